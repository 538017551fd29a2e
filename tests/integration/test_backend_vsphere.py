"""The vSphere backend against vcsim plus real SSH hosts at the VMs' static IPs (cluster dc1-web-dev).

Scaling down drains the leaving node through the cluster's API first (Pods bound to it by
``spec.nodeName``; a PodDisruptionBudget blocks the drain and the VM stays).

vcsim has no guests, so the test environment starts an SSH host at each VM's address
(127.0.1.20 control plane, .21 worker, .22 the worker added by scaling) with
``testenv.hosts.ensure_host`` before the backend bootstraps Kubernetes there with the playbooks.
The tests run in order and share the cluster; the module deletes it at the start and the end.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from backends import ansible
from backends.kube import api_client
from backends.base import CLUSTER_KEY, OWNER_KEY
from backends.connections import Connections, SshConnection, VsphereConnection
from backends.definitions import read_tree
from backends.vsphere import POOL_KEY, VsphereBackend
from models.desired import ObservedCluster
from models.errors import InFlight, OwnershipConflict, TransientError
from models.load import load
from models.plan import Step, plan
from models.resolve import resolve
from testenv import hosts, kube, vcsim
from testenv.common import Config

pytestmark = pytest.mark.timeout(900)  # generous: a loaded 2-core machine made one test take >300 s

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "fleet"
CLUSTER = "dc1-web-dev"
CP, W1, W2 = "127.0.1.20", "127.0.1.21", "127.0.1.22"
TIMINGS: dict[str, float] = {}


def desired(workers: int = 1, version: str = "1.20"):
    f = {k.replace(str(EXAMPLES) + "/", ""): v for k, v in read_tree(EXAMPLES).items()}
    old = "variables: {environment: dev, workers: 1, workerSize: small}"
    assert old in f["clusters/vsphere.yaml"]
    f["clusters/vsphere.yaml"] = f["clusters/vsphere.yaml"].replace(
        old, f'variables: {{environment: dev, workers: {workers}, workerSize: small, kubernetesVersion: "{version}"}}')
    return resolve(load(f), CLUSTER)


def infra_steps(backend, d, observed=None):
    return [s for s in plan(d, observed or backend.observe(d)).steps if s.target == "infrastructure"]


def kube_api(access, tmp: Path):
    """The CoreV1 API of a cluster, through the kube backend's own client (``tmp`` is unused, kept for callers)."""
    from kubernetes import client

    return client.CoreV1Api(api_client(access))


def vms_named(section, name: str):
    """Every VM with this name in the datacenter (vcsim allows duplicates): (vm, {attribute: value})."""
    from pyVim.connect import Disconnect
    from pyVmomi import vim

    si = vcsim.connect(section)
    try:
        content = si.RetrieveContent()
        fields = {f.key: f.name for f in content.customFieldsManager.field or []}
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
        try:
            return [(vm.name, {fields.get(cv.key): cv.value for cv in vm.customValue}, vm.config.hardware.numCPU,
                     vm.config.hardware.memoryMB, {o.key: o.value for o in vm.config.extraConfig},
                     vm.runtime.powerState) for vm in view.view if vm.name == name]
        finally:
            view.Destroy()
    finally:
        Disconnect(si)


def ours(section) -> list[str]:
    """The cluster's VMs, found by custom attribute (a duplicate would show)."""
    return sorted(vcsim.marked_vms(section, CLUSTER_KEY, CLUSTER))


@pytest.fixture(scope="module")
def env(vsphere_env, testenv_config, tmp_path_factory):
    cfg = Config(state_dir=tmp_path_factory.mktemp("vsphere-env") / "state", cache_dir=testenv_config.cache_dir)
    section = hosts.up(cfg, n=0)  # SSH hosts of this module's own (private state dir)
    for a in (CP, W1):
        hosts.ensure_host(cfg, a)
    conn = Connections(
        vsphere=VsphereConnection(host=vsphere_env["host"], port=vsphere_env["port"], user=vsphere_env["user"],
                                  password=vsphere_env["password"], insecure=True),
        ssh=SshConnection(user=section["user"], private_key_file=section["private_key"],
                          known_hosts_file=section["known_hosts"], supervisor=section["supervisor"]),
        kube_binaries=kube.binaries(cfg))
    lines: list[str] = []
    backend = VsphereBackend(conn, log=lines.append)
    try:
        backend.delete(desired(workers=2))  # leftovers of an earlier run
        yield {"backend": backend, "conn": conn, "hosts": section, "cfg": cfg, "vsphere": vsphere_env,
               "lines": lines, "tmp": tmp_path_factory.mktemp("vsphere")}
        backend.delete(desired(workers=2))
    finally:
        hosts.down(cfg)
        print("vsphere timings:", {k: round(v, 1) for k, v in TIMINGS.items()})


