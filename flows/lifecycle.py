"""The lifecycle flows: create, upgrade, add a component, onboard a team, decommission, roll out.

Each flow: load definitions -> resolve -> policy check for the actor -> observe
-> plan -> (dry run stops here) -> apply each step (retried, idempotent, under
the cluster's lock) -> verify -> report as artifacts. The scheduled fleet sweep
is in ``flows.reconcile``.
"""
from __future__ import annotations

from datetime import datetime
from typing import Optional

from prefect import flow, get_run_logger
from pydantic import Field

from models.errors import PermanentError
from models.plan import Step
from models.resolve import Resolver, matches
from models.spec import ModelComponent
from models.status import Status
from models.waves import WavePolicy
from tasks.cluster import Outcome, converge, decommission
from tasks.definitions import WriteBack, component_set_doc, write_back as write_back_task
from tasks.guard import record_imperative
from tasks.report import publish

from .windows import SecurityOverride, WindowGate
from .approvals import second_person
from .common import (DEFAULT_ACTOR, DefinitionsSource, default_source, finish, gate, load_definitions, run_key,
                     run_waves, waves_markdown)

_UPGRADES = ("controlPlane.upgrade", "nodePool.upgrade")


def _desired(defs, name: str, flow_name: str):
    if name not in defs.clusters:
        publish(flow_name, [Outcome(name, Status.FAILED, reason=f"no Cluster {name!r} in the definitions")], dry_run=True)
        raise PermanentError(f"no Cluster {name!r}; known: {', '.join(sorted(defs.clusters))}")
    return Resolver(defs).resolve(name)


@flow(name="create-cluster", log_prints=True)
def create_cluster(cluster: str, source: Optional[DefinitionsSource] = None, dry_run: bool = False,
                   actor: Optional[str] = None, idempotency_key: Optional[str] = None) -> dict:
    """Create a cluster: infrastructure, control plane, node pools, components in order, workspaces.

    Re-running it after success changes nothing; after a crash, it finishes the job.
    """
    defs, old = load_definitions(source or default_source())
    gate(defs, old, actor, "create", flow="create-cluster", cluster=cluster)
    desired = _desired(defs, cluster, "create-cluster")
    approval = second_person(defs, [desired], actor=actor, flow="create-cluster", what="create-cluster", dry_run=dry_run,
                             pending=lambda d: converge(d, dry_run=True, idempotency_key="preview"))
    outcome = converge(desired, dry_run=dry_run, idempotency_key=run_key(idempotency_key))
    return finish("create-cluster", [outcome], dry_run=dry_run) | {"approval": approval}


@flow(name="upgrade-cluster", log_prints=True)
def upgrade_cluster(cluster: str, to_version: str = Field(..., pattern=r"^1\.[0-9]{1,2}$"),
                    source: Optional[DefinitionsSource] = None, dry_run: bool = False,
                    actor: Optional[str] = None, idempotency_key: Optional[str] = None,
                    now: Optional[datetime] = None, security_override: Optional[SecurityOverride] = None) -> dict:
    """Upgrade Kubernetes one minor version at a time, control plane first, a health gate after each step.

    Refused before any change when a component does not support a version on the way. Bump the
    version in Git as well, or the next reconcile reports the cluster as ahead of its definition.
    """
    defs, old = load_definitions(source or default_source())
    gate(defs, old, actor, "upgrade", flow="upgrade-cluster", cluster=cluster)
    desired = _desired(defs, cluster, "upgrade-cluster")
    target = desired.model_copy(update={"kubernetes_version": to_version, "hash": f"{desired.hash}-k8s{to_version}"})
    approval = second_person(defs, [target], actor=actor, flow="upgrade-cluster", what=f"upgrade-cluster to {to_version}",
                             dry_run=dry_run, pending=lambda d: converge(d, dry_run=True, idempotency_key="preview",
                                                                         step_filter=lambda s: s.action in _UPGRADES))
    win = WindowGate(defs, flow="upgrade-cluster", actor=actor, dry_run=dry_run, now=now, override=security_override)
    win.ask_override({cluster: target})
    outcome = converge(target, dry_run=dry_run, idempotency_key=run_key(idempotency_key),
                       step_filter=lambda s: s.action in _UPGRADES, guard=win.guard(target))
    return finish("upgrade-cluster", [outcome], dry_run=dry_run, extra_md=win.finish()) | {"windows": win.record(),
                                                                                  "approval": approval}


