"""What controllers made in a cluster's VPC, deleted before the network itself.

The AWS Load Balancer Controller, the in-tree service controller and the VPC CNI create load
balancers (elbv2 and classic), network interfaces and security groups in the cluster's VPC.
fleetwright did not make them, but they carry the cluster's tags, and while they exist the
subnets, the internet gateway and the VPC cannot be deleted (``DependencyViolation``, forever).
Normally the in-cluster phase of a decommission deletes the Services that own them; when the API
is dead (``force``), or a controller was too slow, this deletes them by their tags:

* ``kubernetes.io/cluster/<c>`` (``owned`` or ``shared``), set by the service controller, CAPA and EKS;
* ``elbv2.k8s.aws/cluster=<c>``, set by the AWS Load Balancer Controller;
* ``cluster.k8s.amazonaws.com/name=<c>``, set by the VPC CNI on the interfaces it makes.

Only resources inside the cluster's VPC and carrying one of these tags are touched.
"""
from __future__ import annotations

from typing import Any

from models.desired import DesiredCluster

from .common import _ec2_tags


def controller_owned(tags: dict[str, str], cluster: str) -> bool:
    return (f"kubernetes.io/cluster/{cluster}" in tags or tags.get("elbv2.k8s.aws/cluster") == cluster
            or tags.get("cluster.k8s.amazonaws.com/name") == cluster)


class CleanupService:
    """Mixin: load balancers, network interfaces and security groups that controllers left in the VPC."""

    def _delete_controller_leftovers(self, desired: DesiredCluster, vpc_id: str, done: list[str]) -> None:
        self._delete_elbv2(desired, vpc_id, done)
        self._delete_classic_elbs(desired, vpc_id, done)
        self._delete_enis(desired, vpc_id, done)
        self._delete_security_groups(desired, vpc_id, done)

    def _pages(self, service: str, region: str, op: str, key: str, token: str = "Marker",
               next_key: str = "NextMarker", **kw: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            r = self._call(service, region, op, **kw) or {}
            out += r.get(key, [])
            if not r.get(next_key):
                return out
            kw[token] = r[next_key]

    def _delete_elbv2(self, desired: DesiredCluster, vpc_id: str, done: list[str]) -> None:
        region, c = self._region(desired), desired.name
        lbs = [lb for lb in self._pages("elbv2", region, "describe_load_balancers", "LoadBalancers")
               if lb.get("VpcId") == vpc_id]
        arns = [lb["LoadBalancerArn"] for lb in lbs]
        tg_arns = [tg["TargetGroupArn"] for tg in self._pages("elbv2", region, "describe_target_groups", "TargetGroups")
                   if tg.get("VpcId") == vpc_id]
        tags: dict[str, dict[str, str]] = {}
        for i in range(0, len(arns + tg_arns), 20):  # DescribeTags takes 20 ARNs at a time
            r = self._call("elbv2", region, "describe_tags", ResourceArns=(arns + tg_arns)[i:i + 20])
            tags.update({d["ResourceArn"]: _ec2_tags(d.get("Tags")) for d in r.get("TagDescriptions", [])})
        gone = []
        for arn in arns:
            if controller_owned(tags.get(arn, {}), c):
                self._call("elbv2", region, "delete_load_balancer", missing_ok=True, LoadBalancerArn=arn)
                done.append(f"load balancer {arn.rsplit('/', 2)[-2]}")
                gone.append(arn)
        if gone:
            self._wait("load balancers deleted", lambda: not any(
                self._call("elbv2", region, "describe_load_balancers", missing_ok=True, LoadBalancerArns=[a])
                for a in gone))
        for arn in tg_arns:  # after their load balancers: a target group in use cannot go
            if controller_owned(tags.get(arn, {}), c):
                self._call("elbv2", region, "delete_target_group", missing_ok=True, TargetGroupArn=arn)
                done.append(f"target group {arn.rsplit('/', 2)[-2]}")

    def _delete_classic_elbs(self, desired: DesiredCluster, vpc_id: str, done: list[str]) -> None:
        region, c = self._region(desired), desired.name
        names = [lb["LoadBalancerName"] for lb in self._pages("elb", region, "describe_load_balancers",
                                                               "LoadBalancerDescriptions")
                 if lb.get("VPCId") == vpc_id]
        for i in range(0, len(names), 20):
            r = self._call("elb", region, "describe_tags", LoadBalancerNames=names[i:i + 20])
            for d in r.get("TagDescriptions", []):
                if controller_owned(_ec2_tags(d.get("Tags")), c):
                    self._call("elb", region, "delete_load_balancer", missing_ok=True,
                               LoadBalancerName=d["LoadBalancerName"])
                    done.append(f"classic load balancer {d['LoadBalancerName']}")

    def _delete_enis(self, desired: DesiredCluster, vpc_id: str, done: list[str]) -> None:
        region, c = self._region(desired), desired.name
        enis = self._pages("ec2", region, "describe_network_interfaces", "NetworkInterfaces", token="NextToken",
                           next_key="NextToken", Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])
        for eni in enis:
            if not controller_owned(_ec2_tags(eni.get("TagSet") or eni.get("Tags")), c):
                continue
            att = eni.get("Attachment") or {}
            if att.get("AttachmentId") and eni.get("Status") == "in-use":
                self._call("ec2", region, "detach_network_interface", missing_ok=True,
                           AttachmentId=att["AttachmentId"], Force=True)
            self._call("ec2", region, "delete_network_interface", missing_ok=True,
                       NetworkInterfaceId=eni["NetworkInterfaceId"])
            done.append(f"network interface {eni['NetworkInterfaceId']}")

    def _delete_security_groups(self, desired: DesiredCluster, vpc_id: str, done: list[str]) -> None:
        """Rules that reference the groups first (groups may reference each other), then the groups."""
        region, c = self._region(desired), desired.name
        groups = [g for g in self._pages("ec2", region, "describe_security_groups", "SecurityGroups",
                                         token="NextToken", next_key="NextToken",
                                         Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])
                  if g.get("GroupName") != "default" and controller_owned(_ec2_tags(g.get("Tags")), c)]
        for g in groups:
            if g.get("IpPermissions"):
                self._call("ec2", region, "revoke_security_group_ingress", missing_ok=True,
                           GroupId=g["GroupId"], IpPermissions=g["IpPermissions"])
            if g.get("IpPermissionsEgress"):
                self._call("ec2", region, "revoke_security_group_egress", missing_ok=True,
                           GroupId=g["GroupId"], IpPermissions=g["IpPermissionsEgress"])
        for g in groups:
            self._call("ec2", region, "delete_security_group", missing_ok=True, GroupId=g["GroupId"])
            done.append(f"security group {g['GroupId']}")
