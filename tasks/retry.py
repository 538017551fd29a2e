"""Retry policy shared by every task: transient errors only, exponential backoff with jitter.

Two bounds the backoff alone does not give:

* a ``TransientError`` that carries a ``delay`` (a server's ``Retry-After``, a throttling delay)
  is waited for at least that long before Prefect's own backoff starts the next attempt;
* retries stop once a task run has spent ``FLEETWRIGHT_RETRY_TOTAL_SECONDS`` (default 3600) in
  all, counted from its first attempt: a long wait (an EKS update, a node group going ACTIVE)
  that times out is retried, but not for hours.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from datetime import datetime, timezone

from prefect.tasks import exponential_backoff

from models.errors import TransientError

log = logging.getLogger("fleetwright.retry")

_FIRST: dict[str, float] = {}  # task run id -> wall-clock time of its first attempt (epoch seconds)
_LOCK = threading.Lock()


def total_seconds() -> float:
    return float(os.environ.get("FLEETWRIGHT_RETRY_TOTAL_SECONDS", "3600"))


def _first_attempt(task_run) -> float:
    now = time.time()
    started = getattr(task_run, "start_time", None)
    if isinstance(started, datetime):
        started = (started if started.tzinfo else started.replace(tzinfo=timezone.utc)).timestamp()
    else:
        started = now
    key = str(getattr(task_run, "id", None) or id(task_run))
    with _LOCK:
        for k in [k for k, t in _FIRST.items() if now - t > 2 * total_seconds()]:
            del _FIRST[k]  # runs long finished
        first = min(_FIRST.get(key, started), started)
        _FIRST[key] = first
    return first


def may_retry(task_run, err: TransientError) -> bool:
    """Within the total budget? Then wait out ``err.delay`` (if any) and say yes."""
    delay = max(float(getattr(err, "delay", None) or 0.0), 0.0)
    spent = time.time() - _first_attempt(task_run)
    if spent + delay > total_seconds():
        log.warning("not retrying after %.0fs in all (bound %.0fs): %s", spent, total_seconds(), err)
        return False
    if delay:
        log.info("the server asked to wait %.1fs before retrying", delay)
        time.sleep(delay)  # then Prefect's own backoff: the next attempt starts no sooner than asked
    return True


def retry_transient(task, task_run, state) -> bool:
    """``retry_condition_fn``: retry only when the task failed with a TransientError, within the total bound."""
    try:
        state.result(raise_on_failure=True)
    except TransientError as e:
        return may_retry(task_run, e)
    except BaseException:  # noqa: BLE001 - anything else is permanent
        return False
    return False


def retry_options(retries: int = 4) -> dict:
    """Task options: ``FLEETWRIGHT_RETRY_BASE_SECONDS`` (default 2) scales the backoff (tests use a small one)."""
    base = float(os.environ.get("FLEETWRIGHT_RETRY_BASE_SECONDS", "2"))
    return dict(retries=retries, retry_delay_seconds=exponential_backoff(backoff_factor=base),
                retry_jitter_factor=0.5, retry_condition_fn=retry_transient)


def call(fn, *args, retries: int = 4, **kwargs):
    """``fn(*args, **kwargs)`` with the same policy as a task with :func:`retry_options`, without a task run.

    For work inside a task that would cost more as task runs than it does itself (a sweep's repairs):
    TransientError only, exponential backoff (``FLEETWRIGHT_RETRY_BASE_SECONDS`` x 2^attempt) with
    jitter, a server's ``delay`` waited out first, within ``FLEETWRIGHT_RETRY_TOTAL_SECONDS`` in all.
    """
    import random

    base = float(os.environ.get("FLEETWRIGHT_RETRY_BASE_SECONDS", "2"))
    first = time.time()
    for attempt in range(retries + 1):
        try:
            return fn(*args, **kwargs)
        except TransientError as e:
            delay = max(float(getattr(e, "delay", None) or 0.0), 0.0)
            if attempt == retries or time.time() - first + delay > total_seconds():
                raise
            log.info("retrying %s after %s (attempt %d of %d)", getattr(fn, "__name__", fn), e, attempt + 2,
                     retries + 1)
            time.sleep(delay + base * 2 ** attempt * random.uniform(0.5, 1.5))
    raise AssertionError("unreachable")
