"""Hands an accepted delivery to Prefect: at most one run per push, and a burst collapses into one.

- **Once, across replicas and restarts.** Each run is created with a flow-run idempotency key made
  of the repository, the ref and the ``after`` commit (a pull request: its number and head SHA).
  Prefect's database enforces the key (``INSERT .. ON CONFLICT DO NOTHING``), so a replayed delivery,
  the same commit from a second hook, or two replicas racing on one delivery all get the first run
  back (the API answers 200 instead of 201) and nothing new starts.
- **Bursts.** A run is scheduled ``debounce_seconds`` ahead and tagged with its repository + branch.
  After creating one, the dispatcher moves every other queued (Scheduled, or Pending and waiting for
  its start time) run with that tag to Cancelling, except the newest by scheduled time, so pushes
  close together end in one sync at the newest commit, whichever replica received which push.
  Prefect's own rules make that safe: a Cancelling run may only end Cancelled, never Running.
  That superseding pass yields to creating: it runs once the writer has had nothing to create for a
  moment, and at the latest a quarter of the debounce after the push, long before the older run is
  due; so a burst pays for one pass over all its branches instead of one per bulk create.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Optional
from uuid import UUID, uuid4

from .config import Repository, normalize_url
from .providers import Delivery

log = logging.getLogger("fleetwright.webhook")

TAG = "fleetwright.io/webhook"
REQUEST_LABEL = "fleetwright.io/webhook-request"


@dataclass
class RunRequest:
    """What to start: the deployment's parameters, its idempotency key and its supersede group."""

    parameters: dict[str, Any]
    idempotency_key: str
    group_tag: str
    received_at: datetime

    @property
    def tags(self) -> list[str]:
        return [TAG, self.group_tag]


@dataclass
class Dispatched:
    run_id: UUID
    created: bool                      # False: an earlier delivery already started this run
    name: str = ""


def repo_hash(url: str) -> str:
    return hashlib.sha256(normalize_url(url).encode()).hexdigest()[:12]


def run_request(d: Delivery, repo: Repository, url: str, received_at: Optional[datetime] = None) -> RunRequest:
    """The sync-from-git run a verified, allow-listed push or pull request calls for."""
    h = repo_hash(url)
    params = {"repo": url, "after": d.after, "before": d.before, "ref": d.ref, "pusher": d.pusher,
              "event": d.event, "delivery": d.delivery_id, "subdir": repo.subdir,
              "dry_run": d.event == "pull_request"}
    if d.event == "pull_request":
        key = f"webhook:pr:{h}:{d.pr_number}:{d.after}"
        group = f"{TAG}:{h}:pr-{d.pr_number}"
    else:
        key = f"webhook:push:{h}:{d.ref}:{d.after}"
        group = f"{TAG}:{h}:{d.ref}"
    return RunRequest(params, key, group, received_at or datetime.now(timezone.utc))


RUN_PARAMETERS = ("repo", "after", "before", "ref", "pusher", "event", "delivery", "subdir", "dry_run")


def schema_problem(schema: Optional[dict]) -> Optional[str]:
    """Why the deployment cannot take the parameters ``run_request`` builds, or None. Checked once per
    deployment instead of by the server for every run (the creates do not enforce the schema)."""
    if not isinstance(schema, dict) or not schema.get("properties"):
        return None
    props = schema["properties"]
    unknown = [k for k in RUN_PARAMETERS if k not in props]
    missing = [k for k in schema.get("required", []) if k not in RUN_PARAMETERS]
    if unknown:
        return f"its flow takes no parameter {', '.join(unknown)}"
    if missing:
        return f"its flow requires {', '.join(missing)}, which a webhook does not give"
    return None


_TRANSIENT = ("database is locked", "could not serialize", "deadlock detected", "QueuePool limit")


def _transient(result: dict) -> bool:
    """A bulk-create item refused because the database was busy, not because the request was wrong."""
    err = str(result.get("error") or "")
    return any(t in err for t in _TRANSIENT)


