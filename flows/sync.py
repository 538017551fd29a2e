"""``sync-from-git``: what a push to the definitions repository starts, and the fallback poll.

A push (reported by the webhook receiver, ``fleetwright webhook serve``, or found by the poll)
names the repository, the commits before and after, and the pusher. The flow:

1. fetches the worker's cache clone; a push whose ``after`` is no longer the branch's head starts
   nothing (superseded by a newer commit, or force-pushed away: a late delivery never rolls back);
   then reads the definitions at ``after`` and at the base, the last synced commit when it is an
   ancestor of ``after`` (so collapsed or lost pushes are included), else ``before``
   (strictly: invalid definitions stop here, naming file, line and field);
2. computes the same diff as ``fleetwright diff`` (``models.diff.diff_fleet`` on the resolved fleet);
3. judges the change for the pusher, mapped to a person by ``Policy.spec.gitIdentities``
   (``models.policy.person_for``): a denied push starts nothing, and the artifact names the rule;
4. starts exactly the lifecycle runs the diff calls for, each pinned to ``after`` with ``before`` as
   its base (so each re-checks the policy), with an idempotency key of commit + action (+ cluster):
   a new Cluster -> ``create-cluster``; changed Clusters (model version bump, Component or
   ComponentSet change, overrides...) -> ONE ``rollout-fleet`` over exactly those clusters; a Team
   change -> ``onboard-team`` (clusters whose only change is that team's workspace are left to it);
   a removed Cluster -> reported only (decommission stays an explicit action);
5. records ``after`` as the branch's last synced commit (a Prefect Variable every worker shares).

A pull / merge request event (``event="pull_request"``) or ``dry_run`` is a dry run: nothing is
started, and the artifact is the plan per affected cluster plus the policy verdict for the author.

``sync-from-git-poll`` (every 5 minutes) asks the remote for the branch head and, when it moved past
the last synced commit without a webhook (a lost delivery), starts ``sync-from-git`` for it.
"""
from __future__ import annotations

import hashlib
import re
from typing import Optional

from prefect import flow, get_run_logger

from models.diff import diff_fleet
from models.errors import PermanentError, PolicyDenied
from models.load import Definitions, load
from models.policy import Verdict, actor_from, evaluate, person_for
from models.resolve import resolve_all
from models.status import Status
from tasks.cluster import Outcome, converge
from tasks.definitions import DefinitionsSource, default_source, redact, remote_repo
from tasks.report import publish

from .common import in_threads

_ZERO = re.compile(r"^0{40}$")
DEPLOYMENTS = {"create": "create-cluster/create-cluster", "rollout": "rollout-fleet/rollout-fleet",
               "onboard": "onboard-team/onboard-team"}


def _norm(url: str) -> str:
    u = url.strip().lower().rstrip("/")
    u = re.sub(r"\.git$", "", u)
    u = re.sub(r"^[a-z+]+://", "", u)
    u = re.sub(r"^[^@/]+@", "", u)  # user@ of ssh / https
    return u.replace(":", "/", 1) if re.match(r"^[^/]+:[^/]", u) and "://" not in url else u


def configured_source(repo: str, subdir: str = "") -> DefinitionsSource:
    """The worker's definitions source for ``repo``; a repository it is not configured for is refused."""
    src = default_source()
    if not src.repo or _norm(src.repo) != _norm(repo):
        raise PermanentError(f"{repo} is not this worker's definitions repository "
                             f"({src.repo or 'a directory: ' + str(src.path)}); set FLEETWRIGHT_DEFINITIONS_REPO")
    return src.model_copy(update={"subdir": subdir or src.subdir})


def synced_variable(repo: str, branch: str) -> str:
    return "fleetwright-synced-" + hashlib.sha256(f"{_norm(repo)}#{branch}".encode()).hexdigest()[:16]


def last_synced(repo: str, branch: str) -> Optional[str]:
    from prefect.variables import Variable

    return Variable.get(synced_variable(repo, branch), default=None)


def _record_synced(repo: str, branch: str, sha: str) -> None:
    from prefect.variables import Variable

    Variable.set(synced_variable(repo, branch), sha, overwrite=True)


def _changed_teams(old: Optional[Definitions], new: Definitions) -> tuple[list[str], list[str]]:
    """(added or changed Teams, removed Teams) between two revisions."""
    a = {n: t.model_dump(mode="json") for n, t in (old.teams if old else {}).items()}
    b = {n: t.model_dump(mode="json") for n, t in new.teams.items()}
    return sorted(n for n in b if a.get(n) != b[n]), sorted(set(a) - set(b))


