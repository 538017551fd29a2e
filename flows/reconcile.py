"""The scheduled fleet sweep: observe every cluster, diff, and report or correct by its drift mode.

``reconcile-fleet`` splits the selected fleet into shards and runs each shard as its own run
of the ``reconcile-shard`` deployment, so every worker of the pool takes part. By default there
is one long shard per online worker of the pool (``models.shards``: each shard's clusters in
proportion to its share of each API limit, so all end together), never shards smaller than
``min_shard_size``: a shard run costs a flow-run process start, so a small fleet is swept in the
fleet run itself. It waits for all of them, re-submits a shard whose run crashed (its worker died),
and gathers one fleet summary artifact from the shards' summaries (counts plus the clusters
that are not in sync: memory stays bounded at 10,000 clusters). A fleet no bigger than one
shard, or a sweep not started from a deployment, runs in this flow run.

Within a shard, clusters are handled in batches (one Prefect task per batch, 50 by default, 4
at once); every cluster of the run is checked in one shared pool of threads (twice the API slots
the run holds), in an order that gives every backend API work all along the run
(``models.shards.interleave``); a backend that offers ``observe_many`` reads a batch's clusters
in one go. Per cluster there is no task run: a repair's observations and steps are plain calls
inside its batch task (``converge(plain=True)``, retried as tasks are), so a sweep costs the
server a few events per batch plus one per drifted or failed cluster. A shard holds its share
of each backend API's fleet-wide limit (``tasks.locks.api_share``), so the limits bound API
calls across all shards.

A cluster in ``report`` mode gets an artifact line and a ``fleetwright.cluster.drift`` event;
the run ends in the state named ``Drift`` (Completed) with the clusters in its message. Failed
or refused clusters emit ``fleetwright.cluster.failed`` and end the run ``Failed``. One in
``correct`` mode is repaired under its lock. Clusters that do not exist yet are reported as
absent: creating is ``create-cluster``'s job. A sweep that starts while another one still runs
is skipped (state ``Skipped``, saying which run) instead of queueing behind it.

Destructive repairs (removals, node-pool deletion or replacement, scale-down) are never made by
the sweep itself: the shards hold them, and the fleet run asks once, at the end, for a person's
approval of all of them (``flows.approvals``); the run's name is then ``Drift`` until approved.
"""
from __future__ import annotations

import contextvars
import math
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from datetime import datetime
from typing import Optional

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE as NO_CACHE
from prefect.runtime import deployment as this_deployment
from prefect.runtime import flow_run as this_run
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner

from backends import registry
from backends.base import BatchObserver
from models.desired import DesiredCluster, ObservedCluster
from models.errors import PermanentError, TransientError
from models.plan import plan
from models.policy import is_automation
from models.resolve import Resolver, matches
from models.shards import interleave, plan_shards
from models.status import PROBLEMS, Status
from tasks.blocks import connections
from tasks.cluster import Outcome, _observe as observe_once, drift_lines, plan_rows
from tasks.definitions import pin
from tasks.guard import RemovalGuard, current as removal_guard, install as install_guard
from tasks.locks import api_limits, api_share, ensure_api_limits, share_of
from tasks.report import merge_summaries, publish, publish_summary, summarise

from .approvals import SWEEP_TIMEOUT_SECONDS, approval_markdown, approve_held, approve_held_in_summary, correct_holding
from .common import DEFAULT_ACTOR, DefinitionsSource, default_source, gate, load_definitions, run_key
from .windows import WindowGate

SHARD_DEPLOYMENT = "reconcile-shard/reconcile-shard"
TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


class SweepFailed(PermanentError):
    """Clusters failed or were refused in a sweep (the fleet summary artifact lists them)."""


def _observe(desired: DesiredCluster, infra_observed: ObservedCluster | None = None, attempts: int = 3):
    for i in range(attempts):
        try:
            return observe_once(desired, infra_observed if i == 0 else None)
        except TransientError:
            if i == attempts - 1:
                raise
            time.sleep(0.5 * 2 ** i)


