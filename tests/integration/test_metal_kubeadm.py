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
SPARE = {"mk-w3": ("worker", 4)}  # listed in the spec, joined by the scale-up test
FIRST = ("mk-cp", "mk-w1", "mk-w2")
CLUSTER_YAML = """apiVersion: fleetwright.io/v1alpha1
kind: Cluster
metadata:
  name: {name}
  labels: {{env: dev, tier: edge, region: emea, fleet: machines}}
spec:
  model: edge-small@1.0.0
  driftMode: correct
  variables: {{environment: dev}}
  overrides:
    nodePools: [{{name: workers, replicas: {replicas}}}]
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
    write_cluster(root, replicas=2)
    t0 = time.monotonic()
    for n, (_, i) in {**HOSTS, **SPARE}.items():
        machines.ensure_machine(testenv_config, n, machines.machine_address(i), fresh=True)
    print(f"4 fresh machines booted in {time.monotonic() - t0:.1f}s")
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
        for n in {**HOSTS, **SPARE}:
            mem = machines.machine_memory_mb(n)
            print(f"machine {n}: {mem:.0f} MB" if mem else f"machine {n}: not running")
            machines.stop_machine(testenv_config, n)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        connections.cache_clear()


def write_cluster(root, replicas: int, hosts: dict | None = None) -> None:
    """The cluster's definition: the hosts listed (spares included) and the workers pool's size."""
    from testenv import machines

    hosts = hosts if hosts is not None else {**HOSTS, **SPARE}
    lines = "\n".join(f"      - {{name: {n}, address: {machines.machine_address(i)}, role: {r}}}"
                      for n, (r, i) in hosts.items())
    (root / "clusters" / "metal-k8s.yaml").write_text(CLUSTER_YAML.format(name=CLUSTER, hosts=lines, replicas=replicas))


def _reload(metal) -> None:
    from backends.definitions import load_path

    metal["defs"] = load_path(metal["root"])


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
    assert set(nodes) == set(FIRST)
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
    # the flow's verify phase waited for the components' workloads: kube-prometheus runs (its stand-in image)
    prom = k8s.AppsV1Api(api).read_namespaced_deployment("prometheus", "monitoring")
    assert (prom.status.available_replicas or 0) == prom.spec.replicas == 1
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


def test_scale_the_pool_up_then_down_drains_and_resets_the_leaving_host(metal):
    """A spare host joins when the pool grows (Ready, labelled, at the cluster's version); when it
    shrinks again the leaving worker is drained through the eviction API (its Pods move), reset with
    kubeadm, and its Node is gone."""
    from flows.lifecycle import create_cluster
    from tasks.definitions import DefinitionsSource
    from testenv import machines

    src = DefinitionsSource(path=str(metal["root"]))
    write_cluster(metal["root"], replicas=3)
    t0 = time.monotonic()
    out = create_cluster(cluster=CLUSTER, source=src, actor="alice")
    print(f"scale up 2 -> 3 workers (prepare + join mk-w3): {time.monotonic() - t0:.1f}s")
    assert out["clusters"][0]["status"] == "converged", out
    api, _ = _api(metal)
    core, apps = k8s.CoreV1Api(api), k8s.AppsV1Api(api)
    w3 = core.read_node("mk-w3")
    assert {c.type: c.status for c in w3.status.conditions}["Ready"] == "True"
    assert w3.status.node_info.kubelet_version == "v1.20.2" and w3.metadata.labels["fleetwright.io/pool"] == "workers"
    # a workload that prefers the new node runs there
    labels = {"app": "mover"}
    affinity = k8s.V1Affinity(node_affinity=k8s.V1NodeAffinity(
        preferred_during_scheduling_ignored_during_execution=[k8s.V1PreferredSchedulingTerm(
            weight=100, preference=k8s.V1NodeSelectorTerm(match_expressions=[k8s.V1NodeSelectorRequirement(
                key="kubernetes.io/hostname", operator="In", values=["mk-w3"])]))]))
    apps.create_namespaced_deployment("default", k8s.V1Deployment(
        metadata=k8s.V1ObjectMeta(name="mover"),
        spec=k8s.V1DeploymentSpec(replicas=1, selector=k8s.V1LabelSelector(match_labels=labels),
                                  template=k8s.V1PodTemplateSpec(
                                      metadata=k8s.V1ObjectMeta(labels=labels),
                                      spec=k8s.V1PodSpec(affinity=affinity, termination_grace_period_seconds=1,
                                                         containers=[k8s.V1Container(
                                                             name="bb", image=metal_image(metal),
                                                             image_pull_policy="IfNotPresent", command=["sleep", "3600"])])))))
    first = _wait(lambda: [p for p in core.list_namespaced_pod("default", label_selector="app=mover").items
                           if p.status.phase == "Running"], 120, "Pod of mover Running")[0]
    assert first.spec.node_name == "mk-w3"

    write_cluster(metal["root"], replicas=2)
    t1 = time.monotonic()
    out = create_cluster(cluster=CLUSTER, source=src, actor="alice")
    print(f"scale down 3 -> 2 workers (drain + kubeadm reset of mk-w3): {time.monotonic() - t1:.1f}s")
    assert out["clusters"][0]["status"] == "converged", out
    assert "mk-w3" not in {n.metadata.name for n in core.list_node().items}
    # the drain evicted the Pod: its Deployment runs it again on a worker that stays
    moved = _wait(lambda: [p for p in core.list_namespaced_pod("default", label_selector="app=mover").items
                           if p.status.phase == "Running" and p.metadata.uid != first.metadata.uid], 120, "mover moved")[0]
    assert moved.spec.node_name in ("mk-w1", "mk-w2")
    apps.delete_namespaced_deployment("mover", "default")
    r = machines.ssh(metal["cfg"], machines.machine_address(SPARE["mk-w3"][1]),
                     "systemctl is-active kubelet; ls /etc/kubernetes /etc/fleetwright/cluster 2>&1 | wc -l; "
                     "pgrep -c kube-proxy || true", check=False)
    active, left, proxies = r.stdout.split()[:3]
    assert active != "active" and proxies == "0", r.stdout
    assert int(left) == 2, r.stdout  # two "No such file or directory" lines: nothing left of the cluster


# heavy until fixed: the new health gate finds kube-proxy v1.21.0 in ImagePullBackOff after the control-plane
# upgrade (the v1.21 image is not pre-loaded on the workers); a real gap the old gate could not see
@pytest.mark.heavy
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


# heavy with the upgrade test: after it, kube-proxy's ImagePullBackOff fails this gate first
@pytest.mark.heavy
def test_the_gate_fails_naming_a_node_whose_kubelet_stopped(metal, monkeypatch):
    """The verify gate judges the nodes by their status: a stopped kubelet makes its Node NotReady
    (the node lifecycle controller, ~40 s) and the gate fails naming it."""
    from models.errors import GateFailed
    from models.resolve import resolve
    from tasks.cluster import observe_cluster, verify_health
    from testenv import machines

    addr = machines.machine_address(HOSTS["mk-w2"][1])
    api, _ = _api(metal)
    core = k8s.CoreV1Api(api)
    d = resolve(metal["defs"], CLUSTER)
    observed = observe_cluster.fn(d)
    machines.ssh(metal["cfg"], addr, "systemctl stop kubelet")
    try:
        _wait(lambda: {c.type: c.status for c in core.read_node("mk-w2").status.conditions}["Ready"] != "True", 180,
              "Node mk-w2 not Ready")
        monkeypatch.setenv("FLEETWRIGHT_HEALTH_TIMEOUT_SECONDS", "10")
        with pytest.raises(GateFailed, match=r"Node/mk-w2: not Ready \(NodeStatusUnknown") as e:
            verify_health.fn(d, observed)
        print(f"gate failed as it should: {e.value}")
        assert not any("mk-w1" in p.subject for p in e.value.problems)
    finally:
        machines.ssh(metal["cfg"], addr, "systemctl start kubelet")
    _wait(lambda: {c.type: c.status for c in core.read_node("mk-w2").status.conditions}["Ready"] == "True", 180,
          "Node mk-w2 Ready again")
    monkeypatch.delenv("FLEETWRIGHT_HEALTH_TIMEOUT_SECONDS")
    verify_health.fn(d, observed)  # and the same gate passes again


BROKEN = """apiVersion: fleetwright.io/v1alpha1
kind: Component
metadata: {name: broken-probe}
spec:
  version: 1.0.0
  namespace: broken-probe
  healthTimeoutSeconds: 40
  source:
    manifests:
      - apiVersion: apps/v1
        kind: Deployment
        metadata: {name: probe}
        spec:
          replicas: 1
          selector: {matchLabels: {app: probe}}
          template:
            metadata: {labels: {app: probe}}
            spec:
              containers:
                - {name: probe, image: "registry.fleetwright.test/no-such-image:1.0"}
"""


def test_a_component_whose_image_cannot_run_fails_the_flow_naming_its_deployment(metal):
    """add-component applies a Deployment whose image no node can get: the flow's verify phase waits
    the component's healthTimeoutSeconds, then fails naming the Deployment, its Pod and why."""
    from flows.lifecycle import add_component
    from tasks.definitions import DefinitionsSource

    (metal["root"] / "components" / "broken-probe.yaml").write_text(BROKEN)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"Deployment/broken-probe/probe: 0 of 1 replicas available.*"
                                           r"Pod/broken-probe/probe-\S+ container probe waiting: (ErrImagePull|ImagePullBackOff)"):
        add_component(component="broken-probe", selector={"fleet": "machines"},
                      source=DefinitionsSource(path=str(metal["root"])), actor="alice", write_back="off")
    print(f"add-component of an image that cannot run failed after {time.monotonic() - t0:.1f}s")


