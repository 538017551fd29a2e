"""Tasks that observe and change one cluster, and the converge procedure the flows share.

Every change goes observe -> plan -> (lock) -> apply each step -> verify.
``apply_step`` is cached under an idempotency key (the run's key + the step's
id + the desired state's hash) with a persisted result, so a run repeated
with the same key after a crash skips the steps that finished and does the
rest; a fresh key (every scheduled sweep) never skips anything.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable

from prefect import get_run_logger, task
from prefect.cache_policies import NONE as NO_CACHE

from backends import registry
from backends.base import StepResult, merge_observations
from models.desired import DesiredCluster, ObservedCluster
from models.errors import GateFailed, TransientError
from models.plan import Plan, Step, minor, plan
from models.status import Status

from .blocks import connections
from .health import expectation, wait_healthy
from .locks import cluster_lock, install_api_guard
from .retry import call, retry_options


install_api_guard()  # every backend API call in this process honours the API limits


__all__ = ["GateFailed"]  # re-exported: it lives in models.errors, the one error tree


def _log():
    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a run (unit tests of .fn)
        import logging

        return logging.getLogger("fleetwright")


class _ToRunLog(logging.Handler):
    """Forwards backend log records (Ansible events, SDK calls) made in this thread to the task's run log."""

    def __init__(self, run_log):
        super().__init__(logging.INFO)
        self.run_log, self.thread = run_log, threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.run_log.log(record.levelno, "%s", record.getMessage())


@contextmanager
def backend_logs():
    """Inside a task: backend loggers (``backends.*``, ``fleetwright.*``) also write to the task's log in the UI."""
    try:
        handler = _ToRunLog(get_run_logger())
    except Exception:  # noqa: BLE001 - not in a run
        yield
        return
    loggers = [logging.getLogger("backends"), logging.getLogger("fleetwright")]
    for lg in loggers:
        lg.addHandler(handler)
        if lg.level == logging.NOTSET or lg.level > logging.INFO:
            lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


@task(name="observe-cluster", task_run_name="observe {desired.name}", cache_policy=NO_CACHE, **retry_options())
def observe_cluster(desired: DesiredCluster) -> ObservedCluster:
    """What the backends find for this cluster (no side effects)."""
    with backend_logs():
        return _observe(desired)


def _observe(desired: DesiredCluster, infra_observed: ObservedCluster | None = None) -> ObservedCluster:
    """Infrastructure then in-cluster observation (``infra_observed``: already read by a batch call)."""
    conns = connections()
    infra = registry.infrastructure(desired, conns)
    observed = infra_observed if infra_observed is not None else infra.observe(desired)
    inside = None
    if observed.exists:
        inside = registry.in_cluster(infra.kube_access(desired)).observe(desired)
    return merge_observations(observed, inside)


def _step_key(context, parameters) -> str:
    step: Step = parameters["step"]
    desired: DesiredCluster = parameters["desired"]
    raw = f"fleetwright-{parameters['idempotency_key']}-{step.id}-{desired.hash}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", raw)


@task(name="apply-step", task_run_name="{step.action} {step.object} on {desired.name}",
      cache_key_fn=_step_key, persist_result=True, **retry_options())
def apply_step(desired: DesiredCluster, step: Step, idempotency_key: str) -> dict:
    """Carry out one plan step through the backend its target names. Idempotent."""
    with backend_logs():
        return _apply(desired, step)


def _apply(desired: DesiredCluster, step: Step) -> dict:
    log = _log()
    conns = connections()
    infra = registry.infrastructure(desired, conns)
    if step.target == "infrastructure":
        result: StepResult = infra.apply(desired, step)
    else:
        result = registry.in_cluster(infra.kube_access(desired)).apply(desired, step)
    log.info("%s %s on %s: %s%s", step.action, step.object, desired.name,
             "changed" if result.changed else "no change", f" ({result.detail})" if result.detail else "")
    return {"step": step.id, "action": step.action, "object": step.object, "changed": result.changed,
            "detail": result.detail}


@task(name="health-gate", task_run_name="health gate after {step.action} {step.object} on {desired.name}",
      cache_policy=NO_CACHE, **retry_options(retries=3))