@flow(name="add-component", log_prints=True)
def add_component(component: str, selector: dict[str, str], values: dict = {},  # noqa: B006 (a form default)
                  source: Optional[DefinitionsSource] = None, waves: WavePolicy = WavePolicy(),
                  dry_run: bool = False, actor: Optional[str] = None, idempotency_key: Optional[str] = None,
                  write_back: WriteBack = "push", record_in_git: bool = True, now: Optional[datetime] = None,
                  security_override: Optional[SecurityOverride] = None) -> dict:
    """Add a component to every cluster the label selector picks, translated per backend, in waves.

    The change goes to the definitions FIRST, as a ComponentSet document, then rolls out from there:
    ``write_back=push`` commits and pushes it (rebased and retried when the branch moved) and rolls out
    from the pushed commit; ``branch`` pushes a review branch and stops (the branch is in the artifact);
    ``off`` (directory sources only) records nothing in the definitions, and records the clusters it
    changed so the sweep never prunes the component (see ``tasks.guard``). ``record_in_git=False`` is
    the old spelling of ``off``.
    """
    log = get_run_logger()
    mode: str = write_back if record_in_git else "off"
    src = source or default_source()
    defs, old = load_definitions(src)
    if component not in defs.components:
        raise PermanentError(f"no Component {component!r}; known: {', '.join(sorted(defs.components))}")
    gate(defs, old, actor, "add_component", flow="add-component", component=component)
    names = sorted(n for n, c in defs.clusters.items() if matches(c.metadata.labels, selector))
    for n in names:  # a team member may add only to clusters their team owns
        gate(defs, old, actor, "add_component", flow="add-component", cluster=n, component=component)
    sel = "-".join(f"{k}-{v}" for k, v in sorted(selector.items())).replace("/", "-").replace(".", "-")
    set_name = f"{component}-{sel}"[:63].strip("-")
    extra = (ModelComponent(name=component, values=values),)
    wb_md, wb = "", None
    if dry_run or mode == "off":
        if mode == "off" and src.repo:
            raise PermanentError("write_back='off' is allowed only for a directory source: with Git as the source of "
                                 "truth the change must be recorded there ('push' or 'branch')")
        r = Resolver(defs)
        desired = {n: r.resolve(n, extra) for n in names}
    else:
        rel, text = component_set_doc(set_name, component, selector, values, actor)
        wb = write_back_task(src, {rel: text}, mode=mode, message=f"add {component} to {selector} (add-component)",
                             actor=actor, review_name=f"add-{set_name}")
        wb_md = _write_back_md(wb, rel)
        log.info("write-back %s: ComponentSet %s%s", mode, set_name, f" in commit {wb.sha} on {wb.branch}" if wb.sha else "")
        if mode == "branch":  # a review branch: stop here, the rollout follows the merge (sync-from-git)
            publish("add-component", [Outcome(n, Status.PLANNED, reason=f"waits for review of branch {wb.branch}")
                                      for n in names], dry_run=True, extra_md=wb_md)
            return {"write_back": wb.to_dict(), "clusters": names}
        defs, _ = load_definitions(wb.source)  # roll out from the commit just pushed, nothing else
        r = Resolver(defs)
        desired = {n: r.resolve(n) for n in names}
        missing = [n for n, d in desired.items() if d.component(component) is None]
        if missing:
            raise PermanentError(f"the recorded ComponentSet {set_name} does not select {', '.join(missing)}")
    wanted = {component} | {d for dc in desired.values() for c in dc.components if c.name == component for d in c.depends_on}

    def only_component(s: Step) -> bool:
        return s.action in ("component.install", "component.upgrade", "component.configure") and s.object in wanted

    key = run_key(idempotency_key)
    if mode == "off" and not dry_run:  # nothing in the definitions: tell the sweep not to prune it (tasks.guard)
        for n in names:
            record_imperative(n, component, key, actor)
    win = WindowGate(defs, flow="add-component", actor=actor, dry_run=dry_run, now=now, override=security_override)
    win.ask_override(desired)
    outcomes, record = run_waves("add-component", desired, waves, dry_run=dry_run, idempotency_key=key, defs=defs,
                                 actor=actor, step_filter=only_component, versions_matter=False, windows=win)
    out = finish("add-component", outcomes, dry_run=dry_run,
                 extra_md="\n\n".join(x for x in (waves_markdown(record), wb_md, win.finish()) if x))
    return out | {"waves": record, "write_back": wb.to_dict() if wb else {"mode": "dry-run" if dry_run else mode},
                  "windows": win.record()}


