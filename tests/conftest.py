"""Shared pytest setup: the test environment's fixtures live in testenv.pytest_plugin.

``make test`` runs ``tests/run.sh``: the on-prem modules (fixed loopback addresses) in one serial
session, everything else beside it in parallel xdist workers (``--dist loadfile``); each worker
has its own test-environment state dir (see ``testenv.pytest_plugin``).

A session-finish check fails the run if it leaked key material or scratch data: directories of dead
processes in fleetwright's private directory, and Ansible run directories of this process still
there after the suite. The session gets a private directory of its own (``FLEETWRIGHT_PRIVATE_DIR``,
inherited by every process it starts), so only its own files count; it is removed at the end. The
crash test also counts the names fleetwright once left in the shared temporary directory.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

pytest_plugins = ["testenv.pytest_plugin"]

_before: set[str] = set()
_session_dir: dict[str, str] = {}


def pytest_configure(config):
    if getattr(config, "workerinput", None) is not None or "FLEETWRIGHT_PRIVATE_DIR" in os.environ:
        return  # an xdist worker, or a directory chosen by the caller: keep it
    d = tempfile.mkdtemp(prefix="fw-pytest-")
    os.environ["FLEETWRIGHT_PRIVATE_DIR"] = str(Path(d) / "private")
    _session_dir["dir"] = d


def leftovers(legacy: bool = False) -> set[str]:
    """Key files and fleetwright scratch directories that no running process uses.

    ``legacy`` adds the names fleetwright once used in the shared temporary directory; only a test
    that holds the on-prem lock can tell they are its own (other sessions' old code may make them).
    """
    from backends import private

    out: set[str] = set()
    if legacy:
        tmp = Path(tempfile.gettempdir())
        out |= {str(p) for p in tmp.glob("fleetwright-ssh-*")} | {str(p) for p in tmp.glob("fw-ansible-*")}
    base = private.root()
    for d in base.iterdir():
        if not d.name.startswith("p"):
            continue
        if not private.alive(d.name):
            out.add(str(d))
        elif d.name.startswith(f"p{os.getpid()}-"):
            out |= {str(r) for r in d.iterdir() if r.is_dir() and r.name.startswith("ansible-")}
    return out


def pytest_sessionstart(session):
    _before.clear()
    _before.update(leftovers())


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    if getattr(session.config, "workerinput", None) is not None:  # an xdist worker: the controller checks
        return
    leaked = sorted(leftovers() - _before)
    if leaked:
        session.config.pluginmanager.get_plugin("terminalreporter").write_line(
            f"LEAKED key material / scratch directories ({len(leaked)}): " + ", ".join(leaked[:10]), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if _session_dir.get("dir"):
        shutil.rmtree(_session_dir["dir"], ignore_errors=True)