class Dispatcher:
    """One Prefect async client and one writer per receiver process.

    Deliveries that arrive while a write is in flight wait in a queue and go to Prefect together in
    one bulk create (one database transaction for up to 100 runs) followed by one read-back. On the
    embedded SQLite, 20 concurrent single creates end in "database is locked" retry storms (p99 above
    a minute was measured here); one writer with group commits does not. Superseding follows each
    batch: one query for the queued runs of the touched groups, one bulk state change.
    """

    BATCH = 25  # the server allows 100; smaller batches keep the first of a batch from waiting on the rest
    TRANSIENT_RETRIES = 5  # items refused by a busy database are sent again (at once, then 0.1 .. 0.8 s apart)
    IDLE_SECONDS = 0.25  # the writer idle this long: a burst is over, supersede now
    WAVE_GAP = 0.015  # during a burst, a batch waits for more while deliveries come at most this far apart ...
    WAVE_MAX = 0.06  # ... and at most this long in all (see _gather)

    def __init__(self, deployment: str, debounce_seconds: float):
        self.deployment = deployment
        self.debounce = timedelta(seconds=debounce_seconds)
        self._client = None
        self._deployment_id: Optional[UUID] = None
        self._queue: Optional[asyncio.Queue] = None
        self._writer: Optional[asyncio.Task] = None
        self._arrived = asyncio.Event()  # set when a delivery is queued
        self.on_retry: Optional[Callable[[], None]] = None  # called each time a bulk is sent again (database busy)
        self.on_superseded: Optional[Callable[[int], None]] = None  # called with the number of runs each supersede pass cancelled
        # groups with a new run whose older queued runs are not superseded yet, and when that is due at the latest
        self._pending_groups: dict[str, float] = {}
        self.incoming: Callable[[], int] = lambda: 0  # deliveries the receiver has read and is still verifying
        self.supersede_within = min(max(debounce_seconds / 4, 0.0), 30.0)

    async def start(self) -> None:
        from prefect.client.orchestration import get_client

        self._client = get_client()
        await self._client.__aenter__()

    async def close(self) -> None:
        if self._pending_groups and self._client is not None:  # do not leave a burst's older runs queued
            groups, self._pending_groups = set(self._pending_groups), {}
            try:
                await asyncio.wait_for(self._supersede(await self.deployment_id(), groups), 10)
            except Exception as e:  # noqa: BLE001
                log.warning("superseding queued syncs at shutdown failed: %s", type(e).__name__)
        if self._writer is not None:
            self._writer.cancel()
            self._writer = None
        if self._client is not None:
            await self._client.__aexit__(None, None, None)
            self._client = None

    @property
    def client(self):
        if self._client is None:
            raise RuntimeError("Dispatcher.start() was not called")
        return self._client

    async def deployment_id(self) -> UUID:
        if self._deployment_id is None:
            dep = await self.client.read_deployment_by_name(self.deployment)
            problem = schema_problem(getattr(dep, "parameter_openapi_schema", None))
            if problem:
                raise ValueError(f"deployment {self.deployment}: {problem}")
            self._deployment_id = dep.id
        return self._deployment_id

    async def healthy(self) -> Optional[str]:
        err = await self.client.api_healthcheck()
        return None if err is None else type(err).__name__

    async def dispatch(self, req: RunRequest) -> Dispatched:
        """Queue one run for the writer and wait for Prefect's answer."""
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write_loop())
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((req, fut))
        self._arrived.set()
        return await fut

    async def _get_within(self, timeout: float):
        """The next queued delivery, or None after ``timeout`` seconds. Waits on an event, not on
        ``Queue.get`` under ``wait_for``: cancelling that on a timeout can lose an item (Python < 3.12)."""
        assert self._queue is not None
        if self._queue.empty():
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), max(0.0, timeout))
            except asyncio.TimeoutError:
                pass
        return None if self._queue.empty() else self._queue.get_nowait()

    async def _next(self):
        """The next queued delivery; meanwhile, supersede when the writer is idle or a pass falls due.

        An overdue pass that finds deliveries waiting does one page and then serves them, so a long
        burst's superseding (hundreds of state changes) is spread between the creates instead of
        holding them up for its whole length."""
        assert self._queue is not None
        while self._pending_groups:
            due = min(self._pending_groups.values())
            if not self._queue.empty():
                if time.monotonic() < due:
                    return self._queue.get_nowait()
            else:
                item = await self._get_within(min(due, time.monotonic() + self.IDLE_SECONDS) - time.monotonic())
                if item is not None:
                    return item
            groups = set(self._pending_groups)
            t0 = time.monotonic()
            more = False
            try:
                _, more = await self._supersede(await self.deployment_id(), groups,
                                                yield_to=lambda: not self._queue.empty())
            except Exception as e:  # noqa: BLE001 - the next push of the group tries again
                log.warning("superseding queued syncs failed: %s", type(e).__name__)
            log.debug("superseded %d groups in %.0f ms%s", len(groups), (time.monotonic() - t0) * 1000,
                      " (more to do)" if more else "")
            if more:  # go on right after the deliveries that arrived meanwhile
                now = time.monotonic()
                for g in groups:
                    self._pending_groups[g] = min(self._pending_groups.get(g, now), now)
                if not self._queue.empty():
                    return self._queue.get_nowait()
            else:
                for g in groups:
                    self._pending_groups.pop(g, None)
        return await self._queue.get()

    async def _gather(self, batch: list) -> list:
        """Fill a batch from the queue; while deliveries are still coming in, wait briefly for them.

        One bulk for a wave of deliveries costs one server round trip; sending the first of a wave alone
        makes the others wait for that bulk and then their own. So the writer keeps collecting while the
        receiver is verifying deliveries it has already read (``incoming``) or one arrived within
        ``WAVE_GAP``, for at most ``WAVE_MAX``. A lone push waits at most ``WAVE_GAP``.
        """
        assert self._queue is not None
        t0 = time.monotonic()
        deadline, last = t0 + self.WAVE_MAX, t0
        while len(batch) < self.BATCH:
            while not self._queue.empty() and len(batch) < self.BATCH:
                batch.append(self._queue.get_nowait())
                last = time.monotonic()
            now = time.monotonic()
            busy = self.incoming() > 0
            if len(batch) >= self.BATCH or now >= deadline or (not busy and now - last >= self.WAVE_GAP):
                break
            # while deliveries are being verified, look again every few ms; else until the gap has passed
            until = min(deadline, now + 0.005) if busy else min(deadline, last + self.WAVE_GAP)
            item = await self._get_within(until - now)
            if item is not None:
                batch.append(item)
                last = time.monotonic()
        return batch

    async def _write_loop(self) -> None:
        assert self._queue is not None
        while True:
            first = await self._next()
            t_first = time.monotonic()
            batch = await self._gather([first])
            gathered_ms = (time.monotonic() - t_first) * 1000
            batch = [(r, f) for r, f in batch if not f.cancelled()]
            if not batch:
                continue
            t0 = time.monotonic()
            try:
                dep_id, results = await self._create(batch)
            except Exception as e:  # noqa: BLE001 - every request of the batch gets the error (answered 503)
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            for (_, f), res in zip(batch, results):
                if not f.done():
                    f.set_exception(res) if isinstance(res, Exception) else f.set_result(res)
            due = time.monotonic() + self.supersede_within
            for (req, _), res in zip(batch, results):
                if isinstance(res, Dispatched) and res.created:
                    self._pending_groups.setdefault(req.group_tag, due)
            log.debug("batch of %d (gathered in %.0f ms): created in %.0f ms", len(batch), gathered_ms,
                      (time.monotonic() - t0) * 1000)

    async def _create(self, batch) -> tuple[UUID, list]:
        from prefect.client.schemas.actions import DeploymentFlowRunCreate
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
        from prefect.exceptions import ObjectNotFound
        from prefect.states import Scheduled, to_state_create

        # one create per idempotency key: the server refuses the same key twice in one bulk transaction
        first: dict[str, int] = {}
        for i, (req, _) in enumerate(batch):
            first.setdefault(req.idempotency_key, i)
        unique = sorted(first.values())
        nonces, bodies = {}, []
        for i in unique:
            req = batch[i][0]
            nonces[i] = uuid4().hex  # says whether the run that comes back is the one this request created
            bodies.append(DeploymentFlowRunCreate(
                parameters=req.parameters,
                state=to_state_create(Scheduled(scheduled_time=req.received_at + self.debounce)),
                tags=req.tags,
                idempotency_key=req.idempotency_key,
                labels={REQUEST_LABEL: nonces[i]},
                # the receiver builds these parameters itself: checked once against the deployment's schema
                # (deployment_id), not by the server for every run (about a third of its cost per run)
                enforce_parameter_schema=False,
            ).model_dump(mode="json", exclude_unset=True))
        results: dict[int, dict] = {}
        pending = list(zip(unique, bodies))
        for attempt in range(self.TRANSIENT_RETRIES + 1):
            try:
                dep_id = await self.deployment_id()
                response = await self.client.request("POST", "/deployments/{id}/create_flow_run/bulk",
                                                     path_params={"id": dep_id}, json=[b for _, b in pending])
            except ObjectNotFound:
                self._deployment_id = None  # re-registered under a new id: look it up again next time
                raise
            results.update(zip([i for i, _ in pending], response.json()["results"]))
            refused = sum(results[i].get("status") != "CREATED" for i, _ in pending)
            if refused:
                log.debug("bulk of %d: %d refused (attempt %d): %s", len(pending), refused, attempt + 1,
                          str(next(r.get("error") for i, _ in pending if (r := results[i]).get("status") != "CREATED"))[:80])
            # a busy database refuses some items of a bulk ("database is locked" on SQLite, a serialization
            # failure on PostgreSQL): the idempotency key makes sending them again safe
            pending = [(i, b) for i, b in pending if results[i].get("status") != "CREATED" and _transient(results[i])]
            if not pending or attempt == self.TRANSIENT_RETRIES:
                break
            if self.on_retry is not None:
                self.on_retry()
            # SQLite refuses a whole bulk when another writer committed between its first read and its
            # first write (a stale snapshot, not a held lock): sending again at once nearly always works
            await asyncio.sleep(0 if attempt == 0 else 0.1 * 2 ** (attempt - 1))
        t_bulk = time.monotonic()
        ids = list({UUID(r["flow_run_id"]) for r in results.values() if r.get("flow_run_id")})
        runs = {r.id: r for r in await self.client.read_flow_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)), limit=len(ids))} if ids else {}
        log.debug("read back %d runs in %.0f ms", len(ids), (time.monotonic() - t_bulk) * 1000)
        out: list = []
        for i, (req, _) in enumerate(batch):
            j = first[req.idempotency_key]
            res = results[j]
            run = runs.get(UUID(res["flow_run_id"])) if res.get("flow_run_id") else None
            if res.get("status") != "CREATED" or run is None:
                out.append(RuntimeError(f"Prefect did not create the run: {str(res.get('error'))[:200]}"))
                continue
            mine = i == j and (run.labels or {}).get(REQUEST_LABEL) == nonces[j]
            out.append(Dispatched(run.id, mine, name=run.name))
        return dep_id, out

    async def _supersede(self, dep_id: UUID, groups: set[str],
                         yield_to: Callable[[], bool] = lambda: False) -> tuple[list[UUID], bool]:
        """Cancel the queued runs of each group except its newest (by scheduled time). Stops after a
        page when ``yield_to()`` says other work waits; returns the cancelled runs and whether more may
        be left."""
        from prefect.client.schemas.filters import (
            DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterId, FlowRunFilterState,
            FlowRunFilterStateType, FlowRunFilterTags)
        from prefect.client.schemas.objects import StateType
        from prefect.client.schemas.sorting import FlowRunSort

        # newest first, a page at a time: a long burst leaves many queued runs per branch; each page keeps
        # (for now) its newest run per branch and cancels the others, until a page has nothing to cancel
        done: list[UUID] = []
        more = False
        for _ in range(200):
            page = await self.client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    tags=FlowRunFilterTags(any_=sorted(groups)),
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED, StateType.PENDING]))),
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep_id])),
                sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=self.SUPERSEDE_PAGE)
            cancelled = await self._supersede_page(page, groups)
            done += cancelled
            more = bool(cancelled) and len(page) >= self.SUPERSEDE_PAGE
            if not more or yield_to():
                break
        if done and self.on_superseded is not None:
            self.on_superseded(len(done))
        return done, more

    SUPERSEDE_PAGE = 50  # the server's limit for one bulk state change

    async def _supersede_page(self, queued: list, groups: set[str]) -> list[UUID]:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        soon = datetime.now(timezone.utc) + timedelta(seconds=1)
        by_group: dict[str, list] = {}
        for r in queued:
            for tag in r.tags:
                if tag in groups:
                    by_group.setdefault(tag, []).append(r)
        doomed, newest_of = [], {}
        for tag, runs in by_group.items():
            newest = max(runs, key=lambda r: (r.expected_start_time or r.created, str(r.id)))
            for r in runs:
                # a run due now may be starting on a worker: let it go ahead, the newer one follows
                if r.id != newest.id and not (r.expected_start_time and r.expected_start_time <= soon):
                    doomed.append(r)
                    newest_of[r.id] = newest
        if not doomed:
            return []
        # Cancelling, never Cancelled: a Scheduled run without a process becomes Cancelled at once (and a
        # worker may no longer move it to Pending); a Pending one whose process already waits for its start
        # time is stopped by its worker (Cancelling may only end Cancelled). Cancelled set on a Pending run
        # would let its process go on to Running.
        response = await self.client.request("POST", "/flow_runs/bulk_set_state", json={
            "flow_runs": FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in doomed])).model_dump(mode="json", exclude_unset=True),
            "state": {"type": "CANCELLING", "message": "superseded by a newer push on the same branch"},
            "force": False})
        done = []
        names = {r.id: r for r in doomed}
        for res in response.json().get("results", []):
            rid = UUID(res["flow_run_id"])
            st = (res.get("state") or {}).get("type")
            r, newest = names.get(rid), newest_of.get(rid)
            if st in ("CANCELLING", "CANCELLED") and r is not None:
                done.append(rid)
                log.info("superseded flow run %s (%s) by %s (%s)", r.name, str(r.parameters.get("after", ""))[:12],
                         newest.name, str(newest.parameters.get("after", ""))[:12])
            elif r is not None:
                log.info("flow run %s not superseded (%s): it goes ahead", r.name, st)
        return done
