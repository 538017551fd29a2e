"""Policy: may this actor make this change between two revisions of the definitions?

Rules, in order:

``platform-all``
    Members of the platform role (or of any role with ``allAccess``) may change everything.
``platform-only-kind``
    Only the platform role may change Components, ClusterModels, ComponentSets and Policies.
``own-workspace-only``
    A team member may change only their own team's Team document.
``cluster-owner-only``
    A team member may change a Cluster only when the cluster's ``spec.owner`` is their team.
``protected-component``
    Nobody but the platform role may remove, downgrade or change the values of a
    protected standard component on any cluster, by whatever route (overrides,
    variables, the cluster's component list). Checked on the resolved clusters.

Who starts an action (``authorize``, checked before ``platform-all``):

``person-required``
    An imperative action (create, upgrade, add_component, onboard_team, decommission) names the
    person who starts it. There is no default actor.
``automation-git-only``
    The automation identity (``fleetwright-automation``) only converges what is committed in
    Git: sweeps and rollouts of the definitions (``reconcile``). It may not create, upgrade by
    parameter, add or change components by parameter, onboard, or decommission, whatever roles a
    policy gives it.

``platform-only-clock`` (checked by ``flows.windows.WindowGate``)
    A real (not dry-run) run with a shifted clock (the ``now`` parameter: maintenance windows
    judged as at another time) is started only by a platform member named as its ``actor``; the
    automation identity never shifts a real run's clock. A dry run may ask about any time.

Approvals (``judge_approval``) for clusters labelled ``fleetwright.io/approval: required`` and
for a sweep's destructive repairs:

``approval-rejected``
    The approver said no.
``approver-named``
    An approval names the person who gives it.
``approver-is-a-person``
    The automation identity never approves.
``second-person``
    The approver is not the person who started the action.
``approver-authorized``
    The approver is in the platform role or in the team that owns every cluster concerned.

A denial names its rule, the object and the field. Open-source Prefect has no user identity:
names come from run parameters and approval forms, so put the UI behind an authenticating proxy
(see the README).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .compare import changes
from .desired import DesiredCluster
from .catalogue import Definitions


@dataclass(frozen=True)
class Actor:
    name: str
    teams: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    platform: bool = False


@dataclass(frozen=True)
class Denial:
    rule: str
    object: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"denied by {self.rule}: {self.object}: {self.field}: {self.message}"


@dataclass
class Verdict:
    actor: str
    allowed: bool
    rule: str
    denials: list[Denial] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"actor": self.actor, "allowed": self.allowed, "rule": self.rule,
                "denials": [d.__dict__ for d in self.denials]}


def actor_from(defs: Definitions, name: str, groups: tuple[str, ...] = ()) -> Actor:
    """Who ``name`` is in these definitions: their teams (by member or group) and roles."""
    teams = frozenset(t for t, team in defs.teams.items()
                      if name in team.spec.members or set(groups) & set(team.spec.groups))
    roles, platform = set(), False
    for pol in defs.policies.values():
        for role in pol.spec.roles:
            if name in role.members or set(groups) & set(role.groups):
                roles.add(role.name)
                platform = platform or role.all_access or role.name == pol.spec.platform_role
    return Actor(name=name, teams=teams, roles=frozenset(roles), platform=platform)


def person_for(defs: Definitions | None, git_identity: str) -> str:
    """The person a Git identity (webhook pusher login, or commit email) is, by ``Policy.spec.gitIdentities``.

    Matching is case-insensitive, as Git hosts treat logins. An identity no Policy lists is
    ``git:<identity>``: a name no role or team contains, so every change it makes is denied.
    """
    want = git_identity.strip().lower()
    if defs is not None and want:
        for pol in defs.policies.values():
            for ident, person in pol.spec.git_identities.items():
                if ident.lower() == want:
                    return person
    return f"git:{git_identity.strip() or 'unknown'}"


def _docs(defs: Definitions | None) -> dict[tuple, dict]:
    if defs is None:
        return {}
    out = {}
    for name, c in defs.components.items():
        out[("Component", name)] = c.model_dump(mode="json", by_alias=True)
    for name, versions in defs.models.items():
        for v, m in versions.items():
            out[("ClusterModel", f"{name}@{v}")] = m.model_dump(mode="json", by_alias=True)
    for name, c in defs.clusters.items():
        out[("Cluster", name)] = c.model_dump(mode="json", by_alias=True)
    for name, t in defs.teams.items():
        out[("Team", name)] = t.model_dump(mode="json", by_alias=True)
    for name, p in defs.policies.items():
        out[("Policy", name)] = p.model_dump(mode="json", by_alias=True)
    for name, cs in defs.component_sets.items():
        out[("ComponentSet", name)] = cs.model_dump(mode="json", by_alias=True)
    return out


def _first_change(old: dict | None, new: dict | None) -> str:
    if old is None:
        return "(added)"
    if new is None:
        return "(removed)"
    return next((p for p, _, _ in changes(old, new)), "")


def evaluate(old: Definitions | None, new: Definitions, actor: Actor,
             old_desired: dict[str, DesiredCluster] | None = None,
             new_desired: dict[str, DesiredCluster] | None = None) -> Verdict:
    """Judge the change from ``old`` to ``new`` for ``actor``."""
    if actor.platform:
        return Verdict(actor.name, True, "platform-all")
    denials: list[Denial] = []
    a, b = _docs(old), _docs(new)
    for key in sorted(set(a) | set(b)):
        before, after = a.get(key), b.get(key)
        if before == after:
            continue
        kind, name = key
        where = _first_change(before, after)
        obj = f"{kind}/{name}"
        if kind in ("Component", "ClusterModel", "Policy", "ComponentSet"):
            denials.append(Denial("platform-only-kind", obj, where, f"only the platform role may change a {kind}"))
        elif kind == "Team" and name not in actor.teams:
            denials.append(Denial("own-workspace-only", obj, where,
                                  f"{actor.name} may change only their own team's workspace ({', '.join(sorted(actor.teams)) or 'no team'})"))
        elif kind == "Cluster":
            owners = {d["spec"].get("owner") for d in (before, after) if d is not None}
            if not owners <= set(actor.teams) or None in owners:
                denials.append(Denial("cluster-owner-only", obj, where,
                                      f"{actor.name}'s teams ({', '.join(sorted(actor.teams)) or 'none'}) do not own this cluster"))
    if old is not None and old_desired is None:
        from .resolve import resolve_all

        old_desired, new_desired = resolve_all(old), resolve_all(new)
    for cname in sorted(set(old_desired or {}) & set(new_desired or {})):
        denials.extend(_protected(old_desired[cname], new_desired[cname]))
    if denials:
        return Verdict(actor.name, False, denials[0].rule, denials)
    return Verdict(actor.name, True, "team-scope")


def _protected(old: DesiredCluster, new: DesiredCluster) -> list[Denial]:
    out = []
    for oc in old.components:
        if not oc.protected:
            continue
        obj = f"Cluster/{new.name}"
        nc = new.component(oc.name)
        if nc is None:
            out.append(Denial("protected-component", obj, f"components.{oc.name}", "a protected standard component may not be removed"))
            continue
        if _semver(nc.version) < _semver(oc.version):
            out.append(Denial("protected-component", obj, f"components.{oc.name}.version",
                              f"a protected standard component may not be downgraded ({oc.version} -> {nc.version})"))
        for path, _, _ in changes(oc.values, nc.values, f"components.{oc.name}.values"):
            out.append(Denial("protected-component", obj, path, "the values of a protected standard component may not be changed"))
            break
    return out


def _semver(v: str) -> tuple:
    core = v.split("-")[0].split("+")[0]
    return tuple(int(x) for x in core.split("."))


ACTIONS = ("create", "upgrade", "add_component", "onboard_team", "reconcile", "decommission")
IMPERATIVE = ("create", "upgrade", "add_component", "onboard_team", "decommission")
AUTOMATION = "fleetwright-automation"
AUTOMATION_ACTIONS = ("reconcile",)  # converge the committed definitions: sweeps and rollouts


def is_automation(name: str | None) -> bool:
    return (name or "").strip() == AUTOMATION


def _identity(actor: Actor, action: str, obj: str) -> list[Denial]:
    """``person-required`` and ``automation-git-only``: before any role is looked at."""
    name = (actor.name or "").strip()
    if is_automation(name) and action not in AUTOMATION_ACTIONS:
        what = {"decommission": "may not decommission a cluster",
                "add_component": "may not add or change components by parameter",
                "upgrade": "may not change a Kubernetes version by parameter"}.get(action, f"may not {action.replace('_', ' ')}")
        return [Denial("automation-git-only", obj, "actor",
                       f"{AUTOMATION} only converges what is committed in Git (sweeps and rollouts); it {what}: "
                       "name the person who starts this")]
    if not name and action in IMPERATIVE:
        return [Denial("person-required", obj, "actor",
                       f"{action.replace('_', ' ')} is started by a person: set the actor parameter to your name "
                       "(there is no default actor)")]
    return []


def authorize(defs: Definitions, actor: Actor, action: str, cluster: str | None = None,
              team: str | None = None, component: str | None = None) -> Verdict:
    """May ``actor`` start ``action`` on this cluster (or for this team)? Checked before anything changes.

    Rules: ``platform-all``; ``platform-only-action`` (decommission, and anything on a cluster with no
    owner); ``cluster-owner-only``; ``own-workspace-only`` (onboard_team); ``protected-component``
    (add_component of a protected component). Before them, ``person-required`` and
    ``automation-git-only`` (``_identity``), which no role overrides.
    """
    obj = f"Cluster/{cluster}" if cluster else f"Team/{team}" if team else f"Component/{component}" if component else action
    who = _identity(actor, action, obj)
    if who:
        return Verdict(actor.name, False, who[0].rule, who)
    if is_automation(actor.name):  # converging the committed definitions: Git is the authority
        return Verdict(actor.name, True, "automation-git-only")
    if actor.platform:
        return Verdict(actor.name, True, "platform-all")
    denials: list[Denial] = []
    protected = {c for p in defs.policies.values() for c in p.spec.protected_components}
    if action == "decommission":
        denials.append(Denial("platform-only-action", f"Cluster/{cluster}", "", "only the platform role may decommission a cluster"))
    if action == "onboard_team" and team is not None and team not in actor.teams:
        denials.append(Denial("own-workspace-only", f"Team/{team}", "", f"{actor.name} is not a member of team {team}"))
    if action == "add_component" and component in protected:
        denials.append(Denial("protected-component", f"Component/{component}", "",
                              "only the platform role may roll out a protected standard component"))
    if cluster is not None and action in ("create", "upgrade", "add_component", "reconcile"):
        c = defs.clusters.get(cluster)
        owner = c.spec.owner if c else None
        if owner is None or owner not in actor.teams:
            denials.append(Denial("cluster-owner-only", f"Cluster/{cluster}", "spec.owner",
                                  f"{actor.name}'s teams ({', '.join(sorted(actor.teams)) or 'none'}) do not own this cluster"))
    if denials:
        return Verdict(actor.name, False, denials[0].rule, denials)
    return Verdict(actor.name, True, "team-scope")


def judge_approval(defs: Definitions, *, actor: str | None, approver: str | None, approve: bool,
                   clusters: list[str], what: str) -> Verdict:
    """Does this answer approve ``what`` on ``clusters``, started by ``actor``? See the module's rules."""
    name = (approver or "").strip()
    obj = ", ".join(f"Cluster/{c}" for c in clusters) or what
    denials: list[Denial] = []
    if not approve:
        denials.append(Denial("approval-rejected", obj, "approve", f"{name or 'the approver'} did not approve {what}"))
    elif not name:
        denials.append(Denial("approver-named", obj, "approver", "an approval names the person who gives it"))
    elif is_automation(name):
        denials.append(Denial("approver-is-a-person", obj, "approver", f"{AUTOMATION} cannot approve: a person must"))
    elif actor and name == actor.strip():
        denials.append(Denial("second-person", obj, "approver",
                              f"{name} started this and cannot approve it too: a second person must approve"))
    else:
        who = actor_from(defs, name)
        if not who.platform:
            owners = {c: (defs.clusters[c].spec.owner if c in defs.clusters else None) for c in clusters}
            foreign = sorted(c for c, o in owners.items() if o is None or o not in who.teams)
            if foreign:
                denials.append(Denial("approver-authorized", ", ".join(f"Cluster/{c}" for c in foreign), "approver",
                                      f"{name} is neither in the platform role nor in the team that owns "
                                      f"{', '.join(foreign)}"))
    if denials:
        return Verdict(name, False, denials[0].rule, denials)
    return Verdict(name, True, "approved")