def test_create_from_nothing(env):
    b, d, vs = env["backend"], desired(), env["vsphere"]
    t = time.monotonic()
    steps = infra_steps(b, d)
    assert [s.action for s in steps] == ["infrastructure.ensure", "controlPlane.create", "nodePool.create"]
    for s in steps:
        assert b.apply(d, s).changed
    TIMINGS["create"] = time.monotonic() - t
    # the VMs: cloned, marked, sized from the Machine, static IP in guestinfo, powered on
    (cp,) = vms_named(vs, "dc1-web-dev-cp-0")
    (w,) = vms_named(vs, "dc1-web-dev-general-0")
    assert cp[1][OWNER_KEY] == "fleetwright" and cp[1][CLUSTER_KEY] == CLUSTER
    assert w[1][POOL_KEY] == "general"
    assert (cp[2], cp[3]) == (2, 8192) and (w[2], w[3]) == (2, 4096)
    assert cp[4]["guestinfo.fleetwright.address"] == CP and w[4]["guestinfo.fleetwright.address"] == W1
    assert cp[5] == "poweredOn" and w[5] == "poweredOn"

    o = b.observe(d)
    assert o.infrastructure and o.exists and o.kubernetes_version == "1.20" and o.control_plane_replicas == 1
    assert o.node_pools["general"].replicas == 1 and o.node_pools["general"].machine == {"cpu": 2, "memoryMiB": 4096}
    assert infra_steps(b, d, o) == []
    access = b.kube_access(d)
    assert access.server == f"https://{CP}:6443"
    api = kube_api(access, env["tmp"])
    assert "default" in {n.metadata.name for n in api.list_namespace().items}
    assert [n.metadata.name for n in api.list_node().items] == ["dc1-web-dev-general-0"]


def test_second_apply_changes_nothing(env):
    b, d = env["backend"], desired()
    t = time.monotonic()
    for action, obj in (("infrastructure.ensure", CLUSTER), ("controlPlane.create", CLUSTER),
                        ("nodePool.create", "general")):
        r = b.apply(d, Step(id=f"{CLUSTER}/{action}/again", cluster=CLUSTER, action=action, target="infrastructure",
                            object=obj, reason="again", params={"version": "1.20"}))
        assert r.changed is False, r
    TIMINGS["re-apply (no changes)"] = time.monotonic() - t
    assert ours(env["vsphere"]) == ["dc1-web-dev-cp-0", "dc1-web-dev-general-0"]  # no duplicate VM


def test_in_flight_is_refused(env):
    b, d = env["backend"], desired()
    step = plan(d, ObservedCluster(name=CLUSTER)).steps[0]
    with ansible.guard(CLUSTER, "test"):
        assert b.observe(d).in_flight
        with pytest.raises(InFlight):
            b.apply(d, step)


def test_clone_delayed_past_the_timeout_is_transient_and_the_retry_makes_no_duplicate(env):
    """vcsim delays CloneVM_Task beyond the client's timeout: TransientError; the retry finishes the job."""
    b, d2 = env["backend"], desired(workers=2)
    hosts.ensure_host(env["cfg"], W2)
    steps = infra_steps(b, d2)
    assert [s.action for s in steps] == ["infrastructure.ensure", "nodePool.scale"]
    impatient = VsphereBackend(env["conn"], log=env["lines"].append, soap_timeout=1.5)
    t = time.monotonic()
    with vcsim.method_delay(Config(), CloneVM_Task=3000):
        with pytest.raises(TransientError):
            impatient.apply(d2, steps[0])
        time.sleep(2.5)  # the delayed call finishes inside vcsim after our client gave up
    TIMINGS["clone past timeout -> TransientError"] = time.monotonic() - t
    t = time.monotonic()
    for s in steps:  # the retry (and the scale step)
        b.apply(d2, s)
    TIMINGS["retry + scale up by one"] = time.monotonic() - t
    assert len(vms_named(env["vsphere"], "dc1-web-dev-general-1")) == 1  # exactly one VM, marked
    # vcsim finished the timed-out clone; the retry found it unmarked in our folder and adopted it
    assert sum("cloning dc1-web-dev-general-1" in ln for ln in env["lines"]) == 1, env["lines"]
    assert vms_named(env["vsphere"], "dc1-web-dev-general-1")[0][1][CLUSTER_KEY] == CLUSTER
    o = b.observe(d2)
    assert o.node_pools["general"].replicas == 2 and infra_steps(b, d2, o) == []
    api = kube_api(b.kube_access(d2), env["tmp"])
    assert sorted(n.metadata.name for n in api.list_node().items) == ["dc1-web-dev-general-0",
                                                                      "dc1-web-dev-general-1"]


