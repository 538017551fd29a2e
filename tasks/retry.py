"""Retry policy shared by every task: transient errors only, exponential backoff with jitter."""
from __future__ import annotations

import os

from prefect.tasks import exponential_backoff

from models.errors import TransientError


def retry_transient(task, task_run, state) -> bool:
    """``retry_condition_fn``: retry only when the task failed with a TransientError."""
    try:
        state.result(raise_on_failure=True)
    except TransientError:
        return True
    except BaseException:  # noqa: BLE001 - anything else is permanent
        return False
    return False


def retry_options(retries: int = 4) -> dict:
    """Task options: ``FLEETWRIGHT_RETRY_BASE_SECONDS`` (default 2) scales the backoff (tests use a small one)."""
    base = float(os.environ.get("FLEETWRIGHT_RETRY_BASE_SECONDS", "2"))
    return dict(retries=retries, retry_delay_seconds=exponential_backoff(backoff_factor=base),
                retry_jitter_factor=0.5, retry_condition_fn=retry_transient)
