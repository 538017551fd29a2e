"""vSphere on real machines: a VM that fleetwright clones in vcsim really becomes a node.

``testenv/vsphere_machines.py`` backs each vcsim VM whose guestinfo address lies on the machines'
bridge (10.250.0.0/24) with an nspawn machine: powering the VM on boots it, powering it off stops
it, destroying it deletes its disk. The vSphere backend and the playbooks run unchanged: the
backend clones, marks, configures (guestinfo) and powers on VMs, waits for their guests to answer
on SSH, and the production kubeadm path makes them a cluster (dc1-web-dev of the example fleet,
1 control plane + 1 worker, its ipPool moved onto the bridge).

Fixed machine addresses (10.250.0.40-49): in tests/run.sh's MACHINES list; by hand, hold
/tmp/fw-heavy.lock and /tmp/fw-machines.lock. The module destroys its VMs (and so its machines)
at the end.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import time

import pytest
from kubernetes import client as k8s

from .conftest import EXAMPLES

pytestmark = pytest.mark.timeout(1500)

CLUSTER = "dc1-web-dev"
CP, WORKER = f"{CLUSTER}-cp-0", f"{CLUSTER}-general-0"
POOL = "ipPool: {start: 10.250.0.40, end: 10.250.0.48, prefix: 24, gateway: 10.250.0.1}"
PROBE, PROBE_ADDRESS = "vsm-probe", "10.250.0.49"  # outside the cluster's pool


def _wait(fn, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            r = fn()
            if r:
                return r
        except Exception as e:  # noqa: BLE001 - not yet
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last: {last})")


def _running(cfg, name: str) -> bool:
    from testenv import machines

    return machines.read_pid(f"machine-{name}", cfg) is not None


@pytest.fixture(scope="module")
def watched(testenv_config, vsphere_env, machines_env):
    """vcsim's VMs on the bridge are backed by machines (the watcher runs for this module)."""
    from testenv import vsphere_machines

    cfg = testenv_config
    t0 = time.monotonic()
    vsphere_machines.up(cfg)
    print(f"vSphere machines watcher up in {time.monotonic() - t0:.1f}s")
    try:
        yield {"cfg": cfg, "vsphere": vsphere_env, "machines": machines_env}
    finally:
        vsphere_machines.down(cfg)


def _vm(section, name: str):
    from pyVmomi import vim

    from testenv import vcsim

    si = vcsim.connect(section)
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        return si, next((v for v in view.view if v.name == name), None)
    finally:
        view.Destroy()


def _power(section, name: str, on: bool) -> None:
    from pyVim.connect import Disconnect
    from pyVim.task import WaitForTask

    si, vm = _vm(section, name)
    try:
        WaitForTask(vm.PowerOnVM_Task() if on else vm.PowerOffVM_Task())
    finally:
        Disconnect(si)


