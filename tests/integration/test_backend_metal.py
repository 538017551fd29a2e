"""The metal backend against real SSH hosts of the test environment (cluster edge-lab-01).

Hosts 127.0.1.111 (control plane), .112 (worker) and .113 (a spare worker for scaling) run
the playbooks for real: etcd + kube-apiserver + kube-controller-manager v1.20.2 on .111, Node
objects for the workers. The tests run in order and share the cluster; the module deletes it at
the start (leftovers of an earlier run) and at the end, so the apiserver's memory is freed.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from backends import ansible
from backends.kube import api_client
from backends.connections import Connections, SshConnection
from backends.definitions import read_tree
from backends.metal import MetalBackend
from models.desired import ObservedCluster
from models.errors import InFlight, OwnershipConflict, TransientError
from models.load import load
from models.plan import Step, plan
from models.resolve import resolve
from testenv import faults, hosts, kube
from testenv.common import Config

pytestmark = pytest.mark.timeout(300)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "fleet"
CLUSTER = "edge-lab-01"
CP, W1, W2 = "127.0.1.111", "127.0.1.112", "127.0.1.113"
TIMINGS: dict[str, float] = {}


def example_files() -> dict[str, str]:
    root = str(EXAMPLES) + "/"
    return {k.replace(root, ""): v for k, v in read_tree(EXAMPLES).items()}


def desired(workers: int = 1, version: str = "1.20", spare: bool = False):
    """edge-lab-01, optionally with the spare host lab01-c listed, more workers, another version."""
    f = example_files()
    if spare or workers > 1:
        f["clusters/metal.yaml"] = f["clusters/metal.yaml"].replace(
            "      - {name: lab01-b, address: 127.0.1.112, role: worker}",
            "      - {name: lab01-b, address: 127.0.1.112, role: worker}\n"
            "      - {name: lab01-c, address: 127.0.1.113, role: worker}", 1)
    if workers != 1:
        marker = "  variables: {environment: dev}\n  backend:\n    type: metal\n    hosts:"
        assert marker in f["clusters/metal.yaml"]
        f["clusters/metal.yaml"] = f["clusters/metal.yaml"].replace(
            marker, marker.replace("  backend:", f"  overrides: {{nodePools: [{{name: workers, replicas: {workers}}}]}}\n  backend:"), 1)
    if version != "1.20":
        f["models/edge-small.yaml"] = f["models/edge-small.yaml"].replace(
            'kubernetes: {version: "1.20"}', f'kubernetes: {{version: "{version}"}}')
    return resolve(load(f), CLUSTER)


def infra_steps(backend, d):
    return [s for s in plan(d, backend.observe(d)).steps if s.target == "infrastructure"]


def kube_client(access, tmp: Path):
    """The CoreV1 API of a cluster, through the kube backend's own client (``tmp`` is unused, kept for callers)."""
    from kubernetes import client

    return client.CoreV1Api(api_client(access))


@pytest.fixture(scope="module")
def env(testenv_config, tmp_path_factory):
    """SSH hosts of this module's own (a private state dir: no other session can stop them)."""
    cfg = Config(state_dir=tmp_path_factory.mktemp("metal-env") / "state", cache_dir=testenv_config.cache_dir)
    section = hosts.up(cfg, n=0)
    for a in (CP, W1, W2):
        hosts.ensure_host(cfg, a)
    conn = Connections(ssh=SshConnection(user=section["user"], private_key_file=section["private_key"],
                                         known_hosts_file=section["known_hosts"], supervisor=section["supervisor"]),
                       kube_binaries=kube.binaries(cfg))
    lines: list[str] = []
    backend = MetalBackend(conn, log=lines.append)
    try:
        backend.delete(desired(spare=True))  # leftovers of an earlier run
        yield {"backend": backend, "section": section, "cfg": cfg, "lines": lines,
               "tmp": tmp_path_factory.mktemp("metal")}
        backend.delete(desired(spare=True))  # stops the apiserver: frees its memory
    finally:
        hosts.down(cfg)
        print("metal timings:", {k: round(v, 1) for k, v in TIMINGS.items()})


