"""EKS access entries: who may use the cluster, set through the EKS API (no aws-auth ConfigMap to edit).

Clusters are created with ``accessConfig.authenticationMode`` from ``backend.access``
(``API`` or ``API_AND_CONFIG_MAP``) and without the implicit creator admin, so every entry is
fleetwright's, tagged and explicit:

* the IAM principal fleetwright runs as (from STS GetCallerIdentity; an assumed role is entered
  as its role) gets ``AmazonEKSClusterAdminPolicy``, cluster-wide;
* each Team granted the cluster: every group and member that is, or maps through
  ``backend.access.principals`` to, an IAM role or user ARN gets an entry whose Kubernetes groups
  are the Team's group (so the workspace's RoleBindings apply too) and the access policy of the
  Team's role (view -> ``AmazonEKSViewPolicy``, edit -> ``AmazonEKSEditPolicy``, admin ->
  ``AmazonEKSAdminPolicy``), scoped to the Team's namespaces.

Entries tagged as ours that nobody wants any more are deleted; an entry for a wanted principal
that is not tagged as ours is an ``OwnershipConflict``.
"""
from __future__ import annotations

from typing import Any

from models.desired import DesiredCluster
from models.errors import OwnershipConflict

from .common import _owned

ROLE_POLICIES = {"view": "AmazonEKSViewPolicy", "edit": "AmazonEKSEditPolicy", "admin": "AmazonEKSAdminPolicy"}
ADMIN_POLICY = "AmazonEKSClusterAdminPolicy"
_CALLERS: dict[tuple, str | None] = {}  # identity -> its principal (an identity's ARN does not change)


def principal_of(caller_arn: str) -> str | None:
    """The IAM principal an access entry names for a caller ARN (an STS assumed role -> its IAM role)."""
    parts = caller_arn.split(":", 5)
    if len(parts) < 6:
        return None
    partition, service, account, resource = parts[1], parts[2], parts[4], parts[5]
    if service == "sts" and resource.startswith("assumed-role/"):
        return f"arn:{partition}:iam::{account}:role/{resource.split('/')[1]}"
    if resource.startswith(("user/", "role/")):
        return f"arn:{partition}:iam::{account}:{resource}"
    return None  # root or a federated user: no access entry