def test_upgrade(env):
    b = env["backend"]
    d3 = desired(workers=2, version="1.21")
    t = time.monotonic()
    steps = infra_steps(b, d3)
    assert [s.action for s in steps] == ["controlPlane.upgrade", "nodePool.upgrade"]
    for s in steps:
        assert b.apply(d3, s).changed
    TIMINGS["upgrade 1.20 -> 1.21"] = time.monotonic() - t
    o = b.observe(d3)
    assert o.kubernetes_version == "1.21" and o.node_pools["general"].version == "1.21"
    assert infra_steps(b, d3, o) == []


def _pod(name: str, node: str, labels: dict | None = None, annotations: dict | None = None) -> dict:
    """A Pod bound to ``node`` (no scheduler or kubelet here: it stays Pending unless its status is set);
    evictions and PodDisruptionBudgets are the API server's own (grace 0: an evicted Pod goes at once)."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": labels or {}, "annotations": annotations or {}},
            "spec": {"nodeName": node, "terminationGracePeriodSeconds": 0, "automountServiceAccountToken": False,
                     "containers": [{"name": "c", "image": "registry.invalid/none:1"}]}}


def test_scale_down_drains_first_and_a_pdb_blocks_it(env):
    """A3: cordon + evict (PDBs honoured) before the VM goes; a blocking PDB leaves the VM; the Node goes last."""
    from backends.kube import KubeBackend

    b, leaving = env["backend"], "dc1-web-dev-general-1"
    d4 = desired(workers=1, version="1.21")
    steps = infra_steps(b, d4)
    assert [s.action for s in steps] == ["nodePool.scale"]
    access = b.kube_access(d4)
    kb = KubeBackend(access)
    api = kube_api(access, env["tmp"])
    for pod in (_pod("web-0", leaving, {"app": "web"}), _pod("batch-0", leaving),
                _pod("static-0", leaving, annotations={"kubernetes.io/config.mirror": "hash"})):
        kb._request("POST", "/api/v1/namespaces/default/pods", body=pod)
    # The API server lets a Pending Pod be evicted whatever its budget says (it disrupts nothing), so
    # web-0 is reported Running and Ready, as its kubelet would (there is none here); batch-0 stays Pending
    api.patch_namespaced_pod_status("web-0", "default", {"status": {
        "phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}})
    pdb = {"apiVersion": "policy/v1beta1", "kind": "PodDisruptionBudget",
           "metadata": {"name": "web-pdb", "namespace": "default"},
           "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "web"}}}}
    kb._request("POST", "/apis/policy/v1beta1/namespaces/default/poddisruptionbudgets", body=pdb)

    impatient = VsphereBackend(env["conn"], log=env["lines"].append, drain_timeout=8, drain_poll=0.5)
    t = time.monotonic()
    with pytest.raises(TransientError) as e:
        impatient.apply(d4, steps[0])
    TIMINGS["scale down blocked by a PDB"] = time.monotonic() - t
    msg = str(e.value)
    assert f"drain of node {leaving}" in msg and "Pod/default/web-0" in msg and "default/web-pdb" in msg, msg
    assert "machine is not removed" in msg
    assert ours(env["vsphere"]) == ["dc1-web-dev-cp-0", "dc1-web-dev-general-0", leaving]  # VM kept
    node = api.read_node(leaving)
    assert node.spec.unschedulable is True  # cordoned
    assert api.read_namespaced_pod("web-0", "default").metadata.deletion_timestamp is None
    assert {p.metadata.name for p in api.list_namespaced_pod("default").items} >= {"web-0", "static-0"}

    kb._request("DELETE", "/apis/policy/v1beta1/namespaces/default/poddisruptionbudgets/web-pdb")
    env["lines"].clear()
    t = time.monotonic()
    r = b.apply(d4, steps[0])
    TIMINGS["scale down by one (drain, stop, destroy, delete Node)"] = time.monotonic() - t
    assert r.changed
    assert r.outputs["drained"][leaving]["evicted"] in (["default/web-0"], ["default/batch-0", "default/web-0"],
                                                        ["default/web-0", "default/batch-0"])
    assert r.outputs["drained"][leaving]["skipped"] == ["default/static-0 (mirror pod)"]
    assert r.outputs["nodes_deleted"] == [leaving]
    lines = env["lines"]
    drained = next(i for i, ln in enumerate(lines) if f"drained node {leaving}" in ln)
    destroyed = next(i for i, ln in enumerate(lines) if f"destroying {leaving}" in ln)
    node_gone = next(i for i, ln in enumerate(lines) if f"deleted Node {leaving}" in ln)
    assert drained < destroyed < node_gone, lines  # evicted before the VM is gone; the Node last
    assert ours(env["vsphere"]) == ["dc1-web-dev-cp-0", "dc1-web-dev-general-0"]
    assert [n.metadata.name for n in api.list_node().items] == ["dc1-web-dev-general-0"]
    assert "web-0" not in {p.metadata.name for p in api.list_namespaced_pod("default").items}
    assert hosts.ssh(env["hosts"], W2, "test -e /etc/fleetwright/cluster", check=False).returncode == 1
    assert infra_steps(b, d4) == []
    kb.close()


def test_delete_leaves_nothing(env):
    b, section = env["backend"], env["hosts"]
    d = desired(version="1.21")
    t = time.monotonic()
    b.delete(d)
    TIMINGS["delete"] = time.monotonic() - t
    assert ours(env["vsphere"]) == []
    o = b.observe(d)
    assert not o.infrastructure and not o.exists
    for a in (CP, W1, W2):
        out = hosts.ssh(section, a, f"ls -A /etc/fleetwright /var/lib/fleetwright 2>/dev/null; "
                              f"{section['supervisor']} list", check=False).stdout
        assert "running" not in out and "cluster" not in out and "state.json" not in out, (a, out)
    assert b.delete(d).changed is False


def test_an_unmarked_same_named_vm_is_refused(env):
    """Someone else's VM named like the worker fleetwright would add: never adopted, changed or deleted."""
    from pyVim.connect import Disconnect
    from pyVim.task import WaitForTask
    from pyVmomi import vim

    b, vs = env["backend"], env["vsphere"]
    si = vcsim.connect(vs)
    try:
        c = si.RetrieveContent()
        tpl = c.searchIndex.FindByInventoryPath(vs["template_path"])
        cl = c.searchIndex.FindByInventoryPath(f"{vs['datacenter']}/host/{vs['cluster']}")
        ds = next(x for x in cl.datastore if x.name == vs["datastore"])
        def clone(folder: str):
            task = tpl.CloneVM_Task(folder=c.searchIndex.FindByInventoryPath(folder), name="dc1-web-dev-general-1",
                                    spec=vim.vm.CloneSpec(location=vim.vm.RelocateSpec(pool=cl.resourcePool, datastore=ds)))
            WaitForTask(task)
            return task.info.result

        d2 = desired(workers=2, version="1.21")
        # elsewhere in the datacenter: no collision with ours (names are unique per folder), never touched
        elsewhere = clone(f"{vs['datacenter']}/vm")
        try:
            assert b.observe(d2).infrastructure is False
            foreign = clone(f"{vs['datacenter']}/vm/{vs['folder']}")  # inside fleetwright's folder: refused
            try:
                with pytest.raises(OwnershipConflict, match="dc1-web-dev-general-1"):
                    b.observe(d2)
                with pytest.raises(OwnershipConflict, match="dc1-web-dev-general-1"):
                    b.apply(d2, plan(d2, ObservedCluster(name=CLUSTER)).steps[0])
                b.delete(d2)  # nothing of ours is left; the foreign VMs are not touched
                left = vms_named(vs, "dc1-web-dev-general-1")
                assert len(left) == 2 and all(CLUSTER_KEY not in v[1] for v in left)  # untouched
            finally:
                WaitForTask(foreign.Destroy_Task())
        finally:
            WaitForTask(elsewhere.Destroy_Task())
    finally:
        Disconnect(si)