def test_create_from_nothing_gives_a_working_api(env):
    b, d = env["backend"], desired()
    t = time.monotonic()
    steps = infra_steps(b, d)
    assert [s.action for s in steps] == ["infrastructure.ensure", "controlPlane.create", "nodePool.create"]
    for s in steps:
        assert b.apply(d, s).changed
    TIMINGS["create"] = time.monotonic() - t
    o = b.observe(d)
    assert o.infrastructure and o.exists and o.kubernetes_version == "1.20" and o.control_plane_replicas == 1
    assert o.node_pools["workers"].replicas == 1 and o.endpoint == f"https://{CP}:6443"
    assert infra_steps(b, d) == []

    access = b.kube_access(d)
    assert access.server == f"https://{CP}:6443" and "***" in repr(access) and access.token not in repr(access)
    assert not any(access.token in line for line in env["lines"])  # the token never reaches the log
    api = kube_client(access, env["tmp"])
    assert "kube-system" in {n.metadata.name for n in api.list_namespace().items}
    nodes = {n.metadata.name: n for n in api.list_node().items}
    assert set(nodes) == {"lab01-b"}
    labels = nodes["lab01-b"].metadata.labels
    assert labels["fleetwright.io/pool"] == "workers" and labels["app.kubernetes.io/managed-by"] == "fleetwright"
    assert labels["fleetwright.io/cluster"] == CLUSTER
    assert {a.address for a in nodes["lab01-b"].status.addresses} >= {W1}


def test_second_apply_changes_nothing(env):
    b, d = env["backend"], desired()
    t = time.monotonic()
    for action in ("infrastructure.ensure", "controlPlane.create", "nodePool.create"):
        step = Step(id=f"{CLUSTER}/{action}/again", cluster=CLUSTER, action=action, target="infrastructure",
                    object="workers" if action.startswith("nodePool") else CLUSTER, reason="again",
                    params={"version": "1.20"})
        r = b.apply(d, step)
        assert r.changed is False, (action, r)
    TIMINGS["re-apply (3 playbooks, no changes)"] = time.monotonic() - t
    out = hosts.ssh(env["section"], CP, f"{env['section']['supervisor']} list").stdout.splitlines()
    assert sorted(ln.split()[0] for ln in out) == ["fw-apiserver", "fw-etcd", "fw-kcm", "fw-node-agent"]  # one of each
    assert all(ln.split()[1] == "running" for ln in out)


def test_a_run_in_flight_is_reported_and_not_overlapped(env):
    b, d = env["backend"], desired()
    with ansible.guard(CLUSTER, "test holds the lock"):
        assert b.observe(d).in_flight  # observe reads without the lock and reports the run
        steps = [s for s in plan(d, b.observe(d).model_copy(update={"infrastructure": False})).steps
                 if s.action == "infrastructure.ensure"]
        with pytest.raises(InFlight):
            b.apply(d, steps[0])
    assert b.observe(d).in_flight == []


def test_observe_many_reads_a_shard_in_one_run_and_isolates_errors(env):
    """Two clusters, one Ansible run: edge-lab-01 is observed as by observe(); edge-store-01's hosts do
    not exist here, so it alone gets a TransientError."""
    b, d = env["backend"], desired()
    other = resolve(load(example_files()), "edge-store-01")
    env["lines"].clear()
    got = b.observe_many([d, other])
    runs = [ln for ln in env["lines"] if ln.startswith("[2-clusters] state.yml:")]
    assert len(runs) == 1 and not any("] state.yml:" in ln for ln in env["lines"] if ln not in runs), env["lines"]
    assert isinstance(got["edge-store-01"], TransientError) and "unreachable" in str(got["edge-store-01"])
    single = b.observe(d)
    assert got[CLUSTER] == single and got[CLUSTER].exists


def test_ssh_authentication_and_host_key_failures_are_permanent(env, tmp_path):
    import subprocess

    from models.errors import PermanentError

    b, d = env["backend"], desired()
    section = env["section"]
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "wrong")], check=True)
    wrong_key = Connections(ssh=SshConnection(user=section["user"], private_key_file=str(tmp_path / "wrong"),
                                              known_hosts_file=section["known_hosts"]))
    with pytest.raises(PermanentError, match="authentication") as e:
        MetalBackend(wrong_key).observe(d)
    assert not isinstance(e.value, TransientError) and "Permission denied" in str(e.value)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other-ca")], check=True)
    (tmp_path / "known_hosts").write_text(f"@cert-authority 127.* {(tmp_path / 'other-ca.pub').read_text()}")
    wrong_ca = Connections(ssh=SshConnection(user=section["user"], private_key_file=section["private_key"],
                                             known_hosts_file=str(tmp_path / "known_hosts")))
    with pytest.raises(PermanentError, match="host-key") as e:
        MetalBackend(wrong_ca).observe(d)
    assert not isinstance(e.value, TransientError)


def test_frozen_host_is_transient_and_the_retry_makes_no_duplicate(env):
    b, d, section = env["backend"], desired(), env["section"]
    step = plan(d, b.observe(d).model_copy(update={"node_pools": {}})).steps[0]
    assert step.action == "nodePool.create"
    faults.host_freeze(section, W1)
    t = time.monotonic()
    try:
        with pytest.raises(TransientError):
            b.observe(d)
        with pytest.raises(TransientError) as e:
            b.apply(d, step)
        assert "unreachable" in str(e.value)
    finally:
        faults.host_thaw(section, W1)
    TIMINGS["frozen host -> TransientError (observe + apply)"] = time.monotonic() - t
    r = b.apply(d, step)  # the retry
    assert r.changed is False
    api = kube_client(b.kube_access(d), env["tmp"])
    assert [n.metadata.name for n in api.list_node().items] == ["lab01-b"]


