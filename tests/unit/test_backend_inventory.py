"""The shared Ansible runner without hosts: inventory, error mapping, the per-cluster lock."""
from __future__ import annotations

import pytest

from backends import ansible
from backends.connections import Connections, SshConnection
from backends.metal import MetalBackend
from models.errors import InFlight, OwnershipConflict, PermanentError, TransientError
from models.resolve import resolve

CONN = Connections(ssh=SshConnection(user="admin", private_key_file="/keys/id", extra_args="-o A=b",
                                     supervisor="/opt/fw-supervise"),
                   kube_binaries={"kube-apiserver": "/b/kube-apiserver", "kube-controller-manager": "/b/kcm",
                                  "etcd": "/b/etcd"})


def test_inventory_groups_and_vars_from_the_cluster_spec(example_defs):
    d = resolve(example_defs, "dc1-web-dev")
    inv = ansible.inventory(list(d.machines), d, CONN)["all"]
    assert set(inv["children"]["control_plane"]["hosts"]) == {"dc1-web-dev-cp-0"}
    assert set(inv["children"]["workers"]["hosts"]) == {"dc1-web-dev-general-0"}
    w = inv["children"]["workers"]["hosts"]["dc1-web-dev-general-0"]
    assert w == {"ansible_host": "127.0.1.21", "fw_role": "worker", "fw_node_name": "dc1-web-dev-general-0",
                 "fw_pool": "general", "fw_labels": {}}
    v = inv["vars"]
    assert v["fw_cluster"] == "dc1-web-dev" and v["fw_version"] == d.kubernetes_version
    assert v["ansible_user"] == "root"  # the cluster spec's sshUser wins over the connection default
    assert v["ansible_ssh_private_key_file"] == "/keys/id" and v["ansible_ssh_common_args"] == "-o A=b"
    assert v["supervisor"] == "/opt/fw-supervise" and v["etcd_bin"] == "/b/etcd"
    assert v["kube_apiserver_bin"] == "/b/kube-apiserver" and v["kube_controller_manager_bin"] == "/b/kcm"


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


def test_cluster_lock_refuses_a_second_run_and_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETWRIGHT_LOCK_DIR", str(tmp_path))
    assert ansible.in_flight("c1") == []
    with ansible.cluster_lock("c1", "prepare.yml"):
        assert "prepare.yml" in ansible.in_flight("c1")[0]
        with pytest.raises(InFlight):
            with ansible.cluster_lock("c1"):
                pass
        with ansible.cluster_lock("c2"):  # another cluster is independent
            pass
    assert ansible.in_flight("c1") == []
