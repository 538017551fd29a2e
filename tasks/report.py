"""Artifacts every run leaves in the Prefect UI: the plan, what was done, drift, failures."""
from __future__ import annotations

import re

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from models.status import PROBLEMS

from .cluster import Outcome


def _key(*parts: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]


def publish(flow: str, outcomes: list[Outcome], *, dry_run: bool, extra_md: str = "") -> dict:
    """One set of artifacts for a run; returns the summary counts."""
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[str(o.status)] = counts.get(str(o.status), 0) + 1
    plan_rows = [{"cluster": o.cluster, **r} for o in outcomes for r in o.steps]
    if plan_rows:
        create_table_artifact(key=_key(flow, "plan"), table=plan_rows,
                              description=f"{flow}: the plan{' (dry run: nothing was changed)' if dry_run else ''}")
    done_rows = [{"cluster": o.cluster, **d} for o in outcomes for d in o.done]
    if done_rows:
        create_table_artifact(key=_key(flow, "done"), table=done_rows, description=f"{flow}: steps carried out")
    status_rows = [{"cluster": o.cluster, "status": str(o.status), "steps": len(o.steps), "done": len(o.done),
                    "drift": len(o.drift), "seconds": round(o.seconds, 1), "reason": o.reason} for o in outcomes]
    lines = [f"# {flow}{' (dry run)' if dry_run else ''}", "",
             "| status | clusters |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in sorted(counts.items())]
    drift = [(o.cluster, d) for o in outcomes for d in o.drift]
    if drift:
        lines += ["", "## Drift found", ""] + [f"- **{c}**: {d}" for c, d in drift]
    failures = [o for o in outcomes if o.status in PROBLEMS]
    if failures:
        lines += ["", "## Failures", ""] + [f"- **{o.cluster}** ({o.status}): {o.reason}" for o in failures]
    if extra_md:
        lines += ["", extra_md]
    create_markdown_artifact(key=_key(flow, "summary"), markdown="\n".join(lines), description=f"{flow}: summary")
    create_table_artifact(key=_key(flow, "clusters"), table=status_rows, description=f"{flow}: cluster by status")
    return counts