def test_a_powered_on_vm_boots_its_machine_power_off_stops_it_and_destroy_deletes_it(watched):
    """The test environment alone (no fleetwright): clone the template, give the clone an address in
    guestinfo.metadata as fleetwright does, and drive its power state."""
    from pyVim.connect import Disconnect
    from pyVim.task import WaitForTask
    from pyVmomi import vim

    from testenv import machines, vcsim, vsphere_machines

    cfg, section = watched["cfg"], watched["vsphere"]
    si = vcsim.connect(section)
    try:
        content = si.RetrieveContent()
        tpl = content.searchIndex.FindByInventoryPath(section["template_path"])
        pool = content.searchIndex.FindByInventoryPath(f"{section['datacenter']}/host/{section['cluster']}").resourcePool
        t = tpl.CloneVM_Task(folder=tpl.parent, name=PROBE, spec=vim.vm.CloneSpec(
            location=vim.vm.RelocateSpec(pool=pool), powerOn=False, template=False))
        WaitForTask(t)
        vm = t.info.result
        meta = {"local-hostname": PROBE, "network": {"version": 2, "ethernets": {"nic0": {
            "match": {"name": "e*"}, "addresses": [f"{PROBE_ADDRESS}/24"]}}}}
        WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(extraConfig=[
            vim.option.OptionValue(key="guestinfo.metadata", value=base64.b64encode(json.dumps(meta).encode()).decode()),
            vim.option.OptionValue(key="guestinfo.metadata.encoding", value="base64")])))
        assert not _running(cfg, PROBE), "a powered-off VM has no machine running"
        t0 = time.monotonic()
        WaitForTask(vm.PowerOnVM_Task())
        # booted: the watcher records it once systemd is up (sshd may answer a little earlier)
        _wait(lambda: (vsphere_machines.machine_of(cfg, PROBE) or {}).get("machine") == "running", 120,
              f"{PROBE}'s machine to boot")
        print(f"power-on to machine booted: {time.monotonic() - t0:.1f}s")
        r = machines.ssh(cfg, PROBE_ADDRESS, "hostname; cat /proc/1/comm; echo kept > /var/lib/disk-probe")
        assert r.stdout.split() == [PROBE, "systemd"]
        assert vsphere_machines.machine_of(cfg, PROBE)["address"] == PROBE_ADDRESS

        t0 = time.monotonic()
        WaitForTask(vm.PowerOffVM_Task())
        _wait(lambda: not _running(cfg, PROBE) and not machines.machine_processes(PROBE), 60, f"machine {PROBE} to stop")
        print(f"power-off to machine stopped: {time.monotonic() - t0:.1f}s")
        assert not machines._ssh_banner(PROBE_ADDRESS)

        _wait(lambda: vsphere_machines.machine_of(cfg, PROBE)["machine"] == "stopped", 30, "the record of the stop")
        WaitForTask(vm.PowerOnVM_Task())  # the same disk boots again
        _wait(lambda: (vsphere_machines.machine_of(cfg, PROBE) or {}).get("machine") == "running", 120,
              f"{PROBE} to boot again")
        assert machines.ssh(cfg, PROBE_ADDRESS, "cat /var/lib/disk-probe").stdout.strip() == "kept"

        WaitForTask(vm.PowerOffVM_Task())
        WaitForTask(vm.Destroy_Task())
        _wait(lambda: vsphere_machines.machine_of(cfg, PROBE) is None and not machines._mdir(cfg, PROBE).exists(), 60,
              f"machine {PROBE} to be removed with its VM")
        assert not _running(cfg, PROBE) and not machines.machine_processes(PROBE)
    finally:
        Disconnect(si)


# --------------------------------------------------------------------------- fleetwright on them


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, watched, prefect_api):
    import testenv
    from backends.definitions import load_path
    from testenv.connections import write_connections

    root = tmp_path_factory.mktemp("vsphere-kubeadm") / "defs"
    shutil.copytree(EXAMPLES, root)
    f = root / "clusters" / "vsphere.yaml"
    text = f.read_text()
    old = "ipPool: {start: 127.0.1.20, end: 127.0.1.29, prefix: 24, gateway: 127.0.1.1}"
    assert old in text
    f.write_text(text.replace(old, POOL))
    conns = write_connections(root.parent / "connections.json", testenv.read_env(watched["cfg"]), machines=True)
    saved = {k: os.environ.get(k) for k in ("FLEETWRIGHT_CONNECTIONS", "FLEETWRIGHT_USE_BLOCKS",
                                            "FLEETWRIGHT_RETRY_BASE_SECONDS")}
    os.environ.update({"FLEETWRIGHT_CONNECTIONS": str(conns), "FLEETWRIGHT_USE_BLOCKS": "0",
                       "FLEETWRIGHT_RETRY_BASE_SECONDS": "0.2"})
    from tasks.blocks import connections

    connections.cache_clear()
    env = {**watched, "root": root, "defs": load_path(root), "connections": json.loads(conns.read_text())}
    try:
        yield env
    finally:
        from backends import registry
        from backends.connections import Connections
        from models.resolve import resolve

        d = resolve(env["defs"], CLUSTER)
        try:  # what a failed test left (after the decommission test: nothing)
            registry.infrastructure(d, Connections.model_validate(env["connections"])).delete(d)
        except Exception as e:  # noqa: BLE001 - the watcher's down removes the machines anyway
            print(f"clean-up of {CLUSTER}: {type(e).__name__}: {e}")
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        connections.cache_clear()


