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
import threading
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


class UpgradeWatch(threading.Thread):
    """Samples the nodes and the budgeted Deployment's Pods while an upgrade runs (its own API client)."""

    def __init__(self, api):
        super().__init__(daemon=True)
        from kubernetes import client as kc

        self.core = kc.CoreV1Api(kc.ApiClient(api.configuration))
        self.stop = threading.Event()
        self.samples, self.max_cordoned, self.min_ready, self.pods_seen = 0, 0, 1 << 30, 0
        self.cordon_order: list[str] = []
        self.cordoned_together: list[list[str]] = []
        self.errors: list[str] = []

    def run(self):
        uids: set[str] = set()
        while not self.stop.is_set():
            try:
                cordoned = sorted(n.metadata.name for n in self.core.list_node(_request_timeout=10).items
                                  if n.spec.unschedulable)
                pods = self.core.list_namespaced_pod("default", label_selector="app=budgeted", _request_timeout=10).items
            except Exception as e:  # noqa: BLE001 - the apiserver restarts during its upgrade: not a sample
                self.errors.append(type(e).__name__)
                time.sleep(0.5)
                continue
            ready = [p for p in pods if p.status.phase == "Running" and not p.metadata.deletion_timestamp
                     and all(c.ready for c in p.status.container_statuses or [])]
            uids |= {p.metadata.uid for p in pods}
            self.samples += 1
            self.min_ready = min(self.min_ready, len(ready))
            self.pods_seen = len(uids)
            self.max_cordoned = max(self.max_cordoned, len(cordoned))
            if len(cordoned) > 1:
                self.cordoned_together.append(cordoned)
            for n in cordoned:
                if n not in self.cordon_order:
                    self.cordon_order.append(n)
            time.sleep(0.5)


# heavy until it has passed twice in a row: the gap that made it heavy (kube-proxy v1.21.0 in ImagePullBackOff
# on the workers after the control-plane upgrade) is fixed (upgrade.yml imports the new images on every node
# first). Its one run since (518 s at load 12-16): converged, one node cordoned at a time, the budget held; it
# failed only on a 4th worker the scale test's reset had left (a reset.yml bug, fixed since)
@pytest.mark.heavy
def test_upgrade_cluster_changes_the_binaries_on_every_node_and_a_budgeted_pod_keeps_running(metal):
    """After create: upgrade-cluster 1.20 -> 1.21 through the flow. Every node gets the 1.21 images
    first (kubeadm upgrade apply moves kube-proxy on every node at once), then kubeadm upgrade apply on
    the control plane, then each worker drained through the eviction API, one at a time, while a
    Deployment whose PodDisruptionBudget allows one Pod down keeps a Pod running throughout."""
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
    watch = UpgradeWatch(api)
    watch.start()
    t0 = time.monotonic()
    try:
        out = upgrade_cluster(cluster=CLUSTER, to_version="1.21", source=DefinitionsSource(path=str(metal["root"])),
                              actor="alice")
    finally:
        watch.stop.set()
        watch.join(30)
    print(f"upgrade-cluster {CLUSTER} 1.20 -> 1.21: {time.monotonic() - t0:.1f}s; {watch.samples} samples, "
          f"cordoned in turn: {watch.cordon_order}")
    assert out["clusters"][0]["status"] == "converged", out
    # one node at a time out of service, every node drained in its turn (control plane first)
    assert watch.max_cordoned == 1, watch.cordoned_together
    assert watch.cordon_order[0] == "mk-cp" and sorted(watch.cordon_order[1:]) == sorted(
        n.metadata.name for n in core.list_node().items if n.metadata.name != "mk-cp"), watch.cordon_order
    # the budget held: a Pod of the Deployment was Running and ready in every sample, and one was evicted
    assert watch.samples > 20 and watch.min_ready >= 1, (watch.samples, watch.min_ready)
    assert watch.pods_seen > 2, "no budgeted Pod was evicted and replaced"
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


@pytest.mark.heavy  # with the upgrade test it follows (passed after it once, 98 s)
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


# --------------------------------------------------------------------------- a flow process killed


def _start_flow(metal, code: str, log) -> "subprocess.Popen":
    """A flow run in a process of its own (the environment of this one: Prefect server, connections)."""
    import subprocess
    import sys

    from .workers import ROOT

    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ), start_new_session=True,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def _on_machine(name: str, prefix: str) -> list[str]:
    """Command lines of the machine's processes that start with ``prefix``."""
    from testenv import machines

    from .test_crash_onprem import cmdline

    return [c for p in machines.machine_processes(name) if (c := cmdline(p)).startswith(prefix)]


def _kill(proc) -> None:
    """SIGKILL the flow process only (as the OOM killer would); nothing it started here may be left."""
    import signal

    from backends import private

    from .test_crash_onprem import descendants, live, mentioning, private_prefix
    from .workers import wait_until

    before = descendants(proc.pid)
    assert before, "the flow process had no ansible-playbook to orphan"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    prefix = private_prefix(proc.pid)
    wait_until(lambda: not mentioning(prefix) and not any(live(p) for p in before), 60,
               f"the killed run's processes to die: {mentioning(prefix)}")
    wait_until(lambda: not any(d.name.startswith(f"p{proc.pid}-") for d in private.root().iterdir()), 30,
               "the killed run's private directory (keys, Ansible data) to be removed")


