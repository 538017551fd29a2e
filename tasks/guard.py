"""The sweep never prunes what a rollout is adding: removals are checked against newer commits and imperative adds.

Why: a sweep reads the definitions at its own commit. ``add-component`` pushes its ComponentSet
FIRST and only then installs, so when a sweep that started before the push finds the new
component on a cluster, the branch has already moved. Before a sweep removes a component or a
workspace it therefore asks the remote for the branch's head (``git ls-remote``, no fetch when it
has not moved); when the head is newer than the sweep's commit and that newer commit still wants
the object on that cluster, the removal is **dropped** and reported ("kept"). The steps that do run
still come from the sweep's own commit only; a newer commit can only veto a removal, never add work.

``add-component`` with write-back ``off`` (directory sources only) records nothing in the
definitions, so it records what it installed instead, in a Prefect Variable every worker shares
(``fleetwright-keep-<cluster>``: the components, the run and the actor). A sweep never removes a
component listed there unless the definitions name the removal explicitly: the Cluster sets
``overrides.components.<name>.enabled: false``. Then the removal goes ahead and the record is dropped.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Optional

from models.load import Definitions
from models.plan import Plan, Step
from models.resolve import Resolver

from .definitions import DefinitionsSource, read_files, remote_repo, revision

REMOVALS = ("component.remove", "workspace.remove")
_log = logging.getLogger("fleetwright.guard")


def _var_name(cluster: str) -> str:
    return f"fleetwright-keep-{cluster}".lower().replace(".", "-")[:255]


def kept_components(cluster: str) -> dict:
    """Components added to ``cluster`` imperatively (write-back ``off``): ``{component: {"run", "actor"}}``."""
    from prefect.variables import Variable

    try:
        return dict(Variable.get(_var_name(cluster), default={}) or {})
    except Exception as e:  # noqa: BLE001 - no API: nothing is known, and the guard says so
        _log.warning("could not read %s: %s", _var_name(cluster), e)
        return {}


def record_imperative(cluster: str, component: str, run: str, actor: str) -> None:
    from prefect.variables import Variable

    cur = kept_components(cluster)
    cur[component] = {"run": run, "actor": actor}
    Variable.set(_var_name(cluster), cur, overwrite=True)


def forget_imperative(cluster: str, component: str) -> None:
    from prefect.variables import Variable

    cur = kept_components(cluster)
    if cur.pop(component, None) is not None:
        Variable.set(_var_name(cluster), cur, overwrite=True)


@dataclass
class RemovalGuard:
    """Decides, per removal step, whether a sweep at ``source`` (pinned) may carry it out."""

    source: DefinitionsSource
    defs: Definitions
    kept: list[dict] = field(default_factory=list)
    _newer: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _wanted_at_head(self, cluster: str, step: Step) -> Optional[str]:
        """The newer head's SHA if it still wants the object removed by ``step`` on ``cluster``."""
        src = self.source
        if not src.remote:
            return None
        rev = revision()
        mine = rev.sha if rev else src.ref
        repo = remote_repo(src)
        head = repo.remote_head(src.branch or "HEAD")
        if not head or head == mine:
            return None
        with self._lock:
            if head not in self._newer:
                repo.fetch()
                from models.load import load

                self._newer[head] = Resolver(load(read_files(src.model_copy(update={"ref": head}), head)))
            r = self._newer[head]
        if cluster not in r.defs.clusters:
            return None
        d = r.resolve(cluster)
        names = {c.name for c in d.components} if step.action == "component.remove" else {w.team for w in d.workspaces}
        return head if step.object in names else None

    def allows(self, step: Step) -> bool:
        if step.action not in REMOVALS:
            return True
        why = None
        if step.action == "component.remove":
            rec = kept_components(step.cluster).get(step.object)
            if rec is not None:
                c = self.defs.clusters.get(step.cluster)
                ov = c.spec.overrides.components.get(step.object) if c else None
                if ov is not None and not ov.enabled:
                    forget_imperative(step.cluster, step.object)  # the definitions name the removal: go ahead
                else:
                    why = (f"added by run {rec.get('run')} ({rec.get('actor')}) with write-back off; remove it by "
                           f"setting overrides.components.{step.object}.enabled: false on the Cluster")
        if why is None:
            head = self._wanted_at_head(step.cluster, step)
            if head:
                why = f"wanted by the newer commit {head[:12]} (this sweep read an older one); not pruned"
        if why is None:
            return True
        with self._lock:
            self.kept.append({"cluster": step.cluster, "action": step.action, "object": step.object, "reason": why})
        _log.warning("%s: kept %s %s: %s", step.cluster, step.action, step.object, why)
        return False

    def filter_plan(self, p: Plan) -> Plan:
        steps = [s for s in p.steps if self.allows(s)]
        return p if len(steps) == len(p.steps) else p.model_copy(update={"steps": steps})

    def markdown(self) -> str:
        if not self.kept:
            return ""
        return "\n".join(["## Kept (not pruned)", ""] + [f"- **{k['cluster']}**: {k['action']} {k['object']}: {k['reason']}"
                                                           for k in self.kept])


_GUARDS: dict[str, RemovalGuard] = {}


def install(run_id: str, guard: RemovalGuard) -> RemovalGuard:
    if len(_GUARDS) > 500:
        _GUARDS.clear()
    _GUARDS[run_id] = guard
    return guard


def current() -> Optional[RemovalGuard]:
    from .definitions import _run_id

    return _GUARDS.get(_run_id())
