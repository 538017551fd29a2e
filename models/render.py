"""Rendering: components and team workspaces as the Kubernetes objects fleetwright owns.

Every object carries the ownership labels (``app.kubernetes.io/managed-by:
fleetwright`` plus the component or workspace it belongs to), so a backend
can find, prune and refuse to adopt by label alone. Manifests may use
``${values.a.b}``, ``${cluster.name}``, ``${cluster.labels.env}``,
``${component.namespace}`` and ``${component.version}``.
"""
from __future__ import annotations

import copy
import re
from typing import Any

from .spec import Component, Source, Team

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "fleetwright"
COMPONENT_LABEL = "fleetwright.io/component"
WORKSPACE_LABEL = "fleetwright.io/workspace"
HASH_ANNOTATION = "fleetwright.io/spec-hash"

CLUSTER_SCOPED = {
    "Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "StorageClass", "PriorityClass",
    "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration", "IngressClass", "APIService",
    "PersistentVolume", "CSIDriver", "RuntimeClass", "PodSecurityPolicy", "VolumeSnapshotClass",
}
SYSTEM_NAMESPACES = {"default", "kube-system", "kube-public", "kube-node-lease"}  # never ours to create or delete
_KIND_ORDER = {"Namespace": 0, "CustomResourceDefinition": 1, "ServiceAccount": 2, "ClusterRole": 3, "Role": 3,
               "ClusterRoleBinding": 4, "RoleBinding": 4, "ConfigMap": 5, "Secret": 5}
_REF = re.compile(r"\$\{((?:values|cluster|component)(?:\.[A-Za-z0-9_-]+)+)\}")


class RenderError(Exception):
    def __init__(self, loc: tuple, message: str):
        self.loc, self.message = loc, message


def _lookup(root: dict, dotted: str, loc: tuple) -> Any:
    cur: Any = root
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise RenderError(loc, f"${{{dotted}}} is not defined")
        cur = cur[part]
    return cur


def _fill(value: Any, root: dict, loc: tuple) -> Any:
    """Substitute references from ``root``; references to a scope not in ``root`` are left open."""
    if isinstance(value, str):
        if "${" not in value:
            return value
        m = _REF.fullmatch(value)
        if m:
            if m.group(1).split(".", 1)[0] not in root:
                return value
            return copy.deepcopy(_lookup(root, m.group(1), loc))

        def one(mm):
            if mm.group(1).split(".", 1)[0] not in root:
                return mm.group(0)
            return str(_lookup(root, mm.group(1), loc))
        return _REF.sub(one, value)
    if isinstance(value, dict):
        return {k: _fill(v, root, loc + (k,)) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, root, loc + (i,)) for i, v in enumerate(value)]
    return value


def _holes(value: Any, path: tuple, out: list) -> list:
    """Paths of strings that still hold a ``${cluster...}`` reference."""
    if isinstance(value, str):
        if "${cluster." in value:
            out.append(path)
    elif isinstance(value, dict):
        for k, v in value.items():
            _holes(v, path + (k,), out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _holes(v, path + (i,), out)
    return out


def _as_text(v: Any) -> str:
    """ConfigMap data is text; a typed value substituted into it is written as YAML would show it."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return v if isinstance(v, str) else str(v)


def sort_objects(objects: list[dict]) -> list[dict]:
    """Namespaces, then CRDs, then RBAC, then the rest; stable otherwise."""
    return sorted(objects, key=lambda o: _KIND_ORDER.get(o.get("kind", ""), 9))


def _own(obj: dict, label: str, owner: str, namespace: str | None) -> dict:
    meta = obj.setdefault("metadata", {})
    labels = meta.setdefault("labels", {})
    labels.update({MANAGED_BY: MANAGER, label: owner})
    if namespace and obj.get("kind") not in CLUSTER_SCOPED:
        meta.setdefault("namespace", namespace)
    return obj


class Template:
    """A component rendered with its values; ``${cluster...}`` references are still open at ``holes``.

    One template serves every cluster that gives the component the same values;
    :meth:`finish` fills in one cluster by copying only the containers on the
    paths to its holes, so a fleet of thousands renders in linear, small time.
    """

    __slots__ = ("objects", "values", "addon", "holes", "key")

    def __init__(self, objects: list[dict], values: dict, addon: dict | None, key: str):
        self.objects, self.values, self.addon, self.key = objects, values, addon, key
        self.holes = _holes(objects, ("objects",), []) + _holes(values, ("values",), [])

    def finish(self, ctx: dict) -> tuple[list[dict], dict, list]:
        """(objects, values, filled strings) for one cluster; each container on a hole's path is copied once."""
        if not self.holes:
            return self.objects, self.values, []
        tree = {"objects": list(self.objects), "values": dict(self.values)}
        fresh = {id(tree["objects"]), id(tree["values"])}
        root = {"cluster": ctx}
        filled = []
        for path in self.holes:
            cur: Any = tree
            for part in path[:-1]:
                child = cur[part]
                if id(child) not in fresh:
                    child = dict(child) if isinstance(child, dict) else list(child)
                    cur[part] = child
                    fresh.add(id(child))
                cur = child
            cur[path[-1]] = value = _fill(cur[path[-1]], root, path)
            filled.append(value)
        return tree["objects"], tree["values"], filled


def prepare(comp: Component, source: Source, values: dict) -> Template:
    """Render one component with its values, leaving cluster references open."""
    name, ns = comp.metadata.name, comp.spec.namespace
    root = {"component": {"name": name, "namespace": ns, "version": comp.spec.version}}
    values = _fill(values, root, ("values",))
    root["values"] = values
    kind = source.kind()
    if kind == "eksAddon":
        return Template([], values, {"name": source.eks_addon.name, "version": source.eks_addon.version}, kind)
    objects: list[dict] = [] if ns in SYSTEM_NAMESPACES else [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}]
    if kind == "manifests":
        for i, m in enumerate(source.manifests):
            obj = _fill(m, root, ("manifests", i))
            if not isinstance(obj.get("apiVersion"), str) or not isinstance(obj.get("kind"), str) \
                    or not isinstance(obj.get("metadata"), dict) or not obj["metadata"].get("name"):
                raise RenderError(("manifests", i), "a manifest needs apiVersion, kind and metadata.name")
            for fld in ("name", "namespace"):
                if fld in obj["metadata"] and not isinstance(obj["metadata"][fld], str):
                    raise RenderError(("manifests", i, "metadata", fld), f"metadata.{fld} must be a string")
            if obj["kind"] in ("ConfigMap", "Secret"):
                for fld in ("data", "stringData"):
                    if isinstance(obj.get(fld), dict):
                        obj[fld] = {k: _as_text(v) for k, v in obj[fld].items()}
            objects.append(obj)
    else:
        h = source.helm
        objects.append({"apiVersion": "source.toolkit.fluxcd.io/v1beta2", "kind": "HelmRepository",
                        "metadata": {"name": name},
                        "spec": {"url": h.repository, "interval": "10m", **({"type": "oci"} if h.repository.startswith("oci://") else {})}})
        objects.append({"apiVersion": "helm.toolkit.fluxcd.io/v2beta1", "kind": "HelmRelease", "metadata": {"name": name},
                        "spec": {"interval": "10m", "releaseName": name, "targetNamespace": ns,
                                 "chart": {"spec": {"chart": h.chart, "version": h.version,
                                                    "sourceRef": {"kind": "HelmRepository", "name": name}}},
                                 "values": "${values}"}})
        objects[-1]["spec"]["values"] = copy.deepcopy(values)
    seen = set()
    out = []
    for obj in objects:
        _own(obj, COMPONENT_LABEL, name, ns)
        key = (obj["apiVersion"], obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])
        if key in seen:
            continue
        seen.add(key)
        out.append(obj)
    return Template(sort_objects(out), values, None, kind)


