"""What every lifecycle flow shares: where definitions come from, the policy gate, waves.

Phases of every flow: load definitions -> resolve -> observe -> plan -> policy
check for the actor -> (dry run stops here) -> apply -> verify -> report.
"""
from __future__ import annotations

import contextvars
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

from prefect import get_run_logger, task
from prefect.cache_policies import NONE as NO_CACHE
from prefect.runtime import flow_run

from models.desired import DesiredCluster
from models.errors import PolicyDenied
from models.load import Definitions
from models.plan import Step
from models.policy import AUTOMATION, Verdict, actor_from, authorize, evaluate, is_automation
from models.status import PROBLEMS, Status
from models.waves import WavePolicy, plan_waves, wave_failed
from tasks.cluster import Outcome, converge
from tasks.definitions import DefinitionsSource, default_source, load_definitions  # noqa: F401 (re-exported)
from tasks.report import publish

from .approvals import Approval, approval_markdown, ask, judge  # noqa: F401 (Approval re-exported)

DEFAULT_ACTOR = AUTOMATION  # only for what converges Git (sweeps, rollouts): imperative flows name a person


def run_key(explicit: Optional[str]) -> str:
    """The idempotency key: given (a webhook's commit + action), else this flow run's id (kept by a retry)."""
    return explicit or str(flow_run.get_id() or f"local-{time.time_ns()}")


def gate(defs: Definitions, old: Optional[Definitions], actor: Optional[str], action: str, *, flow: str,
         cluster: str | None = None, team: str | None = None, component: str | None = None) -> Verdict:
    """The policy check: stops the flow, before any change, when the actor may not do this.

    The automation identity converges what is committed (Git is the authority there: the change itself
    was judged for its pusher by the webhook), so only a person's run judges the change since ``base_ref``.
    """
    who = actor_from(old or defs, (actor or "").strip())
    verdict = authorize(defs, who, action, cluster=cluster, team=team, component=component)
    if verdict.allowed and old is not None and not is_automation(actor):
        verdict = evaluate(old, defs, who)
    if not verdict.allowed:
        o = Outcome(cluster or team or "-", Status.DENIED, reason="; ".join(str(d) for d in verdict.denials))
        publish(flow, [o], dry_run=True)
        raise PolicyDenied(verdict.denials)
    get_run_logger().info("policy: %s may %s (%s)", actor, action, verdict.rule)
    return verdict


@task(name="converge-cluster", task_run_name="converge {desired.name}", cache_policy=NO_CACHE)
def converge_task(desired: DesiredCluster, dry_run: bool, idempotency_key: str,
                  step_filter: Optional[Callable[[Step], bool]] = None, versions_matter: bool = True,
                  guard: Optional[Callable[[Step], Optional[str]]] = None) -> Outcome:
    return converge(desired, dry_run=dry_run, idempotency_key=idempotency_key, step_filter=step_filter,
                    versions_matter=versions_matter, guard=guard)


def in_threads(fn: Callable, items: list, max_workers: int = 8) -> list:
    """Run ``fn(item)`` for each item in threads that keep the flow's Prefect context."""
    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(max_workers, len(items))) as pool:
        futures = [pool.submit(contextvars.copy_context().run, fn, i) for i in items]
        return [f.result() for f in futures]


