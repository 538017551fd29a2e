"""PostgreSQL part of the test environment: Debian's ``postgresql`` in a private directory.

The Prefect server of the production topology (README, "Production") runs on PostgreSQL,
never on SQLite, so the tests and the benchmark run it the same way. This part installs
Debian's ``postgresql`` if missing (apt, under the shared apt lock), makes a cluster with
``initdb`` in ``<state>/postgres/data`` (as the ``postgres`` user: initdb refuses root),
starts ``postgres`` on a free 127.0.0.1 port and creates one database per name asked for
(``database(cfg, name)``), all owned by the role ``fleetwright`` with a random password.

Section of the environment document::

    {"host": "127.0.0.1", "port": 54321, "user": "fleetwright", "password": "...",
     "database": "prefect", "url": "postgresql+asyncpg://fleetwright:...@127.0.0.1:54321/prefect",
     "data_dir": ".../postgres/data", "pid": 1234, "version": "15"}
"""
from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any

from testenv.common import (
    Config,
    apt_install,
    file_lock,
    free_port,
    get_state,
    progress,
    read_pid,
    start_process,
    stop_process,
    tail,
    update_state,
    wait_for,
)

NAME = "postgres"
PACKAGES = ("postgresql",)
USER = "fleetwright"
DATABASE = "prefect"


def _cfg(cfg: Config | None) -> Config:
    return cfg if cfg is not None else Config()


def bindir() -> Path:
    """The newest installed PostgreSQL server binaries (``/usr/lib/postgresql/<v>/bin``)."""
    root = Path("/usr/lib/postgresql")
    versions = sorted((p for p in root.glob("*/bin/postgres")), key=lambda p: int(p.parent.parent.name))
    if not versions:
        raise RuntimeError("postgresql is installed but no /usr/lib/postgresql/<version>/bin/postgres exists")
    return versions[-1].parent


def _as_postgres() -> list[str]:
    """A prefix that runs a command as the ``postgres`` system user when we are root."""
    if os.geteuid() != 0:
        return []
    pwd.getpwnam("postgres")  # made by the Debian package
    return ["setpriv", "--reuid", "postgres", "--regid", "postgres", "--init-groups", "--"]


def _chown(path: Path) -> None:
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(path, pw.pw_uid, pw.pw_gid)


def _psql(sec: dict[str, Any], sql: str, database: str = "postgres") -> str:
    env = dict(os.environ, PGPASSWORD=sec["password"])
    r = subprocess.run([str(bindir() / "psql"), "-h", sec["host"], "-p", str(sec["port"]), "-U", sec["user"], "-d", database,
                        "-v", "ON_ERROR_STOP=1", "-At", "-c", sql], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"psql failed: {r.stderr.strip()}")
    return r.stdout


def _ready(sec: dict[str, Any]) -> bool:
    r = subprocess.run([str(bindir() / "pg_isready"), "-h", sec["host"], "-p", str(sec["port"]), "-q"])
    return r.returncode == 0


def url(sec: dict[str, Any], database: str | None = None) -> str:
    """The SQLAlchemy URL Prefect's ``PREFECT_SERVER_DATABASE_CONNECTION_URL`` takes."""
    return (f"postgresql+asyncpg://{sec['user']}:{sec['password']}@{sec['host']}:{sec['port']}/"
            f"{database or sec['database']}")


