"""Per-cluster locks (Prefect global concurrency limits) and per-API call limits.

A cluster lock is a limit of 1 named ``fleetwright-cluster-<name>``, so two
flows never change one cluster at once, across processes and workers. Its
lease is renewed while held and expires when a holder dies, so a crashed run
never blocks the next one for long; a lost lease stops the step, and waits are
bounded. It is the only lock: backends take none of their own. API limits: see
"API limits" below.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import ExitStack, contextmanager, suppress

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect._internal.concurrency.cancellation import CancelledError
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.types._concurrency import ConcurrencyLeaseHolder

from models.errors import LockLost, LockTimeout

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


def lock_timeout_seconds() -> float:
    """How long a run waits for a cluster's lock: ``FLEETWRIGHT_LOCK_TIMEOUT_SECONDS`` (default 30 min)."""
    return float(os.environ.get("FLEETWRIGHT_LOCK_TIMEOUT_SECONDS", "1800"))


def _holder():
    """This run as the lease's holder (recorded by the server), when there is a run."""
    from prefect.runtime import flow_run, task_run

    with suppress(Exception):
        if task_run.get_id():
            return ConcurrencyLeaseHolder(type="task_run", id=task_run.get_id())
        if flow_run.get_id():
            return ConcurrencyLeaseHolder(type="flow_run", id=flow_run.get_id())
    return None


@contextmanager
def cluster_lock(cluster: str, timeout_seconds: float | None = None):
    """Hold the cluster's lock, a Prefect lease: the one lock of every backend, across workers and machines.

    * Only a live holder keeps it: the lease is renewed while held and expires when the holder dies
      (and its Ansible processes die with it, ``backends/reaper.py``), so a crashed run blocks the next
      one for one lease at most and never runs alongside it.
    * A lost lease (renewal failed: the server was unreachable for longer than Prefect's retries) stops
      the step: Prefect interrupts this thread and the step fails with ``LockLost``. Carrying on would
      let a second holder change the cluster at the same time.
    * The wait is bounded (``timeout_seconds``, default :func:`lock_timeout_seconds`): ``LockTimeout``
      names the cluster. Open-source Prefect does not say who holds a lease, so the error does not either.
    """
    name = lock_name(cluster)
    ensure_limit(name, 1)
    lease = max(60.0, float(os.environ.get("FLEETWRIGHT_LOCK_LEASE_SECONDS", "60")))  # the server's minimum is 60
    wait = lock_timeout_seconds() if timeout_seconds is None else timeout_seconds
    entered = done = False
    try:
        with concurrency(name, occupy=1, timeout_seconds=wait, lease_duration=lease, strict=True,
                         holder=_holder(), raise_on_lease_renewal_failure=True):
            entered = True
            yield
            done = True
    except CancelledError as e:  # Prefect's lease watcher interrupted the step: the lease is gone
        if done:
            return
        raise _lost(cluster, name) from e
    except TimeoutError as e:
        if not entered:
            raise LockTimeout(f"cluster {cluster}: waited {wait:.0f}s for its lock ({name}); another run holds it. "
                              f"If no run of this cluster is running, its lease expires within {lease:.0f}s") from e
        if _interrupted(e):
            raise _lost(cluster, name) from e
        if not done:
            raise
        _release_failed(cluster, e, lease)
    except Exception as e:
        if _interrupted(e):  # the release after the interruption failed too (the API is gone)
            raise _lost(cluster, name) from e
        if not done:
            raise
        _release_failed(cluster, e, lease)


def _interrupted(e: BaseException) -> bool:
    """True if ``e`` was raised while Prefect's CancelledError (a lost lease) was being handled."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, CancelledError):
            return True
        seen.add(id(e))
        e = e.__context__
    return False


def _lost(cluster: str, name: str) -> LockLost:
    return LockLost(f"cluster {cluster}: the lease on its lock ({name}) could not be renewed and is lost; "
                    f"the step was stopped so that no second run changes the cluster at the same time. "
                    f"Run it again when the Prefect API answers")


def _release_failed(cluster: str, e: BaseException, lease: float) -> None:
    """The work is done; only giving the lease back failed (API unreachable): it expires by itself."""
    logging.getLogger("fleetwright.locks").warning(
        "cluster %s: could not release its lock (%s: %s); the lease expires within %.0fs", cluster, type(e).__name__,
        e, lease)


# --------------------------------------------------------------------------- API limits
# A limit per provider API bounds the CALLS a backend makes, not task calls: every call goes
# through ``backends.base.api_call(api)``, guarded here by a per-process limiter (at most
# ``concurrency`` calls in flight and ``rate`` calls per second). Fleet-wide, a sweep shard holds
# a share of each API's Prefect global concurrency limit ``fleetwright-api-<api>`` (limit =
# the fleet's concurrency) for its whole run and sizes its limiter to that share, so the shards
# running at once never exceed the fleet's limits, at one server round trip per shard.

DEFAULT_API_LIMITS: dict[str, tuple[int, float]] = {
    "aws": (20, 10.0), "vsphere": (10, 5.0), "metal": (8, 2.0), "kubernetes": (50, 25.0)}
API_LIMITS = DEFAULT_API_LIMITS  # kept name: concurrency, calls per second


def api_limits() -> dict[str, tuple[int, float]]:
    """The fleet's limits: defaults, overridden by ``FLEETWRIGHT_API_LIMITS="aws=20:10,kubernetes=50:25"``."""
    out = dict(DEFAULT_API_LIMITS)
    raw = os.environ.get("FLEETWRIGHT_API_LIMITS", "").strip()
    for item in filter(None, (x.strip() for x in raw.split(","))):
        try:
            api, _, spec = item.partition("=")
            conc, _, rate = spec.partition(":")
            out[api.strip()] = (int(conc), float(rate) if rate else float(conc))
            if out[api.strip()][0] < 1 or out[api.strip()][1] <= 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"FLEETWRIGHT_API_LIMITS: {item!r} is not api=CONCURRENCY:CALLS_PER_SECOND "
                             f"(both positive), e.g. aws=20:10") from None
    return out


