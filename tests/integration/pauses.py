"""Helpers for flow tests that answer an approval: run a flow in a thread, wait for it to pause, resume it.

The answer goes through the Prefect API (``resume_flow_run`` with ``run_input``), as the UI's form does.
"""
from __future__ import annotations

import contextvars
import threading
import time
from typing import Callable, Optional


def in_thread(fn: Callable, *args, **kwargs) -> threading.Thread:
    """A thread that keeps this test's Prefect settings (API URL): contextvars are not inherited otherwise."""
    ctx = contextvars.copy_context()
    t = threading.Thread(target=ctx.run, args=(fn, *args), kwargs=kwargs, daemon=True)
    t.start()
    return t


def paused_run(flow_name: str, timeout: float = 180, since: Optional[float] = None):
    """The newest paused run of ``flow_name`` that started after ``since`` (waits for it, at most ``timeout`` seconds).

    ``since`` matters: a run another test left paused on the same Prefect server must not be the one answered
    (that mistake left a sweep paused for its whole approval timeout while a stale run got the answer).
    """
    from datetime import datetime, timezone

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterStartTime,
                                                FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    paused = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
    if since is not None:
        paused.start_time = FlowRunFilterStartTime(after_=datetime.fromtimestamp(since, timezone.utc))
    deadline = time.time() + timeout
    with get_client(sync_client=True) as c:
        while time.time() < deadline:
            runs = c.read_flow_runs(flow_run_filter=paused, flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                    sort=FlowRunSort.START_TIME_DESC, limit=5)
            if runs:
                return runs[0]
            time.sleep(0.5)
    raise AssertionError(f"no {flow_name} run paused for approval within {timeout}s")


def run_answering(fn: Callable, flow_name: str, answer: Optional[dict], *, check_paused: Callable[[], None] = lambda: None,
                  **kwargs):
    """Run ``fn(**kwargs, return_state=True)``; when it pauses, call ``check_paused`` then resume with ``answer``.

    ``answer=None`` answers nothing (the approval times out). Returns the final state.
    """
    box: dict = {}
    since = time.time() - 1  # the run this call starts, not one an earlier test left paused
    t = in_thread(lambda: box.update(state=fn(**kwargs, return_state=True)))
    run = paused_run(flow_name, since=since)
    check_paused()
    if answer is not None:
        from prefect.flow_runs import resume_flow_run

        resume_flow_run(run.id, run_input=answer)
    t.join(600)
    assert not t.is_alive(), f"{flow_name} did not finish after the approval"
    return box["state"]
