"""Plan: the ordered steps that take an observed cluster to its desired state.

``plan(desired, observed)`` is pure. Each step has a stable ``id`` (the
idempotency key a flow uses), an ``action``, the ``target`` that carries it out
(``infrastructure`` for the cluster's backend, ``kubernetes`` for in-cluster
work) and a human ``reason``. An observation equal to the desired state gives
an empty plan. Removal steps only ever name objects the backends found by
fleetwright's ownership marks, since observations contain nothing else.

Order: infrastructure, control plane, upgrades one minor version at a time
(control plane before node pools), scaling, new node pools, components in
dependency order, workspaces, then removals (workspaces, components in reverse
dependency order, node pools).

Destructive steps (``Step.destructive``) take capacity or things away: removals, node-pool
deletion or replacement, a scale-down below what runs now (VMs removed, hosts reset), fewer
control-plane replicas. A scheduled sweep never runs them by itself: they wait for a person's
approval (``flows.approvals``).
"""
from __future__ import annotations

from typing import Any, Literal

from dataclasses import dataclass, field, replace

from pydantic import BaseModel, ConfigDict

from .desired import DesiredCluster, ObservedCluster
from .util import construct


Action = Literal[
    "infrastructure.ensure", "controlPlane.create", "controlPlane.upgrade", "controlPlane.scale",
    "nodePool.create", "nodePool.scale", "nodePool.update", "nodePool.upgrade", "nodePool.delete",
    "component.install", "component.upgrade", "component.configure", "component.remove",
    "workspace.create", "workspace.update", "workspace.remove",
]


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a plan. A plain dataclass: plans for thousands of clusters are made in a hot loop."""

    id: str
    cluster: str
    action: Action
    target: Literal["infrastructure", "kubernetes"]
    object: str
    reason: str
    params: dict[str, Any] = field(default_factory=dict)
    destructive: bool = False

    def __str__(self) -> str:
        return f"{self.action} {self.object}: {self.reason}"


class Plan(BaseModel):
    model_config = ConfigDict(frozen=True)

    cluster: str
    desired_hash: str
    steps: list[Step] = []
    refused: list[str] = []

    @property
    def empty(self) -> bool:
        return not self.steps and not self.refused


def minor(v: str) -> tuple[int, int]:
    a, b = v.split(".")[:2]
    return int(a), int(b)


def supports(k8s_min: str, k8s_max: str | None, version: str) -> bool:
    v = minor(version)
    return minor(k8s_min) <= v and (k8s_max is None or v <= minor(k8s_max))


def _drift_text(drift) -> str:
    shown = "; ".join(str(d) for d in drift[:3])
    return shown + (f"; and {len(drift) - 3} more" if len(drift) > 3 else "")


def _scale(p, op) -> tuple[str, dict[str, Any]] | None:
    """(reason, params) of the nodePool.scale a pool needs, or None.

    Without an autoscaler the size is the definition's ``replicas``. With ``autoscaling`` on, the
    autoscaler owns the size: only the bounds are corrected, and a size inside them is not drift;
    a size outside them is brought to the nearest bound, never back to ``replicas``.
    """
    have = f"node pool {p.name} is {op.replicas} ({op.min_size}..{op.max_size})"
    if not p.autoscaling:
        if (op.replicas, op.min_size, op.max_size) == (p.replicas, p.min_size, p.max_size):
            return None
        return (f"{have}, wants {p.replicas} ({p.min_size}..{p.max_size})",
                dict(replicas=p.replicas, minSize=p.min_size, maxSize=p.max_size))
    within = min(max(op.replicas, p.min_size), p.max_size)
    if (op.min_size, op.max_size) == (p.min_size, p.max_size) and within == op.replicas:
        return None
    return (f"{have}, wants bounds {p.min_size}..{p.max_size} (an autoscaler owns the size"
            + (f"; {op.replicas} is brought to {within})" if within != op.replicas else ")"),
            dict(replicas=within, minSize=p.min_size, maxSize=p.max_size, autoscaling=True))


def plan(desired: DesiredCluster, observed: ObservedCluster) -> Plan:
    name = desired.name
    steps: list[Step] = []
    refused: list[str] = []

    def add(action: str, obj: str, reason: str, target: str = "infrastructure", key: str | None = None, **params):
        steps.append(Step(id=f"{name}/{action}/{key or obj}", cluster=name, action=action, target=target,
                          object=obj, reason=reason, params=params))

    want_v = desired.kubernetes_version
    if not observed.infrastructure:
        add("infrastructure.ensure", name, f"no {desired.backend.type} infrastructure owned by fleetwright was found")
    if not observed.exists:
        add("controlPlane.create", name, f"no control plane found; create Kubernetes {want_v} with {desired.control_plane.replicas} replicas",
            version=want_v, replicas=desired.control_plane.replicas)
        for p in desired.node_pools:
            add("nodePool.create", p.name, f"node pool {p.name} does not exist", version=want_v,
                replicas=p.replicas, minSize=p.min_size, maxSize=p.max_size, machine=p.machine)
    else:
        have_v = observed.kubernetes_version or want_v
        if minor(want_v) < minor(have_v):
            refused.append(f"downgrade from Kubernetes {have_v} to {want_v} is not supported")
        elif minor(want_v) > minor(have_v):
            path = [f"1.{m}" for m in range(minor(have_v)[1] + 1, minor(want_v)[1] + 1)]
            blockers = [f"component {c.name} {c.version} supports Kubernetes {c.k8s_min}..{c.k8s_max or 'any'}, not {v}"
                        for v in path for c in desired.components if not supports(c.k8s_min, c.k8s_max, v)]
            if blockers:
                refused.append(f"upgrade {have_v} -> {want_v} refused: " + "; ".join(dict.fromkeys(blockers)))
            else:
                prev = have_v
                for v in path:
                    add("controlPlane.upgrade", name, f"upgrade control plane {prev} -> {v} (one minor version at a time)",
                        key=f"{name}@{v}", version=v, previous=prev)
                    for p in desired.node_pools:
                        op = observed.node_pools.get(p.name)
                        if op is not None and minor(op.version or prev) < minor(v):
                            add("nodePool.upgrade", p.name, f"upgrade node pool {p.name} {prev} -> {v} after the control plane",
                                key=f"{p.name}@{v}", version=v, previous=prev)
                    prev = v
        if not refused and minor(want_v) <= minor(have_v):
            for p in desired.node_pools:  # node pools left behind (for example by an interrupted upgrade)
                op = observed.node_pools.get(p.name)
                if op is not None and op.version and minor(op.version) < minor(have_v):
                    add("nodePool.upgrade", p.name, f"node pool {p.name} runs {op.version}, control plane runs {have_v}",
                        key=f"{p.name}@{have_v}", version=have_v, previous=op.version)
        if observed.control_plane_replicas is not None and observed.control_plane_replicas != desired.control_plane.replicas:
            add("controlPlane.scale", name, f"control plane has {observed.control_plane_replicas} replicas, wants {desired.control_plane.replicas}",
                replicas=desired.control_plane.replicas)
        for p in desired.node_pools:
            op = observed.node_pools.get(p.name)
            if op is None:
                add("nodePool.create", p.name, f"node pool {p.name} does not exist", version=want_v,
                    replicas=p.replicas, minSize=p.min_size, maxSize=p.max_size, machine=p.machine)
                continue
            scale = _scale(p, op)
            if scale is not None:
                add("nodePool.scale", p.name, scale[0], **scale[1])
            if p.machine and op.machine and op.machine != p.machine:
                changed = sorted(k for k in set(p.machine) | set(op.machine) if p.machine.get(k) != op.machine.get(k))
                add("nodePool.update", p.name, f"node pool {p.name} machine differs in {', '.join(changed)}", machine=p.machine)

    for c in desired.components:
        oc = observed.components.get(c.name)
        common = dict(target=c.target, component=c.name, version=c.version, hash=c.hash)
        if oc is None:
            add("component.install", c.name, f"component {c.name} {c.version} is not installed", **common)
        elif oc.version != c.version:
            add("component.upgrade", c.name, f"component {c.name} runs {oc.version}, wants {c.version}", key=f"{c.name}@{c.version}", **common)
        elif oc.drift:
            add("component.configure", c.name, f"component {c.name} drifted: {_drift_text(oc.drift)}", **common)
        elif oc.hash is not None and oc.hash != c.hash:
            add("component.configure", c.name, f"component {c.name} values or manifests changed", **common)
    for w in desired.workspaces:
        ow = observed.workspaces.get(w.team)
        if ow is None:
            add("workspace.create", w.team, f"workspace of team {w.team} is missing", target="kubernetes", team=w.team, hash=w.hash)
        elif ow.drift:
            add("workspace.update", w.team, f"workspace of team {w.team} drifted: {_drift_text(ow.drift)}", target="kubernetes", team=w.team, hash=w.hash)
        elif ow.hash is not None and ow.hash != w.hash:
            add("workspace.update", w.team, f"workspace of team {w.team} changed", target="kubernetes", team=w.team, hash=w.hash)

    wanted_ws = {w.team for w in desired.workspaces}
    for team in sorted(set(observed.workspaces) - wanted_ws):
        add("workspace.remove", team, f"team {team} is no longer granted this cluster", target="kubernetes", team=team)
    wanted_c = {c.name for c in desired.components}
    for comp in sorted(set(observed.components) - wanted_c, reverse=True):
        add("component.remove", comp, f"component {comp} is no longer part of this cluster's model",
            target=observed.components[comp].target, component=comp)
    for pool in sorted(set(observed.node_pools) - {p.name for p in desired.node_pools}):
        add("nodePool.delete", pool, f"node pool {pool} is no longer in the model")

    steps = [replace(s, destructive=True) if _destructive(s, observed) else s for s in steps]
    return construct(Plan, cluster=name, desired_hash=desired.hash, steps=[] if refused and not steps else steps, refused=refused)


_ALWAYS_DESTRUCTIVE = frozenset({"component.remove", "workspace.remove", "nodePool.delete", "nodePool.update"})


def _destructive(s: Step, observed: ObservedCluster) -> bool:
    """Removes something or takes capacity down: removals, pool deletion/replacement, scaling below what runs."""
    if s.action in _ALWAYS_DESTRUCTIVE:  # nodePool.update replaces the pool's machines
        return True
    if s.action == "nodePool.scale":
        op = observed.node_pools.get(s.object)
        now = op.replicas if op is not None else None
        want = [v for v in (s.params.get("replicas"), s.params.get("maxSize")) if isinstance(v, int)]
        return now is not None and any(v < now for v in want)
    if s.action == "controlPlane.scale":
        now = observed.control_plane_replicas
        return now is not None and isinstance(s.params.get("replicas"), int) and s.params["replicas"] < now
    return False