def health_gate(desired: DesiredCluster, step: Step) -> str:
    """After an upgrade step: the API answers, nothing is in flight, the version moved, and the cluster is
    healthy as its API shows it (``tasks.health``: nodes Ready at the kubelet version, kube-system Pods,
    component workloads, control-plane Pods at the new version). Raises GateFailed naming what is not."""
    observed = observe_cluster.fn(desired)
    want = step.params.get("version")
    if observed.in_flight:
        raise TransientError(f"still in flight: {', '.join(observed.in_flight)}")
    if not observed.reachable:
        raise GateFailed(f"the Kubernetes API of {desired.name} does not answer after {step.action}")
    if step.action == "controlPlane.upgrade" and want and minor(observed.kubernetes_version or "0.0") < minor(want):
        raise GateFailed(f"control plane reports {observed.kubernetes_version}, expected {want}")
    if step.action == "nodePool.upgrade" and want:
        pool = observed.node_pools.get(step.object)
        if pool is None or minor(pool.version or "0.0") < minor(want):
            raise GateFailed(f"node pool {step.object} reports {pool.version if pool else 'nothing'}, expected {want}")
    missing = [c.name for c in desired.components if c.name not in observed.components]
    if missing:
        raise GateFailed(f"components missing after {step.action}: {', '.join(missing)}")
    with backend_logs():
        wait_healthy(desired, expectation(desired, observed, step), f"{step.action} {step.object}", log=_log())
    return "passed"


@task(name="verify-health", task_run_name="verify health of {desired.name}", cache_policy=NO_CACHE,
      **retry_options(retries=2))
def verify_health(desired: DesiredCluster, observed: ObservedCluster) -> str:
    """The verify phase of a run that changed the cluster: healthy as its Kubernetes API shows it."""
    with backend_logs():
        wait_healthy(desired, expectation(desired, observed), "the run", log=_log())
    return "passed"


@dataclass
class Outcome:
    """What happened to one cluster in one run."""

    cluster: str
    status: Status  # a plain string is accepted and checked against the vocabulary
    steps: list[dict] = field(default_factory=list)
    done: list[dict] = field(default_factory=list)
    drift: list[str] = field(default_factory=list)
    reason: str = ""
    seconds: float = 0.0
    held: list[dict] = field(default_factory=list)  # destructive steps waiting for an approval (a sweep)

    def __setattr__(self, name, value) -> None:
        super().__setattr__(name, Status.parse(value) if name == "status" else value)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["status"] = self.status.value  # a plain string in results and JSON
        return d


def plan_rows(p: Plan) -> list[dict]:
    return [{"#": i, "action": s.action, "object": s.object, "target": s.target, "reason": s.reason}
            for i, s in enumerate(p.steps, 1)]


def drift_lines(observed: ObservedCluster, p: Plan) -> list[str]:
    out = [f"{n}: {d}" for n, c in observed.components.items() for d in c.drift]
    out += [f"workspace {n}: {d}" for n, w in observed.workspaces.items() for d in w.drift]
    return out + [str(s) for s in p.steps if s.action in ("nodePool.scale", "nodePool.update", "controlPlane.scale")]


