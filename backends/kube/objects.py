"""The vocabulary the kube services share: fleetwright's marks on objects, REST resources, owners, keys.

Kept apart so that apply, drift and inventory can each import it without importing one another.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass

from models.render import COMPONENT_LABEL, HASH_ANNOTATION, MANAGED_BY, MANAGER, WORKSPACE_LABEL

VERSION_ANNOTATION = "fleetwright.io/version"
INVENTORY_LABEL = "fleetwright.io/inventory"  # component | workspace
INVENTORY_KEY = "objects"
SYSTEM_NAMESPACES = frozenset({"default", "kube-system", "kube-public", "kube-node-lease"})
APPLY_PATCH = "application/apply-patch+yaml"
CRD_API = "apiextensions.k8s.io/v1"
CRD = "CustomResourceDefinition"
OWN_ANNOTATIONS = {HASH_ANNOTATION, VERSION_ANNOTATION}


def group_of(api_version: str) -> str:
    return api_version.rsplit("/", 1)[0] if "/" in api_version else ""


def ref_str(obj: dict) -> str:
    """``Kind/namespace/name`` (``Kind/name`` for cluster-scoped objects)."""
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{obj.get('kind')}/{ns}/{meta.get('name')}" if ns else f"{obj.get('kind')}/{meta.get('name')}"


def _pod_specs(obj: dict) -> list[dict]:
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    if obj.get("kind") == "Pod":
        return [spec]
    tmpl = spec.get("template")
    if obj.get("kind") == "CronJob":
        tmpl = ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template")
    pod = tmpl.get("spec") if isinstance(tmpl, dict) else None
    return [pod] if isinstance(pod, dict) else []


def prepare(obj: dict, label: str, owner: str, spec_hash: str, version: str | None) -> dict:
    """The object as fleetwright applies it: ownership labels, hash/version annotations, TCP defaults."""
    o = copy.deepcopy(obj)
    meta = o.setdefault("metadata", {})
    meta.setdefault("labels", {}).update({MANAGED_BY: MANAGER, label: owner})
    ann = meta.setdefault("annotations", {})
    ann[HASH_ANNOTATION] = spec_hash
    if version:
        ann[VERSION_ANNOTATION] = version
    if o.get("kind") == "Service":
        for p in (o.get("spec") or {}).get("ports") or []:
            if isinstance(p, dict):
                p.setdefault("protocol", "TCP")
    for pod in _pod_specs(o):
        for fld in ("containers", "initContainers"):
            for c in pod.get(fld) or []:
                for p in (c.get("ports") or []) if isinstance(c, dict) else []:
                    if isinstance(p, dict):
                        p.setdefault("protocol", "TCP")
    return o


def ours(live: dict) -> bool:
    return ((live.get("metadata") or {}).get("labels") or {}).get(MANAGED_BY) == MANAGER


def system_namespace(obj: dict) -> bool:
    return obj.get("kind") == "Namespace" and obj.get("apiVersion") == "v1" \
        and (obj.get("metadata") or {}).get("name") in SYSTEM_NAMESPACES


DELETE_RANK = {"Namespace": 0, CRD: 1, "ServiceAccount": 2, "ClusterRole": 3, "Role": 3,
                "ClusterRoleBinding": 4, "RoleBinding": 4, "ConfigMap": 5, "Secret": 5}



@dataclass(frozen=True)
class Res:
    api_version: str
    kind: str
    plural: str
    namespaced: bool

    @property
    def base(self) -> str:
        return "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"

    def collection(self, namespace: str | None = None) -> str:
        if self.namespaced and namespace:
            return f"{self.base}/namespaces/{namespace}/{self.plural}"
        return f"{self.base}/{self.plural}"

    def item(self, namespace: str | None, name: str) -> str:
        return f"{self.collection(namespace)}/{name}"


@dataclass(frozen=True)
class Owner:
    kind: str  # "component" | "workspace"
    name: str

    @property
    def label(self) -> str:
        return COMPONENT_LABEL if self.kind == "component" else WORKSPACE_LABEL

    @property
    def selector(self) -> str:
        return f"{MANAGED_BY}={MANAGER},{self.label}={self.name}"

    @property
    def inventory_name(self) -> str:
        return f"fleetwright-inventory-{self.name}" if self.kind == "component" \
            else f"fleetwright-workspace-inventory-{self.name}"

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


Key = tuple  # (group, kind, namespace, name)


def key_of(api_version: str, kind: str, namespace: str | None, name: str) -> Key:
    return (group_of(api_version), kind, namespace or "", name)


def is_inventory(item: dict) -> bool:
    return INVENTORY_LABEL in ((item.get("metadata") or {}).get("labels") or {})


def inventory_refs(inv: dict) -> list[list[str]]:
    try:
        refs = json.loads((inv.get("data") or {}).get(INVENTORY_KEY) or "[]")
    except ValueError:
        return []
    return [r for r in refs if isinstance(r, list) and len(r) == 4 and all(isinstance(x, str) for x in r)]
