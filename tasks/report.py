"""What every run leaves behind: artifacts in the Prefect UI, events for automations, summaries.

* ``publish``: the plan, what was done, drift, failures, and a table of clusters by status.
* ``emit_cluster_events``: one Prefect event per drifted (``fleetwright.cluster.drift``) or
  failed/refused (``fleetwright.cluster.failed``) cluster, with the cluster as the resource
  (``fleetwright.cluster.<name>``), so an Automation can notify people (README, "Events").
* ``summarise`` / ``merge_summaries``: a run's outcomes folded into counts plus the clusters
  that are not in sync, so a sweep over 10,000 clusters never keeps 10,000 outcomes in one flow.
"""
from __future__ import annotations

import logging
import re

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from models.status import PROBLEMS, Status

from .cluster import Outcome
from .definitions import revision

DRIFT_EVENT = "fleetwright.cluster.drift"
FAILED_EVENT = "fleetwright.cluster.failed"
MAX_LISTED = 1000  # clusters listed by name in a fleet summary (the counts are always complete)


def _key(*parts: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]


def cluster_resource(name: str) -> str:
    return f"fleetwright.cluster.{name}"


def emit_cluster_events(flow: str, outcomes: list[Outcome]) -> int:
    """One event per cluster in drift or in trouble; returns how many were emitted."""
    from prefect.events import emit_event

    n = 0
    for o in outcomes:
        if o.status == Status.DRIFT:
            event = DRIFT_EVENT
        elif o.status in PROBLEMS:
            event = FAILED_EVENT
        else:
            continue
        try:
            emit_event(event=event,
                       resource={"prefect.resource.id": cluster_resource(o.cluster), "prefect.resource.name": o.cluster,
                                 "fleetwright.status": str(o.status), "fleetwright.flow": flow},
                       payload={"status": str(o.status), "reason": o.reason[:2000], "drift": o.drift[:50],
                                "steps": len(o.steps)})
            n += 1
        except Exception as e:  # noqa: BLE001 - an event lost must not fail the run; the artifact has it all
            logging.getLogger("fleetwright").warning("could not emit %s for %s: %s", event, o.cluster, e)
    return n


def publish(flow: str, outcomes: list[Outcome], *, dry_run: bool, extra_md: str = "", events: bool = True) -> dict:
    """One set of artifacts (and events) for a run; returns the summary counts. Every artifact names the definitions' commit."""
    rev = revision()
    at = f" (definitions {rev.sha})" if rev else ""
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[str(o.status)] = counts.get(str(o.status), 0) + 1
    plan_rows = [{"cluster": o.cluster, **r} for o in outcomes for r in o.steps]
    if plan_rows:
        create_table_artifact(key=_key(flow, "plan"), table=plan_rows,
                              description=f"{flow}: the plan{' (dry run: nothing was changed)' if dry_run else ''}{at}")
    done_rows = [{"cluster": o.cluster, **d} for o in outcomes for d in o.done]
    if done_rows:
        create_table_artifact(key=_key(flow, "done"), table=done_rows, description=f"{flow}: steps carried out{at}")
    status_rows = [{"cluster": o.cluster, "status": str(o.status), "steps": len(o.steps), "done": len(o.done),
                    "drift": len(o.drift), "seconds": round(o.seconds, 1), "reason": o.reason} for o in outcomes]
    lines = [f"# {flow}{' (dry run)' if dry_run else ''}", "",
             f"Definitions: `{rev.source}` at commit `{rev.sha}`" + (f" (ref `{rev.ref}`)" if rev.ref and rev.ref != rev.sha else "")
             if rev else "Definitions: unknown", "",
             "| status | clusters |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in sorted(counts.items())]
    lines += _drift_and_failures(outcomes)
    if extra_md:
        lines += ["", extra_md]
    create_markdown_artifact(key=_key(flow, "summary"), markdown="\n".join(lines), description=f"{flow}: summary{at}")
    create_table_artifact(key=_key(flow, "clusters"), table=status_rows, description=f"{flow}: cluster by status{at}")
    if events:
        emit_cluster_events(flow, outcomes)
    return counts


def _drift_and_failures(outcomes) -> list[str]:
    lines: list[str] = []
    drift = [(o.cluster, d) for o in outcomes for d in o.drift]
    if drift:
        lines += ["", "## Drift found", ""] + [f"- **{c}**: {d}" for c, d in drift[:MAX_LISTED * 3]]
    failures = [o for o in outcomes if o.status in PROBLEMS]
    if failures:
        lines += ["", "## Failures", ""] + [f"- **{o.cluster}** ({o.status}): {o.reason}" for o in failures[:MAX_LISTED]]
    return lines


# --------------------------------------------------------------------------- summaries (bounded)


def summarise(outcomes: list[Outcome], **extra) -> dict:
    """Counts of every status, plus the outcomes that are not in sync (as dicts)."""
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[str(o.status)] = counts.get(str(o.status), 0) + 1
    notable = [o.to_dict() for o in outcomes if o.status != Status.IN_SYNC]
    return {"counts": counts, "clusters": notable, "total": len(outcomes), **extra}


def merge_summaries(parts: list[dict]) -> dict:
    """One summary from several (shards): counts added, notable clusters concatenated."""
    counts: dict[str, int] = {}
    clusters: list[dict] = []
    for p in parts:
        for k, v in p.get("counts", {}).items():
            counts[k] = counts.get(k, 0) + v
        clusters += p.get("clusters", [])
    return {"counts": counts, "clusters": clusters, "total": sum(p.get("total", 0) for p in parts)}


def publish_summary(flow: str, summary: dict, *, dry_run: bool, extra_md: str = "") -> None:
    """The fleet summary of a sharded sweep: all counts, the notable clusters, the shards."""
    rev = revision()
    at = f" (definitions {rev.sha})" if rev else ""
    counts = summary["counts"]
    notable = [Outcome(**c) for c in summary["clusters"]]
    lines = [f"# {flow}{' (dry run)' if dry_run else ''}", "", f"{summary['total']} clusters.", "",
             f"Definitions: `{rev.source}` at commit `{rev.sha}`" if rev else "Definitions: unknown", "",
             "| status | clusters |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in sorted(counts.items())]
    lines += _drift_and_failures(notable)
    if extra_md:
        lines += ["", extra_md]
    create_markdown_artifact(key=_key(flow, "summary"), markdown="\n".join(lines), description=f"{flow}: summary{at}")
    rows = [{"cluster": o.cluster, "status": str(o.status), "steps": len(o.steps), "done": len(o.done),
             "drift": len(o.drift), "seconds": round(o.seconds, 1), "reason": o.reason} for o in notable[:MAX_LISTED]]
    create_table_artifact(key=_key(flow, "clusters"), table=rows or [{"cluster": "-", "status": "in-sync"}],
                          description=f"{flow}: clusters not in sync (in-sync ones are counted in the summary){at}")