def _unsettled() -> list[str]:
    """What a run may have left running on the machines: a kubeadm command, an SSH session (Ansible's modules
    run in one, pipelined: ``/bin/sh -c /usr/bin/python3 && sleep 0``)."""
    return [f"{n}: {c[:100]}" for n in HOSTS for c in _on_machine(n, "")
            if "kubeadm " in c or c.startswith("sshd: root@") or "sleep 0" in c]


def _settled() -> None:
    from .workers import wait_until

    wait_until(lambda: not _unsettled(), 120, f"kubeadm and SSH sessions on the machines to end: {_unsettled()}")


@pytest.mark.heavy  # 16 min at load 8-16 (passed once): its own create and upgrade, each resumed after the 60 s lease
def test_a_flow_killed_in_kubeadm_init_and_in_a_worker_upgrade_converges_when_run_again(metal, tmp_path):
    """create-cluster killed while `kubeadm init` runs, then the same run again: the cluster converges with
    one Node per host; upgrade-cluster killed while a worker is drained, then again: every node at the new
    version, none left cordoned. Nothing of the killed runs is left, here or on the machines."""
    from flows.lifecycle import create_cluster, decommission_cluster, upgrade_cluster
    from tasks.definitions import DefinitionsSource
    from testenv import machines

    from .workers import wait_until

    root = metal["root"]
    src = DefinitionsSource(path=str(root))
    write_cluster(root, replicas=2, hosts=HOSTS)
    decommission_cluster(cluster=CLUSTER, confirm=CLUSTER, source=src, actor="alice")  # from scratch (a no-op
    # after the module's decommission test)
    _reload(metal)
    log = tmp_path / "flows.log"
    t0 = time.monotonic()
    key = f"kill-create-{time.time_ns()}"
    proc = _start_flow(metal, "from flows.lifecycle import create_cluster; from tasks.definitions import "
                       f"DefinitionsSource; create_cluster(cluster={CLUSTER!r}, source=DefinitionsSource(path="
                       f"{str(root)!r}), idempotency_key={key!r}, actor='alice')", log)
    wait_until(lambda: proc.poll() is not None or _on_machine("mk-cp", "/usr/local/bin/kubeadm init"), 600,
               "kubeadm init running on mk-cp", interval=0.2)
    assert proc.poll() is None, f"create-cluster ended before kubeadm init: {log.read_text()[-3000:]}"
    _kill(proc)
    print(f"create-cluster killed in kubeadm init after {time.monotonic() - t0:.1f}s")
    t1 = time.monotonic()
    out = create_cluster(cluster=CLUSTER, source=src, idempotency_key=key, actor="alice")
    print(f"create-cluster run again (waits for the dead run's lease): {time.monotonic() - t1:.1f}s")
    assert out["clusters"][0]["status"] == "converged", out
    api, _ = _api(metal)
    core = k8s.CoreV1Api(api)
    nodes = [n.metadata.name for n in core.list_node().items]
    assert sorted(nodes) == sorted(HOSTS), nodes  # one Node per host, none twice
    for n in core.list_node().items:
        assert {c.type: c.status for c in n.status.conditions}["Ready"] == "True", n.metadata.name
    pods = [p.metadata.name for p in core.list_namespaced_pod("kube-system").items]
    assert sum(p.startswith("etcd-") for p in pods) == 1 and sum(p.startswith("kube-apiserver-") for p in pods) == 1
    _settled()
    assert create_cluster(cluster=CLUSTER, source=src, actor="alice")["clusters"][0]["status"] == "in-sync"

    t2 = time.monotonic()
    key = f"kill-upgrade-{time.time_ns()}"
    proc = _start_flow(metal, "from flows.lifecycle import upgrade_cluster; from tasks.definitions import "
                       f"DefinitionsSource; upgrade_cluster(cluster={CLUSTER!r}, to_version='1.21', source="
                       f"DefinitionsSource(path={str(root)!r}), idempotency_key={key!r}, actor='alice')", log)

    def worker_cordoned():
        try:
            return [n.metadata.name for n in core.list_node(_request_timeout=10).items
                    if n.spec.unschedulable and n.metadata.name != "mk-cp"]
        except Exception:  # noqa: BLE001 - the apiserver restarts during its own upgrade
            return []

    drained = wait_until(lambda: proc.poll() is not None or worker_cordoned(), 900, "a worker cordoned for its upgrade",
                         interval=0.2)
    assert proc.poll() is None, f"upgrade-cluster ended before a worker's upgrade: {log.read_text()[-3000:]}"
    _kill(proc)
    print(f"upgrade-cluster killed while {drained} was drained, after {time.monotonic() - t2:.1f}s")
    t3 = time.monotonic()
    out = upgrade_cluster(cluster=CLUSTER, to_version="1.21", source=src, idempotency_key=key, actor="alice")
    print(f"upgrade-cluster run again: {time.monotonic() - t3:.1f}s")
    assert out["clusters"][0]["status"] == "converged", out
    api, _ = _api(metal)
    core = k8s.CoreV1Api(api)
    nodes = core.list_node().items
    assert sorted(n.metadata.name for n in nodes) == sorted(HOSTS)
    for n in nodes:  # every node at the new version, Ready, and none left cordoned
        assert n.status.node_info.kubelet_version == "v1.21.0", n.metadata.name
        assert {c.type: c.status for c in n.status.conditions}["Ready"] == "True", n.metadata.name
        assert not n.spec.unschedulable, n.metadata.name
    for n, (_, i) in HOSTS.items():
        assert machines.ssh(metal["cfg"], machines.machine_address(i), "kubelet --version").stdout.strip() \
            == "Kubernetes v1.21.0", n
    _settled()
    # and every host's own record agrees: a new run finds nothing to do
    again = upgrade_cluster(cluster=CLUSTER, to_version="1.21", source=src, actor="alice")
    assert again["clusters"][0]["status"] == "in-sync", again
    print(f"kill test: {time.monotonic() - t0:.1f}s in all")


