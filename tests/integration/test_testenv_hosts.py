"""The test environment's bare-metal SSH hosts, driven by real Ansible (ansible-runner) over SSH.

The destructive tests (freeze, drop, kill, down) run against hosts of their own: a private state
dir and addresses 127.0.1.201-202, away from the shared environment's 127.0.1.11...
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import ansible_runner
import pytest

from testenv import faults, hosts
from testenv.common import Config

pytestmark = pytest.mark.timeout(120)

VENV_BIN = str(Path(sys.executable).parent)

SITE = """\
- hosts: baremetal
  gather_facts: true
  gather_subset: [min]
  tasks:
    - name: node marker in the host's private /opt
      ansible.builtin.copy:
        dest: "/opt/node-{{ inventory_hostname }}.txt"
        content: "host={{ ansible_facts.hostname }} ip={{ ansible_host }}\\n"
        mode: "0644"
    - name: unit file in the host's private /etc/systemd/system
      ansible.builtin.copy:
        dest: /etc/systemd/system/kubelet.service
        content: |
          [Service]
          ExecStart=/usr/local/bin/kubelet --node-ip={{ ansible_host }}
        mode: "0644"
    - name: fleetwright config dir
      ansible.builtin.file:
        path: /etc/fleetwright
        state: directory
        mode: "0755"
    - name: what this host sees
      ansible.builtin.shell: "hostname; ls /opt; ls /etc/systemd/system/kubelet.service"
      register: seen
      changed_when: false
"""

WEB = """\
- hosts: "{{ target }}"
  gather_facts: false
  tasks:
    - name: web server under fw-supervise
      ansible.builtin.command: >-
        {{ supervisor }} {{ action }} web --chdir /opt --wait-port {{ ansible_host }}:8080
        -- python3 -m http.server --bind {{ ansible_host }} 8080
      register: r
      changed_when: r.stdout.split()[0] in ['started', 'restarted', 'stopped']
"""

LIGHT = """\
- hosts: baremetal
  gather_facts: false
  tasks:
    - name: hostname
      ansible.builtin.command: hostname
      changed_when: false
"""

STOP = """\
- hosts: "{{ target }}"
  gather_facts: false
  tasks:
    - name: stop the web server
      ansible.builtin.command: "{{ supervisor }} stop web"
      register: r
      changed_when: r.stdout.startswith('stopped')
    - name: status says stopped
      ansible.builtin.command: "{{ supervisor }} status web"
      register: st
      changed_when: false
      failed_when: st.rc != 3
"""


@pytest.fixture(scope="module")
def own_hosts(tmp_path_factory):
    """Two hosts of this module's own: h1=127.0.1.201, h2=127.0.1.202."""
    base = tmp_path_factory.mktemp("hosts-env")
    cfg = Config(state_dir=base / "state", options={"hosts": {"first": 201}})
    t = time.monotonic()
    section = hosts.up(cfg, n=2)
    print(f"hosts up (2) took {time.monotonic() - t:.2f}s")
    # ssh multiplexing (Ansible's default) halves the run time; a short socket dir of our own
    cp = Path(tempfile.mkdtemp(prefix="fwcp-"))
    os.environ["FW_TEST_SSH_CP_DIR"] = str(cp)
    yield cfg, section
    hosts.down(cfg)  # the masters exit with their sshd
    shutil.rmtree(cp, ignore_errors=True)


def run_playbook(tmp_path: Path, section: dict[str, Any], text: str, limit: str | None = None,
                 extravars: dict[str, Any] | None = None) -> ansible_runner.Runner:
    pdd = tmp_path / f"ar-{time.monotonic_ns()}"
    (pdd / "project").mkdir(parents=True)
    (pdd / "project" / "play.yml").write_text(text)
    lines = ["[baremetal]"]
    lines += [f"{h['name']} ansible_host={h['address']} ansible_port={h['port']}" for h in section["hosts"]]
    lines += ["", "[baremetal:vars]", f"ansible_user={section['user']}",
              f"ansible_ssh_private_key_file={section['private_key']}",
              "ansible_python_interpreter=/usr/bin/python3",
              f"ansible_ssh_common_args={section['ssh_common_args']}",
              f"supervisor={section['supervisor']}"]
    (pdd / "inventory").mkdir()
    (pdd / "inventory" / "hosts").write_text("\n".join(lines) + "\n")
    env = {"PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", ""),
           "ANSIBLE_HOST_KEY_CHECKING": "False", "ANSIBLE_PIPELINING": "True",
           "ANSIBLE_TIMEOUT": "3",
           "ANSIBLE_SSH_ARGS": "-C -o ControlMaster=auto -o ControlPersist=30s",
           "ANSIBLE_SSH_CONTROL_PATH_DIR": os.environ.get("FW_TEST_SSH_CP_DIR", "~/.ansible/cp"),
           "ANSIBLE_NOCOLOR": "1"}
    old = os.environ.get("PATH")
    os.environ["PATH"] = env["PATH"]  # ansible-runner looks up ansible-playbook itself
    try:
        t = time.monotonic()
        r = ansible_runner.run(private_data_dir=str(pdd), playbook="play.yml", limit=limit,
                               envvars=env, extravars=extravars or {}, quiet=True, timeout=90)
        r.took = time.monotonic() - t  # type: ignore[attr-defined]
    finally:
        os.environ["PATH"] = old or ""
    return r


