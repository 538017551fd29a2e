"""create-cluster end to end on vSphere and bare metal: VMs cloned in vcsim and real SSH hosts get a
real Kubernetes API from the playbooks, and the kube backend installs components and a workspace into it."""
from __future__ import annotations

import shutil

import pytest
from kubernetes import client as k8s

from .conftest import EXAMPLES


@pytest.fixture(scope="module")
def onprem(tmp_path_factory, testenv_config, vsphere_env, ssh_hosts, kube_cluster, prefect_api):
    """kube_cluster: the Kubernetes binaries the playbooks start on the hosts are built and listed."""
    import json
    import os

    import testenv
    from backends.definitions import load_path
    from backends.vsphere.addresses import fresh_addresses
    from models.resolve import resolve
    from testenv import hosts
    from testenv.connections import write_connections

    root = tmp_path_factory.mktemp("onprem") / "defs"
    shutil.copytree(EXAMPLES, root)
    defs = load_path(root)
    started = []
    for name in ("dc1-web-dev", "edge-lab-01"):
        d = resolve(defs, name)  # a VM's static IP / a metal host is a real SSH host here
        for a in fresh_addresses(d) if d.backend.type == "vsphere" else [m.address for m in d.machines]:
            hosts.ensure_host(testenv_config, a)
            started.append(a)
    env = testenv.read_env(testenv_config)
    conns = write_connections(root.parent / "connections.json", env)
    saved = {k: os.environ.get(k) for k in ("FLEETWRIGHT_CONNECTIONS", "FLEETWRIGHT_USE_BLOCKS", "FLEETWRIGHT_RETRY_BASE_SECONDS")}
    os.environ.update({"FLEETWRIGHT_CONNECTIONS": str(conns), "FLEETWRIGHT_USE_BLOCKS": "0",
                       "FLEETWRIGHT_RETRY_BASE_SECONDS": "0.2"})
    from tasks.blocks import connections

    connections.cache_clear()
    yield {"root": root, "defs": defs, "connections": json.loads(conns.read_text())}
    for a in started:  # decommissioning is a test of its own (test_decommission_on_prem)
        hosts.remove_host(testenv_config, a)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    connections.cache_clear()


def _api(cluster: str, onprem):
    from backends import registry
    from backends.connections import Connections
    from backends.kube import api_client
    from models.resolve import resolve

    d = resolve(onprem["defs"], cluster)
    access = registry.infrastructure(d, Connections.model_validate(onprem["connections"])).kube_access(d)
    return api_client(access), access


@pytest.mark.parametrize("cluster", ["edge-lab-01", "dc1-web-dev"])
def test_create_cluster_on_prem_end_to_end(onprem, cluster):
    from flows.lifecycle import create_cluster
    from tasks.definitions import DefinitionsSource

    src = DefinitionsSource(path=str(onprem["root"]))
    out = create_cluster(cluster=cluster, source=src, actor="alice")
    (c,) = out["clusters"]
    assert c["status"] == "converged", c
    api, access = _api(cluster, onprem)
    host = access.server.split("//")[1].split(":")[0]
    assert host.startswith("127.0.1."), access.server  # the API answers at the (VM's) host address
    core = k8s.CoreV1Api(api)
    ns = {n.metadata.name for n in core.list_namespace().items}
    assert {"monitoring", "metallb-system"} <= ns
    cm = core.read_namespaced_config_map("prometheus-settings", "monitoring")
    assert cm.metadata.labels["app.kubernetes.io/managed-by"] == "fleetwright"
    if cluster == "dc1-web-dev":  # payments is granted tier=web clusters: its workspace is there
        assert {"payments", "payments-batch"} <= ns
        assert core.read_namespaced_resource_quota("team-quota", "payments").spec.hard["pods"] == "100"
    again = create_cluster(cluster=cluster, source=src, actor="alice")
    assert again["clusters"][0]["status"] == "in-sync"


@pytest.mark.parametrize("cluster", ["edge-lab-01", "dc1-web-dev"])
def test_decommission_on_prem(onprem, cluster):
    """After create: decommission deletes what carries our marks (VMs by custom attribute, host markers)."""
    from backends import registry
    from backends.connections import Connections
    from flows.lifecycle import decommission_cluster
    from models.resolve import resolve
    from tasks.definitions import DefinitionsSource

    d = resolve(onprem["defs"], cluster)
    infra = registry.infrastructure(d, Connections.model_validate(onprem["connections"]))
    before = infra.observe(d)
    assert before.exists and before.infrastructure, "create-cluster did not run first"
    out = decommission_cluster(cluster=cluster, confirm=cluster, source=DefinitionsSource(path=str(onprem["root"])),
                               actor="alice")
    (c,) = out["clusters"]
    assert c["status"] == "converged", c
    assert [(s["step"], s["changed"]) for s in c["done"]] == [("in-cluster", True), ("infrastructure", True)]
    after = infra.observe(d)
    assert (after.exists, after.infrastructure, after.node_pools, after.components) == (False, False, {}, {})
    again = decommission_cluster(cluster=cluster, confirm=cluster, source=DefinitionsSource(path=str(onprem["root"])),
                                 actor="alice")
    assert [(s["step"], s["changed"]) for s in again["clusters"][0]["done"]] == [("infrastructure", False)]