@pytest.mark.heavy  # NOT RUN YET (written at the session's end): a cluster of its own, two control-plane hosts
def test_a_second_control_plane_host_joins_with_a_fresh_certificate_key(metal):
    """create-cluster with two control-plane hosts: kubeadm init on the first, then the second joins with
    --control-plane, the control-plane certificates uploaded encrypted with a key made for the run; it
    runs its own apiserver (serving the cluster's SANs) and etcd member. A re-run changes nothing."""
    from backends.metal import api_ready
    from flows.lifecycle import create_cluster, decommission_cluster
    from tasks.definitions import DefinitionsSource
    from testenv import machines

    root = metal["root"]
    src = DefinitionsSource(path=str(root))
    write_cluster(root, replicas=2, hosts=HOSTS)
    decommission_cluster(cluster=CLUSTER, confirm=CLUSTER, source=src, actor="alice")  # what ran before goes
    two = {"mk-cp": ("controlPlane", 1), "mk-w1": ("controlPlane", 2), "mk-w2": ("worker", 3)}
    write_cluster(root, replicas=1, hosts=two)
    path = root / "clusters" / "metal-k8s.yaml"
    path.write_text(path.read_text().replace("  overrides:\n", "  overrides:\n    controlPlaneReplicas: 2\n"))
    _reload(metal)
    t0 = time.monotonic()
    out = create_cluster(cluster=CLUSTER, source=src, actor="alice")
    print(f"create-cluster with 2 control-plane hosts + 1 worker: {time.monotonic() - t0:.1f}s")
    assert out["clusters"][0]["status"] == "converged", out
    api, access = _api(metal)
    core = k8s.CoreV1Api(api)
    nodes = {n.metadata.name: n for n in core.list_node().items}
    assert set(nodes) == set(two)
    for name, n in nodes.items():
        assert {c.type: c.status for c in n.status.conditions}["Ready"] == "True", name
    assert any(k.startswith("node-role.kubernetes.io/") and k != "node-role.kubernetes.io/worker"
               for k in nodes["mk-w1"].metadata.labels), nodes["mk-w1"].metadata.labels
    pods = {p.metadata.name: p for p in core.list_namespaced_pod("kube-system").items}
    for comp in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"):
        for host in ("mk-cp", "mk-w1"):
            assert pods[f"{comp}-{host}"].status.phase == "Running", (comp, host)
    # the second etcd member joined the first one's cluster
    etcd2 = " ".join(pods["etcd-mk-w1"].spec.containers[0].command)
    assert "--initial-cluster-state=existing" in etcd2 and "mk-cp=https://" in etcd2 and "mk-w1=https://" in etcd2
    # its own apiserver answers on its own address, with a certificate of the cluster's CA
    import base64

    assert api_ready(f"https://{machines.machine_address(2)}:6443", base64.b64decode(access.ca_data).decode())
    # the certificates went through the kubeadm-certs Secret; no key or token is left in a file
    assert core.read_namespaced_secret("kubeadm-certs", "kube-system").data
    for n, (_, i) in two.items():
        r = machines.ssh(metal["cfg"], machines.machine_address(i),
                         "ls /etc/fleetwright/kubeadm-join.yaml /etc/fleetwright/kubeadm-upload-certs.yaml 2>/dev/null "
                         "| wc -l", check=False)
        assert r.stdout.strip() == "0", (n, r.stdout)
    t1 = time.monotonic()
    again = create_cluster(cluster=CLUSTER, source=src, actor="alice")
    print(f"create-cluster re-run (2 control-plane hosts): {time.monotonic() - t1:.1f}s")
    assert again["clusters"][0]["status"] == "in-sync", again