def dispatch_plan(old: Optional[Definitions], new: Definitions, changes: list[dict]) -> dict:
    """Which lifecycle runs a change calls for (pure): ``{"create": [...], "rollout": [...], "onboard": [...],
    "removed": [...], "teams_removed": [...]}``."""
    teams, teams_removed = _changed_teams(old, new)
    create = [c["cluster"] for c in changes if c["change"] == "added"]
    removed = [c["cluster"] for c in changes if c["change"] == "removed"]
    rollout = []
    for c in changes:
        if c["change"] != "changed":
            continue
        paths = [f["path"] for f in c["fields"]]
        only_team_ws = paths and all(p.split(".")[0] == "workspaces" and p.split(".")[1] in teams for p in paths
                                     if len(p.split(".")) > 1)
        if not only_team_ws or not teams:
            rollout.append(c["cluster"])
    return {"create": create, "rollout": sorted(rollout), "onboard": teams, "removed": removed,
            "teams_removed": teams_removed}


def _ui(run_id: str) -> str:
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    base = PREFECT_UI_URL.value() or (PREFECT_API_URL.value() or "").removesuffix("/api")
    return f"{base}/runs/flow-run/{run_id}" if base else run_id


def _start(deployment: str, parameters: dict, key: str) -> dict:
    from prefect.deployments import run_deployment

    fr = run_deployment(name=deployment, parameters=parameters, idempotency_key=key, timeout=0)
    return {"deployment": deployment, "run": str(fr.id), "name": fr.name, "key": key, "link": _ui(str(fr.id)),
            "parameters": {k: v for k, v in parameters.items() if k != "source"}}


def _verdict_md(pusher: str, person: str, v: Verdict) -> list[str]:
    lines = [f"Pusher `{pusher or '-'}` is **{person}**: "
             f"{'ALLOWED' if v.allowed else 'DENIED'} (rule `{v.rule}`)"]
    lines += [f"- denied by **{d.rule}**: {d.object}: {d.field}: {d.message}" for d in v.denials]
    return lines


