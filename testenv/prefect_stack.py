"""The production topology on this machine: a Prefect server on PostgreSQL and N process workers.

Used by the integration tests (tests/integration/test_distributed.py) and the sweep benchmark
(bench/sweep.py), started the way the README's "Production" section says:

* ``prefect server start`` with ``PREFECT_SERVER_DATABASE_CONNECTION_URL`` on a database of the
  ``postgres`` part (one fresh database per stack);
* the ``fleetwright`` process work pool, every flow deployed from ``prefect.yaml``
  (``prefect deploy --all``), the automations in ``automations/`` (dead workers' runs crashed);
* ``workers`` process workers (``prefect worker start --pool fleetwright``), each its own process,
  started and stopped by name (``kill_worker`` kills one with its flow-run processes: a dead machine).

Not a ``testenv`` part (each user wants its own settings): ``Stack(cfg, name, ...).start()``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from testenv import postgres
from testenv.common import Config, free_port, progress, read_pid, start_process, stop_process, wait_for

ROOT = Path(__file__).resolve().parents[1]
POOL = "fleetwright"


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc)."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                ppid = int(stat[stat.rfind(")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def peak_rss_mb(pid: int) -> float:
    """The peak RSS (VmHWM) of a process."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


_PAUSE_SCHEDULES = """
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as c:
    for d in c.read_deployments():
        for s in c.read_deployment_schedules(d.id):
            c.update_deployment_schedule(d.id, s.id, active=False)
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    for r in c.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])))):  # made by the schedule before the pause
        c.delete_flow_run(r.id)
"""


class Stack:
    """A Prefect server on PostgreSQL plus process workers on one pool; ``env`` is what clients need."""

    def __init__(self, cfg: Config, name: str, *, workers: int = 3, worker_limit: int = 4,
                 env: dict[str, str] | None = None, automation_settings: dict[str, str] | None = None,
                 schedules: bool = False):
        self.cfg, self.name, self.n_workers, self.worker_limit = cfg, name, workers, worker_limit
        self.extra_env = dict(env or {})
        self.automation_settings = automation_settings or {}
        self.schedules = schedules
        self.home = cfg.state_dir / f"prefect-{name}"
        self.port = 0
        self.api = ""
        self.db_url = ""

    # ------------------------------------------------------------------ names and env
    @property
    def server_name(self) -> str:
        return f"prefect-{self.name}-server"

    def worker_name(self, i: int) -> str:
        return f"prefect-{self.name}-worker-{i}"

    def logs(self) -> list[Path]:
        return [self.cfg.log(self.server_name)] + [self.cfg.log(self.worker_name(i)) for i in range(self.n_workers)]

    @property
    def env(self) -> dict[str, str]:
        bindir = str(Path(sys.executable).parent)
        return {**os.environ, "PREFECT_HOME": str(self.home), "PREFECT_API_URL": self.api,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
                "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_WORKER_QUERY_SECONDS": "2",
                "PREFECT_WORKER_HEARTBEAT_SECONDS": "10",
                "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(self.home / "results"),
                "PREFECT_LOCAL_STORAGE_PATH": str(self.home / "results"),
                "FLEETWRIGHT_HOME": str(ROOT), "PATH": f"{bindir}:{os.environ.get('PATH', '')}",
                **self.extra_env}

    def _prefect(self) -> str:
        return str(Path(sys.executable).parent / "prefect")

    # ------------------------------------------------------------------ start / stop
    def start(self) -> "Stack":
        pg = postgres.up(self.cfg)
        self.db_url = postgres.database(self.cfg, f"prefect_{self.name}".replace("-", "_"), fresh=True)
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        env = {**self.env, "PREFECT_SERVER_DATABASE_CONNECTION_URL": self.db_url,
               "PREFECT_SERVER_DATABASE_TIMEOUT": "30", "PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT": "30",
               "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "5"}
        progress(f"prefect[{self.name}]: server on 127.0.0.1:{self.port}, PostgreSQL {pg['port']}")
        start_process(self.server_name, [self._prefect(), "server", "start", "--host", "127.0.0.1",
                                         "--port", str(self.port)], env=env, cfg=self.cfg)

        def healthy() -> bool:
            if read_pid(self.server_name, self.cfg) is None:
                raise RuntimeError(f"prefect server exited; see {self.cfg.log(self.server_name)}")
            with urllib.request.urlopen(f"{self.api}/health", timeout=2) as r:
                return r.status == 200

        wait_for(healthy, 180, "the Prefect server", interval=0.5)
        self.deploy()
        for i in range(self.n_workers):
            self.start_worker(i)
        return self

    def sh(self, *args: str) -> str:
        r = subprocess.run(args, env=self.env, cwd=ROOT, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:4])} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return r.stdout

    def deploy(self) -> None:
        """Work pool, every deployment of prefect.yaml, the automations."""
        self.sh(self._prefect(), "work-pool", "create", POOL, "--type", "process", "--overwrite")
        self.sh(self._prefect(), "--no-prompt", "deploy", "--all")
        self.sh(sys.executable, "-c", "import json, sys; from fleetwright.automations import ensure; "
                f"print(ensure(json.loads(sys.argv[1])))", json.dumps(self.automation_settings))
        if not self.schedules:  # runs start when the test or benchmark says, not every 15 minutes
            self.sh(sys.executable, "-c", _PAUSE_SCHEDULES)

    def start_worker(self, i: int) -> int:
        return start_process(self.worker_name(i), [self._prefect(), "worker", "start", "--pool", POOL,
                                                   "--name", f"{self.name}-w{i}", "--limit", str(self.worker_limit)],
                             env=self.env, cfg=self.cfg, cwd=ROOT)

    def worker_pids(self) -> dict[int, int]:
        return {i: p for i in range(self.n_workers) if (p := read_pid(self.worker_name(i), self.cfg)) is not None}

    def kill_worker(self, i: int) -> list[int]:
        """SIGKILL worker ``i`` and every process it started (its flow runs): the machine is gone."""
        pid = read_pid(self.worker_name(i), self.cfg)
        if pid is None:
            return []
        victims = [pid] + _children(pid)
        for p in victims:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stop_process(self.worker_name(i), self.cfg, timeout=1)
        return victims

    def worker_of(self, pid: int) -> int | None:
        """Which worker started process ``pid`` (a flow run's infrastructure pid), if any."""
        for i, wpid in self.worker_pids().items():
            if pid in _children(wpid):
                return i
        return None

    def stop(self) -> None:
        for i in range(self.n_workers):
            self.kill_worker(i)
        stop_process(self.server_name, self.cfg, timeout=15)

    def rss(self) -> dict[str, Any]:
        """RSS now (MB) of the server and each worker (with the flow-run processes it started)."""
        out: dict[str, Any] = {}
        spid = read_pid(self.server_name, self.cfg)
        if spid:
            out["server"] = rss_mb(spid) + sum(rss_mb(c) for c in _children(spid))
        for i, wpid in self.worker_pids().items():
            out[f"worker-{i}"] = rss_mb(wpid)
            out[f"worker-{i}-runs"] = [round(rss_mb(c)) for c in _children(wpid)]
        return out

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs() if p.exists())

    def wait(self, timeout: float = 5.0) -> None:
        time.sleep(timeout)
