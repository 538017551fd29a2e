"""The test environment's machines: systemd-nspawn hosts on a private bridge, reached over SSH.

Machines have fixed addresses (10.250.0.11...): this module is in tests/run.sh's ONPREM list, and a
run by hand holds /tmp/fw-machines.lock. Every test stops the machines it booted.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testenv import machines
from testenv.common import Config

pytestmark = pytest.mark.timeout(900)

FLEETWRIGHT = [sys.executable, "-c", "from fleetwright.cli import main; main()"]


def _nspawn_pids(needle: str) -> list[int]:
    """Live systemd-nspawn processes whose command line names ``needle`` (a machine's rootfs)."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes()
                stat = (p / "stat").read_text()
            except OSError:
                continue
            if b"systemd-nspawn" in cmd and needle.encode() in cmd and stat[stat.rfind(")") + 2] not in "ZX":
                out.append(int(p.name))
    return out


def test_machines_boot_reach_each_other_and_stop_clean(machines_env, testenv_config):
    cfg = testenv_config
    forward_before = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    names = {"m1": machines.machine_address(1), "m2": machines.machine_address(2)}
    try:
        for n, a in names.items():
            machines.ensure_machine(cfg, n, a, fresh=True)
        for n, a in names.items():
            # sshd answers with a host key signed by the machines' CA (StrictHostKeyChecking=yes)
            r = machines.ssh(cfg, a, "hostname; cat /proc/1/comm; systemctl is-system-running; "
                                     "ip -4 -o addr show host0 | awk '{print $4}'")
            hostname, pid1, state, addr = r.stdout.split()
            assert (hostname, pid1, state, addr) == (n, "systemd", "running", f"{a}/24")
            # the node packages are there, and the artefact server answers from inside
            r = machines.ssh(cfg, a, f"containerd --version && runc --version >/dev/null && "
                                     f"ls /usr/lib/cni/bridge && curl -fsS {machines_env['artefacts_url']}"
                                     f"/kubernetes/v1.20.2/SHA256SUMS")
            assert "containerd" in r.stdout and " kubeadm\n" in r.stdout and " crictl\n" in r.stdout
            # the cgroup v1 controllers are writable (containerd/kubelet need it), the host's sysctls untouched
            r = machines.ssh(cfg, a, "mkdir /sys/fs/cgroup/memory/fwprobe && rmdir /sys/fs/cgroup/memory/fwprobe && cat /proc/sys/vm/overcommit_memory")
            assert r.stdout.strip().splitlines()[-1] == "1"
            assert machines.machine_processes(n), "the machine's processes are in its own cgroup"
        # machine to machine over the bridge
        machines.ssh(cfg, names["m1"], f"ping -c1 -W2 {names['m2']}")
        assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == forward_before
        with pytest.raises(ValueError, match="clashes"):
            machines.ensure_machine(cfg, "m9", names["m1"])
    finally:
        for n in names:
            machines.remove_machine(cfg, n)
    for n in names:
        assert machines.machine_processes(n) == []
        assert _nspawn_pids(str(Path(cfg.state_dir) / "machines" / "m" / n)) == []


def test_cli_up_with_a_machine_then_down_leaves_nothing(tmp_path_factory):
    state = str(tmp_path_factory.mktemp("testenv-machines"))
    env = dict(os.environ, FLEETWRIGHT_TESTENV_DIR=state, FLEETWRIGHT_CACHE=str(Config().cache_dir))
    try:
        t0 = time.monotonic()
        r = subprocess.run([*FLEETWRIGHT, "testenv", "up", "--only", "machines", "--machines", "1"], env=env,
                           capture_output=True, text=True, timeout=1800)
        assert r.returncode == 0, r.stderr[-3000:]
        doc = json.loads(r.stdout)["machines"]
        print(f"testenv up --only machines --machines 1: {time.monotonic() - t0:.1f}s")
        assert [m["name"] for m in doc["machines"]] == ["m1"]
        cfg = Config(state_dir=state)
        r2 = machines.ssh(cfg, doc["machines"][0]["address"], "systemctl is-active ssh containerd")
        assert r2.stdout.split() == ["active", "active"]
        st = json.loads(subprocess.run([*FLEETWRIGHT, "testenv", "status", "--only", "machines"], env=env,
                                       capture_output=True, text=True, timeout=60, check=True).stdout)
        assert st["machines"]["machines"][0]["running"] is True
    finally:
        d = subprocess.run([*FLEETWRIGHT, "testenv", "down"], env=env, capture_output=True, text=True, timeout=300)
    assert d.returncode == 0, d.stderr[-2000:]
    assert _nspawn_pids(state) == [], "an nspawn process outlived testenv down"
    assert machines.machine_processes("m1") == []
    assert not (Path(state) / "machines" / "m" / "m1").exists()
