"""Bare-metal part of the test environment: SSH hosts on loopback addresses.

Each host is one ``sshd`` (Debian's openssh-server) started by
``unshare --mount --uts --propagation private`` with:

* its own hostname (UTS namespace);
* its own ``/etc``, ``/var`` and ``/root``: overlayfs mounts whose lower layer is the machine's
  directory and whose upper layer is private to the host (so ``/etc/systemd/system``,
  ``/etc/fleetwright``, ``/etc/kubernetes``, ``/var/lib/etcd``, ``/var/log`` are the host's own,
  and anything the machine has, e.g. ``~/.cache/fleetwright`` with the kube binaries, is visible);
* its own ``/opt`` (a bind mount of a private directory);
* a private tmpfs ``/run`` (``/run/sshd`` for sshd; ``/run/fw`` for the supervisor's pidfiles);
* the SSH server on ``<address>:22``, key auth only (an ed25519 client key made in the state dir).

Addresses.  Every 127.0.0.0/8 address is local on Linux (the kernel's ``local 127.0.0.0/8``
route on ``lo``), so a server can bind 127.0.1.11 without adding an address to ``lo`` (checked
by :func:`_check_bindable`), and no packet for it can ever leave the machine.  Hosts made by
``up`` get ``127.0.1.11``, ``127.0.1.12``, ... from the pool ``127.0.1.0/24``;
:func:`ensure_host` starts a host at any other 127/8 address (not 127.0.0.0/24), e.g. the
static IP a simulated vSphere VM was given.  Nothing is added to ``lo``, so nothing has to be
removed.  All hosts share the machine's network namespace: a process in a host that binds
``0.0.0.0`` binds it for everyone, so bind to the host's own address.

There is no systemd.  ``fw-supervise`` (``testenv/supervise.py``, copied to
``<cache>/testenv/fw-supervise`` which every host sees) starts and stops long-running
processes; see its docstring.

Section of the environment document::

    {"pool": "127.0.1.0/24", "user": "root", "private_key": "/tmp/.../hosts/ssh/id_ed25519",
     "known_hosts": "/tmp/.../hosts/ssh/known_hosts",  # trusts the hosts' CA (host keys are signed)
     "supervisor": "/root/.cache/fleetwright/testenv/fw-supervise",
     "ssh_common_args": "-o StrictHostKeyChecking=no ...", "state_dir": "/tmp/fleetwright-testenv",
     "hosts": [{"name": "h1", "address": "127.0.1.11", "port": 22}, ...]}
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from testenv.common import (
    Config,
    apt_install,
    file_lock,
    get_state,
    locked_state,
    progress,
    read_pid,
    start_process,
    stop_process,
    wait_for,
)

POOL = "127.0.1.0/24"
FIRST = 11  # host i (1-based) of `up` gets 127.0.1.(10+i)
SSH_PORT = 22
MARKER = "/run/fleetwright-testenv-host"
SSH_COMMON_ARGS = ("-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                   "-o ServerAliveInterval=2 -o ServerAliveCountMax=2 -o LogLevel=ERROR")
OVERLAYS = ("/etc", "/var", "/root")
SUPERVISOR_SRC = Path(__file__).resolve().parent / "supervise.py"
NODE_AGENT_SRC = Path(__file__).with_name("node_agent.py")
IPTABLES_CHAIN = "FLEETWRIGHT-TESTENV"
APT_PACKAGES = ["openssh-server"]


def _cfg(cfg: Config | None) -> Config:
    return cfg if cfg is not None else Config()


def _base(cfg: Config) -> Path:
    return cfg.state_dir / "hosts"


def _proc_name(name: str) -> str:
    return f"host-{name}"


def _opts(cfg: Config) -> dict[str, Any]:
    return cfg.options.get("hosts") or {}


def _check_address(address: str) -> str:
    ip = ipaddress.ip_address(address)
    if ip.version != 4 or ip not in ipaddress.ip_network("127.0.0.0/8"):
        raise ValueError(f"test hosts live on 127.0.0.0/8 only, not {address}")
    if ip in ipaddress.ip_network("127.0.0.0/24"):
        raise ValueError(f"{address}: 127.0.0.0/24 is left to the machine; use e.g. 127.0.1.x")
    return str(ip)


def _check_bindable(address: str, port: int = 0) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError as e:
            if port:
                raise RuntimeError(f"{address}:{port} is taken ({e}): another host (maybe of "
                                   f"another state dir) or server listens there")
            raise RuntimeError(f"cannot bind {address} ({e}); is 127.0.0.0/8 local on lo?")


def default_name(address: str) -> str:
    return "host-" + address.replace(".", "-")


# --------------------------------------------------------------------------- keys, supervisor


def client_key(cfg: Config) -> Path:
    d = _base(cfg) / "ssh"
    key = d / "id_ed25519"
    if not key.exists():
        d.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                        "fleetwright-testenv", "-f", str(key)], check=True)
    ak = d / "authorized_keys"
    pub = (d / "id_ed25519.pub").read_text()
    if not ak.exists() or ak.read_text() != pub:
        ak.write_text(pub)
        ak.chmod(0o600)
    return key


def host_ca(cfg: Config) -> Path:
    """The test hosts' SSH certificate authority (made once) and the known_hosts file that trusts it.

    Every host's key is signed by this CA for its address, so one ``@cert-authority 127.* <CA key>``
    line lets fleetwright check host keys strictly, also for hosts started later (a VM's address):
    the way production trusts freshly cloned VMs. Returns the known_hosts file.
    """
    d = _base(cfg) / "ssh"
    ca = d / "host_ca"
    if not ca.exists():
        d.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fleetwright-testenv-host-ca",
                        "-f", str(ca)], check=True)
    known = d / "known_hosts"
    line = f"@cert-authority 127.* {(d / 'host_ca.pub').read_text().strip()}\n"
    if not known.exists() or known.read_text() != line:
        known.write_text(line)
    return known


def _sign_host_key(cfg: Config, hostkey: Path, name: str, address: str) -> Path:
    cert = Path(f"{hostkey}-cert.pub")
    stamp = hostkey.parent / "host-cert.for"
    want = f"{address} {(_base(cfg) / 'ssh' / 'host_ca.pub').read_text().strip()}"
    if not cert.exists() or not stamp.exists() or stamp.read_text() != want:
        subprocess.run(["ssh-keygen", "-q", "-s", str(_base(cfg) / "ssh" / "host_ca"), "-I", name, "-h",
                        "-n", address, f"{hostkey}.pub"], check=True, capture_output=True)
        stamp.write_text(want)
    return cert


def _install(src_path: Path, dst: Path) -> Path:
    src = src_path.read_bytes()
    if not dst.exists() or dst.read_bytes() != src:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(src)
        tmp.chmod(0o755)
        os.replace(tmp, dst)
    return dst


def supervisor_path(cfg: Config) -> Path:
    """Install fw-supervise in the cache dir (shared with every host) and return its path.

    ``fw-node-agent`` (``testenv/node_agent.py``, the stand-in for kubelets that the supervisor path's
    control plane starts beside its controller manager) is installed beside it."""
    _install(NODE_AGENT_SRC, cfg.cache_dir / "testenv" / "fw-node-agent")
    return _install(SUPERVISOR_SRC, cfg.cache_dir / "testenv" / "fw-supervise")


# --------------------------------------------------------------------------- namespaces


def _mnt_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _marker(pid: int) -> dict[str, Any] | None:
    try:
        return json.loads(Path(f"/proc/{pid}/root{MARKER}").read_text())
    except (OSError, ValueError):
        return None


def host_processes(cfg: Config | None, address: str) -> list[int]:
    """Every process living in the host's mount namespace (sshd, sessions, daemons).

    A namespace belongs to the host if its /run holds our marker naming this state dir and
    address, so a recycled namespace id can never make us touch someone else's process.
    """
    cfg = _cfg(cfg)
    own = _mnt_ns(os.getpid())
    by_ns: dict[str, list[int]] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            ns = _mnt_ns(int(p))
            if ns and ns != own:
                by_ns.setdefault(ns, []).append(int(p))
    out: list[int] = []
    for ns, pids in by_ns.items():
        for pid in pids:
            m = _marker(pid)
            if m is None:
                continue
            if m.get("address") == address and m.get("state_dir") == str(cfg.state_dir):
                out.extend(pids)
            break
    return sorted(out)


def signal_host(cfg: Config | None, address: str, sig: int) -> list[int]:
    pids = host_processes(cfg, address)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return pids


def _kill_host(cfg: Config, address: str, grace: float = 2.0) -> int:
    """SIGTERM (after SIGCONT) everything in the host, then SIGKILL what is left."""
    pids = host_processes(cfg, address)
    if not pids:
        return 0
    for sig in (signal.SIGCONT, signal.SIGTERM):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and host_processes(cfg, address):
        time.sleep(0.05)
    for _ in range(50):
        left = host_processes(cfg, address)
        if not left:
            break
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    for pid in pids:  # children of ours (none normally: start_process detaches)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
    return len(pids)


# --------------------------------------------------------------------------- one host


def _ssh_ok(address: str, port: int = SSH_PORT) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1) as s:
            s.settimeout(1)
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def _start_host(cfg: Config, name: str, address: str) -> int:
    base = _base(cfg)
    hd = base / name
    for d in ("opt", *(f"{o.strip('/')}-upper" for o in OVERLAYS),
              *(f"{o.strip('/')}-work" for o in OVERLAYS)):
        (hd / d).mkdir(parents=True, exist_ok=True)
    hostkey = hd / "ssh_host_ed25519_key"
    if not hostkey.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name,
                        "-f", str(hostkey)], check=True)
    host_ca(cfg)
    cert = _sign_host_key(cfg, hostkey, name, address)
    # the host's own /etc/hostname and /etc/hosts (first start only: later edits are the host's)
    etc = hd / "etc-upper"
    if not (etc / "hostname").exists():
        (etc / "hostname").write_text(name + "\n")
        hosts = Path("/etc/hosts").read_text() if Path("/etc/hosts").exists() else ""
        (etc / "hosts").write_text(hosts.rstrip("\n") + f"\n{address}\t{name}\n")
        (etc / "fleetwright").mkdir(exist_ok=True)
        (etc / "systemd" / "system").mkdir(parents=True, exist_ok=True)
    (hd / "opt" / "fw" / "log").mkdir(parents=True, exist_ok=True)
    conf = hd / "sshd_config"
    conf.write_text(f"""# fleetwright test host {name}
ListenAddress {address}
Port {SSH_PORT}
HostKey {hostkey}
HostCertificate {cert}
PidFile none
AuthorizedKeysFile {base / 'ssh' / 'authorized_keys'}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
MaxStartups 100:30:200
MaxSessions 50
AcceptEnv LANG LC_*
Subsystem sftp /usr/lib/openssh/sftp-server
LogLevel ERROR
""")
    marker = json.dumps({"name": name, "address": address, "state_dir": str(cfg.state_dir)})
    mounts = "\n".join(
        f"mount -t overlay overlay -o lowerdir={o},upperdir={hd / (o.strip('/') + '-upper')},"
        f"workdir={hd / (o.strip('/') + '-work')} {o}" for o in OVERLAYS)
    script = f"""set -e
hostname {name}
{mounts}
mount --bind {hd / 'opt'} /opt
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/sshd /run/fw /run/lock
printf '%s' '{marker}' > {MARKER}
exec /usr/sbin/sshd -D -e -f {conf}
"""
    (hd / "boot.sh").write_text(script)
    argv = ["unshare", "--mount", "--uts", "--propagation", "private", "--",
            "/bin/sh", str(hd / "boot.sh")]
    return start_process(_proc_name(name), argv, log=cfg.log(_proc_name(name)), cfg=cfg)


def _host_entry(name: str, address: str) -> dict[str, Any]:
    return {"name": name, "address": address, "port": SSH_PORT}


def ensure_host(cfg: Config | None, address: str, name: str | None = None) -> dict[str, Any]:
    """Make sure an SSH host answers at ``address``:22 (start it if needed); return its entry.

    Idempotent.  A host that was killed (``host_kill``) comes back with its /opt, /etc, /var
    and /root as they were ("reboot"); its /run and its processes are gone.
    """
    cfg = _cfg(cfg)
    address = _check_address(address)
    apt_install(APT_PACKAGES)
    client_key(cfg)
    supervisor_path(cfg)
    with file_lock(cfg.path("hosts.lock"), "hosts"):
        known = {h["address"]: h for h in (get_state(cfg, "hosts") or {}).get("hosts", [])}
        if address in known:
            if name and name != known[address]["name"]:
                raise ValueError(f"{address} is already host {known[address]['name']!r}, "
                                 f"not {name!r}")
            name = known[address]["name"]
        name = name or default_name(address)
        pid = read_pid(_proc_name(name), cfg)
        signed = (_base(cfg) / name / "ssh_host_ed25519_key-cert.pub").exists()
        if pid is None or not host_processes(cfg, address) or not signed:  # unsigned: started before the CA
            if pid is not None:
                stop_process(_proc_name(name), cfg)
            _kill_host(cfg, address)  # leftovers of a half-dead host
            _check_bindable(address)
            _check_bindable(address, SSH_PORT)
            progress(f"hosts: starting {name} at {address}:{SSH_PORT}")
            pid = _start_host(cfg, name, address)
            try:
                def ready() -> bool:
                    if read_pid(_proc_name(name), cfg) is None:
                        raise RuntimeError("sshd exited")
                    return _ssh_ok(address)

                wait_for(ready, 15, f"sshd of {name} at {address}", interval=0.05)
            except (TimeoutError, RuntimeError):
                log = cfg.log(_proc_name(name))
                stop_process(_proc_name(name), cfg)
                raise RuntimeError(f"host {name} did not come up; see {log}:\n"
                                   + log.read_text(errors="replace")[-2000:])
        entry = _host_entry(name, address)
        with locked_state(cfg) as st:
            sec = st.get("hosts") or _section(cfg, [])
            hosts = [h for h in sec.get("hosts", []) if h["address"] != address]
            hosts.append(entry)
            sec["hosts"] = sorted(hosts, key=lambda h: ipaddress.ip_address(h["address"]))
            st["hosts"] = sec
        return entry


def remove_host(cfg: Config | None, address: str) -> bool:
    """Stop the host at ``address`` (every process in it), forget it and delete its files."""
    cfg = _cfg(cfg)
    address = _check_address(address)
    with file_lock(cfg.path("hosts.lock"), "hosts"):
        sec = get_state(cfg, "hosts") or {}
        entry = next((h for h in sec.get("hosts", []) if h["address"] == address), None)
        n = _kill_host(cfg, address)
        name = entry["name"] if entry else default_name(address)
        stop_process(_proc_name(name), cfg)
        host_undrop(address, cfg)
        shutil.rmtree(_base(cfg) / name, ignore_errors=True)
        with locked_state(cfg) as st:
            if st.get("hosts"):
                st["hosts"]["hosts"] = [h for h in st["hosts"].get("hosts", [])
                                        if h["address"] != address]
        return bool(entry or n)


# --------------------------------------------------------------------------- part contract


def _section(cfg: Config, hosts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"pool": _opts(cfg).get("pool", POOL), "user": "root",
            "private_key": str(_base(cfg) / "ssh" / "id_ed25519"), "known_hosts": str(host_ca(cfg)),
            "supervisor": str(supervisor_path(cfg)), "ssh_common_args": SSH_COMMON_ARGS,
            "state_dir": str(cfg.state_dir), "hosts": hosts}


def pool_address(cfg: Config, i: int) -> str:
    """Address of the i-th (1-based) host of ``up``."""
    net = ipaddress.ip_network(_opts(cfg).get("pool", POOL))
    first = int(_opts(cfg).get("first", FIRST))
    return str(net.network_address + first + i - 1)


def up(cfg: Config | None = None, n: int | None = None) -> dict[str, Any]:
    """Start hosts h1..hn (n defaults to ``cfg.hosts``) at 127.0.1.11...; return the section.

    Hosts added with :func:`ensure_host` stay; nothing is stopped.
    """
    cfg = _cfg(cfg)
    n = cfg.hosts if n is None else n
    for i in range(1, n + 1):
        ensure_host(cfg, pool_address(cfg, i), f"h{i}")
    with locked_state(cfg) as st:
        sec = st.get("hosts") or _section(cfg, [])
        sec.update({k: v for k, v in _section(cfg, []).items() if k != "hosts"})
        st["hosts"] = sec
    return sec


def down(cfg: Config | None = None) -> None:
    """Kill every process of every host (daemons included), remove DROP rules and files."""
    cfg = _cfg(cfg)
    sec = get_state(cfg, "hosts") or {}
    for h in sec.get("hosts", []):
        remove_host(cfg, h["address"])
    # hosts whose entry got lost: any leftover host-* pidfile of ours
    if cfg.pid_dir.exists():
        for f in cfg.pid_dir.glob("host-*.pid"):
            stop_process(f.stem, cfg)
    _iptables_cleanup()
    shutil.rmtree(_base(cfg), ignore_errors=True)
    with locked_state(cfg) as st:
        st.pop("hosts", None)
    progress("hosts: down")


def status(cfg: Config | None = None) -> dict[str, Any]:
    cfg = _cfg(cfg)
    sec = get_state(cfg, "hosts") or {}
    out = []
    for h in sec.get("hosts", []):
        pids = host_processes(cfg, h["address"])
        states = set()
        for pid in pids:
            with contextlib.suppress(OSError):
                raw = Path(f"/proc/{pid}/stat").read_text()
                states.add(raw[raw.rfind(")") + 2])
        out.append(dict(h, running=bool(pids), processes=len(pids),
                        frozen=bool(states) and states <= {"T", "t"},
                        dropped=_is_dropped(h["address"]),
                        ssh=_ssh_ok(h["address"]) if pids else False))
    return {"running": any(h["running"] for h in out), "hosts": out}


# --------------------------------------------------------------------------- faults


def host_freeze(cfg: Config | None, address: str) -> int:
    """SIGSTOP every process of the host (connections hang; nothing is refused)."""
    return len(signal_host(cfg, _check_address(address), signal.SIGSTOP))


def host_thaw(cfg: Config | None, address: str) -> int:
    return len(signal_host(cfg, _check_address(address), signal.SIGCONT))


def host_kill(cfg: Config | None, address: str) -> int:
    """SIGKILL every process of the host at once (a power cut). Files stay."""
    cfg = _cfg(cfg)
    address = _check_address(address)
    n = len(signal_host(cfg, address, signal.SIGKILL))
    wait_for(lambda: not host_processes(cfg, address), 5, f"host {address} to die")
    sec = get_state(cfg, "hosts") or {}
    for h in sec.get("hosts", []):
        if h["address"] == address:
            stop_process(_proc_name(h["name"]), cfg)  # reap + forget the pidfile
    return n


def host_restart(cfg: Config | None, address: str) -> dict[str, Any]:
    """Power-cycle: kill everything in the host, then boot it again (same files)."""
    cfg = _cfg(cfg)
    host_kill(cfg, address)
    return ensure_host(cfg, address)


def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["iptables", "-w", "5", *args], capture_output=True, text=True,
                          check=check)


def _rule(address: str) -> list[str]:
    return ["-d", f"{address}/32", "-j", "DROP", "-m", "comment", "--comment",
            "fleetwright-testenv"]


def _is_dropped(address: str) -> bool:
    if not shutil.which("iptables"):
        return False
    return _iptables("-C", IPTABLES_CHAIN, *_rule(address), check=False).returncode == 0


def host_drop(address: str, cfg: Config | None = None) -> None:
    """Drop every packet to the host's address (iptables INPUT): connections time out."""
    address = _check_address(address)
    apt_install(["iptables"])
    if _iptables("-n", "-L", IPTABLES_CHAIN, check=False).returncode != 0:
        _iptables("-N", IPTABLES_CHAIN)
    if _iptables("-C", "INPUT", "-j", IPTABLES_CHAIN, check=False).returncode != 0:
        _iptables("-I", "INPUT", "-j", IPTABLES_CHAIN)
    if not _is_dropped(address):
        _iptables("-A", IPTABLES_CHAIN, *_rule(address))


def host_undrop(address: str, cfg: Config | None = None) -> None:
    address = _check_address(address)
    while _is_dropped(address):
        _iptables("-D", IPTABLES_CHAIN, *_rule(address))


def _iptables_cleanup() -> None:
    """Remove our chain if no rule is left in it."""
    if not shutil.which("iptables"):
        return
    r = _iptables("-S", IPTABLES_CHAIN, check=False)
    if r.returncode != 0:
        return
    if len([ln for ln in r.stdout.splitlines() if ln.startswith("-A")]) == 0:
        while _iptables("-D", "INPUT", "-j", IPTABLES_CHAIN, check=False).returncode == 0:
            pass
        _iptables("-X", IPTABLES_CHAIN, check=False)


def ssh(section: dict[str, Any], address: str, command: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``command`` as root on the test host at ``address`` (``section``: the hosts section)."""
    argv = ["ssh", "-i", section["private_key"], *section["ssh_common_args"].split(), "-o", "ConnectTimeout=5",
            f"root@{address}", command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=check)

