"""Approvals: a person says yes before something destructive or sensitive happens.

Three users of one primitive (``ask``: Prefect's ``pause_flow_run(wait_for_input=Approval)``):

* rollout waves with a cluster labelled ``fleetwright.io/approval: required`` (``flows.common.run_waves``);
* an imperative action (create, upgrade, onboard, decommission) on such a cluster (``second_person``):
  a second person approves, never the actor;
* the fleet sweep's destructive repairs (``correct_holding`` / ``approve_held``): a scheduled sweep in
  ``correct`` mode carries out the non-destructive steps at once and holds the destructive ones
  (removals, pool deletion or replacement, scale-down: see ``models.plan``). At the end of the sweep
  it asks once for all of them, fleet-wide, listing what waits in an artifact. Approved: they are
  carried out under each cluster's lock after observing and planning again (only steps still
  needed, only those that were listed). Rejected or timed out: nothing destructive is done, and the
  artifacts say so.

Who may approve is ``models.policy.judge_approval``. Open-source Prefect has no user identity: the
approver's name is what the form says (see the README on an authenticating proxy).
"""
from __future__ import annotations

from typing import Callable, Optional

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.orchestration import get_client
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run
from prefect.states import Running
from pydantic import Field

from models.desired import DesiredCluster
from models.errors import PolicyDenied
from models.load import Definitions
from models.plan import Plan
from models.policy import Denial, is_automation, judge_approval
from models.status import Status
from models.waves import APPROVAL_LABEL
from tasks.cluster import Outcome, converge, plan_rows
from tasks.locks import api_share, share_of
from tasks.report import publish

DEFAULT_TIMEOUT_SECONDS = 3600
SWEEP_TIMEOUT_SECONDS = 600  # shorter than the 15-minute schedule: an unanswered sweep gives way to the next


class Approval(RunInput):
    """What an approver sends to resume a paused run (shown as a form in the Prefect UI)."""

    approver: str = Field(description="Who approves (recorded in the run's artifacts)")
    approve: bool = Field(True, description="Untick to reject: nothing waiting is done")
    comment: str = ""


def ask(description: str, key: str, timeout: int) -> Optional[Approval]:
    """Pause this flow run until a person answers; ``None`` when nobody answered within ``timeout`` seconds."""
    try:
        return pause_flow_run(wait_for_input=Approval.with_initial_data(description=description, approver=""),
                              timeout=timeout, poll_interval=2, key=key)
    except FlowPauseTimeout:
        # The server would now fail the run on its next state change ("paused and never resumed"):
        # put it back to Running so the run can report what was not done and end with its own state.
        run_id = flow_run.get_id()
        if run_id:
            with get_client(sync_client=True) as c:
                c.set_flow_run_state(run_id, Running(message=f"approval {key} timed out after {timeout}s"), force=True)
        get_run_logger().warning("approval %s timed out after %ss: nothing that waited for it was done", key, timeout)
        return None


def judge(defs: Definitions, answer: Optional[Approval], *, actor: Optional[str], clusters: list[str], what: str,
          timeout: int) -> dict:
    """An answer (or its absence) as a record: approved or not, by whom, which rule decided."""
    if answer is None:
        return {"what": what, "clusters": clusters, "approved": False, "approver": None, "comment": "",
                "rule": "approval-timed-out", "reason": f"no approval within {timeout}s: nothing was done"}
    v = judge_approval(defs, actor=actor, approver=answer.approver, approve=answer.approve, clusters=clusters, what=what)
    return {"what": what, "clusters": clusters, "approved": v.allowed, "approver": answer.approver.strip() or None,
            "comment": answer.comment, "rule": v.rule, "reason": "; ".join(d.message for d in v.denials)}


def needs_approval(desired: list[DesiredCluster]) -> list[str]:
    return sorted(d.name for d in desired if d.labels.get(APPROVAL_LABEL) == "required")