class ApiLimiter:
    """Per process: for each API at most ``concurrency`` calls in flight and ``rate`` calls per second.

    One lock, one condition per API: a call that ends wakes one waiter of its own API, not every
    waiting thread of every API (a sweep has dozens waiting; waking all of them at each of its
    tens of thousands of calls cost more CPU than the calls' own work).
    """

    def __init__(self, limits: dict[str, tuple[int, float]]):
        self._lock = threading.Lock()
        self._conds: dict[str, threading.Condition] = {}
        self._limits = dict(limits)
        self._in_flight: dict[str, int] = {}
        self._tokens: dict[str, float] = {}
        self._stamp: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.peak: dict[str, int] = {}

    def _cond(self, api: str) -> threading.Condition:
        """The API's condition (under ``_lock``)."""
        c = self._conds.get(api)
        if c is None:
            c = self._conds[api] = threading.Condition(self._lock)
        return c

    def configure(self, api: str, concurrency: int, rate: float) -> None:
        with self._lock:
            self._limits[api] = (max(1, int(concurrency)), max(rate, 0.001))
            self._tokens.pop(api, None)
            self._cond(api).notify_all()

    def limit(self, api: str) -> tuple[int, float]:
        return self._limits.get(api) or self._limits.setdefault(api, (20, 10.0))

    def _take_token(self, api: str) -> float:
        """0 when a token was taken, else the seconds to wait for the next one (under the lock)."""
        conc, rate = self.limit(api)
        now = time.monotonic()
        burst = max(1.0, min(rate, float(conc)))
        tokens = min(burst, self._tokens.get(api, burst) + (now - self._stamp.get(api, now)) * rate)
        self._stamp[api] = now
        if tokens >= 1.0:
            self._tokens[api] = tokens - 1.0
            return 0.0
        self._tokens[api] = tokens
        return (1.0 - tokens) / rate

    @contextmanager
    def __call__(self, api: str):
        with self._lock:
            cond = self._cond(api)
            while self._in_flight.get(api, 0) >= self.limit(api)[0]:
                cond.wait()
            self._in_flight[api] = self._in_flight.get(api, 0) + 1
            wait = self._take_token(api)
        try:
            while wait:
                time.sleep(wait)
                with self._lock:
                    wait = self._take_token(api)
            with self._lock:
                self.calls[api] = self.calls.get(api, 0) + 1
                self.peak[api] = max(self.peak.get(api, 0), self._in_flight[api])
            yield
        finally:
            with self._lock:
                self._in_flight[api] -= 1
                cond.notify()


_limiter: ApiLimiter | None = None


def install_api_guard() -> ApiLimiter:
    """The process's limiter, installed as the backends' API call guard (once)."""
    global _limiter
    if _limiter is None:
        from backends.base import set_api_guard

        _limiter = ApiLimiter(api_limits())
        set_api_guard(_limiter)
    return _limiter


def api_limit_name(api: str) -> str:
    return f"fleetwright-api-{api}"


def _ensure_concurrency_limit(name: str, limit: int) -> None:
    """A global concurrency limit (no slot decay) of ``limit``; an older one is brought to it."""
    if name in _known:
        return
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    with get_client(sync_client=True) as client:
        try:
            gcl = client.read_global_concurrency_limit_by_name(name)
            if gcl.limit != limit or gcl.slot_decay_per_second:
                client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(
                    limit=limit, slot_decay_per_second=0.0))
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
            except ObjectAlreadyExists:
                pass
            except Exception:  # noqa: BLE001 - two creators at once: PostgreSQL's unique violation comes back as a 500
                client.read_global_concurrency_limit_by_name(name)  # it exists now, or this raises
    _known.add(name)


def ensure_api_limits() -> None:
    for api, (conc, _) in api_limits().items():
        _ensure_concurrency_limit(api_limit_name(api), conc)


def share_of(api: str, parallel: int) -> int:
    """How many of the API's fleet-wide concurrency slots one of ``parallel`` shards holds."""
    conc, _ = api_limits().get(api, (20, 10.0))
    return max(1, conc // max(1, parallel))


@contextmanager
def api_share(shares: dict[str, int], timeout_seconds: float | None = None):
    """Hold ``shares[api]`` slots of each API's fleet limit for the block; size this process's limiter to them.

    Acquired in a fixed order (no deadlock between shards), with leases: a shard that dies frees
    its share when its lease expires.
    """
    limiter = install_api_guard()
    limits = api_limits()
    lease = max(60.0, float(os.environ.get("FLEETWRIGHT_LOCK_LEASE_SECONDS", "60")))
    with ExitStack() as stack:
        for api in sorted(shares):
            conc, rate = limits.get(api, (20, 10.0))
            n = max(1, min(int(shares[api]), conc))
            _ensure_concurrency_limit(api_limit_name(api), conc)
            stack.enter_context(concurrency(api_limit_name(api), occupy=n, timeout_seconds=timeout_seconds,
                                            lease_duration=lease, strict=True, raise_on_lease_renewal_failure=False))
            limiter.configure(api, n, rate * n / conc)
        try:
            yield
        finally:
            for api in shares:
                limiter.configure(api, *limits.get(api, (20, 10.0)))
