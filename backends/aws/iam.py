"""IAM roles of a cluster: the EKS cluster role and the node role, with AWS managed policies attached."""
from __future__ import annotations

import json
from typing import Any

from models.desired import DesiredCluster
from models.errors import OwnershipConflict

from .common import _as_ec2, _ec2_tags, _owned


class IamService:
    """Mixin: IAM roles."""

    def _role(self, desired: DesiredCluster, name: str) -> dict[str, Any] | None:
        r = self._call("iam", self._region(desired), "get_role", missing_ok=True, RoleName=name)
        if r is None:
            return None
        role = r["Role"]
        if not _owned(_ec2_tags(role.get("Tags")), desired.name):
            raise OwnershipConflict(f"IAM role {name} is not marked as fleetwright's; refusing to adopt it")
        return role

    def _attached(self, desired: DesiredCluster, name: str) -> set[str]:
        r = self._call("iam", self._region(desired), "list_attached_role_policies", RoleName=name)
        return {p["PolicyArn"] for p in r.get("AttachedPolicies", [])}

    def _role_specs(self, desired: DesiredCluster) -> list[tuple[str, str, list[str]]]:
        region = self._region(desired)
        names = self.role_names(desired)
        return [(names["cluster"], "eks.amazonaws.com", self._policy_arns(region, self.cluster_policies)),
                (names["node"], "ec2.amazonaws.com", self._policy_arns(region, self.node_policies))]

    def _roles_ready(self, desired: DesiredCluster) -> bool:
        for name, _, policies in self._role_specs(desired):
            if self._role(desired, name) is None or not set(policies) <= self._attached(desired, name):
                return False
        return True

    def _ensure_roles(self, desired: DesiredCluster) -> tuple[dict[str, str], bool]:
        region, changed, arns = self._region(desired), False, {}
        for (name, principal, policies), kind in zip(self._role_specs(desired), ("cluster", "node")):
            role = self._role(desired, name)
            if role is None:
                trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": principal},
                                                                  "Action": "sts:AssumeRole"}]}
                role = self._call("iam", region, "create_role", RoleName=name, AssumeRolePolicyDocument=json.dumps(trust),
                                  Description=f"fleetwright: EKS {kind} role of cluster {desired.name}",
                                  Tags=_as_ec2(self.tags(desired)))["Role"]
                changed = True
            for arn in sorted(set(policies) - self._attached(desired, name)):
                self._call("iam", region, "attach_role_policy", RoleName=name, PolicyArn=arn)
                changed = True
            arns[kind] = role["Arn"]
        return arns, changed

    def _delete_roles(self, desired: DesiredCluster, done: list[str], skipped: list[str]) -> None:
        """Delete our roles (policies detached, inline policies and instance profiles removed first)."""
        region = self._region(desired)
        for name in self.role_names(desired).values():
            try:
                role = self._role(desired, name)
            except OwnershipConflict as e:
                skipped.append(str(e))
                continue
            if role is None:
                continue
            for arn in sorted(self._attached(desired, name)):
                self._call("iam", region, "detach_role_policy", missing_ok=True, RoleName=name, PolicyArn=arn)
            inline = self._call("iam", region, "list_role_policies", missing_ok=True, RoleName=name) or {}
            for pol in inline.get("PolicyNames", []):
                self._call("iam", region, "delete_role_policy", missing_ok=True, RoleName=name, PolicyName=pol)
            profiles = self._call("iam", region, "list_instance_profiles_for_role", missing_ok=True, RoleName=name) or {}
            for prof in profiles.get("InstanceProfiles", []):
                self._call("iam", region, "remove_role_from_instance_profile", missing_ok=True,
                           InstanceProfileName=prof["InstanceProfileName"], RoleName=name)
            self._call("iam", region, "delete_role", missing_ok=True, RoleName=name)
            done.append(f"IAM role {name}")
