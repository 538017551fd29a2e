"""pytest fixtures for the real test environment (registered in tests/conftest.py).

Session fixtures start only the part a test needs (idempotent ``up``) and FAIL (never skip)
with a clear message when it cannot start. Parts this session had to start are stopped at
session end (by the last of several concurrent sessions sharing the state dir); parts already
running (``fleetwright testenv up``) are reused and left alone. Concurrent sessions should
rather use different ``FLEETWRIGHT_TESTENV_DIR``s: ``aws_env`` resets the shared moto.
``FLEETWRIGHT_TESTENV_KEEP=1`` keeps everything running after the session (faster reruns).

Fixtures
--------
``testenv_config``  the :class:`testenv.common.Config` (state dir, cache dir).
``kube_cluster``    dict for the ``mgmt`` control plane: name, server, port, token, ca_file,
                    kubeconfig, etcd_prefix.
``kube_factory``    ``make(name=None) -> dict`` (same shape) for extra control planes; all
                    deleted (processes and etcd prefix) at session end.
``vsphere_env``     the vsphere section (url, host, port, user, password, insecure, datacenter,
                    cluster, datastore, network, folder, template, ...).
``aws_env``         the aws section; function scoped: moto is reset before each test.
``ssh_hosts``       the hosts section from ``testenv.hosts``.
``machines_env``    the machines section from ``testenv.machines`` (bridge, artefacts_url, keys); boot
                    machines with ``testenv.machines.ensure_machine`` and stop them after the test
                    (runs that boot machines hold ``/tmp/fw-machines.lock``).
``postgres_env``    the postgres section from ``testenv.postgres`` (host, port, user, password, url).
``git_server``      a :class:`testenv.git.GitServer`: ``url``, ``user``, ``token``, ``create(name, seed)``
                    -> clone URL of a fresh bare repository, ``commit(name, edits, message, author)``,
                    ``head(name)``, ``hold_next_push()``, ``save_block()``.
"""
from __future__ import annotations

import json
import os
import secrets
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest

import testenv
from testenv.common import Config, _proc_start_time, file_lock, read_pid

_KEEP = os.environ.get("FLEETWRIGHT_TESTENV_KEEP", "").lower() in ("1", "true", "yes")


# --------------------------------------------------------------------------- parallel workers


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker gets its own state dir (its own moto, apiservers, vcsim)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and not os.environ.get("FLEETWRIGHT_TESTENV_WORKER_DIR"):
        base = os.environ.get("FLEETWRIGHT_TESTENV_DIR") or "/tmp/fleetwright-testenv"
        os.environ["FLEETWRIGHT_TESTENV_DIR"] = f"{base}-{worker}"
        os.environ["FLEETWRIGHT_TESTENV_WORKER_DIR"] = "1"


# --------------------------------------------------------------------------- markers


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.path)).parts
        for i in range(len(parts) - 1):
            if parts[i] == "tests" and parts[i + 1] in ("integration", "unit"):
                marker = parts[i + 1]
                if not item.get_closest_marker(marker):
                    item.add_marker(getattr(pytest.mark, marker))
                break


# --------------------------------------------------------------------------- session bookkeeping


