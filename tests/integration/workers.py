"""Helpers shared by the tests that run the product's deployments on a real process worker.

``deployed_worker`` deploys the named deployments of ``prefect.yaml`` onto a process work pool and
starts ``prefect worker start`` for it, as an operator would; ``wait_until`` waits on a condition
with a generous bound (never a fixed sleep); ``flow_run_processes`` finds the processes a worker
started for one flow run, so a test can kill one as the OOM killer would.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

ROOT = Path(__file__).resolve().parents[2]


def wait_until(cond: Callable, seconds: float, what: str, interval: float = 0.5):
    """``cond()``'s first truthy value, polled every ``interval`` seconds; fails after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"not within {seconds:.0f}s: {what}")


def flow_run_processes(run_id) -> list[int]:
    """PIDs of the processes the worker started for this flow run (found by their PREFECT__FLOW_RUN_ID)."""
    want = f"PREFECT__FLOW_RUN_ID={run_id}".encode()
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if want in (p / "environ").read_bytes().split(b"\0"):
                    out.append(int(p.name))
            except OSError:
                continue
    return out


def parent(pid: int) -> int:
    """The parent's PID; 0 for a process gone or a zombie (it has ended: nothing waits on it)."""
    try:
        state, ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
    except (OSError, ValueError):
        return 0
    return 0 if state == "Z" else int(ppid)


def flow_run_engine(run_id) -> Optional[int]:
    """The flow run's own process: the one of its processes whose parent is not one of them (its children,
    such as ansible-playbook, inherit the run's environment too)."""
    pids = flow_run_processes(run_id)
    tops = [p for p in pids if parent(p) not in pids]
    return tops[0] if len(tops) == 1 else None


def read_run(run_id):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as c:
        return c.read_flow_run(run_id)


def descendants(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            kids.setdefault(parent(int(p.name)), []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


@contextlib.contextmanager
def deployed_worker(prefect_api: str, deployments: list[str], log_path: Path, env: Optional[dict] = None,
                    limit: int = 2) -> Iterator[subprocess.Popen]:
    """The product's ``deployments`` (prefect.yaml) on the ``fleetwright`` process pool, and one worker for them.

    The deployments' schedules are paused (a test starts the runs it means; a scheduled sweep on a shared
    test server would run later, under another module's worker). The worker's flow runs inherit ``env``
    (default: this process's environment). On exit the worker's
    flow-run processes are let to end on their own first (a stopped one would leave its private directory
    to the next process's sweep), then the worker is stopped."""
    wenv = dict(env if env is not None else os.environ, PREFECT_API_URL=prefect_api, FLEETWRIGHT_HOME=str(ROOT),
                PREFECT_WORKER_QUERY_SECONDS="2",
                PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    prefect = str(Path(sys.executable).parent / "prefect")
    names = [a for d in deployments for a in ("--name", d)]
    for cmd in ([prefect, "work-pool", "create", "fleetwright", "--type", "process", "--overwrite"],
                [prefect, "--no-prompt", "deploy", *names]):
        r = subprocess.run(cmd, env=wenv, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    pause_schedules(prefect_api, deployments)
    log = open(log_path, "w")
    proc = subprocess.Popen([prefect, "worker", "start", "--pool", "fleetwright", "--limit", str(limit)], env=wenv,
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(AssertionError):
            wait_until(lambda: not descendants(proc.pid), 120, "the worker's flow-run processes to exit", interval=1)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def pause_schedules(prefect_api: str, deployments: list[str]) -> None:
    """Deactivate the deployments' schedules and delete the runs a schedule made before that."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState
    from prefect.client.schemas.filters import FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as c:
        for name in deployments:
            dep = c.read_deployment_by_name(f"{name}/{name}")
            if not dep.schedules:
                continue
            for sch in dep.schedules:
                c.update_deployment_schedule(dep.id, sch.id, active=False)
            for fr in c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                                       flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                                           type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])))):
                if fr.auto_scheduled:
                    c.delete_flow_run(fr.id)


def finished_steps(run_id) -> tuple[dict, set[str]]:
    """The run's task runs by name, and the names of the lifecycle steps it finished (not observations or gates)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as c:
        first = {t.name: t for t in c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))}
    done = {n for n, t in first.items() if t.state and t.state.is_completed()
            and not n.startswith(("observe", "health gate", "verify"))}
    return first, done


def crashed(run_id):
    """The killed run's final state, once its worker has reported it (Crashed, or Failed)."""
    state = wait_until(lambda: (s := read_run(run_id).state) and s.is_final() and s, 300,
                       "the worker to report the killed run")
    assert state.is_crashed() or state.is_failed(), state
    return state


def retry_like_the_ui(run_id, log_path: Path):
    """What the UI's Retry button does: the same run, Scheduled as AwaitingRetry, forced out of its final state;
    returns the retried run's final state. A late second crash report of the killed attempt can land on the
    retry before it ran (run_count unchanged): Retry is pressed again then, as a person would."""
    from prefect.client.orchestration import get_client
    from prefect.states import AwaitingRetry

    runs_before = read_run(run_id).run_count
    for _ in range(3):
        with get_client(sync_client=True) as c:
            res = c.set_flow_run_state(run_id, AwaitingRetry(message="Retry from the UI"), force=True)
        assert res.status.value == "ACCEPT", res
        done = wait_until(lambda: (s := read_run(run_id).state) and s.is_final() and s, 900,
                          f"the retried run to end ({log_path.read_text()[-2000:]})", interval=2)
        if not (done.is_crashed() and read_run(run_id).run_count == runs_before):
            break
    assert done.is_completed(), (done, log_path.read_text()[-3000:])
    assert read_run(run_id).run_count >= 2  # the same flow run ran again: no new run was made
    return done


def assert_not_redone(run_id, first: dict, done_before: set[str]) -> None:
    """Each step the dead attempt finished was not carried out again: its later task runs are cache hits."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as c:
        tasks = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    by_name: dict[str, list] = {}
    for t in tasks:
        by_name.setdefault(t.name, []).append(t)
    for name in done_before:
        again = [t for t in by_name[name] if t.id != first[name].id]
        assert all(t.state.name == "Cached" for t in again), (name, [t.state.name for t in again])
