"""The scheduled fleet sweep: observe every cluster, diff, and report or correct by its drift mode.

Clusters are handled in batches (one Prefect task per batch, 50 by default),
with concurrent backend calls inside a batch, so a sweep of 2,000 clusters is
about 40 task runs plus one per repair, not thousands of subflows. A cluster
in ``report`` mode gets an artifact line and makes the run end Failed (a
failed check); one in ``correct`` mode is repaired under its lock. Clusters
that do not exist yet are reported as absent: creating is ``create-cluster``'s job.
"""
from __future__ import annotations

import time
from typing import Optional

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE as NO_CACHE
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner

from models.desired import DesiredCluster
from models.errors import TransientError
from models.plan import plan
from models.resolve import Resolver, matches
from models.status import PROBLEMS, Status
from tasks.cluster import Outcome, converge, drift_lines, observe_cluster, plan_rows
from tasks.report import publish

from .common import DefinitionsSource, default_source, in_threads, load_definitions, run_key


def _observe(desired: DesiredCluster, attempts: int = 3):
    for i in range(attempts):
        try:
            return observe_cluster.fn(desired)
        except TransientError:
            if i == attempts - 1:
                raise
            time.sleep(0.5 * 2 ** i)


def check_one(desired: DesiredCluster, dry_run: bool, idempotency_key: str) -> Outcome:
    t0 = time.monotonic()
    try:
        observed = _observe(desired)
    except Exception as e:  # noqa: BLE001 - one unreachable cluster must not stop the sweep
        return Outcome(desired.name, Status.FAILED, reason=f"observe: {type(e).__name__}: {e}", seconds=time.monotonic() - t0)
    if not observed.exists:
        return Outcome(desired.name, Status.ABSENT, reason="no control plane found; run create-cluster", seconds=time.monotonic() - t0)
    p = plan(desired, observed)
    if p.refused:
        return Outcome(desired.name, Status.REFUSED, plan_rows(p), reason="; ".join(p.refused), seconds=time.monotonic() - t0)
    if not p.steps:
        return Outcome(desired.name, Status.IN_SYNC, seconds=time.monotonic() - t0)
    drift = drift_lines(observed, p) or [str(s) for s in p.steps]
    if desired.drift_mode == "report" or dry_run:
        return Outcome(desired.name, Status.DRIFT, plan_rows(p), drift=drift, reason=f"{len(p.steps)} step(s) to converge",
                       seconds=time.monotonic() - t0)
    out = converge(desired, dry_run=False, idempotency_key=idempotency_key)
    out.drift = drift
    if out.status == Status.CONVERGED:
        out.status = Status.CORRECTED
    return out


@task(name="reconcile-batch", task_run_name="reconcile batch {index}", cache_policy=NO_CACHE)
def reconcile_batch(index: int, desired: list[DesiredCluster], dry_run: bool, idempotency_key: str,
                    max_workers: int) -> list[Outcome]:
    return in_threads(lambda d: check_one(d, dry_run, idempotency_key), desired, max_workers)


@flow(name="reconcile-fleet", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=4))
def reconcile_fleet(selector: dict[str, str] = {}, source: Optional[DefinitionsSource] = None,  # noqa: B006
                    batch_size: int = 50, max_workers: int = 8, dry_run: bool = False):
    """Sweep the fleet for drift; report or correct each cluster by its drift mode; one summary artifact."""
    log = get_run_logger()
    t0 = time.monotonic()
    defs, _ = load_definitions(source or default_source())
    r = Resolver(defs)
    names = sorted(n for n, c in defs.clusters.items() if matches(c.metadata.labels, selector))
    desired = [r.resolve(n) for n in names]
    key = run_key(None)  # a fresh key every sweep: repairs are never skipped as done
    futures = [reconcile_batch.submit(i, desired[i:i + batch_size], dry_run, key, max_workers)
               for i in range(0, len(desired), batch_size)]
    outcomes = [o for f in futures for o in f.result()]
    counts = publish("reconcile-fleet", outcomes, dry_run=dry_run,
                     extra_md=f"Swept {len(outcomes)} clusters in {time.monotonic() - t0:.1f}s "
                              f"({len(futures)} batches of up to {batch_size}).")
    log.info("fleet: %s", ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    result = {"counts": counts, "clusters": [o.to_dict() for o in outcomes]}
    reported = [o.cluster for o in outcomes if o.status == Status.DRIFT]
    failed = [o.cluster for o in outcomes if o.status in PROBLEMS]
    if reported or failed:
        return Failed(message=f"drift reported on {len(reported)} cluster(s) {reported}; failed: {failed}", data=result)
    return result