class _Env:
    """Which parts this session brought up, and failures (so a broken part fails fast)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.sections: dict[str, dict[str, Any]] = {}
        self.failures: dict[str, str] = {}
        self.owned: list[str] = []

    def _alive(self) -> set[str]:
        d = self.cfg.pid_dir
        if not d.exists():
            return set()
        return {f.stem for f in d.glob("*.pid") if read_pid(f.stem, self.cfg) is not None}

    def ensure(self, part: str) -> dict[str, Any]:
        if part in self.sections:
            return self.sections[part]
        if part in self.failures:
            pytest.fail(self.failures[part], pytrace=False)
        before = self._alive()
        section = None
        try:
            section = testenv.up_part(self.cfg, part)
        except Exception as e:  # noqa: BLE001
            self.failures[part] = (f"test environment part {part!r} could not start: "
                                   f"{type(e).__name__}: {e} (logs: {self.cfg.log_dir})\n"
                                   f"try: .venv/bin/fleetwright testenv up --only {part}")
        if section is None:
            pytest.fail(self.failures[part], pytrace=False)
        if self._alive() - before:
            self.owned.append(part)
        self.sections[part] = section
        return section

    # Concurrent pytest sessions sharing one state dir: each registers itself; the parts any
    # session had to start are recorded, and the LAST session to finish stops them.
    def _sessions(self) -> Path:
        d = self.cfg.state_dir / "pytest-sessions"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def register(self) -> None:
        with file_lock(self.cfg.path("pytest-sessions.lock")):
            (self._sessions() / str(os.getpid())).write_text(str(_proc_start_time(os.getpid())))

    def teardown(self) -> None:
        with file_lock(self.cfg.path("pytest-sessions.lock")):
            d = self._sessions()
            owned_file = d / "owned.json"
            try:
                owned = json.loads(owned_file.read_text())
            except (OSError, ValueError):
                owned = []
            owned += [p for p in self.owned if p not in owned]
            (d / str(os.getpid())).unlink(missing_ok=True)
            others = []
            for f in d.iterdir():
                if f.name.isdigit():
                    if _proc_start_time(int(f.name)) == f.read_text():
                        others.append(f.name)
                    else:
                        f.unlink(missing_ok=True)  # a session that died
            if others or _KEEP:
                owned_file.write_text(json.dumps(owned))
                return
            owned_file.unlink(missing_ok=True)
            parts = [p for p in testenv.PARTS if p in owned]
            if parts:
                errors = testenv.down(self.cfg, parts)["errors"]
                for part, err in errors.items():
                    print(f"testenv: {part} down failed: {err}")


@pytest.fixture(scope="session")
def testenv_config() -> Config:
    return Config()


@pytest.fixture(scope="session")
def _testenv(testenv_config: Config):
    env = _Env(testenv_config)
    env.register()
    yield env
    env.teardown()


# --------------------------------------------------------------------------- kube


@pytest.fixture(scope="session")
def kube_cluster(_testenv: _Env) -> dict[str, Any]:
    section = _testenv.ensure("kube")
    return dict(section["clusters"]["mgmt"])


@pytest.fixture(scope="session")
def kube_factory(_testenv: _Env, kube_cluster: dict[str, Any]) -> Callable[..., dict[str, Any]]:
    from testenv import kube

    made: list[str] = []

    def make(name: str | None = None) -> dict[str, Any]:
        name = name or f"t-{secrets.token_hex(3)}"
        info, error = None, ""
        try:
            info = kube.ensure_control_plane(_testenv.cfg, name)
        except Exception as e:  # noqa: BLE001
            error = f"could not start control plane {name!r}: {type(e).__name__}: {e}"
        if info is None:
            pytest.fail(error, pytrace=False)
        if name not in made:
            made.append(name)
        return dict(info)

    yield make
    for name in made:
        try:
            kube.delete_control_plane(_testenv.cfg, name)
        except Exception as e:  # noqa: BLE001
            print(f"testenv: deleting control plane {name} failed: {e}")


# --------------------------------------------------------------------------- vsphere / aws / hosts


@pytest.fixture(scope="session")
def vsphere_env(_testenv: _Env) -> dict[str, Any]:
    return dict(_testenv.ensure("vsphere"))


@pytest.fixture(scope="session")
def _aws_session(_testenv: _Env) -> dict[str, Any]:
    return dict(_testenv.ensure("aws"))


def _reset_aws(cfg: Config, section: dict[str, Any]) -> None:
    mod = testenv.load_part("aws")
    reset = getattr(mod, "reset", None)
    if callable(reset):
        reset(cfg)
        return
    req = urllib.request.Request(section["endpoint_url"].rstrip("/") + "/moto-api/reset", data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()


@pytest.fixture
def aws_env(_testenv: _Env, _aws_session: dict[str, Any]) -> dict[str, Any]:
    try:
        _reset_aws(_testenv.cfg, _aws_session)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"could not reset the AWS test server: {type(e).__name__}: {e}", pytrace=False)
    return dict(_aws_session)


@pytest.fixture(scope="session")
def ssh_hosts(_testenv: _Env) -> dict[str, Any]:
    return dict(_testenv.ensure("hosts"))


@pytest.fixture(scope="session")
def git_server(_testenv: _Env):
    from testenv.git import GitServer

    return GitServer(_testenv.ensure("git"))


def pytest_report_header(config: pytest.Config) -> str:
    cfg = Config()
    return f"fleetwright testenv: state {cfg.state_dir}, cache {cfg.cache_dir}" + (
        " (kept after the session)" if _KEEP else "")


def env_json(cfg: Config) -> dict[str, Any]:
    """The environment document (``env.json``) as the session sees it."""
    return json.loads(testenv.env_file(cfg).read_text())


@pytest.fixture(scope="session")
def postgres_env(_testenv: _Env) -> dict[str, Any]:
    return dict(_testenv.ensure("postgres"))


@pytest.fixture(scope="session")
def machines_env(_testenv: _Env) -> dict[str, Any]:
    return dict(_testenv.ensure("machines"))
