"""Per-cluster locks and per-backend API rate limits, as Prefect global concurrency limits.

A cluster lock is a limit of 1 named ``fleetwright-cluster-<name>``, so two
flows never change one cluster at once, across processes and workers. Its
lease is renewed while held and expires when a holder dies, so a crashed run
never blocks the next one for long. API limits (``fleetwright-api-<backend>``)
are rate limits with slot decay, created once by ``ensure_api_limits``.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency, rate_limit
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

API_LIMITS = {"aws": (20, 10.0), "vsphere": (10, 5.0), "metal": (8, 2.0), "kubernetes": (50, 25.0)}
_known: set[str] = set()


def ensure_limit(name: str, limit: int, slot_decay_per_second: float | None = None) -> None:
    if name in _known:
        return
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                fields = {"slot_decay_per_second": slot_decay_per_second} if slot_decay_per_second else {}
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit, **fields))
            except ObjectAlreadyExists:
                pass
    _known.add(name)


def lock_name(cluster: str) -> str:
    return f"fleetwright-cluster-{cluster}"


@contextmanager
def cluster_lock(cluster: str, timeout_seconds: float | None = None):
    """Hold the cluster's lock; waits for another flow holding it."""
    name = lock_name(cluster)
    ensure_limit(name, 1)
    lease = max(60.0, float(os.environ.get("FLEETWRIGHT_LOCK_LEASE_SECONDS", "60")))  # the server's minimum is 60
    # A failed lease renewal (the API briefly unavailable) logs and carries on rather than killing a step
    # half-way: a half-done step is worse than the small chance of a second holder after a long outage.
    with concurrency(name, occupy=1, timeout_seconds=timeout_seconds, lease_duration=lease, strict=True,
                     raise_on_lease_renewal_failure=False):
        yield


def ensure_api_limits() -> None:
    for backend, (limit, decay) in API_LIMITS.items():
        ensure_limit(f"fleetwright-api-{backend}", limit, decay)


def api_slot(backend: str) -> None:
    """Take one slot of the backend API's rate limit (blocks while the fleet is over its rate)."""
    name = f"fleetwright-api-{backend}"
    limit, decay = API_LIMITS.get(backend, (20, 10.0))
    ensure_limit(name, limit, decay)
    rate_limit(name, occupy=1, strict=True)
