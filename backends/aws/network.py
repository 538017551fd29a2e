"""EC2 networking of a cluster: the VPC and its subnets (found by recorded ID, else by Name tag + ownership)."""
from __future__ import annotations

import ipaddress
import math
from typing import Any

from models.desired import DesiredCluster
from models.errors import OwnershipConflict, PermanentError

from .common import CLUSTER_KEY, OWNER_KEY, _as_ec2, _ec2_tags, _owned


class NetworkService:
    """Mixin: VPC and subnets."""

    def _find_vpc(self, desired: DesiredCluster) -> dict[str, Any] | None:
        """Our VPC (by ID in the spec, else by Name tag plus ownership); OwnershipConflict if foreign."""
        region, vpc = self._region(desired), desired.backend.vpc
        if vpc.id:
            r = self._call("ec2", region, "describe_vpcs", missing_ok=True, VpcIds=[vpc.id])
            found = (r or {}).get("Vpcs") or []
            return found[0] if found else None
        name = f"fw-{desired.name}"
        r = self._call("ec2", region, "describe_vpcs", Filters=[{"Name": "tag:Name", "Values": [name]}])
        vpcs = sorted(r.get("Vpcs", []), key=lambda v: v["VpcId"])
        ours = [v for v in vpcs if _owned(_ec2_tags(v.get("Tags")), desired.name)]
        if not ours and vpcs:
            raise OwnershipConflict(f"VPC {vpcs[0]['VpcId']} named {name} is not marked as fleetwright's "
                                    f"(tags {OWNER_KEY}, {CLUSTER_KEY}={desired.name}); refusing to adopt it")
        return ours[0] if ours else None

    def _subnet_plan(self, desired: DesiredCluster) -> list[tuple[str, str]]:
        """[(az, cidr)] for a VPC created from ``cidr``: one subnet per AZ, carved from the VPC block."""
        region, vpc = self._region(desired), desired.backend.vpc
        zones = self._call("ec2", region, "describe_availability_zones",
                           Filters=[{"Name": "state", "Values": ["available"]}])
        names = sorted(z["ZoneName"] for z in zones.get("AvailabilityZones", [])
                       if z.get("ZoneType", "availability-zone") == "availability-zone")
        n = vpc.availability_zones
        if len(names) < n:
            raise PermanentError(f"region {region} has {len(names)} availability zones, the spec wants {n}")
        net = ipaddress.ip_network(vpc.cidr, strict=False)
        bits = max(3, math.ceil(math.log2(n)))  # room for 8 subnets, whatever n is
        new_prefix = min(net.prefixlen + bits, 28)
        blocks = list(net.subnets(new_prefix=new_prefix))
        if len(blocks) < n:
            raise PermanentError(f"VPC CIDR {vpc.cidr} is too small for {n} subnets")
        return [(names[i], str(blocks[i])) for i in range(n)]

    def _our_subnets(self, desired: DesiredCluster, vpc_id: str) -> list[dict[str, Any]]:
        r = self._call("ec2", self._region(desired), "describe_subnets",
                       Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])
        out = []
        prefix = f"fw-{desired.name}-"
        for s in r.get("Subnets", []):
            tags = _ec2_tags(s.get("Tags"))
            if not tags.get("Name", "").startswith(prefix):
                continue
            if not _owned(tags, desired.name):
                raise OwnershipConflict(f"subnet {s['SubnetId']} named {tags['Name']} is not marked as fleetwright's")
            out.append(s)
        return sorted(out, key=lambda s: s["AvailabilityZone"])

    def _network(self, desired: DesiredCluster) -> tuple[dict[str, Any] | None, list[str], bool]:
        """(vpc, subnet ids, ready)."""
        region, spec = self._region(desired), desired.backend.vpc
        vpc = self._find_vpc(desired)
        if vpc is None:
            return None, [], False
        if spec.id:
            if spec.subnet_ids:
                r = self._call("ec2", region, "describe_subnets", missing_ok=True, SubnetIds=list(spec.subnet_ids))
                subnets = (r or {}).get("Subnets", [])
                ok = len(subnets) == len(spec.subnet_ids) and all(s["VpcId"] == spec.id for s in subnets)
                return vpc, [s["SubnetId"] for s in subnets], ok
            r = self._call("ec2", region, "describe_subnets", Filters=[{"Name": "vpc-id", "Values": [spec.id]}])
            ids = sorted(s["SubnetId"] for s in r.get("Subnets", []))
            return vpc, ids, bool(ids) and vpc.get("State") == "available"
        subnets = self._our_subnets(desired, vpc["VpcId"])
        ready = (vpc.get("State") == "available" and len(subnets) >= spec.availability_zones
                 and all(s.get("State") == "available" for s in subnets))
        return vpc, [s["SubnetId"] for s in subnets], ready

    def _ensure_network(self, desired: DesiredCluster) -> tuple[list[str], bool]:
        region, spec = self._region(desired), desired.backend.vpc
        changed = False
        if spec.id:
            vpc, ids, ok = self._network(desired)
            if vpc is None or not ok:
                raise PermanentError(f"the VPC {spec.id} / subnets {list(spec.subnet_ids)} named in the spec were not found")
            return ids, False
        if not spec.cidr:
            raise PermanentError("backend.vpc needs either id (+ subnetIds) or cidr")
        vpc = self._find_vpc(desired)
        if vpc is None:
            vpc = self._call("ec2", region, "create_vpc", CidrBlock=spec.cidr, TagSpecifications=[
                {"ResourceType": "vpc", "Tags": _as_ec2(self.tags(desired, Name=f"fw-{desired.name}"))}])["Vpc"]
            changed = True
        vpc_id = vpc["VpcId"]
        if vpc.get("State") != "available":
            self._wait(f"VPC {vpc_id} available", lambda: (self._call(
                "ec2", region, "describe_vpcs", VpcIds=[vpc_id])["Vpcs"][0].get("State") == "available"))
        have = {s["AvailabilityZone"]: s for s in self._our_subnets(desired, vpc_id)}
        for az, cidr in self._subnet_plan(desired):
            if az in have:
                continue
            tags = self.tags(desired, Name=f"fw-{desired.name}-{az}", **{f"kubernetes.io/cluster/{desired.name}": "shared"})
            self._call("ec2", region, "create_subnet", VpcId=vpc_id, CidrBlock=cidr, AvailabilityZone=az,
                       TagSpecifications=[{"ResourceType": "subnet", "Tags": _as_ec2(tags)}])
            changed = True
        subnets = self._wait(f"subnets of VPC {vpc_id} available", lambda: (
            lambda s: s if s and all(x.get("State") == "available" for x in s) else None)(
                self._our_subnets(desired, vpc_id)))
        return [s["SubnetId"] for s in subnets], changed

    def _delete_network(self, desired: DesiredCluster, done: list[str], skipped: list[str]) -> None:
        """Delete our subnets, then our VPC."""
        region = self._region(desired)
        if not desired.backend.vpc.id:  # a VPC named in the spec is not ours to delete
            try:
                vpc = self._find_vpc(desired)
            except OwnershipConflict as e:
                vpc = None
                skipped.append(str(e))
            if vpc is not None:
                for s in self._our_subnets(desired, vpc["VpcId"]):
                    self._call("ec2", region, "delete_subnet", missing_ok=True, SubnetId=s["SubnetId"])
                    done.append(f"subnet {s['SubnetId']}")
                self._call("ec2", region, "delete_vpc", missing_ok=True, VpcId=vpc["VpcId"])
                done.append(f"VPC {vpc['VpcId']}")