def run_waves(flow: str, desired: dict[str, DesiredCluster], policy: WavePolicy, *, dry_run: bool,
              idempotency_key: str, defs: Definitions, actor: Optional[str],
              step_filter: Optional[Callable[[Step], bool]] = None,
              max_workers: int = 8, versions_matter: bool = True, windows=None) -> tuple[list[Outcome], dict]:
    """Carry a change across clusters in waves; halt past the failure threshold; wait for approvals.

    ``windows`` (a ``flows.windows.WindowGate``) defers clusters outside their maintenance windows.
    An approval comes from a person other than ``actor`` (``models.policy.judge_approval``); a rejected,
    invalid or timed-out approval halts the rollout before that wave, and the record says which rule.
    """
    log = get_run_logger()
    waves = plan_waves(list(desired.values()), policy)
    outcomes: list[Outcome] = []
    record = {"waves": [w.model_dump() for w in waves], "approvals": [], "halted": None, "timeline": []}
    for n, wave in enumerate(waves):
        if wave.needs_approval and not dry_run:
            log.info("wave %s waits for approval (%s)", wave.name, ", ".join(wave.needs_approval))
            answer = ask(f"Approve wave {wave.name} of {flow} by {actor}: {', '.join(wave.clusters)} "
                         "(a second person approves)", key=f"approve-{wave.name}", timeout=policy.approval_timeout_seconds)
            rec = judge(defs, answer, actor=actor, clusters=wave.clusters, what=f"wave {wave.name}",
                        timeout=policy.approval_timeout_seconds)
            record["approvals"].append({"wave": wave.name, **rec})
            if not rec["approved"]:
                record["halted"] = {"wave": wave.name, "rule": rec["rule"], "reason": f"not approved: {rec['reason']}",
                                    "not_started": [c for w in waves[n:] for c in w.clusters]}
                log.error("halting before wave %s: %s", wave.name, record["halted"]["reason"])
                break
        log.info("wave %s: %s", wave.name, ", ".join(wave.clusters))
        started = time.time()
        results = in_threads(lambda name: converge_task(desired[name], dry_run, idempotency_key, step_filter,
                                                        versions_matter, windows and windows.guard(desired[name])),
                             wave.clusters, max_workers)
        record["timeline"].append({"wave": wave.name, "started": started, "finished": time.time()})
        outcomes += results
        failed = sum(o.status in PROBLEMS for o in results)
        if wave_failed(failed, len(results), policy):
            record["halted"] = {"wave": wave.name, "reason": f"{failed} of {len(results)} clusters failed",
                                "not_started": [c for w in waves[n + 1:] for c in w.clusters]}
            log.error("halting after wave %s: %s", wave.name, record["halted"]["reason"])
            break
        if policy.bake_seconds and n < len(waves) - 1 and not dry_run:
            log.info("baking %.0fs after wave %s", policy.bake_seconds, wave.name)
            time.sleep(policy.bake_seconds)
    return outcomes, record


def waves_markdown(record: dict) -> str:
    lines = ["## Waves", ""]
    for w in record["waves"]:
        lines.append(f"- **{w['name']}**: {', '.join(w['clusters'])}" + (" (approval)" if w["needs_approval"] else ""))
    for a in record["approvals"]:
        lines.append(f"- approval of {a['wave']}: {'approved' if a['approved'] else 'NOT approved'}"
                     + (f" by **{a['approver']}**" if a["approver"] else "") + f" ({a['rule']})"
                     + (f": {a['reason']}" if a["reason"] else "") + (f"; comment: {a['comment']}" if a["comment"] else ""))
    if record["halted"]:
        h = record["halted"]
        lines.append(f"- **HALTED** at {h['wave']}: {h['reason']}"
                     + (f"; not started: {', '.join(h.get('not_started', []))}" if h.get("not_started") else ""))
    return "\n".join(lines)


def finish(flow: str, outcomes: list[Outcome], *, dry_run: bool, extra_md: str = "", fail_on=PROBLEMS) -> dict:
    """Publish the run's artifacts and fail the run when a cluster failed."""
    counts = publish(flow, outcomes, dry_run=dry_run, extra_md=extra_md)
    bad = [o for o in outcomes if o.status in fail_on]
    if bad:
        raise RuntimeError(f"{flow}: {len(bad)} cluster(s) failed: " + "; ".join(f"{o.cluster}: {o.reason}" for o in bad))
    return {"counts": counts, "clusters": [o.to_dict() for o in outcomes]}
