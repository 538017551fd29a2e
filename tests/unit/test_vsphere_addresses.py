"""Stable VM addresses (pure part): recorded addresses are kept, new machines get the lowest free one."""
from __future__ import annotations

import pytest

from backends.kube.drain import _skip_reason, selector_matches
from backends.vsphere.addresses import AddressesExhausted, allocate, pool_addresses
from models.desired import Machine
from models.spec import IpPool

POOL = IpPool(start="10.0.0.10", end="10.0.0.14")


def m(name: str, role: str = "worker", pool: str | None = "p") -> Machine:
    return Machine(name=name, role=role, pool=pool if role == "worker" else None)


def test_pool_range_is_inclusive():
    assert pool_addresses(POOL) == ["10.0.0.10", "10.0.0.11", "10.0.0.12", "10.0.0.13", "10.0.0.14"]


def test_recorded_addresses_are_kept_and_new_machines_get_the_lowest_free():
    machines = [m("cp-0", "controlPlane"), m("a-0"), m("b-0"), m("b-1")]
    recorded = {"cp-0": "10.0.0.10", "b-0": "10.0.0.12", "gone-0": "10.0.0.11"}  # gone-0: still there, leaving
    out = {x.name: x.address for x in allocate("c", POOL, machines, recorded)}
    assert out == {"cp-0": "10.0.0.10", "a-0": "10.0.0.13", "b-0": "10.0.0.12", "b-1": "10.0.0.14"}


def test_order_of_machines_does_not_move_a_recorded_address():
    recorded = {"a-0": "10.0.0.14", "a-1": "10.0.0.10"}
    out = {x.name: x.address for x in allocate("c", POOL, [m("a-1"), m("a-0"), m("a-2")], recorded)}
    assert out == {"a-0": "10.0.0.14", "a-1": "10.0.0.10", "a-2": "10.0.0.11"}


def test_exhaustion_names_cluster_range_and_need():
    recorded = {f"x-{i}": f"10.0.0.{10 + i}" for i in range(4)}
    with pytest.raises(AddressesExhausted) as e:
        allocate("edge-7", POOL, [m(f"x-{i}") for i in range(4)] + [m("y-0"), m("y-1")], recorded)
    msg = str(e.value)
    assert "cluster edge-7" in msg and "10.0.0.10-10.0.0.14" in msg and "1 free" in msg
    assert "2 new VM(s)" in msg and "y-0, y-1" in msg and "nothing was cloned" in msg


def test_drain_skips_daemonset_and_mirror_pods_only():
    ds = {"metadata": {"ownerReferences": [{"kind": "DaemonSet", "controller": True, "name": "x"}]}}
    rs = {"metadata": {"ownerReferences": [{"kind": "ReplicaSet", "controller": True, "name": "x"}]}}
    mirror = {"metadata": {"annotations": {"kubernetes.io/config.mirror": "abc"}}}
    assert _skip_reason(ds) == "DaemonSet pod" and _skip_reason(mirror) == "mirror pod"
    assert _skip_reason(rs) is None and _skip_reason({"metadata": {}}) is None


def test_pdb_selector_matching():
    labels = {"app": "web", "tier": "front"}
    assert selector_matches({"matchLabels": {"app": "web"}}, labels)
    assert not selector_matches({"matchLabels": {"app": "db"}}, labels)
    assert selector_matches({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["front"]}]}, labels)
    assert not selector_matches({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["front"]}]}, labels)
    assert selector_matches({"matchExpressions": [{"key": "x", "operator": "DoesNotExist"}]}, labels)
    assert not selector_matches({"matchExpressions": [{"key": "x", "operator": "Exists"}]}, labels)
    assert selector_matches({}, labels) and not selector_matches(None, labels)