def workspace_objects(team: Team) -> list[dict]:
    """A team's workspace: namespaces, RBAC, quota, limits, default-deny, and its GitOps source."""
    name, spec = team.metadata.name, team.spec
    objs: list[dict] = []
    subjects = [{"kind": "Group", "name": g, "apiGroup": "rbac.authorization.k8s.io"} for g in spec.groups] + \
               [{"kind": "User", "name": u, "apiGroup": "rbac.authorization.k8s.io"} for u in spec.members]
    first = spec.namespaces[0].name
    sa = "gitops-reconciler"
    for ns in spec.namespaces:
        n = ns.name
        objs.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n, "labels": {"fleetwright.io/team": name}}})
        if subjects:
            objs.append({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                         "metadata": {"name": f"team-{name}", "namespace": n},
                         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": spec.role},
                         "subjects": subjects})
        hard = {"requests.cpu": ns.quota.cpu, "requests.memory": ns.quota.memory, "limits.cpu": ns.quota.cpu,
                "limits.memory": ns.quota.memory, "pods": str(ns.quota.pods)}
        if ns.quota.storage:
            hard["requests.storage"] = ns.quota.storage
        objs.append({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "team-quota", "namespace": n},
                     "spec": {"hard": hard}})
        objs.append({"apiVersion": "v1", "kind": "LimitRange", "metadata": {"name": "team-limits", "namespace": n},
                     "spec": {"limits": [{"type": "Container",
                                          "default": {"cpu": ns.limits.cpu, "memory": ns.limits.memory},
                                          "defaultRequest": {"cpu": ns.limits.cpu, "memory": ns.limits.memory}}]}})
        objs.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "default-deny", "namespace": n},
                     "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
                              "egress": [{"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]}})
        if spec.gitops is not None:
            objs.append({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                         "metadata": {"name": f"{sa}", "namespace": n},
                         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "admin"},
                         "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": first}]})
    if spec.gitops is not None:
        g = spec.gitops
        objs.append({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": first}})
        repo = {"url": g.url, "interval": g.interval, "ref": {"branch": g.ref}}
        if g.secret_ref:
            repo["secretRef"] = {"name": g.secret_ref}
        objs.append({"apiVersion": "source.toolkit.fluxcd.io/v1beta2", "kind": "GitRepository",
                     "metadata": {"name": name, "namespace": first}, "spec": repo})
        objs.append({"apiVersion": "kustomize.toolkit.fluxcd.io/v1beta2", "kind": "Kustomization",
                     "metadata": {"name": name, "namespace": first},
                     "spec": {"interval": g.interval, "path": g.path, "prune": True, "serviceAccountName": sa,
                              "targetNamespace": first, "sourceRef": {"kind": "GitRepository", "name": name}}})
    for o in objs:
        _own(o, WORKSPACE_LABEL, name, None)
    return sort_objects(objs)
