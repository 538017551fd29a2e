"""Names, tag keys and small conversions shared by the AWS services (no SDK calls)."""
from __future__ import annotations

import json
from typing import Any

from models.desired import DesiredComponent
from models.errors import PermanentError

from ..base import CLUSTER_KEY, OWNER_KEY, OWNER_VALUE

COMPONENT_KEY = "fleetwright.io/component"
COMPONENT_VERSION_KEY = "fleetwright.io/component-version"
SPEC_HASH_KEY = "fleetwright.io/spec-hash"
ADDON_VERSION_KEY = "fleetwright.io/addon-version"  # the add-on version the two tags above describe
NODE_POOL_KEY = "fleetwright.io/node-pool"

# AWS managed policies (ARN suffixes; the partition is filled in per region).
CLUSTER_POLICIES = ("AmazonEKSClusterPolicy",)
NODE_POLICIES = ("AmazonEKSWorkerNodePolicy", "AmazonEKS_CNI_Policy", "AmazonEC2ContainerRegistryReadOnly")

TRANSITIONAL = {"CREATING", "UPDATING", "DELETING"}
TOKEN_PREFIX = "k8s-aws-v1."
TOKEN_EXPIRES = 60  # seconds, as aws eks get-token


def _ec2_tags(tags: list[dict[str, str]] | None) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in tags or []}


def _as_ec2(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in sorted(tags.items())]


def _owned(tags: dict[str, str] | None, cluster: str) -> bool:
    tags = tags or {}
    return tags.get(OWNER_KEY) == OWNER_VALUE and tags.get(CLUSTER_KEY) == cluster


def _minor(v: str | None) -> tuple[int, int]:
    a, b = str(v).split(".")[:2]
    return int(a), int(b)


_EFFECTS = {"NoSchedule": "NO_SCHEDULE", "NoExecute": "NO_EXECUTE", "PreferNoSchedule": "PREFER_NO_SCHEDULE"}


def eks_taint(taint: str) -> dict[str, str]:
    """``key=value:NoSchedule`` (or ``key:NoExecute``) as an EKS taint."""
    body, sep, effect = taint.rpartition(":")
    if not sep or effect not in _EFFECTS:
        raise PermanentError(f"taint {taint!r}: expected key[=value]:NoSchedule|NoExecute|PreferNoSchedule")
    key, _, value = body.partition("=")
    out = {"key": key, "effect": _EFFECTS[effect]}
    if value:
        out["value"] = value
    return out


def _addon_config(comp: DesiredComponent) -> str | None:
    return json.dumps(comp.values, sort_keys=True, separators=(",", ":")) if comp.values else None


def _same_config(live: str | None, want: str | None) -> bool:

    def parse(s: str | None) -> Any:
        if not s:
            return None
        try:
            return json.loads(s)
        except ValueError:
            return s
    return parse(live) == parse(want)