def _write_back_md(wb, rel: str) -> str:
    lines = ["## Write-back", "", f"- mode: **{wb.mode}**, file `{rel}`"]
    if wb.sha:
        lines.append(f"- commit `{wb.sha}` on branch `{wb.branch}`" + (" (already there: nothing pushed)" if wb.unchanged else "")
                     + (f", after {wb.attempts} attempts (rebased onto {', '.join(x[:12] for x in wb.rebased_onto)})"
                        if wb.rebased_onto else ""))
    if wb.mode == "branch":
        lines.append(f"- review branch **{wb.branch}**: merge it and sync-from-git rolls it out")
    return "\n".join(lines)


@flow(name="rollout-fleet", log_prints=True)
def rollout_fleet(selector: dict[str, str] = {}, source: Optional[DefinitionsSource] = None,  # noqa: B006
                  waves: WavePolicy = WavePolicy(), to_version: Optional[str] = None, dry_run: bool = False,
                  actor: str = DEFAULT_ACTOR, idempotency_key: Optional[str] = None,
                  clusters: Optional[list[str]] = None, now: Optional[datetime] = None,
                  security_override: Optional[SecurityOverride] = None) -> dict:
    """Converge the selected clusters to the definitions in waves (a model version bump), or upgrade them.

    Each cluster changes only inside its maintenance window (``flows.windows``); the others are deferred
    to a follow-up run at their next window. ``now`` evaluates the windows as at that time.

    ``clusters`` names exactly the clusters to roll out (as ``sync-from-git`` does); with a ``selector``
    too, a cluster must match both.
    """
    defs, old = load_definitions(source or default_source())
    names = sorted(n for n, c in defs.clusters.items() if matches(c.metadata.labels, selector))
    if clusters is not None:
        unknown = sorted(set(clusters) - set(defs.clusters))
        if unknown:
            raise PermanentError(f"no Cluster {', '.join(unknown)} in the definitions")
        names = [n for n in names if n in set(clusters)]
    for n in names:
        gate(defs, old, actor, "upgrade" if to_version else "reconcile", flow="rollout-fleet", cluster=n)
    r = Resolver(defs)
    desired = {n: r.resolve(n) for n in names}
    superseded = []
    if clusters is not None:  # started by sync-from-git for a push: never roll back what a newer push changed
        from .sync import superseded_clusters

        stale = superseded_clusters(source, desired)
        superseded = [Outcome(n, Status.SUPERSEDED, reason=f"changed again by the newer commit {sha}, whose runs roll "
                              "it out; not rolled back to this run's older commit") for n, sha in sorted(stale.items())]
        desired = {n: d for n, d in desired.items() if n not in stale}
    step_filter = None
    if to_version:
        desired = {n: d.model_copy(update={"kubernetes_version": to_version, "hash": f"{d.hash}-k8s{to_version}"})
                   for n, d in desired.items()}
        step_filter = lambda s: s.action in _UPGRADES  # noqa: E731
    win = WindowGate(defs, flow="rollout-fleet", actor=actor, dry_run=dry_run, now=now, override=security_override)
    win.ask_override(desired)
    outcomes, record = run_waves("rollout-fleet", desired, waves, dry_run=dry_run, defs=defs, actor=actor,
                                 idempotency_key=run_key(idempotency_key), step_filter=step_filter, windows=win)
    return finish("rollout-fleet", outcomes + superseded, dry_run=dry_run,
                  extra_md=waves_markdown(record) + "\n\n" + win.finish()) \
        | {"waves": record, "windows": win.record()}