def test_decommission_refuses_a_host_of_another_cluster_then_resets_every_host(metal):
    """decommission-cluster stops before any change when a listed host carries another cluster's
    marker; without it, every host is reset (kubeadm reset, what fleetwright installed removed)."""
    from flows.lifecycle import decommission_cluster
    from tasks.definitions import DefinitionsSource
    from testenv import machines

    src = DefinitionsSource(path=str(metal["root"]))
    spare = machines.machine_address(SPARE["mk-w3"][1])
    machines.ssh(metal["cfg"], spare, "mkdir -p /etc/fleetwright && echo other-cluster > /etc/fleetwright/cluster")
    with pytest.raises(Exception, match=r"mk-w3 .* is marked for cluster 'other-cluster'"):
        decommission_cluster(cluster=CLUSTER, confirm=CLUSTER, source=src, actor="alice")
    api, _ = _api(metal)
    assert {n.metadata.name for n in k8s.CoreV1Api(api).list_node().items} == set(FIRST)  # nothing changed

    write_cluster(metal["root"], replicas=2, hosts=HOSTS)  # the foreign host is no longer listed
    t0 = time.monotonic()
    decommission_cluster(cluster=CLUSTER, confirm=CLUSTER, source=src, actor="alice")
    print(f"decommission-cluster (kubeadm reset of 3 hosts): {time.monotonic() - t0:.1f}s")
    for n, (_, i) in HOSTS.items():
        r = machines.ssh(metal["cfg"], machines.machine_address(i),
                         "systemctl is-active kubelet; ls -d /etc/kubernetes /var/lib/etcd /etc/fleetwright/cluster "
                         "/etc/fleetwright/state.json 2>/dev/null | wc -l; "
                         "pgrep -c -x 'kubelet|kube-apiserver|etcd|kube-proxy|kube-scheduler|kube-controller' || true", check=False)
        active, left, procs = r.stdout.split()[:3]
        assert active != "active" and left == "0" and procs == "0", (n, r.stdout)
    assert machines.ssh(metal["cfg"], spare, "cat /etc/fleetwright/cluster").stdout.strip() == "other-cluster"
