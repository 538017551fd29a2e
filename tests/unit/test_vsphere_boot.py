"""A VM powered on is not yet a host: the vSphere backend waits for its guest's SSH banner, and the
test environment reads a VM's address from guestinfo as cloud-init would."""
from __future__ import annotations

import base64
import json
import socket
import threading

import pytest

from backends.connections import Connections, SshConnection, VsphereConnection
from backends.vsphere import VsphereBackend
from models.desired import Machine
from models.errors import TransientError
from testenv.vsphere_machines import backed, guest_identity


class _Desired:
    name = "c1"


def _backend(port: int, timeout: float) -> tuple[VsphereBackend, list[str]]:
    lines: list[str] = []
    conn = Connections(vsphere=VsphereConnection(host="vc", user="u", password="p", boot_timeout_seconds=timeout),
                       ssh=SshConnection(private_key_file="/nonexistent", port=port))
    return VsphereBackend(conn, log=lines.append), lines


def _machine(name: str, address: str) -> Machine:
    return Machine(name=name, role="worker", pool="general", address=address)


def test_await_boot_returns_once_the_guest_greets_with_an_ssh_banner():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def serve():
        for _ in range(2):
            c, _ = srv.accept()
            c.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
            c.close()

    threading.Thread(target=serve, daemon=True).start()
    b, lines = _backend(srv.getsockname()[1], timeout=30)
    b._await_boot(_Desired(), [_machine("c1-general-0", "127.0.0.1")])
    assert any("guests up" in ln for ln in lines), lines
    srv.close()


def test_await_boot_names_the_silent_vm_after_the_timeout():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b, _ = _backend(port, timeout=1)
    with pytest.raises(TransientError, match=r"not answering on SSH after 1s: c1-general-0 \(127\.0\.0\.1:\d+\)"):
        b._await_boot(_Desired(), [_machine("c1-general-0", "127.0.0.1")])


def test_nothing_powered_on_nothing_waited_for():
    b, lines = _backend(1, timeout=0)
    b._await_boot(_Desired(), [])
    assert lines == []


def test_guest_identity_as_cloud_init_reads_guestinfo():
    meta = {"instance-id": "c1-cp-0", "local-hostname": "c1-cp-0",
            "network": {"version": 2, "ethernets": {"nic0": {"addresses": ["10.250.0.40/24"]}}}}
    extra = {"guestinfo.metadata": base64.b64encode(json.dumps(meta).encode()).decode(),
             "guestinfo.metadata.encoding": "base64", "guestinfo.fleetwright.address": "10.250.0.99"}
    assert guest_identity("vm-name", extra) == ("c1-cp-0", "10.250.0.40")
    assert guest_identity("vm-name", {"guestinfo.fleetwright.address": "10.250.0.41"}) == ("vm-name", "10.250.0.41")
    assert guest_identity("vm-name", {}) == ("vm-name", None)
    assert guest_identity("vm-name", {"guestinfo.metadata": "not json"}) == ("vm-name", None)


def test_only_addresses_on_the_machines_bridge_are_backed():
    assert backed("10.250.0.40")
    assert not backed("10.250.0.1")  # the bridge's own address
    assert not backed("127.0.1.20")  # the fast SSH hosts of the supervisor path
    assert not backed(None) and not backed("nonsense")