@flow(name="sync-from-git", log_prints=True)
def sync_from_git(repo: str, after: str, before: str = "", ref: str = "refs/heads/main", pusher: str = "",
                  event: str = "push", delivery: str = "", subdir: str = "", dry_run: bool = False) -> dict:
    """Start exactly the lifecycle runs a push calls for, on exactly the affected clusters (see the module doc)."""
    from prefect.artifacts import create_markdown_artifact

    log = get_run_logger()
    if event not in ("push", "pull_request"):
        raise PermanentError(f"event {event!r}: only push and pull_request are synced")
    dry = dry_run or event == "pull_request"
    src = configured_source(repo, subdir)
    branch = ref.removeprefix("refs/heads/")
    git = remote_repo(src)
    git.fetch()
    after = git.resolve(after)
    if event == "push" and not dry:
        stale = _stale(git, repo, branch, after, delivery)
        if stale is not None:
            return stale
    given = before if before and not _ZERO.match(before) else ""
    if event == "push":  # diff from what was last rolled out when that is older (collapsed or lost pushes)
        last = last_synced(repo, branch)
        if last and last != after and git.has(last) and git.is_ancestor(last, after):
            before = last
        elif not given:
            before = last or ""
        else:
            before = given
    else:
        before = given
    before = git.resolve(before) if before else ""
    pinned = src.model_copy(update={"ref": after, "base_ref": before or None, "branch": branch})
    from tasks.definitions import Revision, _remember, _run_id

    _remember(_run_id(), ("sync", after), Revision(src.repo, ref, after))
    new = load(git.read(after, src.subdir))
    old_files = git.read(before, src.subdir) if before else {}
    old = load(old_files) if old_files else None
    old_d, new_d = (resolve_all(old) if old else {}), resolve_all(new)
    changes = diff_fleet(old_d, new_d)
    person = person_for(old or new, pusher)
    verdict = evaluate(old, new, actor_from(old or new, person), old_d, new_d)
    plan = dispatch_plan(old, new, changes)
    head = [f"# sync-from-git{' (dry run: ' + event + ')' if dry else ''}", "",
            f"Definitions: `{src.repo}` {('`' + before[:12] + '`..') if before else ''}`{after}` (branch `{branch}`)"
            + (f", delivery `{delivery}`" if delivery else ""), ""] + _verdict_md(pusher, person, verdict)
    head += ["", "## Changes", ""] + ([f"- **{c['cluster']}**: {c['change']}"
                                       + (f" ({', '.join(f['path'] for f in c['fields'][:6])}"
                                          f"{' ...' if len(c['fields']) > 6 else ''})" if c["fields"] else "")
                                       for c in changes] or ["- no cluster changes"])
    if plan["onboard"]:
        head.append(f"- Teams changed: {', '.join(plan['onboard'])}")
    result = {"after": after, "before": before, "person": person, "verdict": verdict.to_dict(), "changes": changes,
              "plan": plan, "runs": [], "dry_run": dry}
    if not verdict.allowed:
        create_markdown_artifact(key="sync-from-git", markdown="\n".join(head + ["", "Nothing was started."]),
                                 description=f"sync-from-git {after}: denied by {verdict.rule}")
        publish("sync-from-git", [Outcome(c["cluster"], Status.DENIED,
                                          reason="; ".join(str(d) for d in verdict.denials)) for c in changes]
                or [Outcome("-", Status.DENIED, reason="; ".join(str(d) for d in verdict.denials))], dry_run=True)
        raise PolicyDenied(verdict.denials)
    removed_md = [f"- **{c}** was removed from the definitions: reported only; run decommission-cluster to delete it"
                  for c in plan["removed"]] + [f"- Team **{t}** was removed: reported only" for t in plan["teams_removed"]]
    if dry:
        affected = sorted(set(plan["create"]) | set(plan["rollout"]))
        outcomes = in_threads(lambda n: converge(new_d[n], dry_run=True, idempotency_key=f"{after}-plan"), affected)
        md = head + ["", "## Would start", ""] + _would(plan) + ([""] + removed_md if removed_md else [])
        create_markdown_artifact(key="sync-from-git", markdown="\n".join(md),
                                 description=f"sync-from-git {after}: dry run ({event}), {verdict.rule}")
        publish("sync-from-git", outcomes, dry_run=True)
        result["clusters"] = [o.to_dict() for o in outcomes]
        return result
    base = {"source": pinned.model_dump(), "actor": person}
    runs = []
    for c in plan["create"]:
        runs.append(_start(DEPLOYMENTS["create"], {**base, "cluster": c, "idempotency_key": f"{after}:create-cluster:{c}"},
                           f"{after}:create-cluster:{c}"))
    if plan["rollout"]:
        key = f"{after}:rollout-fleet"
        runs.append(_start(DEPLOYMENTS["rollout"], {**base, "clusters": plan["rollout"], "idempotency_key": key}, key))
    for t in plan["onboard"]:
        key = f"{after}:onboard-team:{t}"
        runs.append(_start(DEPLOYMENTS["onboard"], {**base, "team": t, "idempotency_key": key}, key))
    for r in runs:
        log.info("started %s: %s (%s)", r["deployment"], r["name"], r["link"])
    md = head + ["", "## Started", ""] + ([f"- [{r['deployment']} {r['name']}]({r['link']}) "
                                           f"{r['parameters'].get('cluster') or r['parameters'].get('team') or ', '.join(r['parameters'].get('clusters', []))}"
                                           f" (key `{r['key']}`)" for r in runs] or ["- nothing to start"])
    md += [""] + removed_md if removed_md else []
    create_markdown_artifact(key="sync-from-git", markdown="\n".join(md),
                             description=f"sync-from-git {after}: {len(runs)} run(s) started")
    if event == "push":
        _record_synced(repo, branch, after)
    result["runs"] = runs
    return result


