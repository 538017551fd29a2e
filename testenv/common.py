"""Shared contract for the test-environment parts (kube, vsphere, aws, hosts).

Every part module (``testenv.kube``, ``testenv.vcsim``, ``testenv.aws``, ``testenv.hosts``)
exposes three functions taking a :class:`Config`:

* ``up(cfg) -> dict``    start (building/installing what is missing) and return the part's
                         section of the JSON document. MUST be idempotent: a second call while
                         the part runs is harmless and returns the same endpoints.
* ``down(cfg) -> None``  stop the part's processes (by PID) and undo what ``up`` did.
* ``status(cfg) -> dict`` what is running, without starting anything.

Directories:

* cache dir  ``$FLEETWRIGHT_CACHE`` (default ``~/.cache/fleetwright``): slow build artefacts,
  keyed by version, e.g. ``kube-v1.20.2/bin/kube-apiserver``. Survives ``down``.
* state dir  ``$FLEETWRIGHT_TESTENV_DIR`` (default ``/tmp/fleetwright-testenv``): pids
  (``pids/<name>.pid``), logs (``logs/<name>.log``), kubeconfigs, ``state.json``, ``env.json``.

Progress goes to stderr only (:func:`progress`); stdout is reserved for the JSON document.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

T = TypeVar("T")

PARTS = ("kube", "vsphere", "aws", "hosts", "postgres", "git", "machines")
# what a plain ``up`` starts: the machines part (nspawn machines, a 13-minute build and a debootstrap
# the first time) only when asked for (``--only machines`` / ``--machines N``); ``down`` stops all
DEFAULT_PARTS = tuple(p for p in PARTS if p != "machines")
_T0 = time.monotonic()


# --------------------------------------------------------------------------- directories


def cache_dir() -> Path:
    return Path(os.environ.get("FLEETWRIGHT_CACHE") or Path.home() / ".cache" / "fleetwright").expanduser()


def state_dir() -> Path:
    return Path(os.environ.get("FLEETWRIGHT_TESTENV_DIR") or "/tmp/fleetwright-testenv").expanduser()


@dataclasses.dataclass
class Config:
    """What ``up`` was asked for. Parts read the fields they care about."""

    state_dir: Path = dataclasses.field(default_factory=state_dir)
    cache_dir: Path = dataclasses.field(default_factory=cache_dir)
    kube_clusters: int = 1
    hosts: int = 2
    only: tuple[str, ...] = DEFAULT_PARTS
    # free-form per-part options, e.g. {"vsphere": {"method_delay": "CloneVM_Task:500"}}
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).expanduser().resolve()
        self.cache_dir = Path(self.cache_dir).expanduser().resolve()

    @classmethod
    def from_env(cls, **overrides: Any) -> "Config":
        return cls(**overrides)

    # convenience paths
    def path(self, *parts: str) -> Path:
        p = self.state_dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def pid_dir(self) -> Path:
        return self.state_dir / "pids"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    def log(self, name: str) -> Path:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return self.log_dir / f"{name}.log"


def _cfg(cfg: Config | None) -> Config:
    return cfg if cfg is not None else Config()


# --------------------------------------------------------------------------- progress


def progress(msg: str) -> None:
    """One progress line on stderr with the time elapsed since the process started."""
    print(f"[testenv {time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- locks


@contextlib.contextmanager
def file_lock(path: Path | str, what: str | None = None) -> Iterator[None]:
    """Exclusive advisory lock (flock) on ``path``; blocks, saying so once, while another holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for lock {path}" + (f" ({what})" if what else ""))
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- state.json


def _state_file(cfg: Config) -> Path:
    return cfg.path("state.json")


def read_state(cfg: Config | None = None) -> dict[str, Any]:
    cfg = _cfg(cfg)
    with file_lock(cfg.path("state.lock")):
        return _read_state_unlocked(cfg)


def _read_state_unlocked(cfg: Config) -> dict[str, Any]:
    f = _state_file(cfg)
    if not f.exists():
        return {}
    try:
        return json.loads(f.read_text() or "{}")
    except json.JSONDecodeError:
        return {}


def _write_state_unlocked(cfg: Config, data: Mapping[str, Any]) -> None:
    f = _state_file(cfg)
    tmp = f.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, f)


@contextlib.contextmanager
def locked_state(cfg: Config | None = None) -> Iterator[dict[str, Any]]:
    """``with locked_state(cfg) as st: st["kube"] = ...`` -- read-modify-write under the lock."""
    cfg = _cfg(cfg)
    with file_lock(cfg.path("state.lock")):
        data = _read_state_unlocked(cfg)
        yield data
        _write_state_unlocked(cfg, data)


def update_state(cfg: Config | None, section: str, value: Any) -> None:
    """Set (or, with ``value=None``, remove) one top-level section of state.json."""
    with locked_state(cfg) as st:
        if value is None:
            st.pop(section, None)
        else:
            st[section] = value


def get_state(cfg: Config | None, section: str, default: Any = None) -> Any:
    return read_state(cfg).get(section, default)


# --------------------------------------------------------------------------- apt


def dpkg_installed(pkg: str) -> bool:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
    return r.returncode == 0 and "install ok installed" in r.stdout


_APT_UPDATED = False


