"""A scheduled sweep never deletes by itself: destructive repairs wait for a person's approval.

fw-dev (driftMode: correct) carries two things fleetwright owns that its definition no longer names:
the component external-dns (installed by fleetwright, not in the model) and a node group ``extra``
(made by fleetwright, not in the model). The sweep repairs a ConfigMap drift at once, holds the two
removals, lists them, and asks once. Rejected or timed out: nothing is removed, and the run says so.
Approved: both are removed and the approver is recorded. Real Prefect server, moto's EKS, a real
kube-apiserver.
"""
from __future__ import annotations

import pytest
from kubernetes import client as k8s

from .conftest import eks, kube_client
from .pauses import run_answering

SELECTOR = {"tier": "flowtest", "env": "dev"}  # fw-canary (not created: absent) and fw-dev


def src(fleet):
    from tasks.definitions import DefinitionsSource

    return DefinitionsSource(path=str(fleet["root"]))


@pytest.fixture(scope="module")
def fw_dev(aws_fleet):
    from flows.lifecycle import create_cluster
    from tasks.guard import forget_imperative

    # a cluster of the same name in another module of this Prefect server may have left a write-back-off record
    forget_imperative("fw-dev", "external-dns")

    out = create_cluster(cluster="fw-dev", source=src(aws_fleet), actor="bob")
    assert out["clusters"][0]["status"] == "converged", out
    return aws_fleet


def add_extras(fleet) -> None:
    """Things of ours the definition does not name: a component and a node pool, made by fleetwright itself."""
    from backends.definitions import load_path
    from models.resolve import Resolver
    from models.spec import ModelComponent
    from tasks.cluster import converge

    r = Resolver(load_path(fleet["root"]))
    with_dns = r.resolve("fw-dev", (ModelComponent(name="external-dns"),))
    out = converge(with_dns, dry_run=False, idempotency_key="extras", step_filter=lambda s: s.object == "external-dns",
                   versions_matter=False)
    assert out.status in ("converged", "in-sync"), out
    d = r.resolve("fw-dev")
    extra = d.node_pools[0].model_copy(update={"name": "extra"})
    with_pool = d.model_copy(update={"node_pools": [*d.node_pools, extra], "hash": d.hash + "-extra"})
    out = converge(with_pool, dry_run=False, idempotency_key="extras", step_filter=lambda s: s.object == "extra")
    assert out.status in ("converged", "in-sync"), out
    assert_extras_present(fleet)


def namespaces(fleet) -> set[str]:
    return {n.metadata.name for n in k8s.CoreV1Api(kube_client(fleet["endpoints"]["fw-dev"])).list_namespace().items}


def pools(fleet) -> list[str]:
    return sorted(eks(fleet["aws"]).list_nodegroups(clusterName="fw-dev")["nodegroups"])


def assert_extras_present(fleet) -> None:
    assert "external-dns" in namespaces(fleet)
    assert pools(fleet) == ["extra", "workers"]


def drift_retention(fleet) -> k8s.CoreV1Api:
    core = k8s.CoreV1Api(kube_client(fleet["endpoints"]["fw-dev"]))
    core.patch_namespaced_config_map("prometheus-settings", "monitoring", {"data": {"retention": "1h"}})
    return core


def held_artifact() -> list[dict]:
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as c:
        (art,) = c.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["reconcile-fleet-held"])))
    rows = art.data if isinstance(art.data, list) else json.loads(art.data)
    return [(r["cluster"], r["action"], r["object"]) for r in rows]


HELD = [("fw-dev", "component.remove", "external-dns"), ("fw-dev", "nodePool.delete", "extra")]


def while_paused(fleet, core):
    """While the sweep waits: the removals are listed and not done; the ConfigMap repair is already done."""
    def check():
        assert held_artifact() == HELD
        assert_extras_present(fleet)
        assert core.read_namespaced_config_map("prometheus-settings", "monitoring").data["retention"] == "3d"
    return check


@pytest.mark.parametrize("answer,rule", [({"approver": "bob", "approve": False, "comment": "keep it"}, "approval-rejected"),
                                         ({"approver": "carol", "approve": True}, "approver-authorized"),
                                         (None, "approval-timed-out")])
def test_sweep_does_nothing_destructive_without_approval(fw_dev, answer, rule):
    from flows.reconcile import reconcile_fleet

    add_extras(fw_dev)
    core = drift_retention(fw_dev)
    state = run_answering(reconcile_fleet, "reconcile-fleet", answer, check_paused=while_paused(fw_dev, core),
                          selector=SELECTOR, source=src(fw_dev), approval_timeout_seconds=6 if answer is None else 120)
    assert_extras_present(fw_dev)
    assert state.is_completed() and state.name == "Drift", state  # drift that stays, as in report mode
    assert "destructive repairs not approved, nothing destructive done: fw-dev" in state.message
    result = state.result()
    assert result["counts"] == {"absent": 1, "awaiting-approval": 1}
    assert (result["approval"]["approved"], result["approval"]["rule"]) == (False, rule)
    assert [(s["cluster"], s["action"], s["object"]) for s in result["approval"]["steps"]] == HELD
    by = {c["cluster"]: c for c in result["clusters"]}
    assert by["fw-canary"]["status"] == "absent"
    dev = by["fw-dev"]
    assert dev["status"] == "awaiting-approval"
    assert [d["action"] for d in dev["done"]] == ["component.configure"]  # the non-destructive repair went ahead
    assert [(h["action"], h["object"]) for h in dev["held"]] == [(a, o) for _, a, o in HELD]
    assert dev["reason"].startswith(f"destructive repairs not done ({rule}): ")
    assert dev["reason"].endswith("waiting: component.remove external-dns; nodePool.delete extra")


def test_sweep_carries_out_destructive_repairs_once_approved(fw_dev):
    from flows.reconcile import reconcile_fleet

    add_extras(fw_dev)
    core = drift_retention(fw_dev)
    state = run_answering(reconcile_fleet, "reconcile-fleet", {"approver": "alice", "approve": True, "comment": "CHG-9"},
                          check_paused=while_paused(fw_dev, core), selector=SELECTOR, source=src(fw_dev),
                          approval_timeout_seconds=120)
    assert state.is_completed() and state.name == "Completed", state
    result = state.result()
    assert result["counts"] == {"absent": 1, "corrected": 1}
    a = result["approval"]
    assert (a["approved"], a["approver"], a["rule"], a["comment"]) == (True, "alice", "approved", "CHG-9")
    dev = {c["cluster"]: c for c in result["clusters"]}["fw-dev"]
    assert dev["status"] == "corrected" and dev["reason"] == "destructive repairs approved by alice"
    assert [d["action"] for d in dev["done"]] == ["component.configure", "component.remove", "nodePool.delete"]
    assert "external-dns" not in namespaces(fw_dev)
    assert pools(fw_dev) == ["workers"]
    again = reconcile_fleet(selector=SELECTOR, source=src(fw_dev), approval_timeout_seconds=6)
    assert again["counts"] == {"absent": 1, "in-sync": 1} and again["approval"] is None
