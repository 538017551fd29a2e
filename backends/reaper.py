"""Watchdog around one ``ansible-playbook``: nothing it starts outlives the run or the process that asked for it.

Why: ansible-runner starts ``ansible-playbook`` through pexpect in a new session with SIGHUP ignored,
so when the flow process was SIGKILLed the playbook (and its ssh processes) kept running for minutes
against hosts the next run was changing. ``backends/ansible.py`` therefore starts this script as the
"binary" of ansible-runner (``python -I reaper.py <ansible-playbook arguments>``). It:

1. asks the kernel for SIGTERM when the thread that started it dies (``PR_SET_PDEATHSIG``) and makes
   itself a child subreaper (``PR_SET_CHILD_SUBREAPER``), so every descendant that is orphaned,
   including ssh's daemonised ControlPersist masters, becomes its child instead of init's;
2. starts ``ansible-playbook`` with SIGKILL as its own parent-death signal, and waits for it;
3. when the playbook ends, terminates what is left (ssh masters), so a run leaves no process;
4. when its parent dies instead (or it is sent SIGTERM), kills the whole tree at once and removes the
   run's private directory, and the process directory too if that process is gone.

It imports nothing from fleetwright (it runs with ``-I``). Environment, removed before the exec:
``FW_REAPER_PARENT`` (pid to watch), ``FW_REAPER_RUN_DIR``, ``FW_REAPER_PROCESS_DIR``,
``FW_REAPER_EXEC`` (default ``ansible-playbook``). Linux only.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


class _Abandoned(Exception):
    pass


def _prctl(option: int, value: int) -> None:
    ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def _start_time(pid: int) -> str | None:
    try:
        raw = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()
    return None if fields[0] == "Z" else fields[19]


def _descendants(me: int) -> list[int]:
    """Every live descendant of ``me`` (children first), from /proc."""
    parent_of: dict[int, int] = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            raw = open(f"/proc/{p}/stat").read()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2:].split()
        if fields[0] != "Z":
            parent_of[int(p)] = int(fields[1])
    out, frontier = [], [me]
    while frontier:
        nxt = [pid for pid, pp in parent_of.items() if pp in frontier]
        out += nxt
        frontier = nxt
    return out


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _kill_tree(first: int, grace: float) -> None:
    """``first`` signal to every descendant, then SIGKILL to what is still there after ``grace`` seconds."""
    me = os.getpid()
    for pid in _descendants(me):
        try:
            os.kill(pid, first)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap()
        if not _descendants(me):
            return
        time.sleep(0.05)
    for _ in range(100):
        left = _descendants(me)
        if not left:
            break
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
        _reap()
    _reap()


def main(argv: list[str]) -> int:
    parent = int(os.environ.pop("FW_REAPER_PARENT", "0") or 0)
    run_dir = os.environ.pop("FW_REAPER_RUN_DIR", "")
    process_dir = os.environ.pop("FW_REAPER_PROCESS_DIR", "")
    real = os.environ.pop("FW_REAPER_EXEC", "ansible-playbook")
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    def abandon(signum, frame):
        raise _Abandoned()

    signal.signal(signal.SIGTERM, abandon)
    signal.signal(signal.SIGINT, abandon)
    if run_dir:
        with open(os.path.join(run_dir, "reaper.pid"), "w") as f:
            f.write(str(os.getpid()))
    rc = 128 + signal.SIGTERM
    try:
        if parent and os.getppid() != parent:  # the parent died before we could watch it
            raise _Abandoned()
        child = os.fork()
        if child == 0:
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                os.execvp(real, [real, *argv])
            finally:
                os._exit(127)
        while True:
            pid, status = os.wait()  # reaps orphans handed to us (subreaper) as well
            if pid == child:
                rc = os.waitstatus_to_exitcode(status)
                break
    except _Abandoned:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _kill_tree(signal.SIGKILL, 1.0)
        if run_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
        name = os.path.basename(process_dir.rstrip("/"))
        if process_dir and name.startswith("p") and "-" in name:
            pid_s, start = name[1:].split("-", 1)
            if pid_s.isdigit() and _start_time(int(pid_s)) != start:
                shutil.rmtree(process_dir, ignore_errors=True)
        return rc
    except ChildProcessError:
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _kill_tree(signal.SIGTERM, 2.0)  # ssh ControlPersist masters and stragglers
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
