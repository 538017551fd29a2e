"""Fleet waves: canaries first, then growing batches; who needs a human approval.

Pure planning only; flows carry the waves out (bake time, failure threshold,
approvals through Prefect's ``pause_flow_run``).
"""
from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

from .desired import DesiredCluster

WAVE_LABEL = "fleetwright.io/wave"
APPROVAL_LABEL = "fleetwright.io/approval"


class WavePolicy(BaseModel):
    """How a fleet rollout proceeds. Shown as a form in the Prefect UI."""

    model_config = ConfigDict(extra="forbid")

    canary_value: str = Field("canary", description=f"clusters labelled {WAVE_LABEL}=<this> go first")
    first_batch: int = Field(1, ge=1, description="size of the first wave after the canaries")
    growth: float = Field(2.0, ge=1.0, description="each wave is this many times larger than the one before")
    max_batch: int = Field(50, ge=1)
    max_failure_ratio: float = Field(0.0, ge=0.0, le=1.0,
                                     description="halt when a wave's failed fraction is above this (0: any failure halts)")
    bake_seconds: float = Field(0.0, ge=0.0, description="wait after each successful wave before the next")
    approval_timeout_seconds: int = Field(3600, ge=1)


class Wave(BaseModel):
    model_config = ConfigDict(frozen=True)

    index: int
    name: str
    clusters: list[str]
    needs_approval: list[str] = []


def plan_waves(clusters: list[DesiredCluster], policy: WavePolicy) -> list[Wave]:
    """Canaries first (one wave), then batches growing by ``growth`` (dev before staging before prod)."""
    env_rank = {"dev": 0, "test": 0, "staging": 1, "prod": 2}
    canaries = sorted(c.name for c in clusters if c.labels.get(WAVE_LABEL) == policy.canary_value)
    rest = sorted((c for c in clusters if c.labels.get(WAVE_LABEL) != policy.canary_value),
                  key=lambda c: (env_rank.get(c.labels.get("env", ""), 1), c.name))
    approval = {c.name for c in clusters if c.labels.get(APPROVAL_LABEL) == "required"}
    waves: list[Wave] = []
    if canaries:
        waves.append(Wave(index=0, name="canary", clusters=canaries, needs_approval=sorted(approval & set(canaries))))
    size, i = policy.first_batch, 0
    while i < len(rest):
        batch = [c.name for c in rest[i:i + size]]
        waves.append(Wave(index=len(waves), name=f"wave-{len(waves)}", clusters=batch,
                          needs_approval=sorted(approval & set(batch))))
        i += size
        size = min(policy.max_batch, max(size + 1, math.ceil(size * policy.growth)))
    return waves


def wave_failed(failed: int, total: int, policy: WavePolicy) -> bool:
    return total > 0 and failed / total > policy.max_failure_ratio
