"""The shared Ansible runner without hosts: inventory, error mapping, the per-cluster lock."""
from __future__ import annotations

import pytest

from backends import ansible
from backends.connections import Connections, SshConnection
from backends.metal import MetalBackend
from backends.vsphere.addresses import allocate
from models.errors import InFlight, OwnershipConflict, PermanentError, TransientError
from models.resolve import resolve

CONN = Connections(ssh=SshConnection(user="admin", private_key_file="/keys/id", extra_args="-o A=b", host_key_checking=False,
                                     supervisor="/opt/fw-supervise"),
                   kube_binaries={"kube-apiserver": "/b/kube-apiserver", "kube-controller-manager": "/b/kcm",
                                  "etcd": "/b/etcd"})


def test_inventory_groups_and_vars_from_the_cluster_spec(example_defs):
    d = resolve(example_defs, "dc1-web-dev")
    machines = allocate(d.name, d.backend.ip_pool, d.machines, {})  # a vSphere VM's address comes from the backend
    inv = ansible.inventory(machines, d, CONN)["all"]
    assert set(inv["children"]["control_plane"]["hosts"]) == {"dc1-web-dev-cp-0"}
    assert set(inv["children"]["workers"]["hosts"]) == {"dc1-web-dev-general-0"}
    w = inv["children"]["workers"]["hosts"]["dc1-web-dev-general-0"]
    assert w == {"ansible_host": "127.0.1.21", "fw_role": "worker", "fw_node_name": "dc1-web-dev-general-0",
                 "fw_pool": "general", "fw_labels": {}}
    v = inv["vars"]
    assert v["fw_cluster"] == "dc1-web-dev" and v["fw_version"] == d.kubernetes_version
    assert v["ansible_user"] == "root"  # the cluster spec's sshUser wins over the connection default
    assert v["ansible_ssh_private_key_file"] == "/keys/id" and v["ansible_ssh_common_args"].endswith("-o A=b")
    assert v["supervisor"] == "/opt/fw-supervise" and v["etcd_bin"] == "/b/etcd"
    assert v["kube_apiserver_bin"] == "/b/kube-apiserver" and v["kube_controller_manager_bin"] == "/b/kcm"


def test_kubeadm_path_inventory_carries_the_site_settings_and_no_supervisor(example_defs):
    from backends.connections import KubeNodeSettings

    d = resolve(example_defs, "edge-lab-01")
    conn = Connections(ssh=SshConnection(private_key_file="/keys/id"),
                       kubernetes=KubeNodeSettings(source="artefacts", artefacts_url="http://files.example:8080",
                                                   versions={"1.20": "v1.20.2"}))
    v = ansible.inventory(list(d.machines), d, conn)["all"]["vars"]
    assert "supervisor" not in v  # playbooks/group_vars/all.yml: fw_mode is kubeadm
    assert v["fw_kube"]["source"] == "artefacts" and v["fw_kube"]["versions"] == {"1.20": "v1.20.2"}
    assert v["fw_kube"]["pod_subnet"] == "10.244.0.0/16" and v["fw_kube"]["token_ttl"] == "15m"
    assert "fw_kube" not in ansible.inventory(list(d.machines), d, CONN)["all"]["vars"]


def test_metal_inventory_lists_spare_hosts_for_scale_down(example_defs):
    d = resolve(example_defs, "edge-lab-01")
    assert [m.name for m in MetalBackend(CONN).hosts(d)] == ["lab01-a", "lab01-b"]


def test_no_ssh_connection_is_a_permanent_error(example_defs):
    d = resolve(example_defs, "edge-lab-01")
    with pytest.raises(PermanentError, match="no SSH connection"):
        ansible.inventory(list(d.machines), d, Connections())


@pytest.mark.parametrize("kwargs, error", [
    (dict(status="timeout", rc=254, failures=[], unreachable=[]), TransientError),
    (dict(status="failed", rc=4, failures=[], unreachable=[("h1", "ssh: connect timed out")]), TransientError),
    (dict(status="failed", rc=2, failures=[("h1", "etcd", "failed etcd: exited at once")], unreachable=[]),
     PermanentError),
    (dict(status="failed", rc=2, failures=[("h1", "wait for /readyz", "Status code was -1: Connection refused")],
          unreachable=[]), TransientError),
    (dict(status="failed", rc=2, failures=[("h1", "refuse", "OWNERSHIP CONFLICT: host h1 is marked for x")],
          unreachable=[]), OwnershipConflict),
    (dict(status="failed", rc=1, failures=[], unreachable=[]), PermanentError),
])
def test_errors_are_mapped_in_one_place(kwargs, error):
    with pytest.raises(error) as e:
        ansible._raise_for("x.yml", "c1", timeout=10, **kwargs)
    assert type(e.value) is error or issubclass(type(e.value), error)
    if kwargs["failures"] and error is PermanentError:
        assert "etcd" in str(e.value) and "exited at once" in str(e.value)  # task name and message


