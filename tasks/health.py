"""Waiting for a cluster to be healthy as its Kubernetes API shows it: the health gates and the verify phase.

``tasks.cluster.health_gate`` (after each upgrade step) and the verify phase of ``converge`` (after a
run changed something) call :func:`wait_healthy`. It builds a
:class:`~backends.base.HealthExpectation` from the desired and observed state (which Nodes the
infrastructure made and the kubelet version each must run, which components' workloads must be
available, the control-plane version after an upgrade), asks the cluster backend's ``health``
(``backends/kube/health.py``) and polls until nothing is wrong:

* a "not yet" (a Deployment still rolling out, a node still NotReady, the API server restarting)
  is waited for, each within its own timeout: a component's ``healthTimeoutSeconds`` (Component
  spec), ``FLEETWRIGHT_HEALTH_TIMEOUT_SECONDS`` (default 300) for nodes, kube-system and the
  control plane;
* a problem that waiting cannot cure (an invalid image name, a rollout past its progress deadline)
  fails at once;
* a failure raises :class:`models.errors.GateFailed` naming every object and why.
"""
from __future__ import annotations

import os
import time
from typing import Callable

from backends import registry
from backends.base import HealthExpectation, HealthProblem
from models.desired import DesiredCluster, ObservedCluster
from models.errors import GateFailed, TransientError
from models.plan import Step

from .blocks import connections

POLL_SECONDS = 1.0


def default_timeout() -> float:
    return float(os.environ.get("FLEETWRIGHT_HEALTH_TIMEOUT_SECONDS", "300"))


def expectation(desired: DesiredCluster, observed: ObservedCluster, step: Step | None = None) -> HealthExpectation:
    """What must be true now: after ``step`` (an upgrade) or, without a step, after a whole run."""
    cp_version = observed.kubernetes_version or desired.kubernetes_version
    nodes: dict[str, str | None] = {}
    for m in desired.machines:
        if m.role != "worker":
            continue
        pool = observed.node_pools.get(m.pool or "")
        want = pool.version if pool is not None and pool.version else desired.kubernetes_version
        if step is not None and step.action == "controlPlane.upgrade":
            want = None  # workers follow in their own steps (one minor of skew is allowed)
        elif step is not None and step.action == "nodePool.upgrade":
            want = step.params.get("version") if m.pool == step.object else None
        nodes[m.name] = want
    cps = {m.name: (step.params.get("version") if step is not None and step.action == "controlPlane.upgrade"
                    else cp_version) for m in desired.machines if m.role == "controlPlane"}
    want_cp = step.params.get("version") if step is not None and step.action == "controlPlane.upgrade" else None
    comps = tuple(c.name for c in desired.components if c.target == "kubernetes" and c.name in observed.components)
    return HealthExpectation(nodes=nodes, node_versions=cps, control_plane_version=want_cp, components=comps)


def _timeouts(desired: DesiredCluster) -> dict[str, float]:
    t = default_timeout()
    out = {g: t for g in ("nodes", "kube-system", "control-plane", "api")}
    for c in desired.components:
        out[f"component:{c.name}"] = float(c.health_timeout_seconds)
    return out


def wait_healthy(desired: DesiredCluster, expect: HealthExpectation, after: str,
                 poll: float = POLL_SECONDS, log=None,
                 check: Callable[[DesiredCluster, HealthExpectation], list[HealthProblem]] | None = None) -> int:
    """Poll the cluster's health until it is healthy; raise GateFailed naming what is not. Returns polls made.

    ``check`` defaults to the cluster backend's ``health`` (through the registry)."""
    if check is None:
        infra = registry.infrastructure(desired, connections())
        check = registry.in_cluster(infra.kube_access(desired)).health
    timeouts = _timeouts(desired)
    t0 = time.monotonic()
    polls = 0
    last: list[HealthProblem] = []
    while True:
        polls += 1
        try:
            problems = check(desired, expect)
        except TransientError as e:  # the API server restarting, a timeout: "not yet"
            problems = [HealthProblem("api", "the Kubernetes API", str(e))]
        if not problems:
            if log is not None and polls > 1:
                log.info("%s: healthy after %s (%.0fs)", desired.name, after, time.monotonic() - t0)
            return polls
        waited = time.monotonic() - t0
        final = [p for p in problems if p.final]
        overdue = [p for p in problems if waited >= timeouts.get(p.group, default_timeout())]
        if final or overdue:
            bad = final or overdue
            more = [p for p in problems if p not in bad]
            msg = (f"{desired.name} is not healthy after {after}: " + "; ".join(map(str, bad))
                   + (f" (also not yet healthy: {'; '.join(map(str, more))})" if more else "")
                   + ("" if final else f" (waited {waited:.0f}s)"))
            raise GateFailed(msg, problems)
        if log is not None and [str(p) for p in problems] != [str(p) for p in last]:
            log.info("%s: waiting after %s: %s", desired.name, after, "; ".join(map(str, problems)))
        last = problems
        time.sleep(poll)
