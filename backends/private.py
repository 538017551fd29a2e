"""One private directory for key material and Ansible scratch data, cleaned after use and at start-up.

Why: a worker that is killed (SIGKILL, OOM, a power cut) cannot clean up after itself. Before this
module, every ``connections()`` wrote the SSH private key to a fresh ``fleetwright-ssh-*`` file and
every Ansible run made a ``fw-ansible-*`` directory, all in the shared system temporary directory;
five SIGKILLs left 55 copies of the key behind. Now:

* everything lives under ONE root, ``$FLEETWRIGHT_PRIVATE_DIR``, else ``$XDG_RUNTIME_DIR/fleetwright``,
  else ``<tmp>/fleetwright-<uid>``; mode 0700, owned by us, never a symlink (checked, else
  ``PermanentError``);
* each process has its own subdirectory ``p<pid>-<start time>`` (the start time makes a recycled pid
  harmless); the SSH key and known-hosts files of the process are written there once;
* each Ansible run has a subdirectory of it (:func:`run_dir`), removed when the run ends;
* the process directory is removed at interpreter exit, and the first use in a new process sweeps
  the directories of processes that no longer exist (:func:`sweep`), so a kill leaves nothing behind
  for longer than the next start. The watchdog of a run (``backends/reaper.py``) also removes its run
  directory when the process that started it dies.

:func:`die_with_parent` is the ``preexec_fn`` for any other subprocess a backend starts (git, ssh):
the child gets SIGKILL when the thread that started it dies.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import stat
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from models.errors import PermanentError

PR_SET_PDEATHSIG = 1
_lock = threading.Lock()
_mine: Path | None = None


def root() -> Path:
    """The private root directory (made 0700 if missing; refused if it is not ours and private)."""
    explicit = os.environ.get("FLEETWRIGHT_PRIVATE_DIR")
    if explicit:
        d = Path(explicit)
    elif os.environ.get("XDG_RUNTIME_DIR") and os.path.isdir(os.environ["XDG_RUNTIME_DIR"]):
        d = Path(os.environ["XDG_RUNTIME_DIR"]) / "fleetwright"
    else:
        d = Path(tempfile.gettempdir()) / f"fleetwright-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        d.mkdir(mode=0o700, parents=True)
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermanentError(f"private directory {d} must be a directory owned by uid {os.getuid()} with mode 0700 "
                             f"(found mode {oct(st.st_mode & 0o777)}, uid {st.st_uid}); fix or remove it, or set "
                             f"FLEETWRIGHT_PRIVATE_DIR")
    return d


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (field 22 of /proc/<pid>/stat), None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()
    if fields[0] == "Z":  # a zombie holds nothing
        return None
    return fields[19]


def _name(pid: int) -> str:
    return f"p{pid}-{_start_time(pid)}"


def alive(dirname: str) -> bool:
    """True if the process a ``p<pid>-<start>`` directory belongs to still runs."""
    try:
        pid_s, start = dirname[1:].split("-", 1)
        return _start_time(int(pid_s)) == start
    except ValueError:
        return False


def sweep(base: Path | None = None) -> list[str]:
    """Remove the directories of processes that no longer exist; returns their names."""
    base = base or root()
    gone = []
    for d in base.iterdir():
        if d.name.startswith("p") and d.is_dir() and not d.is_symlink() and not alive(d.name):
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d.name)
    return gone


def process_dir() -> Path:
    """This process's private directory (made, with a sweep of dead ones, on first use)."""
    global _mine
    with _lock:
        pid_dir = None if _mine is None or not _mine.name.startswith(f"p{os.getpid()}-") else _mine
        if pid_dir is None or not pid_dir.is_dir():
            base = root()
            sweep(base)
            pid_dir = base / _name(os.getpid())
            with contextlib.suppress(FileExistsError):
                pid_dir.mkdir(mode=0o700)
            if _mine is None:
                atexit.register(_cleanup)
            _mine = pid_dir
        return pid_dir


def _cleanup() -> None:
    if _mine is not None and _mine.name.startswith(f"p{os.getpid()}-"):
        shutil.rmtree(_mine, ignore_errors=True)


def write_secret(name: str, text: str) -> Path:
    """Write ``text`` to ``<process dir>/<name>`` with mode 0600 (replaced atomically if it changed)."""
    path = process_dir() / name
    with contextlib.suppress(OSError):
        if path.read_text() == text:
            return path
    tmp = path.with_name(f".{name}.{threading.get_ident()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def run_dir(prefix: str) -> Iterator[Path]:
    """A fresh 0700 directory for one run inside the process directory, removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=process_dir()))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def die_with_parent() -> None:
    """``preexec_fn``: SIGKILL this child when the thread that forked it dies (Linux ``PR_SET_PDEATHSIG``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
