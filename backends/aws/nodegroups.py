"""EKS managed node groups: one per node pool, created, scaled, replaced, upgraded and deleted.

A pool's node group is first named after the pool. Its machine (instance types, disk, capacity
type) is immutable in EKS, so a machine change replaces it, create before destroy: a new node
group ``<pool>-<hash of the machine>`` is created and waited for until ACTIVE, and only then are
the pool's other node groups deleted. Every node group carries the tag
``fleetwright.io/node-pool=<pool>``, so a replacement interrupted at any point is found again
(both groups, by tags) and finished; the pool never has zero ACTIVE node groups.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from models.desired import DesiredCluster
from models.errors import OwnershipConflict, PermanentError
from models.plan import Step

from .common import NODE_POOL_KEY, _minor, _owned, eks_taint


class NodegroupService:
    """Mixin: node groups."""

    def _nodegroup(self, desired: DesiredCluster, pool: str, *, strict: bool = True) -> dict[str, Any] | None:
        r = self._call("eks", self._region(desired), "describe_nodegroup", missing_ok=True,
                       clusterName=desired.name, nodegroupName=pool)
        if r is None:
            return None
        ng = r["nodegroup"]
        if not _owned(ng.get("tags"), desired.name):
            if strict:
                raise OwnershipConflict(f"EKS node group {pool} of cluster {desired.name} is not marked as fleetwright's")
            return None
        return ng

    def _nodegroup_names(self, desired: DesiredCluster) -> list[str]:
        """Every node group of the cluster (all pages), ours or not."""
        region = self._region(desired)
        names: list[str] = []
        kw: dict[str, Any] = {}
        while True:
            r = self._call("eks", region, "list_nodegroups", clusterName=desired.name, **kw)
            names += r.get("nodegroups", [])
            if not r.get("nextToken"):
                break
            kw["nextToken"] = r["nextToken"]
        return names

    def _pool_nodegroups(self, desired: DesiredCluster) -> dict[str, list[dict[str, Any]]]:
        """Our node groups by pool (oldest first). A foreign node group with a desired pool's name is a conflict."""
        names = self._nodegroup_names(desired)
        wanted = {p.name for p in desired.node_pools}
        out: dict[str, list[dict[str, Any]]] = {}
        for n in names:
            ng = self._nodegroup(desired, n, strict=n in wanted)
            if ng is not None:
                out.setdefault((ng.get("tags") or {}).get(NODE_POOL_KEY, n), []).append(ng)
        for groups in out.values():
            groups.sort(key=lambda g: (g.get("status") == "DELETING", str(g.get("createdAt") or ""), g["nodegroupName"]))
        return out

    def _nodegroups(self, desired: DesiredCluster) -> dict[str, dict[str, Any]]:
        """Our node group of each pool: the oldest, while a replacement runs (so the plan finishes it)."""
        return {pool: groups[0] for pool, groups in self._pool_nodegroups(desired).items()}

    def _group_name(self, desired: DesiredCluster, pool: str) -> str:
        """The node group that carries ``pool`` now (its oldest), or the pool's own name if there is none."""
        groups = self._pool_nodegroups(desired).get(pool) or []
        return groups[0]["nodegroupName"] if groups else pool

    @staticmethod
    def replacement_name(pool: str, machine: dict[str, Any]) -> str:
        """The deterministic name of the node group that replaces a pool's for ``machine`` (max. 63 chars)."""
        h = hashlib.sha256(json.dumps(machine, sort_keys=True, default=str).encode()).hexdigest()[:6]
        return f"{pool[:56]}-{h}"

    # -- node pools
    def _pool(self, desired: DesiredCluster, name: str):
        p = next((p for p in desired.node_pools if p.name == name), None)
        if p is None:
            raise PermanentError(f"node pool {name} is not in the desired state of {desired.name}")
        return p

    def _wait_nodegroup(self, desired: DesiredCluster, pool: str, want: str | None = "ACTIVE") -> dict[str, Any] | None:
        """Wait until the node group is ``want`` (None: gone)."""
        def check():
            ng = self._nodegroup(desired, pool)
            if want is None:
                return ng is None
            if ng is None:
                raise PermanentError(f"EKS node group {pool} disappeared while waiting for {want}")
            if ng["status"] == want:
                return ng
            if ng["status"] in ("CREATE_FAILED", "DELETE_FAILED", "DEGRADED") and ng["status"] != want:
                issues = "; ".join(f"{i.get('code')}: {i.get('message')}" for i in (ng.get("health") or {}).get("issues", []))
                raise PermanentError(f"EKS node group {pool} is {ng['status']}: {issues or 'no details'}")
            return None
        r = self._wait(f"EKS node group {pool} {want or 'gone'}", check)
        return r if want else None

    def _settled_nodegroup(self, desired: DesiredCluster, pool: str) -> dict[str, Any] | None:
        """The node group once no operation runs on it (waits for CREATING/UPDATING; DELETING -> gone)."""
        ng = self._nodegroup(desired, pool)
        if ng is None:
            return None
        if ng["status"] == "DELETING":
            return self._wait_nodegroup(desired, pool, None)
        if ng["status"] in ("CREATING", "UPDATING"):
            return self._wait_nodegroup(desired, pool)
        return ng

    def _create_nodegroup(self, desired: DesiredCluster, pool: str, name: str | None = None,
                          size: int | None = None) -> dict[str, Any]:
        p = self._pool(desired, pool)
        name = name or pool
        c = self._active_cluster(desired, f"create node group {pool}")
        subnets = self._node_subnets(desired)
        role = self._role(desired, self.role_names(desired)["node"])
        if role is None or not subnets:
            raise PermanentError(f"infrastructure of {desired.name} is not ready (run infrastructure.ensure first)")
        m = p.machine or {}
        kw: dict[str, Any] = dict(
            clusterName=desired.name, nodegroupName=name, nodeRole=role["Arn"], subnets=subnets,
            scalingConfig={"minSize": p.min_size, "maxSize": p.max_size,
                           "desiredSize": p.replicas if size is None else size},
            tags=self.tags(desired, **{NODE_POOL_KEY: pool}), version=c.get("version"))
        if m.get("instanceTypes"):
            kw["instanceTypes"] = list(m["instanceTypes"])
        if m.get("diskSizeGiB"):
            kw["diskSize"] = int(m["diskSizeGiB"])
        if m.get("capacityType"):
            kw["capacityType"] = m["capacityType"]
        if p.labels:
            kw["labels"] = dict(p.labels)
        if p.taints:
            kw["taints"] = [eks_taint(t) for t in p.taints]
        self._call("eks", self._region(desired), "create_nodegroup", **kw)
        return self._wait_nodegroup(desired, name)

    def _apply_pool_create(self, desired: DesiredCluster, step: Step):
        ng = self._settled_nodegroup(desired, step.object)
        if ng is not None:
            if ng["status"] in ("CREATE_FAILED",):
                raise PermanentError(f"EKS node group {step.object} is CREATE_FAILED; delete it to create it again")
            return False, f"EKS node group {step.object} exists", {"arn": ng.get("nodegroupArn")}
        ng = self._create_nodegroup(desired, step.object)
        return True, f"created EKS node group {step.object}", {"arn": ng.get("nodegroupArn")}

    def _apply_pool_scale(self, desired: DesiredCluster, step: Step):
        p = self._pool(desired, step.object)
        name = self._group_name(desired, step.object)
        ng = self._settled_nodegroup(desired, name)
        if ng is None:
            raise PermanentError(f"EKS node group {step.object} does not exist; cannot scale it")
        live = ng.get("scalingConfig") or {}
        size = p.replicas
        if p.autoscaling:  # the autoscaler owns the size: keep the live one, within the bounds
            size = min(max(int(live.get("desiredSize") or 0), p.min_size), p.max_size)
        want = {"minSize": p.min_size, "maxSize": p.max_size, "desiredSize": size}
        have = {k: live.get(k) for k in want}
        if have == want:
            return False, f"EKS node group {step.object} is already {size} ({p.min_size}..{p.max_size})", {}
        send = dict(want)
        if p.autoscaling and live.get("desiredSize") == size:
            del send["desiredSize"]  # inside the bounds: leave the autoscaler's latest choice alone
        u = self._call("eks", self._region(desired), "update_nodegroup_config", clusterName=desired.name,
                       nodegroupName=name, scalingConfig=send)["update"]
        seen = self._wait_update(desired, u, f"scaling of EKS node group {name}", nodegroupName=name)
        self._wait_nodegroup(desired, name)
        return True, f"scaled EKS node group {name} from {have} to {want}", {"updateId": u["id"], "statuses": seen}

    def _machine_of(self, ng: dict[str, Any], keys: set[str]) -> dict[str, Any]:
        m = {"instanceTypes": list(ng.get("instanceTypes") or []), "diskSizeGiB": ng.get("diskSize"),
             "capacityType": ng.get("capacityType")}
        return {k: m.get(k) for k in keys} if keys else m

    def _apply_pool_update(self, desired: DesiredCluster, step: Step):
        """Replace the pool's node group, create before destroy (its machine is immutable in EKS).

        One resumable step: the new node group has a deterministic name and the pool's tag, so a
        re-run after a crash finds it (CREATING or ACTIVE) beside the old one, waits, and deletes the old.
        """
        pool = step.object
        p = self._pool(desired, pool)
        want = dict(p.machine)
        groups = self._pool_nodegroups(desired).get(pool) or []
        fits = [g for g in groups if self._machine_of(g, set(want)) == want and g.get("status") != "DELETING"]
        old = [g for g in groups if g not in fits]
        if not old and fits:
            return False, f"EKS node group {fits[0]['nodegroupName']} already has the desired machine", {}
        changed = False
        if fits:
            new = fits[0]
            if new["status"] in ("CREATE_FAILED", "DEGRADED"):
                raise PermanentError(f"EKS node group {new['nodegroupName']} (replacing pool {pool}) is {new['status']}; "
                                     "delete it to try again")
            if new["status"] != "ACTIVE":
                new = self._wait_nodegroup(desired, new["nodegroupName"])
        else:
            name = self.replacement_name(pool, want)
            if any(g["nodegroupName"] == name for g in groups):  # the same machine again: back to the pool's name
                name = pool if all(g["nodegroupName"] != pool for g in groups) else f"{name}-b"
            size = p.replicas
            live = [(g.get("scalingConfig") or {}).get("desiredSize") for g in old if g.get("status") != "DELETING"]
            if p.autoscaling and live and live[0] is not None:  # keep the autoscaler's capacity
                size = min(max(int(live[0]), p.min_size), p.max_size)
            new = self._create_nodegroup(desired, pool, name=name, size=size)
            changed = True
        for g in old:  # only now: the new node group is ACTIVE
            self._delete_nodegroup(desired, g["nodegroupName"])
            changed = True
        return changed, (f"replaced EKS node group(s) {', '.join(g['nodegroupName'] for g in old)} of pool {pool} "
                         f"with {new['nodegroupName']} (create before destroy)"), {"arn": new.get("nodegroupArn"),
                                                                                   "nodegroup": new["nodegroupName"]}

    def _apply_pool_upgrade(self, desired: DesiredCluster, step: Step):
        target = str(step.params["version"])
        pool = self._group_name(desired, step.object)  # the node group's name
        ng = self._nodegroup(desired, pool)
        if ng is None:
            raise PermanentError(f"EKS node group {pool} does not exist; cannot upgrade it")
        if ng["status"] == "UPDATING":
            for u in self._in_progress(desired, nodegroupName=pool):
                if u.get("type") == "VersionUpdate" and self._param(u, "Version") == target:
                    seen = self._wait_update(desired, u, f"upgrade of EKS node group {pool} to {target}", nodegroupName=pool)
                    self._wait_nodegroup(desired, pool)
                    return True, f"waited for the running upgrade of {pool} to {target}", {"updateId": u["id"], "statuses": seen}
        ng = self._settled_nodegroup(desired, pool)
        if ng is None:
            raise PermanentError(f"EKS node group {pool} does not exist; cannot upgrade it")
        have = ng.get("version")
        if have and _minor(have) >= _minor(target):
            return False, f"EKS node group {pool} already runs {have}", {}
        u = self._call("eks", self._region(desired), "update_nodegroup_version", clusterName=desired.name,
                       nodegroupName=pool, version=target)["update"]
        seen = self._wait_update(desired, u, f"upgrade of EKS node group {pool} to {target}", nodegroupName=pool)
        self._wait_nodegroup(desired, pool)
        return True, f"upgraded EKS node group {pool} {have} -> {target}", {"updateId": u["id"], "statuses": seen}

    def _delete_nodegroup(self, desired: DesiredCluster, pool: str) -> bool:
        ng = self._nodegroup(desired, pool)
        if ng is None:
            return False
        if ng["status"] != "DELETING":
            if ng["status"] in ("CREATING", "UPDATING"):
                ng = self._settled_nodegroup(desired, pool)
                if ng is None:
                    return True
            self._call("eks", self._region(desired), "delete_nodegroup", missing_ok=True,
                       clusterName=desired.name, nodegroupName=pool)
        self._wait_nodegroup(desired, pool, None)
        return True

    def _apply_pool_delete(self, desired: DesiredCluster, step: Step):
        names = [g["nodegroupName"] for g in self._pool_nodegroups(desired).get(step.object) or []] or [step.object]
        changed = False
        for n in names:
            changed |= self._delete_nodegroup(desired, n)
        return changed, (f"deleted EKS node group(s) {', '.join(names)}" if changed
                         else f"EKS node group {step.object} is gone"), {}