def _api(fleet, user: str | None = None):
    from backends import registry
    from backends.connections import Connections
    from backends.kube import api_client
    from models.resolve import resolve

    d = resolve(fleet["defs"], CLUSTER)
    access = registry.infrastructure(d, Connections.model_validate(fleet["connections"])).kube_access(d)
    api = api_client(access)
    if user:
        api.set_default_header("Impersonate-User", user)
    return api, access


def _ready(node) -> str:
    return {c.type: c.status for c in node.status.conditions}["Ready"]


@pytest.mark.heavy
def test_create_vsphere_cluster_on_machines_then_rerun_changes_nothing(fleet):
    from flows.lifecycle import create_cluster
    from tasks.definitions import DefinitionsSource
    from testenv import machines, vsphere_machines

    src = DefinitionsSource(path=str(fleet["root"]))
    t0 = time.monotonic()
    out = create_cluster(cluster=CLUSTER, source=src, actor="alice")
    print(f"create-cluster {CLUSTER} on vSphere machines (1 control plane + 1 worker): {time.monotonic() - t0:.1f}s")
    (c,) = out["clusters"]
    assert c["status"] == "converged", c
    # the VMs fleetwright cloned are the machines the cluster runs on
    cfg = fleet["cfg"]
    for vm, address in ((CP, "10.250.0.40"), (WORKER, "10.250.0.41")):
        entry = vsphere_machines.machine_of(cfg, vm)
        assert entry and entry["address"] == address and entry["machine"] == "running", (vm, entry)
        assert _running(cfg, vm)
    api, access = _api(fleet)
    assert access.server == "https://10.250.0.40:6443" and access.token is None
    core, apps = k8s.CoreV1Api(api), k8s.AppsV1Api(api)
    nodes = {n.metadata.name: n for n in core.list_node().items}
    assert set(nodes) == {CP, WORKER}
    for name, n in nodes.items():
        assert _ready(n) == "True", f"node {name} is not Ready"
        assert n.status.node_info.kubelet_version == "v1.20.2", name
        assert n.status.node_info.container_runtime_version.startswith("containerd://"), name
        ips = {a.type: a.address for a in n.status.addresses}
        assert ips["InternalIP"] == vsphere_machines.machine_of(cfg, name)["address"], (name, ips)
    assert nodes[WORKER].metadata.labels["fleetwright.io/pool"] == "general"
    # the components' workloads run (their stand-in images) and are Available
    deps = {f"{d.metadata.namespace}/{d.metadata.name}": d for d in apps.list_deployment_for_all_namespaces().items}
    assert {"monitoring/prometheus", "ingress-nginx/ingress-nginx-controller", "cert-manager/cert-manager",
            "flux-system/source-controller"} <= set(deps), sorted(deps)
    for key, d in deps.items():
        assert (d.status.available_replicas or 0) == d.spec.replicas, key
    # the team's workspace: bob (a member of payments) runs a Pod there, within the namespace's quota
    bob_api, _ = _api(fleet, user="bob")
    bob = k8s.CoreV1Api(bob_api)
    image = machines.BUSYBOX_IMAGE
    bob.create_namespaced_pod("payments-batch", k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name="batch-job"),
        spec=k8s.V1PodSpec(restart_policy="Never", termination_grace_period_seconds=1, containers=[k8s.V1Container(
            name="job", image=image, image_pull_policy="IfNotPresent",
            command=["sh", "-c", "echo settled by $(hostname); sleep 3600"])])))
    pod = _wait(lambda: (p := core.read_namespaced_pod("batch-job", "payments-batch")).status.phase == "Running" and p,
                120, "the team's Pod Running")
    assert pod.spec.node_name == WORKER
    assert pod.spec.containers[0].resources.limits == {"cpu": "250m", "memory": "256Mi"}  # the team's LimitRange
    assert "settled by batch-job" in _wait(lambda: core.read_namespaced_pod_log("batch-job", "payments-batch"), 60,
                                           "the Pod's logs (from the worker's kubelet)")
    used = _wait(lambda: (q := core.read_namespaced_resource_quota("team-quota", "payments-batch").status.used)
                 and q.get("pods") == "1" and q, 60, "the quota to count the Pod")
    assert used["requests.cpu"] == "250m" and used["limits.memory"] == "256Mi", used
    with pytest.raises(k8s.ApiException) as e:  # beyond the quota: refused
        bob.create_namespaced_pod("payments-batch", k8s.V1Pod(
            metadata=k8s.V1ObjectMeta(name="too-big"),
            spec=k8s.V1PodSpec(containers=[k8s.V1Container(
                name="big", image=image, command=["sleep", "1"],
                resources=k8s.V1ResourceRequirements(requests={"cpu": "9"}, limits={"cpu": "9"}))])))
    assert e.value.status == 403 and "exceeded quota: team-quota" in e.value.body, e.value.body
    with pytest.raises(k8s.ApiException) as e:  # and nothing outside the team's namespaces
        bob.list_namespaced_pod("kube-system")
    assert e.value.status == 403
    core.delete_namespaced_pod("batch-job", "payments-batch", grace_period_seconds=0)

    t1 = time.monotonic()
    again = create_cluster(cluster=CLUSTER, source=src, actor="alice")
    print(f"create-cluster re-run: {time.monotonic() - t1:.1f}s")
    assert again["clusters"][0]["status"] == "in-sync", again