class AccessService:
    """Mixin: the cluster's authentication mode and access entries."""

    def _policy(self, desired: DesiredCluster, name: str) -> str:
        return f"arn:{self._partition(self._region(desired))}:eks::aws:cluster-access-policy/{name}"

    def _caller(self, desired: DesiredCluster) -> str | None:
        """Who fleetwright runs as: asked once per process and identity (every cluster's observation needs it)."""
        from .clients import _conn_key

        t = self._region(desired)
        key = (t.credentials, t.role_arn, t.external_id) + _conn_key(self._connection(t.credentials))
        if key not in _CALLERS:
            arn = self._call("sts", t, "get_caller_identity").get("Arn") or ""
            _CALLERS[key] = principal_of(arn)
        return _CALLERS[key]

    def _wanted_access(self, desired: DesiredCluster) -> dict[str, dict[str, Any]]:
        """principal ARN -> {"groups": [...], "policies": {policy ARN: access scope}}."""
        out: dict[str, dict[str, Any]] = {}
        me = self._caller(desired)
        if me:
            out[me] = {"groups": set(), "policies": {self._policy(desired, ADMIN_POLICY): {"type": "cluster"}}}
        names = desired.backend.access.principals
        for ws in desired.workspaces:
            policy = self._policy(desired, ROLE_POLICIES.get(ws.role, "AmazonEKSViewPolicy"))
            for who in list(ws.groups) + list(ws.members):
                arn = who if who.startswith("arn:") else names.get(who)
                if not arn:
                    continue
                e = out.setdefault(arn, {"groups": set(), "policies": {}})
                if who in ws.groups:
                    e["groups"].add(who)
                if e["policies"].get(policy, {}).get("type") == "cluster":
                    continue
                scope = e["policies"].setdefault(policy, {"type": "namespace", "namespaces": []})
                scope["namespaces"] = sorted(set(scope["namespaces"]) | set(ws.namespaces))
        for e in out.values():
            e["groups"] = sorted(e["groups"])
        return out

    def _live_access(self, desired: DesiredCluster) -> dict[str, dict[str, Any]]:
        """Every access entry of the cluster: principal -> {"entry", "ours", "policies"}."""
        region, out = self._region(desired), {}
        kw: dict[str, Any] = {}
        principals: list[str] = []
        while True:
            r = self._call("eks", region, "list_access_entries", clusterName=desired.name, **kw)
            principals += r.get("accessEntries", [])
            if not r.get("nextToken"):
                break
            kw["nextToken"] = r["nextToken"]
        for p in principals:
            d = self._call("eks", region, "describe_access_entry", missing_ok=True, clusterName=desired.name,
                           principalArn=p)
            if d is None:
                continue
            e = d["accessEntry"]
            ours = _owned(e.get("tags"), desired.name)
            pols = {}
            if ours:
                r = self._call("eks", region, "list_associated_access_policies", clusterName=desired.name,
                               principalArn=p)
                pols = {a["policyArn"]: self._scope(a.get("accessScope")) for a in r.get("associatedAccessPolicies", [])}
            out[p] = {"entry": e, "ours": ours, "policies": pols}
        return out

    @staticmethod
    def _scope(s: dict[str, Any] | None) -> dict[str, Any]:
        s = s or {"type": "cluster"}
        return {"type": "cluster"} if s.get("type") == "cluster" else {"type": "namespace",
                                                                        "namespaces": sorted(s.get("namespaces") or [])}

    def _access_drift(self, desired: DesiredCluster, cluster: dict[str, Any]) -> list[str]:
        """What differs between the wanted and the live access (empty: in place)."""
        want_mode = desired.backend.access.authentication_mode
        out = []
        mode = (cluster.get("accessConfig") or {}).get("authenticationMode", "CONFIG_MAP")
        if mode != want_mode:
            out.append(f"authentication mode {mode}, wants {want_mode}")
        live = self._live_access(desired)
        for p, want in self._wanted_access(desired).items():
            have = live.get(p)
            if have is None:
                out.append(f"no access entry for {p}")
            elif have["ours"] and (sorted(have["entry"].get("kubernetesGroups") or []) != want["groups"]
                                   or have["policies"] != want["policies"]):
                out.append(f"access entry of {p} differs")
        wanted = set(self._wanted_access(desired))
        out += [f"access entry of {p} is no longer wanted" for p, h in live.items() if h["ours"] and p not in wanted]
        return out

    def _ensure_access(self, desired: DesiredCluster, cluster: dict[str, Any]) -> bool:
        region, c, changed = self._region(desired), desired.name, False
        want_mode = desired.backend.access.authentication_mode
        mode = (cluster.get("accessConfig") or {}).get("authenticationMode", "CONFIG_MAP")
        if mode != want_mode:
            u = self._call("eks", region, "update_cluster_config", name=c,
                           accessConfig={"authenticationMode": want_mode})["update"]
            self._wait_update(desired, u, f"authentication mode of EKS cluster {c} to {want_mode}")
            self._wait_cluster(desired)
            changed = True
        live = self._live_access(desired)
        wanted = self._wanted_access(desired)
        for p, want in wanted.items():
            have = live.get(p)
            if have is not None and not have["ours"]:
                raise OwnershipConflict(f"EKS access entry of {p} on cluster {c} is not marked as fleetwright's; "
                                        "refusing to change it")
            if have is None:
                self._call("eks", region, "create_access_entry", clusterName=c, principalArn=p,
                           kubernetesGroups=want["groups"], type="STANDARD", tags=self.tags(desired))
                have = {"entry": {"kubernetesGroups": want["groups"]}, "ours": True, "policies": {}}
                changed = True
            elif sorted(have["entry"].get("kubernetesGroups") or []) != want["groups"]:
                self._call("eks", region, "update_access_entry", clusterName=c, principalArn=p,
                           kubernetesGroups=want["groups"])
                changed = True
            for pol, scope in want["policies"].items():
                if have["policies"].get(pol) != scope:
                    self._call("eks", region, "associate_access_policy", clusterName=c, principalArn=p,
                               policyArn=pol, accessScope=scope)
                    changed = True
            for pol in set(have["policies"]) - set(want["policies"]):
                self._call("eks", region, "disassociate_access_policy", missing_ok=True, clusterName=c,
                           principalArn=p, policyArn=pol)
                changed = True
        for p, have in live.items():
            if have["ours"] and p not in wanted:
                self._call("eks", region, "delete_access_entry", missing_ok=True, clusterName=c, principalArn=p)
                changed = True
        return changed
