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
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Optional
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
    superseded: list[UUID] = field(default_factory=list)
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


class Dispatcher:
    """One Prefect async client for the receiver's lifetime; the deployment id is looked up once."""

    def __init__(self, deployment: str, debounce_seconds: float):
        self.deployment = deployment
        self.debounce = timedelta(seconds=debounce_seconds)
        self._client = None
        self._deployment_id: Optional[UUID] = None

    async def start(self) -> None:
        from prefect.client.orchestration import get_client

        self._client = get_client()
        await self._client.__aenter__()

    async def close(self) -> None:
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
            self._deployment_id = dep.id
        return self._deployment_id

    async def healthy(self) -> Optional[str]:
        err = await self.client.api_healthcheck()
        return None if err is None else type(err).__name__

    async def dispatch(self, req: RunRequest) -> Dispatched:
        from prefect.client.schemas.actions import DeploymentFlowRunCreate
        from prefect.client.schemas.objects import FlowRun
        from prefect.exceptions import ObjectNotFound
        from prefect.states import Scheduled, to_state_create

        nonce = uuid4().hex  # says whether the run that comes back is the one this request created
        body = DeploymentFlowRunCreate(
            parameters=req.parameters,
            state=to_state_create(Scheduled(scheduled_time=req.received_at + self.debounce)),
            tags=req.tags,
            idempotency_key=req.idempotency_key,
            labels={REQUEST_LABEL: nonce},
        ).model_dump(mode="json", exclude_unset=True)
        try:
            dep_id = await self.deployment_id()
            response = await self.client.request("POST", "/deployments/{id}/create_flow_run",
                                                 path_params={"id": dep_id}, json=body)
        except ObjectNotFound:
            self._deployment_id = None  # re-registered under a new id: look it up again next time
            raise
        run = FlowRun.model_validate(response.json())
        # 201 alone is not proof: the server answers 201 when the existing run's creation time is later
        # than this request's start, which happens when two requests race on one key
        created = response.status_code == 201 and (run.labels or {}).get(REQUEST_LABEL) == nonce
        out = Dispatched(run.id, created, name=run.name)
        if created:
            out.superseded = await self.supersede(dep_id, run, req)
        return out

    async def supersede(self, dep_id: UUID, run, req: RunRequest) -> list[UUID]:
        """Cancel the queued runs of this group that are older than the newest one (maybe ``run`` itself)."""
        from prefect.client.schemas.filters import (
            DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType,
            FlowRunFilterTags)
        from prefect.client.schemas.objects import StateType
        from prefect.states import Cancelling

        queued = await self.client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[req.group_tag]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED, StateType.PENDING]))),
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep_id])),
            limit=200)
        if all(r.id != run.id for r in queued):
            queued.append(run)

        def order(r):
            return (r.expected_start_time or r.created, str(r.id))

        newest = max(queued, key=order)
        cancelled: list[UUID] = []
        soon = datetime.now(timezone.utc) + timedelta(seconds=1)
        for r in queued:
            if r.id == newest.id:
                continue
            if r.expected_start_time and r.expected_start_time <= soon:
                continue  # due now: a worker may be starting it; let it run, the newer one follows
            msg = (f"superseded by a newer push: flow run {newest.name} at "
                   f"{str(newest.parameters.get('after', ''))[:12]}")
            try:
                # Cancelling, never Cancelled: a Scheduled run without a process becomes Cancelled at once
                # (and a worker may no longer move it to Pending), a Pending one whose process already
                # waits for its start time is stopped by its worker (Cancelling may only end Cancelled).
                # Cancelled set on a Pending run would let its process go on to Running.
                result = await self.client.set_flow_run_state(r.id, Cancelling(message=msg), force=False)
            except Exception as e:  # noqa: BLE001 - it started or finished meanwhile: leave it
                log.warning("could not supersede flow run %s: %s", r.id, type(e).__name__)
                continue
            state = getattr(result, "state", None)
            if state is not None and state.type in (StateType.CANCELLING, StateType.CANCELLED):
                cancelled.append(r.id)
                log.info("superseded flow run %s (%s) by %s", r.name, str(r.parameters.get("after", ""))[:12],
                         newest.name)
            else:
                log.info("flow run %s not superseded (%s): it goes ahead, %s follows", r.name,
                         getattr(getattr(result, "details", None), "reason", "") or "refused", newest.name)
        return cancelled
