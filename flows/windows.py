"""Maintenance windows in the flows: change a cluster only inside its window and outside its blackouts.

One :class:`WindowGate` per flow run holds

- the **clock**: real time, or the time a ``now`` parameter names ("what would happen at T";
  the clock then runs on from T). A dry run may ask about any time, for anyone; a real run with a
  shifted clock is refused before anything changes unless its ``actor`` is a platform member
  (policy rule ``platform-only-clock``: it changes clusters at a time their owners did not agree
  to). The automation identity is no platform member, so a scheduled sweep never shifts its clock;
  a platform member who wants a real run "as at T" names themselves (every flow that honours
  windows, ``reconcile-fleet`` included, takes an ``actor``), and the artifact records who and when;
- each cluster's :class:`~models.windows.Schedule` and the Policy's step estimates;
- the **guard** that ``tasks.cluster.converge`` calls before it starts each step: a step that
  is outside the window, inside a blackout whose scope covers it, or would not finish before the
  window closes, is not started, and the cluster is ``deferred``;
- the **security override**: with a reason, a run may cross windows and blackouts once a second
  person approves it (``pause_flow_run`` with an ``Approval`` input, judged by the same rules as every
  approval, ``models.policy.judge_approval``: named, a person, not the requester, in the platform
  role or the team that owns the blocked clusters); requester, approver, rule and reason are recorded.

Waiting costs nothing: no worker sleeps. :meth:`WindowGate.finish` schedules one follow-up run of
the same deployment, with the same parameters, a minute after the earliest next opening of the
deferred clusters (``run_deployment(..., scheduled_time=..., timeout=0)`` with an idempotency key,
so a retried run schedules no second one). That run converges what is open then and defers the
rest again. A run not started from a deployment cannot be re-run by Prefect: its artifact says
when to start it again instead. The artifact lists every deferred cluster, the rule that blocks
it and its next window in its own local time and in UTC.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable, Optional

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel, Field

from models.desired import DesiredCluster
from models.errors import PermanentError, PolicyDenied
from models.maintenance import estimate_seconds, fleet_settings, schedule_of
from models.plan import Step
from models.policy import Denial, actor_from
from models.util import canonical_hash
from models.windows import Decision, fmt

FOLLOW_UP_SLACK = 60.0  # seconds after a window opens: a worker that picks a run up early still finds it open


class SecurityOverride(BaseModel):
    """Cross maintenance windows and blackouts for a security fix, once a second person approves."""

    reason: str = Field(..., min_length=8, description="The security fix (advisory, CVE) and why it cannot wait")


class Clock:
    """Real time, or time shifted so that the run starts at ``at`` and runs on from there."""

    def __init__(self, at: Optional[datetime] = None):
        if at is not None and at.tzinfo is None:
            raise PermanentError(f"now={at.isoformat()} has no timezone: give one, e.g. {at.isoformat()}Z")
        self.at = at
        self.shift = (at.timestamp() - time.time()) if at is not None else 0.0

    def now(self) -> float:
        return time.time() + self.shift

    def real(self, ts: float) -> float:
        """The real time at which this clock will read ``ts``."""
        return ts - self.shift


@dataclass
class Deferral:
    cluster: str
    action: str
    decision: Decision
    timezone: str


class WindowGate:
    """The maintenance rules of one flow run (see the module docstring)."""

    def __init__(self, defs, *, flow: str, actor: str, dry_run: bool, now: Optional[datetime] = None,
                 override: Optional[SecurityOverride] = None, approval_timeout: int = 3600):
        self.defs, self.flow, self.actor, self.dry_run = defs, flow, actor, dry_run
        self.clock = Clock(now)
        if now is not None and not dry_run and not actor_from(defs, actor).platform:
            raise PolicyDenied([Denial("platform-only-clock", f"flow/{flow}", "now",
                                       f"only the platform role may run a change as if it were {now.isoformat()} "
                                       "(a dry run may ask about any time)")])
        self.settings = fleet_settings(defs)
        self.override = override
        self.approval_timeout = approval_timeout
        self.granted = False
        self.override_record: Optional[dict] = None
        self.follow_up: Optional[dict] = None
        self.deferred: dict[str, Deferral] = {}
        self._schedules: dict = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ per step
    def schedule(self, desired: DesiredCluster):
        s = self._schedules.get(desired.name)
        if s is None:
            s = self._schedules[desired.name] = schedule_of(desired, self.defs.files)
        return s

    def check(self, desired: DesiredCluster, step: Step) -> Optional[str]:
        """None when ``step`` may start now on ``desired``; else why not (and the cluster is recorded as deferred)."""
        s = self.schedule(desired)
        if s.unrestricted or self.granted:
            return None
        d = s.decide(self.clock.now(), step.action, estimate_seconds(self.settings, step.action))
        with self._lock:
            if d.allowed:
                self.deferred.pop(desired.name, None)
                return None
            self.deferred[desired.name] = Deferral(desired.name, step.action, d, s.timezone)
        return str(d)

    def guard(self, desired: DesiredCluster) -> Callable[[Step], Optional[str]]:
        return lambda step: self.check(desired, step)

    # ------------------------------------------------------------------ the override
    def ask_override(self, desired: dict[str, DesiredCluster]) -> None:
        """With a security override: if any cluster is blocked now, wait for a second person's approval."""
        if self.override is None:
            return
        from .approvals import ask, judge

        now = self.clock.now()
        blocked = {}
        for name, d in desired.items():
            s = self.schedule(d)
            if not s.unrestricted:
                dec = s.decide(now, "controlPlane.upgrade", 0.0)  # the most restricted kind of change
                if not dec.allowed:
                    blocked[name] = dec.reason
        rec = {"requester": self.actor, "reason": self.override.reason, "clusters": blocked, "approver": None,
               "granted": False, "comment": ""}
        self.override_record = rec
        if not blocked:
            rec["outcome"] = "not needed: no cluster is blocked now"
            return
        if self.dry_run:
            rec["outcome"] = "a real run would wait for a second person's approval"
            return
        log = get_run_logger()
        log.warning("security override requested by %s (%s): waiting for approval to cross the rules of %s",
                    self.actor, self.override.reason, ", ".join(blocked))
        lines = "; ".join(f"{n}: {r}" for n, r in sorted(blocked.items()))
        answer = ask(f"Security override of {self.flow} requested by {self.actor}: {self.override.reason}. "
                     f"It crosses: {lines}. Approve as a second person (not {self.actor}), in the platform role "
                     "or in the team that owns these clusters.", key="security-override", timeout=self.approval_timeout)
        verdict = judge(self.defs, answer, actor=self.actor, clusters=sorted(blocked), what="security override",
                        timeout=self.approval_timeout)
        rec.update(approver=verdict["approver"], comment=verdict["comment"], rule=verdict["rule"])
        if verdict["approved"]:
            rec.update(granted=True, outcome=f"approved by {verdict['approver']}")
            self.granted = True
        else:
            rec["outcome"] = f"refused ({verdict['rule']}): {verdict['reason']}"
        log.warning("security override %s", rec["outcome"])

    # ------------------------------------------------------------------ the end of the run
    def finish(self) -> str:
        """Schedule the follow-up run, publish the deferred clusters; returns a markdown section for the summary."""
        lines = []
        if self.clock.at is not None:
            lines += ["## Clock", "", f"Evaluated as at **{self.clock.at.isoformat()}** (the `now` parameter, "
                      f"{'a dry run' if self.dry_run else f'a real run by {self.actor}'}), not the real time.", ""]
        if self.override_record:
            r = self.override_record
            lines += ["## Security override", "", f"- requested by **{r['requester']}**: {r['reason']}",
                      f"- {r.get('outcome', '')}" + (f" ({r['comment']})" if r.get("comment") else "")]
            lines += [f"- crossed on **{n}**: {why}" if r["granted"] else f"- blocked on **{n}**: {why}"
                      for n, why in sorted(r["clusters"].items())]
            lines.append("")
        if not self.deferred:
            return "\n".join(lines)
        nexts = [d.decision.next.start for d in self.deferred.values() if d.decision.next]
        self.follow_up = self._schedule_follow_up(min(nexts)) if nexts else {
            "scheduled": False, "why": "no deferred cluster has a window in the look-ahead: nothing was scheduled"}
        rows = []
        lines += ["## Would wait for a maintenance window (dry run)" if self.dry_run else "## Waiting for a maintenance window",
                  ""]
        for name in sorted(self.deferred):
            d = self.deferred[name]
            nxt = d.decision.next
            rows.append({"cluster": name, "step": d.action, "rule": d.decision.rule, "blocked by": d.decision.reason,
                         "next window (local)": nxt.local() if nxt else "none in the look-ahead",
                         "next window (UTC)": nxt.utc() if nxt else ""})
            lines.append(f"- **{name}** ({d.action}): {d.decision.reason}; next window "
                         + (f"{nxt.local()} ({nxt.utc()})" if nxt else "none in the look-ahead"))
        f = self.follow_up
        lines += ["", f"Follow-up run: {f.get('name', '')} scheduled for {f['at_utc']}" if f["scheduled"]
                  else f"No follow-up run: {f['why']}."]
        create_table_artifact(key=f"{self.flow}-deferred", table=rows,
                              description=f"{self.flow}: clusters waiting for a maintenance window")
        return "\n".join(lines)

    def record(self) -> dict:
        return {"deferred": {n: {"step": d.action, "rule": d.decision.rule, "reason": d.decision.reason,
                                 "next_local": d.decision.next.local() if d.decision.next else None,
                                 "next_utc": d.decision.next.utc() if d.decision.next else None,
                                 "next_start": d.decision.next.start_utc.isoformat() if d.decision.next else None}
                             for n, d in sorted(self.deferred.items())},
                "follow_up": self.follow_up, "override": self.override_record, "actor": self.actor,
                "clock": self.clock.at.isoformat() if self.clock.at else None}

    def _schedule_follow_up(self, opening: float) -> dict:
        at = opening + FOLLOW_UP_SLACK
        at_utc = fmt(at, "UTC")
        if self.dry_run:
            return {"scheduled": False, "at_utc": at_utc, "why": f"a dry run schedules nothing (a real run would, for {at_utc})"}
        from prefect.deployments import run_deployment
        from prefect.runtime import deployment, flow_run

        if not deployment.id:
            return {"scheduled": False, "at_utc": at_utc,
                    "why": f"this run was not started from a deployment; start it again after {at_utc}"}
        from pydantic_core import to_jsonable_python

        params = to_jsonable_python(dict(flow_run.parameters or {}))
        params.pop("now", None)
        key = f"fleetwright-follow-up-{deployment.id}-{canonical_hash(params)}-{int(at)}"
        if self.clock.at is not None:  # a shifted clock: the follow-up runs in the same frame
            params["now"] = datetime.fromtimestamp(at, timezone.utc).isoformat()
        real = datetime.fromtimestamp(self.clock.real(at), timezone.utc)
        name = f"{flow_run.flow_name}/{deployment.name}"
        fr = run_deployment(name=name, parameters=params, scheduled_time=real, timeout=0, idempotency_key=key,
                            as_subflow=False)
        get_run_logger().info("deferred clusters: follow-up run %s of %s scheduled for %s", fr.id, name,
                              real.isoformat())
        return {"scheduled": True, "name": name, "flow_run_id": str(fr.id), "at_utc": at_utc,
                "scheduled_time": real.isoformat(), "idempotency_key": key,
                "after": str(timedelta(seconds=round(self.clock.real(at) - time.time())))}