def converge(desired: DesiredCluster, *, dry_run: bool, idempotency_key: str,
             step_filter: Callable[[Step], bool] | None = None, lock_timeout: float | None = None,
             versions_matter: bool = True, guard: Callable[[Step], str | None] | None = None,
             plain: bool = False) -> Outcome:
    """Observe, plan and (unless ``dry_run``) apply one cluster's steps under its lock, then verify.

    ``versions_matter=False`` (a flow that only touches components or workspaces) lets a refused
    Kubernetes version change stand aside instead of stopping the run, and skips clusters that do not
    exist yet (reported as ``absent``: creating them will include the change). ``guard(step)`` (the
    maintenance windows, ``flows.windows``) returns why a step may not start now: the cluster is then
    ``deferred`` with that reason, before the step and before anything after it.

    ``plain``: observations, steps and checks are plain calls with the tasks' retry policy, not task
    runs (a sweep's repairs, inside its batch task: a task run per observation and step cost more CPU
    and server events than the repair itself). Without their cache a step is not skipped as done by a
    re-run with the same key; the re-run observes and plans again, so a step already done is not planned.
    """
    observe_cluster, apply_step, health_gate, verify_health = (
        _as_calls(_TASKS) if plain else _TASKS)
    t0 = time.monotonic()
    log = _log()
    keep = step_filter or (lambda s: True)
    rows: list[dict] = []
    done: list[dict] = []
    try:
        observed = observe_cluster(desired)
        p = plan(desired, observed)
        steps = [s for s in p.steps if keep(s)]
        rows = [r for r, s in zip(plan_rows(p), p.steps) if keep(s)]
        if p.refused and versions_matter:
            return Outcome(desired.name, Status.REFUSED, rows, reason="; ".join(p.refused), seconds=time.monotonic() - t0)
        if not versions_matter and not observed.exists:  # an in-cluster change to a cluster not made yet
            return Outcome(desired.name, Status.ABSENT, reason="the cluster does not exist yet; create-cluster will include this",
                           seconds=time.monotonic() - t0)
        if not steps:
            return Outcome(desired.name, Status.IN_SYNC, [], seconds=time.monotonic() - t0)
        if guard is not None and (why := guard(steps[0])):
            return Outcome(desired.name, Status.DEFERRED, rows, drift=drift_lines(observed, p), reason=why,
                           seconds=time.monotonic() - t0)
        if dry_run:
            return Outcome(desired.name, Status.PLANNED, rows, drift=drift_lines(observed, p), seconds=time.monotonic() - t0)
        with cluster_lock(desired.name, timeout_seconds=lock_timeout):
            observed = observe_cluster(desired)  # another run may have changed it while we waited
            p = plan(desired, observed)
            steps = [s for s in p.steps if keep(s)]
            for i, s in enumerate(steps):
                if guard is not None and (why := guard(s)):  # the window closes before this step could finish
                    return Outcome(desired.name, Status.DEFERRED, rows, done, reason=f"{i} of {len(steps)} steps done; {why}",
                                   seconds=time.monotonic() - t0)
                done.append(apply_step(desired, s, idempotency_key))
                if s.action in ("controlPlane.upgrade", "nodePool.upgrade"):
                    health_gate(desired, s)
            final = observe_cluster(desired)
            after = plan(desired, final)
        left = [s for s in after.steps if keep(s)]
        if left:
            return Outcome(desired.name, Status.FAILED, rows, done, reason="not converged after apply: " + "; ".join(map(str, left)),
                           seconds=time.monotonic() - t0)
        if final.exists and done:
            verify_health(desired, final)  # GateFailed: reported as failed below, naming the object
        return Outcome(desired.name, Status.CONVERGED, rows, done, drift=drift_lines(observed, p), seconds=time.monotonic() - t0)
    except Exception as e:  # noqa: BLE001 - a failed task re-raises its exception; report it, don't crash the fleet
        log.error("%s: %s: %s", desired.name, type(e).__name__, e)
        return Outcome(desired.name, Status.FAILED, rows, done, reason=f"{type(e).__name__}: {e}", seconds=time.monotonic() - t0)


_TASKS = (observe_cluster, apply_step, health_gate, verify_health)


def _as_calls(tasks_: tuple) -> tuple:
    """Each task as a plain call of its function, retried as the task would be (``tasks.retry.call``)."""
    return tuple((lambda t: lambda *a, **k: call(t.fn, *a, retries=t.retries, **k))(t) for t in tasks_)


@task(name="decommission", task_run_name="decommission {desired.name}", cache_policy=NO_CACHE, **retry_options())
def decommission(desired: DesiredCluster, force: bool = False) -> list[dict]:
    """Delete everything of the cluster that carries our marks: in-cluster objects, then infrastructure.

    ``force`` skips the in-cluster phase (its API is already dead): the infrastructure backend then
    also deletes what controllers made for the cluster (load balancers, network interfaces, ...).
    """
    conns = connections()
    infra = registry.infrastructure(desired, conns)
    done = []
    with cluster_lock(desired.name):
        observed = infra.observe(desired)
        if observed.exists and force:
            done.append({"step": "in-cluster", "changed": False, "detail": "skipped (force): the API is not used"})
        elif observed.exists:
            r = registry.in_cluster(infra.kube_access(desired)).delete(desired)
            done.append({"step": "in-cluster", "changed": r.changed, "detail": r.detail})
        r = infra.delete(desired)
        done.append({"step": "infrastructure", "changed": r.changed, "detail": r.detail})
    return done