def check_one(desired: DesiredCluster, dry_run: bool, idempotency_key: str,
              infra_observed: ObservedCluster | Exception | None = None, windows=None) -> Outcome:
    t0 = time.monotonic()
    try:
        if isinstance(infra_observed, Exception):
            raise infra_observed
        observed = _observe(desired, infra_observed)
    except Exception as e:  # noqa: BLE001 - one unreachable cluster must not stop the sweep
        return Outcome(desired.name, Status.FAILED, reason=f"observe: {type(e).__name__}: {e}", seconds=time.monotonic() - t0)
    if not observed.exists:
        return Outcome(desired.name, Status.ABSENT, reason="no control plane found; run create-cluster", seconds=time.monotonic() - t0)
    p = plan(desired, observed)
    guard = removal_guard()
    if guard is not None:  # never prune what a newer commit (a rollout under way) or an imperative add wants
        p = guard.filter_plan(p)
    if p.refused:
        return Outcome(desired.name, Status.REFUSED, plan_rows(p), reason="; ".join(p.refused), seconds=time.monotonic() - t0)
    if not p.steps:
        return Outcome(desired.name, Status.IN_SYNC, seconds=time.monotonic() - t0)
    drift = drift_lines(observed, p) or [str(s) for s in p.steps]
    if dry_run and desired.drift_mode == "correct" and windows is not None:  # would the repair wait for its window?
        allowed = [s for s in p.steps if guard is None or guard.allows(s)] or p.steps
        first = next((s for s in allowed if not s.destructive), allowed[0])
        why = windows.check(desired, first)
        if why:
            return Outcome(desired.name, Status.DEFERRED, plan_rows(p), drift=drift,
                           reason=f"a real run would defer the repair: {why}", seconds=time.monotonic() - t0)
    if desired.drift_mode == "report" or dry_run:
        return Outcome(desired.name, Status.DRIFT, plan_rows(p), drift=drift, reason=f"{len(p.steps)} step(s) to converge",
                       seconds=time.monotonic() - t0)
    # destructive steps wait for an approval (flows.approvals); the guard keeps what a rollout or an imperative add
    # wants; repairs wait for the cluster's maintenance window
    return correct_holding(desired, p, drift, idempotency_key, allow=guard.allows if guard is not None else None,
                           window=windows and windows.guard(desired))


def observe_batch(desired: list[DesiredCluster]) -> dict[str, ObservedCluster | Exception]:
    """Infrastructure observations from backends that read many clusters at once (``observe_many``)."""
    by_type: dict[str, list[DesiredCluster]] = {}
    for d in desired:
        by_type.setdefault(d.backend.type, []).append(d)
    out: dict[str, ObservedCluster | Exception] = {}
    for group in by_type.values():
        infra = registry.infrastructure(group[0], connections())
        if len(group) > 1 and isinstance(infra, BatchObserver):
            try:
                out.update(infra.observe_many(group))
            except Exception as e:  # noqa: BLE001 - fall back to one observation per cluster
                get_run_logger().warning("batch observation of %d %s clusters failed (%s); observing one by one",
                                         len(group), group[0].backend.type, e)
    return out


class SweepWork:
    """What the batch tasks of one run share; a plain object, so Prefect does not walk it as a task parameter.

    ``resolve(name)`` gives a cluster's desired state (resolved in its batch: a shard never holds
    all of its clusters' desired states at once). ``pool``: one set of threads for every cluster of
    the run, so a slow cluster (a repair under its lock) holds one thread, not its batch's share of
    the API slots, and batches never leave slots idle while their last clusters finish.
    """

    def __init__(self, resolve, pool, dry_run: bool, idempotency_key: str, windows=None):
        self.resolve, self.pool, self.dry_run, self.key, self.windows = resolve, pool, dry_run, idempotency_key, windows

    def check(self, d: DesiredCluster, pre) -> Outcome:
        return check_one(d, self.dry_run, self.key, pre, self.windows)


