"""The kubeadm path end to end: `create-cluster` of a metal cluster on machines (testenv/machines.py).

Three systemd-nspawn machines (1 control plane + 2 workers) get production Kubernetes from the
playbooks through the flows and a real Prefect server: containerd, kubelet under systemd,
`kubeadm init` with stacked TLS etcd, workers joined with a short-lived bootstrap token. The test
checks what a platform engineer would: every node Ready at the expected kubelet version, the
control-plane Pods Running, a Pod of a team running on a worker, and a re-run that changes nothing.

Fixed machine addresses (10.250.0.11-13): in tests/run.sh's ONPREM list; by hand, hold
/tmp/fw-machines.lock. The machines are stopped at the end of the module.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from kubernetes import client as k8s

from .conftest import EXAMPLES

pytestmark = pytest.mark.timeout(1500)

CLUSTER = "metal-k8s"
HOSTS = {"mk-cp": ("controlPlane", 1), "mk-w1": ("worker", 2), "mk-w2": ("worker", 3)}
CLUSTER_YAML = """apiVersion: fleetwright.io/v1alpha1
kind: Cluster
metadata:
  name: {name}
  labels: {{env: dev, tier: edge, region: emea}}
spec:
  model: edge-small@1.0.0
  driftMode: correct
  variables: {{environment: dev}}
  overrides:
    nodePools: [{{name: workers, replicas: 2}}]
  backend:
    type: metal
    hosts:
{hosts}
"""


@pytest.fixture(scope="module")
def metal(tmp_path_factory, testenv_config, machines_env, prefect_api):
    import testenv
    from backends.definitions import load_path
    from testenv import machines
    from testenv.connections import write_connections

    root = tmp_path_factory.mktemp("metal-kubeadm") / "defs"
    shutil.copytree(EXAMPLES, root)
    hosts = "\n".join(f"      - {{name: {n}, address: {machines.machine_address(i)}, role: {r}}}"
                      for n, (r, i) in HOSTS.items())
    (root / "clusters" / "metal-k8s.yaml").write_text(CLUSTER_YAML.format(name=CLUSTER, hosts=hosts))
    t0 = time.monotonic()
    for n, (_, i) in HOSTS.items():
        machines.ensure_machine(testenv_config, n, machines.machine_address(i), fresh=True)
    print(f"3 fresh machines booted in {time.monotonic() - t0:.1f}s")
    conns = write_connections(root.parent / "connections.json", testenv.read_env(testenv_config), machines=True)
    saved = {k: os.environ.get(k) for k in ("FLEETWRIGHT_CONNECTIONS", "FLEETWRIGHT_USE_BLOCKS",
                                            "FLEETWRIGHT_RETRY_BASE_SECONDS")}
    os.environ.update({"FLEETWRIGHT_CONNECTIONS": str(conns), "FLEETWRIGHT_USE_BLOCKS": "0",
                       "FLEETWRIGHT_RETRY_BASE_SECONDS": "0.2"})
    from tasks.blocks import connections

    connections.cache_clear()
    try:
        yield {"root": root, "defs": load_path(root), "connections": json.loads(conns.read_text()),
               "cfg": testenv_config}
    finally:
        for n in HOSTS:
            mem = machines.machine_memory_mb(n)
            print(f"machine {n}: {mem:.0f} MB" if mem else f"machine {n}: not running")
            machines.stop_machine(testenv_config, n)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        connections.cache_clear()


def _api(metal):
    from backends import registry
    from backends.connections import Connections
    from backends.kube import api_client
    from models.resolve import resolve

    d = resolve(metal["defs"], CLUSTER)
    access = registry.infrastructure(d, Connections.model_validate(metal["connections"])).kube_access(d)
    return api_client(access), access


def _wait(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            r = fn()
            if r:
                return r
        except Exception as e:  # noqa: BLE001 - not yet
            last = e
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what} (last: {last})")


def test_create_metal_cluster_with_kubeadm_then_rerun_changes_nothing(metal):
    from flows.lifecycle import create_cluster
    from tasks.definitions import DefinitionsSource
    from testenv import machines

    src = DefinitionsSource(path=str(metal["root"]))
    t0 = time.monotonic()
    out = create_cluster(cluster=CLUSTER, source=src, actor="alice")
    print(f"create-cluster {CLUSTER} (1 control plane + 2 workers): {time.monotonic() - t0:.1f}s")
    (c,) = out["clusters"]
    assert c["status"] == "converged", c
    api, access = _api(metal)
    assert access.server == f"https://{machines.machine_address(1)}:6443" and access.token is None
    core = k8s.CoreV1Api(api)
    nodes = {n.metadata.name: n for n in core.list_node().items}
    assert set(nodes) == set(HOSTS)
    for name, n in nodes.items():
        ready = {c.type: c.status for c in n.status.conditions}["Ready"]
        assert ready == "True", f"node {name} is not Ready"
        assert n.status.node_info.kubelet_version == "v1.20.2", name
        assert n.status.node_info.container_runtime_version.startswith("containerd://"), name
    assert nodes["mk-w1"].metadata.labels["fleetwright.io/pool"] == "workers"
    assert "node-role.kubernetes.io/worker" in nodes["mk-w2"].metadata.labels
    # the control plane really runs as static Pods under the kubelet, etcd with TLS
    pods = core.list_namespaced_pod("kube-system").items
    running = {p.metadata.name.removesuffix("-mk-cp"): p.status.phase for p in pods}
    for comp in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd"):
        assert running.get(comp) == "Running", (comp, running)
    etcd = next(p for p in pods if p.metadata.name.startswith("etcd-"))
    cmd = " ".join(etcd.spec.containers[0].command)
    assert "--client-cert-auth=true" in cmd and "https://" in cmd
    assert sum(1 for p in pods if p.metadata.name.startswith("kube-proxy-") and p.status.phase == "Running") == 3
    # a Pod runs on a worker, with the locally built image
    core.create_namespaced_pod("default", k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name="probe"),
        spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="bb", image=metal_image(metal),
                                                       image_pull_policy="IfNotPresent",
                                                       command=["sh", "-c", "echo hello from $(hostname); sleep 3600"])],
                           restart_policy="Never")))
    pod = _wait(lambda: (p := core.read_namespaced_pod("probe", "default")).status.phase == "Running" and p, 120,
                "Pod probe Running")
    assert pod.spec.node_name in ("mk-w1", "mk-w2")
    # the worker's kubelet really runs the container (logs come from the node)
    assert "hello from probe" in _wait(lambda: core.read_namespaced_pod_log("probe", "default"), 60, "probe logs")
    core.delete_namespaced_pod("probe", "default", grace_period_seconds=0)
    # no static token, no supervisor: the bootstrap token used for the join was short-lived
    r = machines.ssh(metal["cfg"], machines.machine_address(1),
                     "grep -c token-auth-file /etc/kubernetes/manifests/kube-apiserver.yaml; "
                     "grep -o 'authorization-mode=.*' /etc/kubernetes/manifests/kube-apiserver.yaml", check=False)
    assert r.stdout.split()[0] == "0" and "Node,RBAC" in r.stdout
    t1 = time.monotonic()
    again = create_cluster(cluster=CLUSTER, source=src, actor="alice")
    print(f"create-cluster re-run: {time.monotonic() - t1:.1f}s")
    assert again["clusters"][0]["status"] == "in-sync", again


def metal_image(metal) -> str:
    from testenv.machines import BUSYBOX_IMAGE

    return BUSYBOX_IMAGE


def test_upgrade_cluster_changes_the_binaries_on_every_node_and_a_budgeted_pod_keeps_running(metal):
    """After create: upgrade-cluster 1.20 -> 1.21 through the flow (kubeadm upgrade apply on the control
    plane, then each worker drained through the eviction API, one at a time)."""
    from flows.lifecycle import upgrade_cluster
    from tasks.definitions import DefinitionsSource
    from testenv import machines

    api, _ = _api(metal)
    core, apps = k8s.CoreV1Api(api), k8s.AppsV1Api(api)
    assert {n.status.node_info.kubelet_version for n in core.list_node().items} == {"v1.20.2"}, "create ran first"
    labels = {"app": "budgeted"}
    apps.create_namespaced_deployment("default", k8s.V1Deployment(
        metadata=k8s.V1ObjectMeta(name="budgeted"),
        spec=k8s.V1DeploymentSpec(replicas=2, selector=k8s.V1LabelSelector(match_labels=labels),
                                  template=k8s.V1PodTemplateSpec(
                                      metadata=k8s.V1ObjectMeta(labels=labels),
                                      spec=k8s.V1PodSpec(termination_grace_period_seconds=1, containers=[k8s.V1Container(
                                          name="bb", image=metal_image(metal), image_pull_policy="IfNotPresent",
                                          command=["sleep", "3600"])])))))
    # Kubernetes 1.20 serves PodDisruptionBudgets as policy/v1beta1 only (the client knows policy/v1)
    k8s.CustomObjectsApi(api).create_namespaced_custom_object("policy", "v1beta1", "default", "poddisruptionbudgets", {
        "apiVersion": "policy/v1beta1", "kind": "PodDisruptionBudget", "metadata": {"name": "budgeted"},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": labels}}})
    _wait(lambda: (apps.read_namespaced_deployment("budgeted", "default").status.available_replicas or 0) == 2, 120,
          "Deployment budgeted available")
    t0 = time.monotonic()
    out = upgrade_cluster(cluster=CLUSTER, to_version="1.21", source=DefinitionsSource(path=str(metal["root"])),
                          actor="alice")
    print(f"upgrade-cluster {CLUSTER} 1.20 -> 1.21: {time.monotonic() - t0:.1f}s")
    assert out["clusters"][0]["status"] == "converged", out
    api, _ = _api(metal)
    core, apps = k8s.CoreV1Api(api), k8s.AppsV1Api(api)
    for n in core.list_node().items:  # node versions moved, every node Ready and schedulable again
        assert n.status.node_info.kubelet_version == "v1.21.0", n.metadata.name
        assert {c.type: c.status for c in n.status.conditions}["Ready"] == "True", n.metadata.name
        assert not n.spec.unschedulable, n.metadata.name
    assert k8s.VersionApi(api).get_code().git_version == "v1.21.0"  # the apiserver's /version
    for n, (_, i) in HOSTS.items():  # the binaries on every node changed
        assert machines.ssh(metal["cfg"], machines.machine_address(i), "kubelet --version").stdout.strip() \
            == "Kubernetes v1.21.0", n
    pods = {p.metadata.name.removesuffix("-mk-cp"): p for p in core.list_namespaced_pod("kube-system").items}
    for comp in ("kube-apiserver", "kube-controller-manager", "kube-scheduler"):
        assert pods[comp].spec.containers[0].image.endswith(":v1.21.0"), comp
        assert pods[comp].status.phase == "Running", comp
    d = apps.read_namespaced_deployment("budgeted", "default")
    assert (d.status.available_replicas or 0) >= 1