@pytest.mark.heavy
def test_a_vm_powered_off_stops_its_machine_and_a_rerun_powers_it_on_with_its_disk(fleet):
    """Power the worker's VM off behind fleetwright's back: its machine stops. A re-run of
    create-cluster finds the VM off, powers it on, waits for its guest, and the same node (same disk,
    no second join) is Ready again."""
    from flows.lifecycle import create_cluster
    from tasks.definitions import DefinitionsSource
    from testenv import machines

    api, _ = _api(fleet)
    core = k8s.CoreV1Api(api)
    before = core.read_node(WORKER)
    assert _ready(before) == "True", "create ran first"
    t0 = time.monotonic()
    _power(fleet["vsphere"], WORKER, on=False)
    _wait(lambda: not _running(fleet["cfg"], WORKER) and not machines.machine_processes(WORKER), 60, f"machine {WORKER} to stop")
    print(f"power-off of {WORKER} to machine stopped: {time.monotonic() - t0:.1f}s")
    assert not machines._ssh_banner("10.250.0.41")

    t1 = time.monotonic()
    out = create_cluster(cluster=CLUSTER, source=DefinitionsSource(path=str(fleet["root"])), actor="alice")
    print(f"create-cluster after the power-off (power on, boot, node Ready): {time.monotonic() - t1:.1f}s")
    assert out["clusters"][0]["status"] == "converged", out
    assert _running(fleet["cfg"], WORKER)
    after = _wait(lambda: (n := core.read_node(WORKER)) and _ready(n) == "True" and n, 120, f"{WORKER} Ready")
    assert after.metadata.uid == before.metadata.uid  # the same Node: the disk kept its kubelet, no re-join
    assert {n.metadata.name for n in core.list_node().items} == {CP, WORKER}


@pytest.mark.heavy
def test_decommission_destroys_the_vms_and_so_their_machines(fleet):
    from pyVim.connect import Disconnect

    from flows.lifecycle import decommission_cluster
    from tasks.definitions import DefinitionsSource
    from testenv import machines, vsphere_machines

    t0 = time.monotonic()
    decommission_cluster(cluster=CLUSTER, confirm=CLUSTER, source=DefinitionsSource(path=str(fleet["root"])),
                         actor="alice")
    print(f"decommission-cluster (kubeadm reset, VMs destroyed): {time.monotonic() - t0:.1f}s")
    for vm in (CP, WORKER):
        si, ref = _vm(fleet["vsphere"], vm)
        Disconnect(si)
        assert ref is None, f"VM {vm} still exists"
        _wait(lambda: vsphere_machines.machine_of(fleet["cfg"], vm) is None and not machines._mdir(fleet["cfg"], vm).exists(),
              60, f"machine {vm} removed with its VM")
        assert not _running(fleet["cfg"], vm) and not machines.machine_processes(vm)