def outputs(r: ansible_runner.Runner, task: str) -> dict[str, Any]:
    out = {}
    for ev in r.events:
        d = ev.get("event_data", {})
        if ev.get("event") == "runner_on_ok" and d.get("task") == task:
            out[d["host"]] = d["res"]
    return out


def stdout_of(r: ansible_runner.Runner) -> str:
    return r.stdout.read() if hasattr(r.stdout, "read") else str(r.stdout)


def test_playbook_over_ssh_private_hosts_and_idempotence(own_hosts, tmp_path):
    cfg, section = own_hosts
    r = run_playbook(tmp_path, section, SITE)
    assert r.rc == 0, stdout_of(r)
    assert set(r.stats["ok"]) == {"h1", "h2"}
    assert set(r.stats["changed"]) == {"h1", "h2"}
    seen = outputs(r, "what this host sees")
    for name in ("h1", "h2"):
        lines = seen[name]["stdout"].splitlines()
        assert lines[0] == name  # own hostname (UTS namespace)
        assert f"node-{name}.txt" in lines  # own /opt ...
        other = "h2" if name == "h1" else "h1"
        assert f"node-{other}.txt" not in lines  # ... and not the other host's
    # nothing leaked to the machine's own /opt and /etc
    assert not list(Path("/opt").glob("node-h*.txt"))
    assert not Path("/etc/systemd/system/kubelet.service").exists()
    # the host's files live in its private dirs in the state dir
    assert (cfg.state_dir / "hosts" / "h1" / "opt" / "node-h1.txt").exists()

    r2 = run_playbook(tmp_path, section, SITE)
    assert r2.rc == 0, stdout_of(r2)
    assert r2.stats["changed"] == {}
    print(f"playbook over 2 hosts: {r.took:.1f}s, re-run {r2.took:.1f}s")


@pytest.mark.parametrize("fault", ["freeze", "drop"])
def test_unreachable_host_fails_alone_and_recovers(own_hosts, tmp_path, fault):
    cfg, section = own_hosts
    h1 = section["hosts"][0]["address"]
    if fault == "freeze":
        assert faults.host_freeze(section, h1) >= 1
        assert hosts.status(cfg)["hosts"][0]["frozen"] is True
    else:
        faults.host_drop(section, h1)
        assert hosts.status(cfg)["hosts"][0]["dropped"] is True
    try:
        r = run_playbook(tmp_path, section, LIGHT)
        assert r.rc != 0
        assert set(r.stats["dark"]) == {"h1"}, r.stats
        assert "h2" in r.stats["ok"] and "h2" not in r.stats["failures"]
        print(f"{fault}: run with an unreachable host took {r.took:.1f}s")
    finally:
        if fault == "freeze":
            faults.host_thaw(section, h1)
        else:
            faults.host_undrop(section, h1)
    r = run_playbook(tmp_path, section, LIGHT)
    assert r.rc == 0, stdout_of(r)
    assert set(r.stats["ok"]) == {"h1", "h2"} and not r.stats["dark"]
    assert outputs(r, "hostname")["h1"]["stdout"] == "h1"


def test_supervisor_runs_a_daemon_idempotently(own_hosts, tmp_path):
    cfg, section = own_hosts
    h1 = section["hosts"][0]["address"]
    url = f"http://{h1}:8080/"
    ev = {"target": "h1", "action": "start"}
    r = run_playbook(tmp_path, section, WEB, extravars=ev)
    assert r.rc == 0, stdout_of(r)
    assert set(r.stats["changed"]) == {"h1"}
    with urllib.request.urlopen(url, timeout=5) as resp:  # served from h1's private /opt
        assert resp.status == 200 and b"node-h1.txt" in resp.read()
    pids = hosts.host_processes(cfg, h1)
    assert len(pids) >= 2  # sshd + the daemon, all in h1's mount namespace

    r = run_playbook(tmp_path, section, WEB, extravars=ev)
    assert r.rc == 0 and r.stats["changed"] == {}, stdout_of(r)
    assert "unchanged" in outputs(r, "web server under fw-supervise")["h1"]["stdout"]

    r = run_playbook(tmp_path, section, STOP, extravars={"target": "h1"})
    assert r.rc == 0, stdout_of(r)
    assert set(r.stats["changed"]) == {"h1"}
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)
    r = run_playbook(tmp_path, section, STOP, extravars={"target": "h1"})
    assert r.rc == 0 and r.stats["changed"] == {}, stdout_of(r)