def _stale(git, repo: str, branch: str, after: str, delivery: str) -> Optional[dict]:
    """A push whose commit is no longer the branch's head starts nothing (None: ``after`` is the head).

    A late or replayed delivery of an older commit must never roll the fleet back from a newer one:
    when the branch has moved past ``after``, the sync of the newer head (its webhook, or the poll)
    rolls out both; when ``after`` is not on the branch any more (force-pushed away), nothing rolls out.
    """
    from prefect.artifacts import create_markdown_artifact

    head = git.resolve(f"refs/heads/{branch}")
    if head == after:
        return None
    newer = git.is_ancestor(after, head)
    why = (f"superseded: branch `{branch}` has moved on to `{head}`, which contains `{after}`; the sync of "
           f"`{head[:12]}` rolls it out" if newer else
           f"`{after}` is no longer on branch `{branch}` (now at `{head}`, force-pushed?): not rolled out")
    get_run_logger().warning("%s %s: %s", repo, after[:12], why.replace("`", ""))
    create_markdown_artifact(key="sync-from-git", description=f"sync-from-git {after}: {'superseded' if newer else 'not on the branch'}",
                             markdown="\n".join([f"# sync-from-git: {after}", "", f"Definitions: `{redact(repo)}` branch "
                                                 f"`{branch}`" + (f", delivery `{delivery}`" if delivery else ""), "",
                                                 why[0].upper() + why[1:] + ".", "", "Nothing was started."]))
    return {"after": after, "head": head, "status": "superseded" if newer else "not-on-branch", "reason": why,
            "runs": [], "plan": None, "dry_run": False}


def superseded_clusters(source: Optional[DefinitionsSource], desired: dict) -> dict[str, str]:
    """Clusters a run pinned to an older pushed commit must leave alone: ``{cluster: newer synced commit}``.

    A run ``sync-from-git`` started for commit A may start late, after the sync of a newer push B
    (which contains A) started its own runs. Rolling a cluster out at A then would roll back what B
    changed on it; so a cluster whose definition differs between A and the last synced commit (or that
    B removed) is left to B's runs. A cluster B did not change is the same at A and at B: it goes ahead.
    """
    if source is None or not source.remote or not source.branch or not re.fullmatch(r"[0-9a-f]{40}", source.ref):
        return {}
    last = last_synced(source.repo, source.branch)
    if not last or last == source.ref:
        return {}
    git = remote_repo(source)
    if not git.has(last):
        git.fetch()
    if not git.has(last) or not git.is_ancestor(source.ref, last):
        return {}
    from models.resolve import Resolver

    newer = load(git.read(last, source.subdir))
    r = Resolver(newer)
    return {n: last for n, d in desired.items() if n not in newer.clusters or r.resolve(n).hash != d.hash}


def _would(plan: dict) -> list[str]:
    out = [f"- create-cluster {c}" for c in plan["create"]]
    if plan["rollout"]:
        out.append(f"- rollout-fleet over {', '.join(plan['rollout'])}")
    out += [f"- onboard-team {t}" for t in plan["onboard"]]
    return out or ["- nothing"]


@flow(name="sync-from-git-poll", log_prints=True)
def poll_git(repo: str = "", ref: str = "refs/heads/main", subdir: str = "", actor: str = "") -> dict:
    """The fallback when a webhook was lost: if the branch moved past the last synced commit, sync it.

    There is no verified pusher here: the change is judged for ``actor`` if given (e.g. the automation
    identity, trusting the branch's protection as Flux does), else for the head commit's author email,
    mapped by ``Policy.spec.gitIdentities`` (unverified: protect the branch). The first poll of a branch only
    records its head.
    """
    from prefect.deployments import run_deployment

    log = get_run_logger()
    src = default_source()
    repo = repo or src.repo or ""
    if not repo:
        raise PermanentError("no definitions repository configured (FLEETWRIGHT_DEFINITIONS_REPO)")
    src = configured_source(repo, subdir)
    branch = ref.removeprefix("refs/heads/")
    git = remote_repo(src)
    head = git.remote_head(ref)
    if head is None:
        raise PermanentError(f"{repo} has no {ref}")
    last = last_synced(repo, branch)
    if last == head:
        log.info("%s %s: at %s, already synced", repo, branch, head[:12])
        return {"status": "up-to-date", "head": head}
    if last is None:
        _record_synced(repo, branch, head)
        log.info("%s %s: first poll, recorded %s as synced", repo, branch, head[:12])
        return {"status": "baseline", "head": head}
    git.fetch()
    who = actor or git.author_email(head)
    fr = run_deployment(name="sync-from-git/sync-from-git", timeout=0, idempotency_key=f"poll:{_norm(repo)}:{head}",
                        parameters={"repo": repo, "after": head, "before": last, "ref": ref, "pusher": who,
                                    "event": "push", "delivery": f"poll-{head[:12]}", "subdir": subdir})
    log.warning("%s %s moved %s..%s without a webhook: started sync %s", repo, branch, last[:12], head[:12], fr.name)
    return {"status": "started", "head": head, "before": last, "run": str(fr.id)}