def second_person(defs: Definitions, desired: list[DesiredCluster], *, actor: Optional[str], flow: str, what: str,
                  dry_run: bool, pending: Optional[Callable[[DesiredCluster], Outcome]] = None,
                  timeout: int = DEFAULT_TIMEOUT_SECONDS) -> Optional[dict]:
    """Before an imperative action on clusters labelled approval-required: a second person approves.

    ``pending`` (a dry-run converge) tells which of those clusters the action would change: a cluster
    with nothing to do (or not created yet, for an in-cluster action) needs no approval. Returns the
    approval record (None when no cluster needs one, or on a dry run); raises ``PolicyDenied`` (after an
    artifact saying so) when it is rejected, invalid or timed out: nothing has been changed then.
    """
    if dry_run:
        return None
    plans = {d.name: pending(d) if pending else None for d in desired if d.labels.get(APPROVAL_LABEL) == "required"}
    # only "nothing to do" skips the approval: a cluster that could not be observed still needs one
    clusters = sorted(n for n, o in plans.items() if o is None or o.status not in (Status.IN_SYNC, Status.ABSENT))
    if not clusters:
        return None
    steps = [f"{n}: {r['action']} {r['object']}" for n in clusters for r in (plans[n].steps if plans[n] else [])]
    get_run_logger().info("%s on %s waits for a second person's approval", what, ", ".join(clusters))
    answer = ask(f"Approve {what} by {actor} on {', '.join(clusters)} (labelled {APPROVAL_LABEL}: required); "
                 "the approver must be a second person."
                 + (f" Plan: {'; '.join(steps[:15])}" + (f"; and {len(steps) - 15} more" if len(steps) > 15 else "")
                    if steps else ""), key=f"approve-{flow}", timeout=timeout)
    rec = judge(defs, answer, actor=actor, clusters=clusters, what=what, timeout=timeout)
    create_markdown_artifact(key=f"{flow}-approval", markdown=approval_markdown([rec]), description=f"{flow}: approval")
    if not rec["approved"]:
        publish(flow, [Outcome(c, Status.DENIED, reason=f"{rec['rule']}: {rec['reason']}") for c in clusters], dry_run=True)
        raise PolicyDenied([Denial(rec["rule"], ", ".join(f"Cluster/{c}" for c in clusters), "approver",
                                   rec["reason"] + " (nothing was changed)")])
    get_run_logger().info("%s approved by %s", what, rec["approver"])
    return rec


def approval_markdown(records: list[dict]) -> str:
    lines = ["## Approvals", ""]
    for r in records:
        state = "approved" if r["approved"] else "NOT approved"
        by = f" by **{r['approver']}**" if r["approver"] else ""
        lines.append(f"- {r['what']} on {', '.join(r['clusters'])}: {state}{by} ({r['rule']})"
                     + (f": {r['reason']}" if r["reason"] else "") + (f"; comment: {r['comment']}" if r["comment"] else ""))
    return "\n".join(lines)


# --- the fleet sweep's destructive repairs ---------------------------------------------------------

def correct_holding(desired: DesiredCluster, p: Plan, drift: list[str], idempotency_key: str,
                    allow: Optional[Callable] = None, window=None) -> Outcome:
    """A correct-mode repair in a sweep: the non-destructive steps now, the destructive ones held.

    ``allow`` (the sweep's removal guard) also filters the steps carried out now; ``window`` (the
    cluster's maintenance-window guard) is passed on to ``converge``.
    """
    held = [s for s in p.steps if s.destructive]
    if len(held) == len(p.steps):
        out = Outcome(desired.name, Status.IN_SYNC)
    else:
        out = converge(desired, dry_run=False, idempotency_key=idempotency_key, plain=True,
                       step_filter=lambda s: not s.destructive and (allow is None or allow(s)), guard=window)
    out.drift = drift
    if out.status == Status.CONVERGED:
        out.status = Status.CORRECTED
    if held and out.status in (Status.CORRECTED, Status.IN_SYNC):
        out.status = Status.AWAITING_APPROVAL
        out.held = [{"id": s.id, **r} for s, r in zip(p.steps, plan_rows(p)) if s.destructive]
        out.reason = (f"{len(held)} destructive repair(s) wait for approval: "
                      + "; ".join(f"{r['action']} {r['object']}" for r in out.held))
    return out


