"""The vSphere backend at fleet scale, against vcsim plus SSH hosts: addresses, sessions, batched observation.

* C1 stable addresses: a cluster ``vs-addr`` with two worker pools (model ``two-pools``, written
  here) on the pool 127.0.1.30-37; changing the control-plane replicas, a pool's ``maxSize`` and
  another pool's replicas moves no existing VM's address (positional addresses moved every
  worker); an exhausted pool is an error before anything is cloned.
* C2 one session per process: a worker process observes 20 times from 5 threads with ONE vCenter
  session, logs in again after vCenter terminates it, and logs out when it exits.
* #13 ``observe_many``: one PropertyCollector query over fleetwright's folder for many clusters,
  with the same result as ``observe`` per cluster.

Only ``infrastructure.ensure`` runs here (VMs plus ``prepare.yml``); no Kubernetes is started.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backends.base import CLUSTER_KEY
from backends.connections import Connections, SshConnection, VsphereConnection
from backends.definitions import read_tree
from backends.vsphere import ADDRESS_KEY, AddressesExhausted, VsphereBackend
from models.load import load
from models.plan import Step
from models.resolve import resolve
from testenv import hosts, kube, vcsim
from testenv.common import Config

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "fleet"
CLUSTER = "vs-addr"
POOL = [f"127.0.1.{n}" for n in range(30, 38)]
MODEL = """apiVersion: fleetwright.io/v1alpha1
kind: ClusterModel
metadata: {name: two-pools, version: 1.0.0}
spec:
  description: Two worker pools and nothing else (stable-address tests)
  kubernetes: {version: "1.20"}
  controlPlane: {replicas: 1, size: small}
  nodePools:
    - {name: system, size: small, replicas: 1, minSize: 0, maxSize: 2}
    - {name: gpu, size: small, replicas: 1, minSize: 0, maxSize: 2}
"""


def files() -> dict[str, str]:
    return {k.replace(str(EXAMPLES) + "/", ""): v for k, v in read_tree(EXAMPLES).items()}


def desired(cp=1, sys_rep=2, sys_max=2, gpu_rep=1, gpu_max=2):
    f = files()
    f["models/two-pools.yaml"] = MODEL
    f["clusters/vs-addr.yaml"] = f"""apiVersion: fleetwright.io/v1alpha1
kind: Cluster
metadata: {{name: {CLUSTER}, labels: {{env: dev}}}}
spec:
  model: two-pools@1.0.0
  driftMode: report
  owner: payments
  overrides:
    controlPlaneReplicas: {cp}
    nodePools:
      - {{name: system, replicas: {sys_rep}, maxSize: {sys_max}}}
      - {{name: gpu, replicas: {gpu_rep}, maxSize: {gpu_max}}}
  backend:
    type: vsphere
    datacenter: DC0
    cluster: DC0_C0
    datastore: LocalDS_0
    template: fw-ubuntu-template
    network: VM Network
    ipPool: {{start: {POOL[0]}, end: {POOL[-1]}, prefix: 24, gateway: 127.0.1.1}}