def test_scale_up_upgrade_and_scale_down(env):
    b = env["backend"]
    api = kube_client(b.kube_access(desired()), env["tmp"])
    # scale the pool up by one (the spare host lab01-c)
    d2 = desired(workers=2)
    t = time.monotonic()
    steps = infra_steps(b, d2)
    assert [s.action for s in steps] == ["infrastructure.ensure", "nodePool.scale"]
    for s in steps:
        assert b.apply(d2, s).changed
    TIMINGS["scale up by one"] = time.monotonic() - t
    o = b.observe(d2)
    assert o.node_pools["workers"].replicas == 2 and infra_steps(b, d2) == []
    assert sorted(n.metadata.name for n in api.list_node().items) == ["lab01-b", "lab01-c"]

    # Kubernetes 1.20 -> 1.21 through the upgrade role (control plane first, then workers)
    d3 = desired(workers=2, version="1.21")
    t = time.monotonic()
    steps = infra_steps(b, d3)
    assert [s.action for s in steps] == ["controlPlane.upgrade", "nodePool.upgrade"]
    pid_before = hosts.ssh(env["section"], CP, f"{env['section']['supervisor']} status fw-apiserver").stdout
    for s in steps:
        assert b.apply(d3, s).changed
    TIMINGS["upgrade 1.20 -> 1.21"] = time.monotonic() - t
    pid_after = hosts.ssh(env["section"], CP, f"{env['section']['supervisor']} status fw-apiserver").stdout
    assert pid_before != pid_after  # restarted (same v1.20.2 binary: see playbooks/README.md)
    o = b.observe(d3)
    assert o.kubernetes_version == "1.21" and o.node_pools["workers"].version == "1.21" and o.exists
    assert infra_steps(b, d3) == []
    assert {n.metadata.labels["fleetwright.io/kubernetes-version"] for n in api.list_node().items} == {"1.21"}
    upgrade_lines = [ln for ln in env["lines"] if "upgrade.yml" in ln]
    assert upgrade_lines
    assert [b.apply(d3, s).changed for s in steps] == [False, False]  # idempotent

    # and back down to one worker: lab01-c is reset, its Node deleted
    d4 = desired(workers=1, version="1.21", spare=True)
    steps = infra_steps(b, d4)
    assert [s.action for s in steps] == ["nodePool.scale"]
    assert b.apply(d4, steps[0]).changed
    assert [n.metadata.name for n in api.list_node().items] == ["lab01-b"]
    assert hosts.ssh(env["section"], W2, "test -e /etc/fleetwright/cluster", check=False).returncode == 1
    assert b.observe(d4).node_pools["workers"].replicas == 1


def test_delete_leaves_nothing(env):
    b, section = env["backend"], env["section"]
    d = desired(version="1.21", spare=True)
    t = time.monotonic()
    assert b.delete(d).changed
    TIMINGS["delete"] = time.monotonic() - t
    o = b.observe(d)
    assert not o.infrastructure and not o.exists and o.node_pools == {}
    for a in (CP, W1, W2):
        out = hosts.ssh(section, a, f"ls -A /etc/fleetwright /var/lib/fleetwright 2>/dev/null; "
                              f"{section['supervisor']} list", check=False).stdout
        assert "running" not in out and "cluster" not in out and "state.json" not in out, (a, out)
    assert b.delete(d).changed is False  # already gone is success


def test_a_host_marked_for_another_cluster_is_refused(env):
    b, section, d = env["backend"], env["section"], desired()
    hosts.ssh(section, W1, "mkdir -p /etc/fleetwright && echo other-cluster > /etc/fleetwright/cluster")
    try:
        with pytest.raises(OwnershipConflict, match="other-cluster"):
            b.observe(d)
        step = next(s for s in plan(d, ObservedCluster(name=d.name)).steps if s.action == "infrastructure.ensure")
        with pytest.raises(OwnershipConflict, match="other-cluster"):
            b.apply(d, step)
        with pytest.raises(OwnershipConflict):
            b.delete(d)
        assert hosts.ssh(section, W1, "cat /etc/fleetwright/cluster").stdout.strip() == "other-cluster"
    finally:
        hosts.ssh(section, W1, "rm -f /etc/fleetwright/cluster")
        b.delete(d)  # lab01-a was prepared while lab01-b was refused: reset it again