def approve_held(outcomes: list[Outcome], *, definitions: Callable[[], Definitions], flow: str, idempotency_key: str,
                 timeout: int, max_workers: int = 8, window: Optional[Callable] = None,
                 actor: Optional[str] = None) -> tuple[list[Outcome], Optional[dict]]:
    """Ask once for every held destructive repair of the sweep; carry them out only when approved.

    ``definitions`` loads the sweep's definitions (the same commit), only when something is held;
    ``window(desired)`` gives a cluster's maintenance-window guard for ``converge``; ``actor``, the
    person who started the sweep (if one did), cannot approve them.
    """
    held = [o for o in outcomes if o.status == Status.AWAITING_APPROVAL]
    if not held:
        return outcomes, None
    log = get_run_logger()
    rows = [{"cluster": o.cluster, **{k: v for k, v in r.items() if k != "#"}} for o in held for r in o.held]
    create_table_artifact(key=f"{flow}-held", table=rows,
                          description=f"{flow}: destructive repairs waiting for approval (nothing of these is done yet)")
    clusters = [o.cluster for o in held]
    log.warning("%d destructive repair(s) on %d cluster(s) wait for approval", len(rows), len(clusters))
    listed = "; ".join(f"{r['cluster']}: {r['action']} {r['object']}" for r in rows[:20])
    answer = ask(f"Approve {len(rows)} destructive repair(s) of {flow} on {len(clusters)} cluster(s) (all listed in "
                 f"the artifact {flow}-held): {listed}" + (f"; and {len(rows) - 20} more" if len(rows) > 20 else ""),
                 key=f"approve-{flow}-destructive", timeout=timeout)
    defs = definitions()
    rec = judge(defs, answer, actor=None if is_automation(actor) else actor, clusters=clusters,
                what="destructive repairs", timeout=timeout)
    rec["steps"] = rows
    if not rec["approved"]:
        for o in held:
            o.reason = f"destructive repairs not done ({rec['rule']}): {rec['reason']}; waiting: " + \
                "; ".join(f"{r['action']} {r['object']}" for r in o.held)
        log.warning("destructive repairs not done: %s: %s", rec["rule"], rec["reason"])
        return outcomes, rec
    log.info("destructive repairs approved by %s", rec["approver"])
    from models.resolve import Resolver

    from .common import in_threads

    r = Resolver(defs)
    desired = {o.cluster: r.resolve(o.cluster) for o in held if o.cluster in defs.clusters}

    def carry_out(o: Outcome) -> Outcome:
        if o.cluster not in desired:
            o.reason = "no longer in the definitions: nothing done"
            return o
        ids = {r["id"] for r in o.held}
        out = converge(desired[o.cluster], dry_run=False, idempotency_key=idempotency_key,
                       step_filter=lambda s: s.destructive and s.id in ids,
                       guard=window(desired[o.cluster]) if window else None)
        out.drift = o.drift
        out.steps = o.steps + out.steps
        out.done = o.done + out.done
        out.held = o.held
        if out.status in (Status.CONVERGED, Status.IN_SYNC):
            out.status = Status.CORRECTED
            out.reason = f"destructive repairs approved by {rec['approver']}"
        return out

    shares = {api: share_of(api, 1) for api in {d.backend.type for d in desired.values()} | {"kubernetes"}}
    with api_share(shares):
        done = {o.cluster: o for o in in_threads(carry_out, held, max_workers)}
    return [done.get(o.cluster, o) for o in outcomes], rec


def approve_held_in_summary(summary: dict, **kw) -> tuple[dict, Optional[dict]]:
    """``approve_held`` for a sharded sweep's merged summary (its notable clusters, as dicts)."""
    held = [Outcome(**c) for c in summary["clusters"] if c["status"] == Status.AWAITING_APPROVAL]
    if not held:
        return summary, None
    after, rec = approve_held(held, **kw)
    by = {o.cluster: o for o in after}
    counts = dict(summary["counts"])
    for o in held:
        new = str(by[o.cluster].status)
        counts[Status.AWAITING_APPROVAL.value] -= 1
        counts[new] = counts.get(new, 0) + 1
    counts = {k: v for k, v in counts.items() if v}
    clusters = [by[c["cluster"]].to_dict() if c["cluster"] in by else c for c in summary["clusters"]]
    return {**summary, "counts": counts, "clusters": clusters}, rec