def test_restart_keeps_files_and_forgets_processes(own_hosts, tmp_path):
    cfg, section = own_hosts
    h2 = section["hosts"][1]["address"]
    sup = section["supervisor"]
    ssh = ["ssh", "-i", section["private_key"], *section["ssh_common_args"].split(),
           "-o", "ConnectTimeout=3", f"root@{h2}"]
    start = f"{sup} start sleeper -- sleep 300"
    assert subprocess.run([*ssh, start], capture_output=True, text=True, timeout=20).stdout.startswith("started")
    before = hosts.host_processes(cfg, h2)
    t = time.monotonic()
    entry = faults.host_restart(section, h2)
    took = time.monotonic() - t
    assert entry["name"] == "h2"
    assert not set(before) & set(hosts.host_processes(cfg, h2))
    out = subprocess.run([*ssh, f"hostname; ls /opt; {sup} status sleeper"], capture_output=True,
                         text=True, timeout=20)
    assert out.stdout.splitlines()[0] == "h2"
    assert "node-h2.txt" in out.stdout  # /opt survived the "reboot" ...
    assert out.returncode == 3  # ... the process did not
    print(f"host restart took {took:.2f}s")


def test_ensure_host_at_a_given_address_and_remove_it(own_hosts):
    cfg, section = own_hosts
    with pytest.raises(ValueError):
        hosts.ensure_host(cfg, "10.1.2.3")  # never anything off the machine
    t = time.monotonic()
    entry = hosts.ensure_host(cfg, "127.0.1.203", name="vm-1")
    took = time.monotonic() - t
    assert entry == {"name": "vm-1", "address": "127.0.1.203", "port": 22}
    pids = hosts.host_processes(cfg, "127.0.1.203")
    assert hosts.ensure_host(cfg, "127.0.1.203") == entry  # idempotent, name remembered
    assert hosts.host_processes(cfg, "127.0.1.203") == pids
    out = subprocess.run(["ssh", "-i", section["private_key"], *section["ssh_common_args"].split(),
                          "-o", "ConnectTimeout=3", "root@127.0.1.203", "hostname"],
                         capture_output=True, text=True, timeout=20)
    assert out.stdout.strip() == "vm-1", out.stderr
    assert "127.0.1.203" in [h["address"] for h in hosts.status(cfg)["hosts"]]
    assert hosts.remove_host(cfg, "127.0.1.203") is True
    assert hosts.host_processes(cfg, "127.0.1.203") == []
    assert "127.0.1.203" not in [h["address"] for h in hosts.status(cfg)["hosts"]]
    assert not (cfg.state_dir / "hosts" / "vm-1").exists()
    print(f"ensure_host took {took:.2f}s")


def test_down_leaves_nothing_behind(own_hosts, tmp_path):
    cfg, section = own_hosts
    sup = section["supervisor"]
    h1, h2 = (h["address"] for h in section["hosts"])
    ssh = ["ssh", "-i", section["private_key"], *section["ssh_common_args"].split(),
           "-o", "ConnectTimeout=3"]
    for a in (h1, h2):
        subprocess.run([*ssh, f"root@{a}", f"{sup} start sleeper -- sleep 300"], check=True,
                       capture_output=True, timeout=20)
    faults.host_freeze(section, h2)  # even frozen processes go
    faults.host_drop(section, h1)
    all_pids = hosts.host_processes(cfg, h1) + hosts.host_processes(cfg, h2)
    assert len(all_pids) >= 4
    t = time.monotonic()
    hosts.down(cfg)
    took = time.monotonic() - t
    for pid in all_pids:
        p = Path(f"/proc/{pid}/stat")
        assert not p.exists() or p.read_text().split(") ")[1][0] == "Z", pid
    assert hosts.host_processes(cfg, h1) == [] and hosts.host_processes(cfg, h2) == []
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(cfg.state_dir) not in ps
    assert not (cfg.state_dir / "hosts").exists()
    assert hosts.status(cfg) == {"running": False, "hosts": []}
    rules = subprocess.run(["iptables", "-w", "5", "-S"], capture_output=True, text=True).stdout
    assert h1 not in rules
    print(f"hosts down took {took:.2f}s")


def test_shared_ssh_hosts_fixture(ssh_hosts):
    """The plugin's ``ssh_hosts`` (the shared environment) gives reachable, distinct hosts."""
    names = set()
    for h in ssh_hosts["hosts"]:
        out = subprocess.run(["ssh", "-i", ssh_hosts["private_key"], *ssh_hosts["ssh_common_args"].split(),
                              "-o", "ConnectTimeout=5", f"{ssh_hosts['user']}@{h['address']}", "hostname"],
                             capture_output=True, text=True, timeout=20)
        assert out.returncode == 0, out.stderr
        names.add(out.stdout.strip())
    assert names == {h["name"] for h in ssh_hosts["hosts"]} and len(names) >= 2
    assert Path(ssh_hosts["supervisor"]).exists()