@task(name="reconcile-batch", task_run_name="reconcile batch {index}", cache_policy=NO_CACHE)
def reconcile_batch(index: int, clusters: list[str], work: SweepWork) -> list[Outcome]:
    """One batch of a sweep: its clusters resolved, observed (a batch call where the backend has one) and
    checked in the run's shared threads. A cluster that cannot be resolved fails alone."""
    desired, outcomes = [], {}
    for n in clusters:
        try:
            desired.append(work.resolve(n))
        except Exception as e:  # noqa: BLE001 - one broken definition must not stop the batch
            outcomes[n] = Outcome(n, Status.FAILED, reason=f"resolve: {type(e).__name__}: {e}")
    pre = observe_batch(desired)
    futures = {d.name: work.pool.submit(contextvars.copy_context().run, work.check, d, pre.get(d.name))
               for d in desired}
    for n, f in futures.items():
        outcomes[n] = f.result()
    return [outcomes[n] for n in clusters]


BATCHES_AT_ONCE = 4  # the sweep flows' ThreadPoolTaskRunner


def _sweep(names: list[str], resolve, dry_run: bool, key: str, batch_size: int, max_workers: int,
           windows=None, slots: int = 0) -> list[Outcome]:
    """The clusters in batch tasks, all checked in one pool of threads. ``slots``: API slots this run
    holds; a cluster holds one at a time, so twice as many clusters in flight keep them busy
    (``max_workers`` at least)."""
    threads = max(max_workers, 2 * slots)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sweep") as pool:
        work = SweepWork(resolve, pool, dry_run, key, windows)
        futures = [reconcile_batch.submit(i, names[i:i + batch_size], work) for i in range(0, len(names), batch_size)]
        return sorted((o for f in futures for o in f.result()), key=lambda o: o.cluster)


def _apis(defs, names: list[str]) -> set[str]:
    return {defs.clusters[n].spec.backend.type for n in names} | {"kubernetes"}


def _in_api_order(defs, names: list[str]) -> list[str]:
    """The clusters with each backend API's spread evenly over the run (``models.shards.interleave``)."""
    return interleave([(n, defs.clusters[n].spec.backend.type) for n in names])


def _listed(names: list[str], n: int = 20) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def final_state(flow_name: str, summary: dict):
    """The run's end: Failed (clusters failed/refused), Completed named Drift (report-mode drift), or Completed."""
    counts = summary["counts"]
    drift = [c["cluster"] for c in summary["clusters"] if c["status"] == Status.DRIFT]
    bad = [c["cluster"] for c in summary["clusters"] if c["status"] in PROBLEMS]
    held = [c["cluster"] for c in summary["clusters"] if c["status"] == Status.AWAITING_APPROVAL]
    tally = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    retried = summary.get("retried_shards") or []
    extra = f"; shards re-run after their worker died: {len(retried)}" if retried else ""
    if held:  # drift that stays: destructive repairs a person did not approve
        extra += f"; destructive repairs not approved, nothing destructive done: {_listed(held)}"
        if not bad and not drift:
            msg = f"{flow_name}: {len(held)} cluster(s) keep drift that needs a destructive repair ({tally}){extra}"
            return Completed(name="Drift", message=msg, data=summary)
    if bad:
        msg = (f"{flow_name}: {len(bad)} cluster(s) failed or refused: {_listed(bad)}"
               + (f"; drift reported on {len(drift)}: {_listed(drift)}" if drift else "") + f" ({tally}){extra}")
        return Failed(name="Failed", message=msg, data=SweepFailed(msg))
    if drift:
        msg = f"{flow_name}: drift reported on {len(drift)} cluster(s) in report mode: {_listed(drift)} ({tally}){extra}"
        return Completed(name="Drift", message=msg, data=summary)
    return Completed(message=f"{flow_name}: {summary['total']} clusters ({tally}){extra}", data=summary)


