"""What a change to the definitions does to the fleet: which clusters change, and how."""
from __future__ import annotations

from .compare import changes
from .desired import DesiredCluster


def _summary(d: DesiredCluster) -> dict:
    return {
        "model": f"{d.model}@{d.model_version}",
        "kubernetesVersion": d.kubernetes_version,
        "driftMode": d.drift_mode,
        "labels": d.labels,
        "backend": d.backend.model_dump(mode="json", by_alias=True),
        "controlPlane": {"replicas": d.control_plane.replicas, "size": d.control_plane.size},
        "nodePools": {p.name: {"replicas": p.replicas, "minSize": p.min_size, "maxSize": p.max_size,
                               "size": p.size, "machine": p.machine} for p in d.node_pools},
        "components": {c.name: {"version": c.version, "values": c.values} for c in d.components},
        "workspaces": {w.team: {"namespaces": w.namespaces, "hash": w.hash} for w in d.workspaces},
    }


def diff_fleet(old: dict[str, DesiredCluster], new: dict[str, DesiredCluster]) -> list[dict]:
    """One entry per affected cluster: ``{"cluster", "change": added|removed|changed, "fields": [...]}``."""
    out = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a is None:
            out.append({"cluster": name, "change": "added", "fields": []})
        elif b is None:
            out.append({"cluster": name, "change": "removed", "fields": []})
        elif a.hash != b.hash:
            fields = [{"path": p, "old": o, "new": n} for p, o, n in changes(_summary(a), _summary(b))]
            out.append({"cluster": name, "change": "changed", "fields": fields})
    return out