def apt_install(pkgs: Sequence[str]) -> None:
    """Install the Debian packages that are missing (``apt-get update`` once, only if needed)."""
    global _APT_UPDATED
    missing = [p for p in pkgs if not dpkg_installed(p)]
    if not missing:
        return
    with file_lock(Path("/tmp/fleetwright-apt.lock"), "apt"):
        missing = [p for p in missing if not dpkg_installed(p)]
        if not missing:
            return
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        if not _APT_UPDATED:
            progress("apt-get update")
            subprocess.run(["apt-get", "update", "-qq"], check=True, env=env,
                           stdout=subprocess.DEVNULL, stderr=sys.stderr)
            _APT_UPDATED = True
        progress("apt-get install " + " ".join(missing))
        # apt/dpkg may hold its own lock briefly (another installer); retry a few times
        for attempt in range(30):
            r = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends",
                                "-o", "DPkg::Lock::Timeout=120", *missing],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if r.returncode == 0:
                return
            if "lock" in r.stderr.lower() and attempt < 29:
                time.sleep(2)
                continue
            raise RuntimeError(f"apt-get install {' '.join(missing)} failed:\n{r.stderr[-2000:]}")


# --------------------------------------------------------------------------- processes


def _proc_start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks): distinguishes PID reuse."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rfind(")") + 2:].split()
    # rest[0] is field 3 (state); field 22 is rest[19]
    if rest[0] in ("Z", "X"):
        return None
    return rest[19]


def _pidfile(cfg: Config, name: str) -> Path:
    cfg.pid_dir.mkdir(parents=True, exist_ok=True)
    return cfg.pid_dir / f"{name}.pid"


def read_pid(name: str, cfg: Config | None = None) -> int | None:
    """The PID of ``name`` if it is alive (and is the process we started), else None."""
    cfg = _cfg(cfg)
    f = _pidfile(cfg, name)
    try:
        info = json.loads(f.read_text())
        pid, start = int(info["pid"]), str(info["start"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if _proc_start_time(pid) != start:
        return None
    return pid


def is_running(name: str, cfg: Config | None = None) -> bool:
    return read_pid(name, cfg) is not None


def start_process(name: str, argv: Sequence[str], log: Path | str | None = None,
                  env: Mapping[str, str] | None = None, cfg: Config | None = None,
                  cwd: Path | str | None = None) -> int:
    """Start ``argv`` in its own session (setsid), stdout+stderr appended to ``log``.

    The PID (plus its start time, so a reused PID is never mistaken for ours) goes to
    ``<state>/pids/<name>.pid``. If ``name`` already runs, its PID is returned unchanged.
    """
    cfg = _cfg(cfg)
    pid = read_pid(name, cfg)
    if pid is not None:
        return pid
    log = Path(log) if log else cfg.log(name)
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    with open(log, "ab") as out:
        out.write(f"\n=== {time.strftime('%F %T')} start {name}: {' '.join(map(str, argv))}\n".encode())
        out.flush()
        p = subprocess.Popen([str(a) for a in argv], stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env=full_env, cwd=cwd,
                             start_new_session=True, close_fds=True)
    start = None
    for _ in range(50):
        start = _proc_start_time(p.pid)
        if start is not None or p.poll() is not None:
            break
        time.sleep(0.01)
    if start is None:
        raise RuntimeError(f"{name} exited at once (rc={p.poll()}); see {log}:\n{tail(log)}")
    _pidfile(cfg, name).write_text(json.dumps({"pid": p.pid, "start": start, "argv": [str(a) for a in argv],
                                               "log": str(log)}))
    # keep the Popen from warning when garbage-collected; the process outlives us on purpose
    p.returncode = 0
    return p.pid


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def stop_process(name: str, cfg: Config | None = None, timeout: float = 10.0) -> bool:
    """SIGTERM ``name`` (its whole session), wait up to ``timeout``, then SIGKILL. True if it ran."""
    cfg = _cfg(cfg)
    pid = read_pid(name, cfg)
    f = _pidfile(cfg, name)
    if pid is None:
        f.unlink(missing_ok=True)
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)  # started with setsid: pgid == pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 5)
        while time.monotonic() < deadline:
            _reap(pid)
            if _proc_start_time(pid) is None:
                f.unlink(missing_ok=True)
                return True
            time.sleep(0.05)
    f.unlink(missing_ok=True)
    return True


def signal_process(name: str, sig: int, cfg: Config | None = None) -> bool:
    """Send ``sig`` (e.g. SIGSTOP/SIGCONT for fault tests) to ``name``. True if it runs."""
    pid = read_pid(name, cfg)
    if pid is None:
        return False
    os.kill(pid, sig)
    return True


def tail(path: Path | str, n: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# --------------------------------------------------------------------------- waiting / ports


def wait_for(fn: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """Call ``fn`` until it returns something truthy (exceptions count as "not yet")."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            r = fn()
            if r:
                return r
        except Exception as e:  # noqa: BLE001 - any failure means "not ready yet"
            last = e
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}"
                               + (f" (last error: {type(last).__name__}: {last})" if last else ""))
        time.sleep(interval)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def run(argv: Sequence[str], log: Path | str | None = None, **kw: Any) -> subprocess.CompletedProcess:
    """Run a command to completion; with ``log``, its output is appended there and shown on failure."""
    if log is None:
        return subprocess.run([str(a) for a in argv], check=True, **kw)
    with open(log, "ab") as out:
        r = subprocess.run([str(a) for a in argv], stdout=out, stderr=subprocess.STDOUT, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed (rc={r.returncode}); see {log}:\n{tail(log)}")
    return r


def which(name: str) -> str | None:
    return shutil.which(name)
