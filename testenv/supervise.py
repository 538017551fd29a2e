#!/usr/bin/python3
"""fw-supervise: a tiny process supervisor for the test environment's SSH hosts (no systemd).

The hosts part copies this file to ``<cache>/testenv/fw-supervise``; that path is visible
inside every host and is given as ``supervisor`` in the hosts section of the environment
document.  Standard library only, so it runs under the host's ``/usr/bin/python3``.

    fw-supervise start NAME [--chdir DIR] [--env K=V]... [--wait-port HOST:PORT]
                            [--wait SECONDS] -- ARGV...
    fw-supervise stop NAME [--timeout SECONDS]
    fw-supervise restart NAME [start options] -- ARGV...
    fw-supervise status NAME        exit 0 running, 3 stopped
    fw-supervise list               one line per known process

``start`` daemonizes ARGV (new session via setsid, stdin /dev/null, stdout+stderr appended to
``/opt/fw/log/NAME.log``) and records ``/run/fw/NAME.pid`` (JSON: pid, start time, argv).  Both
paths are private to the host (``/run`` is a per-host tmpfs, ``/opt`` a per-host directory), so
a host "reboot" forgets its processes, as a real one would.

The first word printed says what happened, for Ansible's ``changed_when``:

* ``started NAME pid=N`` / ``restarted NAME pid=N`` (argv differed from the running one)
  / ``stopped NAME``                                         -> a change
* ``unchanged NAME ...``                                      -> no change
* ``failed NAME ...`` (exit 1): the process died at once or the port did not open.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time

RUN_DIR = os.environ.get("FW_SUPERVISE_RUN", "/run/fw")
LOG_DIR = os.environ.get("FW_SUPERVISE_LOG", "/opt/fw/log")


def _pidfile(name: str) -> str:
    return os.path.join(RUN_DIR, name + ".pid")


def _logfile(name: str) -> str:
    return os.path.join(LOG_DIR, name + ".log")


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    rest = raw[raw.rfind(")") + 2:].split()
    if rest[0] in ("Z", "X"):
        return None
    return rest[19]


def _read(name: str) -> dict | None:
    """The record of NAME if its process is alive, else None."""
    try:
        with open(_pidfile(name)) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    if _start_time(int(rec["pid"])) != str(rec.get("start")):
        return None
    return rec


def _tail(path: str, n: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def _port_open(hostport: str) -> bool:
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def _spawn(name: str, argv: list[str], chdir: str | None, env: list[str]) -> int:
    os.makedirs(RUN_DIR, exist_ok=True)
    os.makedirs(LOG_DIR, exist_ok=True)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: new session, then a grandchild that execs ARGV
        os.close(r)
        os.setsid()
        gpid = os.fork()
        if gpid:
            os.write(w, str(gpid).encode())
            os._exit(0)
        os.close(w)
        if chdir:
            os.chdir(chdir)
        environ = dict(os.environ)
        for kv in env:
            k, _, v = kv.partition("=")
            environ[k] = v
        fd = os.open(_logfile(name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.write(fd, f"=== {time.strftime('%F %T')} start {name}: {' '.join(argv)}\n".encode())
        try:
            os.execvpe(argv[0], argv, environ)
        except OSError as e:
            os.write(2, f"exec failed: {e}\n".encode())
            os._exit(127)
    os.close(w)
    data = b""
    while chunk := os.read(r, 64):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    gpid = int(data)
    start = None
    for _ in range(100):
        start = _start_time(gpid)
        if start:
            break
        time.sleep(0.01)
    with open(_pidfile(name) + ".tmp", "w") as f:
        json.dump({"pid": gpid, "start": start, "argv": argv, "chdir": chdir, "env": env}, f)
    os.replace(_pidfile(name) + ".tmp", _pidfile(name))
    return gpid


def _stop(name: str, timeout: float) -> bool:
    rec = _read(name)
    if rec is None:
        try:
            os.unlink(_pidfile(name))
        except OSError:
            pass
        return False
    pid = int(rec["pid"])
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for kill in (lambda: os.killpg(pid, sig), lambda: os.kill(pid, sig)):
            try:
                kill()
            except OSError:
                pass
        try:
            os.kill(pid, signal.SIGCONT)
        except OSError:
            pass
        deadline = time.time() + (timeout if sig == signal.SIGTERM else 5)
        while time.time() < deadline:
            if _start_time(pid) != str(rec["start"]):
                break
            time.sleep(0.05)
        else:
            continue
        break
    try:
        os.unlink(_pidfile(name))
    except OSError:
        pass
    return True


def cmd_start(a: argparse.Namespace, restart: bool = False) -> int:
    argv = a.argv
    if not argv:
        print(f"failed {a.name}: no command given (use: start NAME -- ARGV...)")
        return 2
    rec = _read(a.name)
    word = "started"
    if rec is not None:
        same = (rec.get("argv") == argv and rec.get("chdir") == a.chdir
                and rec.get("env", []) == a.env)
        if same and not restart:
            print(f"unchanged {a.name} pid={rec['pid']} (already running)")
            return 0
        _stop(a.name, a.timeout)
        word = "restarted"
    pid = _spawn(a.name, argv, a.chdir, a.env)
    deadline = time.time() + a.wait
    while True:
        alive = _read(a.name) is not None
        if not alive:
            print(f"failed {a.name}: exited at once; log {_logfile(a.name)}:\n"
                  f"{_tail(_logfile(a.name))}")
            return 1
        if a.wait_port:
            if _port_open(a.wait_port):
                break
        elif time.time() >= deadline:
            break
        if a.wait_port and time.time() >= deadline:
            _stop(a.name, a.timeout)
            print(f"failed {a.name}: {a.wait_port} did not open within {a.wait}s (stopped "
                  f"it again); log {_logfile(a.name)}:\n{_tail(_logfile(a.name))}")
            return 1
        time.sleep(0.05)
    print(f"{word} {a.name} pid={pid}")
    return 0


def cmd_stop(a: argparse.Namespace) -> int:
    if _stop(a.name, a.timeout):
        print(f"stopped {a.name}")
    else:
        print(f"unchanged {a.name} (not running)")
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    rec = _read(a.name)
    if rec is None:
        print(f"{a.name} stopped")
        return 3
    print(f"{a.name} running pid={rec['pid']} argv={json.dumps(rec['argv'])}")
    return 0


def cmd_list(_: argparse.Namespace) -> int:
    try:
        names = sorted(f[:-4] for f in os.listdir(RUN_DIR) if f.endswith(".pid"))
    except OSError:
        names = []
    for n in names:
        rec = _read(n)
        print(f"{n} {'running pid=' + str(rec['pid']) if rec else 'stopped'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:  # everything after the first "--" is the command, untouched
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="fw-supervise", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for c in ("start", "restart"):
        p = sub.add_parser(c, usage=f"fw-supervise {c} NAME [options] -- ARGV...")
        p.add_argument("name")
        p.add_argument("--chdir")
        p.add_argument("--env", action="append", default=[], metavar="K=V")
        p.add_argument("--wait-port", metavar="HOST:PORT",
                       help="wait until this TCP port accepts connections")
        p.add_argument("--wait", type=float, default=None,
                       help="seconds to watch for an early exit (default 0.3), or the "
                            "port timeout with --wait-port (default 30)")
        p.add_argument("--timeout", type=float, default=10.0, help="stop timeout on restart")
    p = sub.add_parser("stop")
    p.add_argument("name")
    p.add_argument("--timeout", type=float, default=10.0)
    p = sub.add_parser("status")
    p.add_argument("name")
    sub.add_parser("list")
    a = ap.parse_args(argv)
    if a.cmd in ("start", "restart"):
        a.argv = command
        if a.wait is None:
            a.wait = 30.0 if a.wait_port else 0.3
        return cmd_start(a, restart=a.cmd == "restart")
    if a.cmd == "stop":
        return cmd_stop(a)
    if a.cmd == "status":
        return cmd_status(a)
    return cmd_list(a)


if __name__ == "__main__":
    sys.exit(main())