def _initdb(cfg: Config, data: Path, password: str) -> None:
    root = data.parent
    root.mkdir(parents=True, exist_ok=True)
    _chown(root)
    pwfile = root / "pwfile"
    pwfile.write_text(password + "\n")
    _chown(pwfile)
    os.chmod(pwfile, 0o600)
    log = cfg.log("postgres-initdb")
    with open(log, "ab") as out:
        r = subprocess.run([*_as_postgres(), str(bindir() / "initdb"), "-D", str(data), "-U", USER,
                            f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8"],
                           stdout=out, stderr=subprocess.STDOUT)
    pwfile.unlink(missing_ok=True)
    if r.returncode != 0:
        raise RuntimeError(f"initdb failed (rc={r.returncode}); see {log}:\n{tail(log)}")


def up(cfg: Config | None = None) -> dict[str, Any]:
    """Start PostgreSQL if it is not running; return its section (same on every call)."""
    cfg = _cfg(cfg)
    apt_install(PACKAGES)
    with file_lock(cfg.path("postgres.lock"), "postgres up"):
        pid = read_pid(NAME, cfg)
        sec = get_state(cfg, NAME)
        if pid is not None and sec and _ready(sec):
            return sec
        if pid is not None:
            stop_process(NAME, cfg)
        root = cfg.state_dir / "postgres"
        data = root / "data"
        sock = root / "sock"
        if sec and (data / "PG_VERSION").exists():  # keep the data and password of a stopped cluster
            password = sec["password"]
        else:
            shutil.rmtree(root, ignore_errors=True)
            password = secrets.token_hex(16)
            progress(f"postgres: initdb in {data}")
            _initdb(cfg, data, password)
        sock.mkdir(parents=True, exist_ok=True)
        _chown(sock)
        port = free_port()
        log = cfg.log(NAME)
        progress(f"postgres: starting on 127.0.0.1:{port}")
        argv = [*_as_postgres(), str(bindir() / "postgres"), "-D", str(data), "-p", str(port),
                "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={sock}",
                "-c", "max_connections=200", "-c", "shared_buffers=128MB", "-c", "synchronous_commit=off",
                "-c", "log_min_messages=warning"]
        pid = start_process(NAME, argv, cfg=cfg)
        sec = {"host": "127.0.0.1", "port": port, "user": USER, "password": password, "database": DATABASE,
               "data_dir": str(data), "pid": pid, "version": bindir().parent.name}

        def ready() -> bool:
            if read_pid(NAME, cfg) is None:
                raise RuntimeError(f"postgres exited; see {log}:\n{tail(log)}")
            return _ready(sec)

        try:
            wait_for(ready, 60, f"postgres on port {port}", interval=0.2)
            _ensure_database(sec, DATABASE)
        except Exception:
            stop_process(NAME, cfg)
            raise
        sec["url"] = url(sec)
        update_state(cfg, NAME, sec)
        progress(f"postgres: ready on 127.0.0.1:{port} (pid {pid})")
        return sec


def _ensure_database(sec: dict[str, Any], name: str) -> None:
    if not _psql(sec, f"SELECT 1 FROM pg_database WHERE datname = '{name}'").strip():
        _psql(sec, f'CREATE DATABASE "{name}" OWNER {USER}')


def database(cfg: Config | None, name: str, fresh: bool = False) -> str:
    """A database ``name`` on the running cluster (dropped and made again when ``fresh``); its URL."""
    sec = get_state(_cfg(cfg), NAME)
    if not sec:
        raise RuntimeError("the postgres part is not up")
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"database name {name!r}: letters, digits, - and _ only")
    if fresh:
        _psql(sec, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    _ensure_database(sec, name)
    return url(sec, name)


def down(cfg: Config | None = None) -> None:
    cfg = _cfg(cfg)
    with file_lock(cfg.path("postgres.lock"), "postgres down"):
        if stop_process(NAME, cfg, timeout=20):  # SIGTERM is PostgreSQL's "smart" shutdown
            progress("postgres: stopped")
        update_state(cfg, NAME, None)
        shutil.rmtree(cfg.state_dir / "postgres", ignore_errors=True)


def status(cfg: Config | None = None) -> dict[str, Any]:
    cfg = _cfg(cfg)
    pid = read_pid(NAME, cfg)
    sec = get_state(cfg, NAME) or {}
    out: dict[str, Any] = {"running": pid is not None, "pid": pid}
    if pid is not None and sec:
        out.update({k: v for k, v in sec.items() if k not in ("password", "url")} | {"ready": _ready(sec)})
    return out