"""
    return resolve(load(f), CLUSTER)


def example(name: str):
    return resolve(load(files()), name)


def ensure(b: VsphereBackend, d):
    return b.apply(d, Step(id=f"{d.name}/infrastructure.ensure/test", cluster=d.name, action="infrastructure.ensure",
                           target="infrastructure", object=d.name, reason="test"))


def addresses(section) -> dict[str, tuple[str, str]]:
    """VM name -> (address attribute, guestinfo address) of every VM marked for ``vs-addr``."""
    return {n: (v["marks"].get(ADDRESS_KEY), v["extra"].get("guestinfo.fleetwright.address"))
            for n, v in vcsim.marked_vms(section, CLUSTER_KEY, CLUSTER).items()}


@pytest.fixture(scope="module")
def env(vsphere_env, testenv_config, tmp_path_factory):
    cfg = Config(state_dir=tmp_path_factory.mktemp("vsphere-fleet") / "state", cache_dir=testenv_config.cache_dir)
    section = hosts.up(cfg, n=0)
    for a in POOL[:6]:
        hosts.ensure_host(cfg, a)
    conn = Connections(
        vsphere=VsphereConnection(host=vsphere_env["host"], port=vsphere_env["port"], user=vsphere_env["user"],
                                  password=vsphere_env["password"], insecure=True),
        ssh=SshConnection(user=section["user"], private_key_file=section["private_key"],
                          known_hosts_file=section["known_hosts"], supervisor=section["supervisor"]),
        kube_binaries=kube.binaries(cfg))
    lines: list[str] = []
    backend = VsphereBackend(conn, log=lines.append)
    big = desired(cp=2, sys_max=3, gpu_rep=2)
    try:
        backend.delete(big)  # leftovers of an earlier run
        yield {"backend": backend, "conn": conn, "vsphere": vsphere_env, "lines": lines}
        backend.delete(big)
    finally:
        hosts.down(cfg)


def test_addresses_stay_when_replicas_and_max_size_change(env):
    b, vs = env["backend"], env["vsphere"]
    ensure(b, desired())
    first = addresses(vs)
    assert first == {f"{CLUSTER}-cp-0": (POOL[0],) * 2, f"{CLUSTER}-system-0": (POOL[1],) * 2,
                     f"{CLUSTER}-system-1": (POOL[2],) * 2, f"{CLUSTER}-gpu-0": (POOL[3],) * 2}
    # one more control-plane VM, pool "system" may grow to 3, pool "gpu" gets a second VM: positional
    # addresses would have moved every worker (the gpu block started after system's maxSize)
    ensure(b, desired(cp=2, sys_max=3, gpu_rep=2))
    second = addresses(vs)
    assert {n: second[n] for n in first} == first  # no existing VM moved
    assert second[f"{CLUSTER}-cp-1"] == (POOL[4],) * 2 and second[f"{CLUSTER}-gpu-1"] == (POOL[5],) * 2
    o = b.observe(desired(cp=2, sys_max=3, gpu_rep=2))
    assert o.infrastructure  # every VM there, marked, powered on; its host (at its address) prepared


def test_an_exhausted_pool_is_an_error_before_anything_is_cloned(env):
    b, vs = env["backend"], env["vsphere"]
    ensure(b, desired(cp=2, sys_max=3, gpu_rep=2))  # its own starting point (unchanged when the test above ran)
    before = addresses(vs)
    assert len(before) == 6
    clones = sum("cloning" in ln for ln in env["lines"])
    # system shrinks to 1 (its second VM still holds an address until the scale-down), gpu grows to 5:
    # 3 new VMs, 2 free addresses; the definitions are valid (2 + 1 + 5 addresses at maxSize)
    d = desired(cp=2, sys_rep=1, sys_max=1, gpu_rep=5, gpu_max=5)
    with pytest.raises(AddressesExhausted) as e:
        ensure(b, d)
    msg = str(e.value)
    assert f"cluster {CLUSTER}" in msg and f"{POOL[0]}-{POOL[-1]}" in msg, msg
    assert "2 free address(es)" in msg and "3 new VM(s)" in msg and f"{CLUSTER}-gpu-4" in msg, msg
    assert addresses(vs) == before and sum("cloning" in ln for ln in env["lines"]) == clones


def test_observe_many_reads_every_cluster_with_one_property_collector_query(env, monkeypatch):
    from pyVmomi import vim

    b = env["backend"]
    ensure(b, desired(cp=2, sys_max=3, gpu_rep=2))  # its own starting point: one cluster there, two absent
    ds = [desired(cp=2, sys_max=3, gpu_rep=2), example("dc1-web-prod"), example("dc1-web-dev")]
    stub = b.session.content().propertyCollector._stub
    listings = []
    real = stub.InvokeMethod

    def counting(mo, info, args, *rest, **kw):  # VM listings on the wire: RetrieveProperties over a ContainerView
        if info.wsdlName in ("RetrieveProperties", "RetrievePropertiesEx") and any(
                isinstance(o.obj, vim.view.ContainerView) for spec in args[0] for o in spec.objectSet):
            listings.append(len(args[0][0].objectSet))
        return real(mo, info, args, *rest, **kw)

    monkeypatch.setattr(stub, "InvokeMethod", counting)
    many = b.observe_many(ds)
    assert len(listings) == 1, listings  # one query for all three clusters
    one_by_one = {d.name: b.observe(d) for d in ds}
    assert len(listings) == 4  # observe: one query per cluster
    monkeypatch.undo()
    assert set(many) == {d.name for d in ds}
    for d in ds:
        assert many[d.name] == one_by_one[d.name], d.name
    assert many[CLUSTER].infrastructure and not many["dc1-web-prod"].infrastructure


_WORKER = r"""
import json, sys, threading
from backends.connections import Connections
from backends.vsphere import VsphereBackend
from backends.vsphere import session as sessions
from backends.definitions import load_path
from models.resolve import resolve

conn = Connections.model_validate_json(sys.stdin.readline())
d = resolve(load_path(sys.argv[1]), "dc1-web-prod")  # not created: observing it is vSphere calls only
errors = []

def work():
    try:
        for _ in range(4):
            VsphereBackend(conn).observe(d)  # a backend per call, as the tasks make them
    except Exception as e:
        errors.append(repr(e))

def report():
    s = sessions.session(conn.vsphere, 60.0)
    print(json.dumps({"key": s.key(), "logins": s.logins, "sessions": len(sessions.sessions()), "errors": errors}),
          flush=True)

threads = [threading.Thread(target=work) for _ in range(5)]
[t.start() for t in threads]
[t.join() for t in threads]
report()
sys.stdin.readline()  # the test terminated our session on the vCenter
VsphereBackend(conn).observe(d)
report()
sys.stdin.readline()  # exit normally: atexit logs out
"""


def test_one_session_per_worker_process_relogin_and_logout_at_exit(env):
    from pyVim.connect import Disconnect

    vs = env["vsphere"]
    si = vcsim.connect(vs)  # the test's own session, to look at the vCenter's session list
    try:
        sm = si.RetrieveContent().sessionManager

        def keys() -> set[str]:
            return {s.key for s in sm.sessionList}

        base = keys()
        conn = {"vsphere": {"host": vs["host"], "port": vs["port"], "user": vs["user"], "password": vs["password"],
                            "insecure": True}}  # on stdin, never in argv
        p = subprocess.Popen([sys.executable, "-c", _WORKER, str(EXAMPLES)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            p.stdin.write(json.dumps(conn) + "\n")
            p.stdin.flush()
            first = json.loads(p.stdout.readline())
            assert first["errors"] == [] and first["logins"] == 1 and first["sessions"] == 1, first
            assert keys() - base == {first["key"]}  # 20 observes from 5 threads: one session on the vCenter
            sm.TerminateSession([first["key"]])  # as an idle timeout or an administrator would
            p.stdin.write("\n")
            p.stdin.flush()
            second = json.loads(p.stdout.readline())
            assert second["logins"] == 2 and second["key"] != first["key"], second  # logged in again, once
            assert keys() - base == {second["key"]}
            p.stdin.write("\n")
            p.stdin.flush()
            assert p.wait(60) == 0
        finally:
            if p.poll() is None:
                p.kill()
        assert keys() - base == set()  # logged out at exit
    finally:
        Disconnect(si)