@flow(name="onboard-team", log_prints=True)
def onboard_team(team: str, source: Optional[DefinitionsSource] = None, dry_run: bool = False,
                 actor: Optional[str] = None, idempotency_key: Optional[str] = None) -> dict:
    """Namespaces, RBAC, quota, limits, default-deny network policy and GitOps source on every granted cluster."""
    from models.resolve import placed

    defs, old = load_definitions(source or default_source())
    if team not in defs.teams:
        raise PermanentError(f"no Team {team!r}; known: {', '.join(sorted(defs.teams))}")
    gate(defs, old, actor, "onboard_team", flow="onboard-team", team=team)
    names = sorted(n for n, c in defs.clusters.items() if placed(defs.teams[team], c))
    r = Resolver(defs)
    key = run_key(idempotency_key)

    def for_team(desired):
        gitops = {c.name for c in desired.components if "gitops" in c.provides}
        return lambda s: (s.action.startswith("workspace.") and s.object == team) or \
            (s.action == "component.install" and s.object in gitops)

    approval = second_person(defs, [r.resolve(n) for n in names], actor=actor, flow="onboard-team",
                             what=f"onboard-team {team}", dry_run=dry_run,
                             pending=lambda d: converge(d, dry_run=True, idempotency_key="preview",
                                                        step_filter=for_team(d), versions_matter=False))

    from .common import in_threads

    outcomes = in_threads(lambda n: converge((d := r.resolve(n)), dry_run=dry_run, idempotency_key=key,
                                             step_filter=for_team(d), versions_matter=False), names)
    return finish("onboard-team", outcomes, dry_run=dry_run) | {"approval": approval}


@flow(name="decommission-cluster", log_prints=True)
def decommission_cluster(cluster: str, confirm: str = "", source: Optional[DefinitionsSource] = None,
                         dry_run: bool = False, actor: Optional[str] = None, force: bool = False) -> dict:
    """Delete a cluster: only what carries fleetwright's marks. Refused for clusters labelled protected.

    ``confirm`` must repeat the cluster's name. ``force`` skips the in-cluster phase, for a cluster
    whose Kubernetes API is already dead.
    """
    defs, old = load_definitions(source or default_source())
    gate(defs, old, actor, "decommission", flow="decommission-cluster", cluster=cluster)
    desired = _desired(defs, cluster, "decommission-cluster")
    if desired.protected:
        o = Outcome(cluster, Status.REFUSED, reason="the cluster is labelled fleetwright.io/protected=true")
        publish("decommission-cluster", [o], dry_run=True)
        raise PermanentError(f"{cluster} is protected (label fleetwright.io/protected=true): remove the label in Git first")
    if confirm != cluster and not dry_run:
        raise PermanentError(f"confirm must repeat the cluster's name ({cluster!r})")
    approval = second_person(defs, [desired], actor=actor, flow="decommission-cluster", what="decommission-cluster",
                             dry_run=dry_run)
    if dry_run:
        return finish("decommission-cluster", [Outcome(cluster, Status.PLANNED, [{"#": 1, "action": "delete", "object": cluster,
                                                                             "target": "all", "reason": "decommission"}])], dry_run=True)
    done = decommission(desired, force=force)
    return finish("decommission-cluster", [Outcome(cluster, Status.CONVERGED, done=done)], dry_run=False) | {"approval": approval}