def test_successful_run_raises_nothing():
    ansible._raise_for("x.yml", "c1", "successful", 0, [], [], 10)


def test_guard_refuses_a_second_run_in_the_worker_and_is_reported():
    assert ansible.in_flight("c1") == []
    with ansible.guard("c1", "prepare.yml"):
        assert "prepare.yml" in ansible.in_flight("c1")[0]
        with pytest.raises(InFlight):
            with ansible.guard("c1"):
                pass
        with ansible.guard("c2"):  # another cluster is independent
            pass
    assert ansible.in_flight("c1") == []


def test_host_keys_are_checked_unless_the_connection_says_not():
    strict = ansible.ssh_args(SshConnection(private_key_file="/k", known_hosts_file="/kh"))
    assert strict.startswith("-o StrictHostKeyChecking=yes -o UserKnownHostsFile=/kh")
    assert "StrictHostKeyChecking=no" not in ansible.ssh_args(SshConnection(private_key_file="/k"))
    off = ansible.ssh_args(SshConnection(private_key_file="/k", host_key_checking=False))
    assert "StrictHostKeyChecking=no" in off
    with pytest.raises(PermanentError, match="known_hosts"):
        ansible.ssh_args(SshConnection(private_key_file="/k", extra_args="-o StrictHostKeyChecking=no"))


@pytest.mark.parametrize("message, error", [
    ("Failed to connect to the host via ssh: root@127.0.1.5: Permission denied (publickey).", PermanentError),
    ("Failed to connect to the host via ssh: Host key verification failed.", PermanentError),
    ("Failed to connect to the host via ssh: ssh: connect to host 127.0.1.5 port 22: Connection refused",
     TransientError),
    ("Failed to connect to the host via ssh: Connection timed out during banner exchange", TransientError),
])
def test_an_authentication_failure_is_permanent_an_unreachable_host_transient(message, error):
    with pytest.raises(error) as e:
        ansible._raise_for("x.yml", "c1", "failed", 4, [], [("h1", message)], 10)
    assert type(e.value) is error


def test_the_control_plane_upgrade_brings_every_member_the_new_images_but_upgrades_only_the_control_plane(
        example_defs, monkeypatch, tmp_path):
    """`kubeadm upgrade apply` moves kube-proxy on every node at once: the control-plane step's run has every
    member in its limit for upgrade.yml's image play, and its upgrade plays pick only the control plane
    (checked with ansible-playbook --list-hosts on the generated inventory, ~2 s)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from backends.ansible import AnsibleResult, HostState
    from models.plan import Step

    d = resolve(example_defs, "edge-lab-01")
    b = MetalBackend(CONN)
    hosts = b.hosts(d)
    monkeypatch.setattr(b, "_states", lambda desired, hosts=None: {
        m.name: HostState(machine=m, marker=d.name, state={"role": m.role, "pool": m.pool, "version": "1.20"},
                          ca=None, processes={}) for m in hosts})
    runs = []
    monkeypatch.setattr(b, "_run", lambda playbook, desired, limit=None, **ev: runs.append((playbook, limit, ev))
                        or AnsibleResult(changed=True, ok=[], failed=[], unreachable=[], stats={}))
    pool = d.node_pools[0].name
    for action, obj in (("controlPlane.upgrade", "control-plane"), ("nodePool.upgrade", pool)):
        b.apply_hosts(d, Step(id=action, cluster=d.name, action=action, target="infrastructure", object=obj,
                              reason="test", params={"version": "1.21"}))
    (pb1, limit1, ev1), (pb2, limit2, ev2) = runs
    assert pb1 == pb2 == "upgrade.yml"
    assert sorted(m.name for m in limit1) == sorted(m.name for m in hosts)  # workers too: the images
    assert ev1["fw_upgrade_group"] == "control_plane" and ev2["fw_upgrade_group"] == "workers"
    assert sorted(m.name for m in limit2) == sorted(m.name for m in hosts if m.role == "worker")

    inv = tmp_path / "hosts.json"
    inv.write_text(json.dumps(ansible.inventory(hosts, d, CONN)))
    pb = Path(ansible.__file__).resolve().parent.parent / "playbooks" / "upgrade.yml"

    def plays(group: str, limit) -> list[list[str]]:
        out = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inv), str(pb),
                              "--list-hosts", "-e", f"fw_upgrade_group={group}", "--limit", ",".join(m.name for m in limit)],
                             capture_output=True, text=True, check=True).stdout
        got: list[list[str]] = []
        for line in out.splitlines():
            if line.strip().startswith("play #"):
                got.append([])
            elif got and line.startswith("      ") and line.strip():
                got[-1].append(line.strip())
        return [sorted(p) for p in got]

    cps = [m.name for m in hosts if m.role == "controlPlane"]
    workers = sorted(m.name for m in hosts if m.role == "worker")
    assert plays("control_plane", limit1) == [sorted(m.name for m in hosts), cps, []]
    assert workers  # (the workers step's plays mirror it: "workers:&workers"; one ansible-playbook call is enough)