def gate_sweep(defs, old, actor: str, names: list[str], flow: str) -> None:
    """A sweep started by a person: they must be allowed to reconcile every selected cluster (as rollout-fleet
    judges it); the automation identity converges what is committed (``automation-git-only``)."""
    if is_automation(actor):
        return
    for i, n in enumerate(names):  # the change since base_ref is judged once, not per cluster
        gate(defs, old if i == 0 else None, actor, "reconcile", flow=flow, cluster=n)


# --------------------------------------------------------------------------- one shard


@flow(name="reconcile-shard", log_prints=True, persist_result=True,
      task_runner=ThreadPoolTaskRunner(max_workers=BATCHES_AT_ONCE))
def reconcile_shard(clusters: list[str], source: Optional[DefinitionsSource] = None, dry_run: bool = False,
                    batch_size: int = 50, max_workers: int = 8, idempotency_key: Optional[str] = None,
                    shard: str = "", api_shares: dict[str, int] = {}, now: Optional[datetime] = None,  # noqa: B006
                    actor: str = DEFAULT_ACTOR, checked: Optional[str] = None):
    """One shard of a fleet sweep: the named clusters, under this shard's share of the API limits.

    Repairs wait for each cluster's maintenance window (``now``: as at that time); a deferred repair
    gets a follow-up run of this shard at the window's opening. ``actor``: as reconcile-fleet's.
    ``checked``: the revision the fleet run checked in full (not checked again when it is the one read)."""
    t0 = time.monotonic()
    defs, old = load_definitions(source or default_source(), checked=checked)
    gate_sweep(defs, old, actor, [n for n in clusters if n in defs.clusters], "reconcile-shard")
    guard = install_guard(str(this_run.get_id() or ""), RemovalGuard(pin(source or default_source())[0], defs))
    r = Resolver(defs)
    gone = [n for n in clusters if n not in defs.clusters]
    names = _in_api_order(defs, [n for n in clusters if n in defs.clusters])
    outcomes = [Outcome(n, Status.SKIPPED, reason="no longer in the definitions") for n in gone]
    key = run_key(idempotency_key)
    win = WindowGate(defs, flow="reconcile-shard", actor=actor, dry_run=dry_run, now=now)
    with api_share(api_shares) if api_shares else nullcontext():
        outcomes += _sweep(names, r.resolve, dry_run, key, batch_size, max_workers, win, slots=sum(api_shares.values()))
    seconds = time.monotonic() - t0
    publish("reconcile-shard", outcomes, dry_run=dry_run,
            extra_md=f"Shard {shard}: {len(outcomes)} clusters in {seconds:.1f}s.\n\n{guard.markdown()}\n\n" + win.finish())
    summary = summarise(outcomes, shard=shard, seconds=round(seconds, 1), windows=win.record(), actor=actor)
    counts = ", ".join(f"{k}={v}" for k, v in sorted(summary["counts"].items()))
    drift = summary["counts"].get(Status.DRIFT.value, 0)
    bad = sum(summary["counts"].get(s.value, 0) for s in PROBLEMS)
    name = "Cluster failures" if bad else "Drift" if drift else "Completed"
    return Completed(name=name, message=f"shard {shard}: {counts}", data=summary)


# --------------------------------------------------------------------------- the fleet


def _running_sweep():
    """Another reconcile-fleet run that is running and started before this one, if any."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterState,
                                                FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType

    me = this_run.get_id()
    if not me:
        return None
    with get_client(sync_client=True) as c:
        mine = c.read_flow_run(me)
        runs = c.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["reconcile-fleet"])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))))
    key = (mine.start_time or mine.expected_start_time, str(mine.id))
    older = [r for r in runs if str(r.id) != str(me) and (r.start_time or r.expected_start_time, str(r.id)) < key]
    return older[0] if older else None


def online_workers() -> int:
    """How many workers of this run's work pool are online (1 when unknown)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus

    try:
        with get_client(sync_client=True) as c:
            pool = c.read_flow_run(this_run.get_id()).work_pool_name
            if not pool:
                return 1
            return max(1, len(c.read_workers_for_work_pool(
                pool, worker_filter=WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"])))))
    except Exception as e:  # noqa: BLE001 - sizing falls back to one shard per expected slot
        get_run_logger().warning("could not count the pool's online workers (%s); assuming 1", e)
        return 1


def cut_shards(names: list[str], api_of: dict[str, str], *, shard_size: Optional[int], parallel: int,
               min_shard_size: int) -> tuple[list[list[str]], list[dict[str, int]]]:
    """The shards (cluster names) and each one's API shares; one shard or none: sweep in the fleet run.

    ``shard_size`` given: even shards of at most that many, each holding ``1/parallel`` of every
    API limit (more shards than ``parallel`` wait for a share). Otherwise ``parallel`` shards, but
    none smaller than ``min_shard_size``, cut by ``models.shards.plan_shards``.
    """
    if shard_size is not None:
        if shard_size <= 0 or len(names) <= shard_size:
            return [names], []
        n = math.ceil(len(names) / shard_size)
        size = math.ceil(len(names) / n)  # even shards
        chunks = [names[i:i + size] for i in range(0, len(names), size)]
        apis = sorted({api_of[c] for c in names} | {"kubernetes"})
        shares = {api: share_of(api, parallel) for api in apis}
        return chunks, [shares] * len(chunks)
    k = min(parallel, len(names) // max(1, min_shard_size))
    if k <= 1:
        return [names], []
    plan = plan_shards([(c, api_of[c]) for c in names], k, {a: conc for a, (conc, _) in api_limits().items()})
    return [s.clusters for s in plan], [s.shares for s in plan]


def _run_shards(chunks: list[list[str]], shares: list[dict[str, int]], *, source, dry_run: bool, batch_size: int,
                max_workers: int, key: str, shard_retries: int, poll_seconds: float, timeout_seconds: float,
                now=None, actor: str = DEFAULT_ACTOR, checked: Optional[str] = None) -> tuple[dict, list[dict]]:
    """Run every shard as a deployment run, wait for all, re-submit crashed ones; the merged summary."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment

    log = get_run_logger()
    names = [c for chunk in chunks for c in chunk]
    ensure_api_limits()  # made once here, not by every shard at once
    rows = [{"shard": f"{i + 1}/{len(chunks)}", "clusters": len(c), "attempts": 0, "runs": [], "state": "",
             "note": ""} for i, c in enumerate(chunks)]

    def submit(i: int) -> str:
        rows[i]["attempts"] += 1
        fr = run_deployment(SHARD_DEPLOYMENT, timeout=0, as_subflow=True,
                            idempotency_key=f"{key}-shard-{i + 1}-attempt-{rows[i]['attempts']}",
                            parameters={"clusters": chunks[i], "source": source, "dry_run": dry_run,
                                        "batch_size": batch_size, "max_workers": max_workers,
                                        "idempotency_key": key, "shard": rows[i]["shard"], "api_shares": shares[i],
                                        "checked": checked,
                                        **({"now": now.isoformat()} if now else {}),
                                        **({} if is_automation(actor) else {"actor": actor})})
        rows[i]["runs"].append(str(fr.id))
        return str(fr.id)

    pending = {submit(i): i for i in range(len(chunks))}
    log.info("%d clusters in %d shards of %s (API shares: %s)", len(names), len(chunks),
             "/".join(str(len(c)) for c in chunks), shares)
    summaries: list[dict] = []
    deadline = time.monotonic() + timeout_seconds
    with get_client(sync_client=True) as client:
        while pending:
            time.sleep(poll_seconds)
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(pending))),
                                         limit=len(pending))
            for fr in runs:
                if fr.state is None or fr.state.type.value not in TERMINAL:
                    continue
                i = pending.pop(str(fr.id))
                row = rows[i]
                row["state"] = fr.state.name
                summary = None
                if fr.state.type.value == "COMPLETED":
                    try:
                        summary = fr.state.result()
                    except Exception as e:  # noqa: BLE001 - e.g. result storage not shared between machines
                        row["note"] += f"result unreadable: {e}; "
                if summary is not None:
                    summaries.append(summary)
                    continue
                why = f"run {fr.id} ended {fr.state.name}: {(fr.state.message or '')[:200]}"
                if row["attempts"] <= shard_retries:
                    row["note"] += f"re-run after {why}; "
                    log.warning("shard %s: %s; submitting it again", row["shard"], why)
                    pending[submit(i)] = i
                else:
                    row["note"] += f"gave up after {why}; "
                    summaries.append(summarise([Outcome(c, Status.FAILED, reason=f"shard {row['shard']}: {why}")
                                                for c in chunks[i]]))
            if pending and time.monotonic() > deadline:
                for run_id, i in pending.items():
                    rows[i]["note"] += f"no result within {timeout_seconds:.0f}s (run {run_id}); "
                    summaries.append(summarise([Outcome(c, Status.FAILED, reason=f"shard {rows[i]['shard']}: "
                                                        f"no result within {timeout_seconds:.0f}s") for c in chunks[i]]))
                break
    merged = merge_summaries(summaries)
    merged["retried_shards"] = [r["shard"] for r in rows if r["attempts"] > 1]
    return merged, rows


class _LateWindows:
    """The fleet run's definitions and window gate for the repairs its shards held, made on first use: an
    approved destructive repair still waits for its cluster's maintenance window, as in an unsharded sweep."""

    def __init__(self, src, **gate):
        self.src, self.gate, self._defs, self._win = src, gate, None, None

    def definitions(self):
        if self._defs is None:
            self._defs = load_definitions(self.src)[0]
        return self._defs

    def guard(self, desired):
        if self._win is None:
            self._win = WindowGate(self.definitions(), flow="reconcile-fleet", **self.gate)
        return self._win.guard(desired)


def _shards_md(rows: list[dict]) -> str:
    lines = ["## Shards", "", "| shard | clusters | attempts | state | runs | note |", "|---|---:|---:|---|---|---|"]
    lines += [f"| {r['shard']} | {r['clusters']} | {r['attempts']} | {r['state']} | {', '.join(r['runs'])} | "
              f"{r['note'].strip().rstrip(';') or '-'} |" for r in rows]
    return "\n".join(lines)


@flow(name="reconcile-fleet", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=BATCHES_AT_ONCE))
def reconcile_fleet(selector: dict[str, str] = {}, source: Optional[DefinitionsSource] = None,  # noqa: B006
                    batch_size: int = 50, max_workers: int = 8, dry_run: bool = False,
                    shard_size: Optional[int] = None, parallel_shards: Optional[int] = None,
                    min_shard_size: int = 2500, shard_retries: int = 1,
                    shard_timeout_seconds: float = 3600.0, now: Optional[datetime] = None,
                    approval_timeout_seconds: int = SWEEP_TIMEOUT_SECONDS, actor: str = DEFAULT_ACTOR):
    """Sweep the fleet for drift in shards; report or correct each cluster by its drift mode; one summary artifact.

    It observes and reports at any time; a repair waits for the cluster's maintenance window (deferred,
    with a follow-up run at the window's opening). ``now`` evaluates the windows as at that time.

    ``parallel_shards``: how many shards run at once (default: the pool's online workers, one long
    shard each). ``min_shard_size``: fewer clusters than that per shard and the fleet run sweeps them
    itself. ``shard_size``: instead, shards of at most that many clusters (0: no shards), each
    holding 1/parallel_shards of every API's limit (more wait).
    ``approval_timeout_seconds``: how long the sweep waits, at its end, for a person to approve the
    destructive repairs it held (none are made without one).

    ``actor``: who starts the sweep. The schedule runs it as the automation identity; a person who
    starts one names themselves: they must be allowed to reconcile every selected cluster (as for
    rollout-fleet), they cannot approve its destructive repairs themselves, and only a platform
    member may run a real (not dry-run) sweep with a shifted clock ``now`` (``platform-only-clock``).
    The actor is recorded in the run's summary.
    """
    log = get_run_logger()
    t0 = time.monotonic()
    other = _running_sweep()
    if other is not None:
        msg = (f"skipped: sweep {other.name} ({other.id}), started {other.start_time}, is still running; "
               "this one does not queue behind it")
        log.warning(msg)
        return Completed(name="Skipped", message=msg, data={"skipped": msg, "running": str(other.id)})
    src = source or default_source()
    defs, old = load_definitions(src)
    src, rev = pin(src)  # the shards read this run's commit, whatever is pushed meanwhile
    guard = install_guard(str(this_run.get_id() or ""), RemovalGuard(src, defs))
    names = sorted(n for n, c in defs.clusters.items() if matches(c.metadata.labels, selector))
    gate_sweep(defs, old, actor, names, "reconcile-fleet")
    del old
    key = run_key(None)  # a fresh key every sweep: repairs are never skipped as done
    r = Resolver(defs)
    chunks: list[list[str]] = [names]
    if this_deployment.id is not None and shard_size != 0 and len(names) > 1:
        chunks, shares = cut_shards(names, {n: defs.clusters[n].spec.backend.type for n in names},
                                    shard_size=shard_size, parallel=parallel_shards or online_workers(),
                                    min_shard_size=min_shard_size)
    if len(chunks) > 1:
        del defs, r  # the shards load their own; keep this run small
        summary, rows = _run_shards(chunks, shares, source=src, dry_run=dry_run, batch_size=batch_size,
                                    max_workers=max_workers, key=key, shard_retries=shard_retries,
                                    poll_seconds=2.0, timeout_seconds=shard_timeout_seconds, now=now, actor=actor,
                                    checked=rev.sha)
        late = _LateWindows(src, actor=actor, dry_run=dry_run, now=now)  # loaded only if a repair is held
        summary, approval = approve_held_in_summary(summary, definitions=late.definitions, window=late.guard,
                                                    flow="reconcile-fleet", idempotency_key=key, actor=actor,
                                                    timeout=approval_timeout_seconds, max_workers=max_workers)
        retried = f" {len(summary['retried_shards'])} shard(s) re-run after a crash: " \
                  f"{', '.join(summary['retried_shards'])}." if summary["retried_shards"] else ""
        publish_summary("reconcile-fleet", summary, dry_run=dry_run,
                        extra_md=f"Swept {summary['total']} clusters in {time.monotonic() - t0:.1f}s, started by **{actor}**, "
                                 f"in {len(rows)} shard runs.{retried}\n\n" + _shards_md(rows)
                                 + ("\n\n" + approval_markdown([approval]) if approval else ""))
    else:
        shares = {api: share_of(api, 1) for api in _apis(defs, names)}
        win = WindowGate(defs, flow="reconcile-fleet", actor=actor, dry_run=dry_run, now=now)
        with api_share(shares):
            outcomes = _sweep(_in_api_order(defs, names), r.resolve, dry_run, key, batch_size, max_workers, win,
                              slots=sum(shares.values()))
        outcomes, approval = approve_held(outcomes, definitions=lambda: defs, flow="reconcile-fleet", idempotency_key=key,
                                          timeout=approval_timeout_seconds, max_workers=max_workers, window=win.guard,
                                          actor=actor)
        publish("reconcile-fleet", outcomes, dry_run=dry_run,
                extra_md=f"Swept {len(outcomes)} clusters in {time.monotonic() - t0:.1f}s, started by **{actor}** "
                         f"({math.ceil(len(outcomes) / batch_size)} batches of up to {batch_size}).\n\n{guard.markdown()}"
                         "\n\n" + win.finish() + ("\n\n" + approval_markdown([approval]) if approval else ""))
        summary = summarise(outcomes, windows=win.record())
        summary["kept"] = list(guard.kept)  # removals the guard dropped (a newer commit or an imperative add wants them)
    summary["approval"] = approval
    summary["actor"] = actor
    log.info("fleet: %s", ", ".join(f"{k}={v}" for k, v in sorted(summary["counts"].items())))
    return final_state("reconcile-fleet", summary)
