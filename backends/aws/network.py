"""EC2 networking of a cluster: what nodes need to join and load balancers need to find their subnets.

A VPC named in the spec (``vpc.id`` + ``subnetIds``) is the user's: it is used, never changed or
deleted. A VPC built from ``vpc.cidr`` is fleetwright's, with (per cluster ``<c>``):

* the VPC ``fw-<c>`` with ``enableDnsSupport`` and ``enableDnsHostnames`` on;
* per availability zone a private subnet ``fw-<c>-private-<az>`` (nodes; tagged
  ``kubernetes.io/role/internal-elb``) and a public one ``fw-<c>-public-<az>`` (public IPs on
  launch; tagged ``kubernetes.io/role/elb``), both tagged ``kubernetes.io/cluster/<c>=shared``;
* an internet gateway ``fw-<c>``; a public route table ``fw-<c>-public`` (0.0.0.0/0 to it);
* NAT gateways ``fw-<c>-<az>`` in the public subnets, each with its Elastic IP of the same name:
  one (``natGateways: single``, in the first zone) or one per zone (``perZone``);
* per zone a private route table ``fw-<c>-private-<az>`` (0.0.0.0/0 to the zone's NAT gateway).

Zones come from ``describe_availability_zones`` for the region (available, of type
availability-zone). Everything is found by Name tag plus ownership tags (CAPA's rule: a resource
with our name but without our tags is an ``OwnershipConflict``, never adopted) and deleted in
reverse order: NAT gateways, their Elastic IPs, the internet gateway, route tables, subnets, VPC.
"""
from __future__ import annotations

import ipaddress
import math
from typing import Any

from models.desired import DesiredCluster
from models.errors import OwnershipConflict, PermanentError

from .common import CLUSTER_KEY, OWNER_KEY, OWNER_VALUE, _as_ec2, _ec2_tags, _owned

ROLE_KEY = "fleetwright.io/subnet-role"  # public | private
ELB_ROLE = {"public": "kubernetes.io/role/elb", "private": "kubernetes.io/role/internal-elb"}
DEFAULT_ROUTE = "0.0.0.0/0"
_NAT_GONE = ("deleted", "deleting", "failed")


class NetworkService:
    """Mixin: VPC, subnets, internet and NAT gateways, Elastic IPs, route tables."""

    # -- lookups ------------------------------------------------------------------------------
    def _find_vpc(self, desired: DesiredCluster) -> dict[str, Any] | None:
        """Our VPC (by ID in the spec, else by Name tag plus ownership); OwnershipConflict if foreign."""
        region, vpc = self._region(desired), desired.backend.vpc
        if vpc.id:
            r = self._call("ec2", region, "describe_vpcs", missing_ok=True, VpcIds=[vpc.id])
            found = (r or {}).get("Vpcs") or []
            return found[0] if found else None
        name = f"fw-{desired.name}"
        listing = self._listing(desired)
        if listing is not None:  # observe_many's listing of the batch (backends/aws/listing.py)
            found = listing.vpcs_by_name.get(name, [])
        else:
            found = self._call("ec2", region, "describe_vpcs", Filters=[{"Name": "tag:Name", "Values": [name]}]).get("Vpcs", [])
        vpcs = sorted(found, key=lambda v: v["VpcId"])
        ours = [v for v in vpcs if _owned(_ec2_tags(v.get("Tags")), desired.name)]
        if not ours and vpcs:
            raise OwnershipConflict(f"VPC {vpcs[0]['VpcId']} named {name} is not marked as fleetwright's "
                                    f"(tags {OWNER_KEY}, {CLUSTER_KEY}={desired.name}); refusing to adopt it")
        return ours[0] if ours else None

    @staticmethod
    def _named(kind: str, items: list[dict[str, Any]], cluster: str, id_key: str,
               conflicts: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """Our items by Name tag (only names starting ``fw-<cluster>``); a same-named foreign one is a conflict
        (raised, or with ``conflicts`` given, recorded there and left alone)."""
        out: dict[str, dict[str, Any]] = {}
        prefix = f"fw-{cluster}"
        for it in sorted(items, key=lambda i: i.get(id_key) or ""):
            tags = _ec2_tags(it.get("Tags"))
            name = tags.get("Name", "")
            if name != prefix and not name.startswith(prefix + "-"):
                continue
            if tags.get(OWNER_KEY) == OWNER_VALUE and tags.get(CLUSTER_KEY) != cluster:
                continue  # another cluster's (a name like fw-<cluster>-staging-...)
            if not _owned(tags, cluster):
                msg = (f"{kind} {it.get(id_key)} named {name} is not marked as fleetwright's "
                       f"(tags {OWNER_KEY}, {CLUSTER_KEY}={cluster}); refusing to adopt it")
                if conflicts is None:
                    raise OwnershipConflict(msg)
                conflicts.append(msg)
                continue
            out.setdefault(name, it)
        return out

    def _zones(self, desired: DesiredCluster) -> list[str]:
        """The region's zones (available, of type availability-zone: no Local or Wavelength zones), by name."""
        region, listing = self._region(desired), self._listing(desired)
        if listing is not None:
            zones = listing.zones
        else:
            zones = self._call("ec2", region, "describe_availability_zones",
                               Filters=[{"Name": "state", "Values": ["available"]},
                                        {"Name": "zone-type", "Values": ["availability-zone"]}]).get("AvailabilityZones", [])
        return sorted(z["ZoneName"] for z in zones
                      if z.get("ZoneType", "availability-zone") == "availability-zone"
                      and z.get("State", "available") == "available"
                      and z.get("OptInStatus", "opt-in-not-required") in ("opt-in-not-required", "opted-in"))

    def _subnet_plan(self, desired: DesiredCluster) -> list[tuple[str, str, str]]:
        """[(role, az, cidr)] for a VPC built from ``cidr``: a private and a public subnet per zone.

        The block is cut into equal parts (at least 8); private subnets take the first half, public
        ones the second.
        """
        region, vpc = self._region(desired), desired.backend.vpc
        names = self._zones(desired)
        n = vpc.availability_zones
        if len(names) < n:
            raise PermanentError(f"region {region} has {len(names)} availability zones, the spec wants {n}")
        net = ipaddress.ip_network(vpc.cidr, strict=False)
        bits = max(3, math.ceil(math.log2(2 * n)))
        new_prefix = net.prefixlen + bits
        if new_prefix > 28:
            raise PermanentError(f"VPC CIDR {vpc.cidr} is too small for {2 * n} subnets (/28 at least each)")
        blocks = list(net.subnets(new_prefix=new_prefix))
        half = len(blocks) // 2
        return ([("private", names[i], str(blocks[i])) for i in range(n)]
                + [("public", names[i], str(blocks[half + i])) for i in range(n)])

    def _our_subnets(self, desired: DesiredCluster, vpc_id: str, conflicts: list[str] | None = None) -> list[dict[str, Any]]:
        listing = self._listing(desired)
        if listing is not None and listing.covers(vpc_id):
            items = listing.subnets[vpc_id]
        else:
            items = self._call("ec2", self._region(desired), "describe_subnets",
                               Filters=[{"Name": "vpc-id", "Values": [vpc_id]}]).get("Subnets", [])
        found = self._named("subnet", items, desired.name, "SubnetId", conflicts)
        return sorted(found.values(), key=lambda s: (self._role_of(s), s["AvailabilityZone"]))

    @staticmethod
    def _role_of(subnet: dict[str, Any]) -> str:
        return _ec2_tags(subnet.get("Tags")).get(ROLE_KEY, "private")

    def _nat_zones(self, desired: DesiredCluster, zones: list[str]) -> list[str]:
        return list(zones) if desired.backend.vpc.nat_gateways == "perZone" else list(zones[:1])

    def _parts(self, desired: DesiredCluster, vpc: dict[str, Any], conflicts: list[str] | None = None) -> dict[str, Any]:
        """Everything of ours in the VPC, found by Name tag + ownership (one listing per kind)."""
        region, vpc_id, c = self._region(desired), vpc["VpcId"], desired.name
        in_vpc = [{"Name": "vpc-id", "Values": [vpc_id]}]
        subnets = self._our_subnets(desired, vpc_id, conflicts)
        listing = self._listing(desired)
        if listing is not None and listing.covers(vpc_id):
            igws, nats, tables = listing.igws_by_name.get(f"fw-{c}", []), listing.nats[vpc_id], listing.tables[vpc_id]
        else:
            igws = self._call("ec2", region, "describe_internet_gateways",
                              Filters=[{"Name": "tag:Name", "Values": [f"fw-{c}"]}]).get("InternetGateways", [])
            nats = self._call("ec2", region, "describe_nat_gateways", Filter=in_vpc).get("NatGateways", [])
            tables = self._call("ec2", region, "describe_route_tables", Filters=in_vpc).get("RouteTables", [])
        nats = [n for n in nats if n.get("State") not in _NAT_GONE]
        return {"subnets": subnets,
                "igw": self._named("internet gateway", igws, c, "InternetGatewayId", conflicts).get(f"fw-{c}"),
                "nats": self._named("NAT gateway", nats, c, "NatGatewayId", conflicts),
                "tables": self._named("route table", tables, c, "RouteTableId", conflicts), "all_tables": tables}

    def _dns_on(self, desired: DesiredCluster, vpc_id: str) -> dict[str, bool]:
        region, out = self._region(desired), {}
        for attr, key in (("enableDnsSupport", "EnableDnsSupport"), ("enableDnsHostnames", "EnableDnsHostnames")):
            r = self._call("ec2", region, "describe_vpc_attribute", VpcId=vpc_id, Attribute=attr)
            out[key] = bool((r.get(key) or {}).get("Value"))
        return out

    @staticmethod
    def _default_route(table: dict[str, Any] | None) -> dict[str, Any] | None:
        if table is None:
            return None
        return next((r for r in table.get("Routes", []) if r.get("DestinationCidrBlock") == DEFAULT_ROUTE), None)

    def _missing(self, desired: DesiredCluster, vpc: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
        """What a VPC built from ``cidr`` still lacks (empty: complete), and the parts found."""
        c = desired.name
        parts = self._parts(desired, vpc)
        missing = []
        if vpc.get("State") != "available":
            missing.append(f"VPC {vpc['VpcId']} is {vpc.get('State')}")
        missing += [f"VPC attribute {k}" for k, v in self._dns_on(desired, vpc["VpcId"]).items() if not v]
        have = {(self._role_of(s), s["AvailabilityZone"]): s for s in parts["subnets"]}
        zones = []
        for role, az, _cidr in self._subnet_plan(desired):
            s = have.get((role, az))
            if role == "private":
                zones.append(az)
            if s is None or s.get("State") != "available":
                missing.append(f"{role} subnet in {az}")
        igw = parts["igw"]
        if igw is None or not any(a.get("VpcId") == vpc["VpcId"] for a in igw.get("Attachments", [])):
            missing.append("internet gateway")
        for az in self._nat_zones(desired, zones):
            nat = parts["nats"].get(f"fw-{c}-{az}")
            if nat is None or nat.get("State") != "available":
                missing.append(f"NAT gateway in {az}")
        public = parts["tables"].get(f"fw-{c}-public")
        route = self._default_route(public)
        if route is None or igw is None or route.get("GatewayId") != igw["InternetGatewayId"]:
            missing.append("public default route")
        for az in zones:
            table = parts["tables"].get(f"fw-{c}-private-{az}")
            route = self._default_route(table)
            if route is None or not route.get("NatGatewayId"):
                missing.append(f"private default route in {az}")
        assoc = {a["SubnetId"]: t.get("Tags") for t in parts["all_tables"] for a in t.get("Associations", [])
                 if a.get("SubnetId")}
        for (role, az), s in have.items():
            want = f"fw-{c}-public" if role == "public" else f"fw-{c}-private-{az}"
            if _ec2_tags(assoc.get(s["SubnetId"])).get("Name") != want:
                missing.append(f"route table association of {role} subnet in {az}")
        return missing, parts

    def _network(self, desired: DesiredCluster) -> tuple[dict[str, Any] | None, list[str], bool]:
        """(vpc, subnet ids for the EKS cluster, ready)."""
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
        missing, parts = self._missing(desired, vpc)
        return vpc, [s["SubnetId"] for s in parts["subnets"]], not missing

    def _node_subnets(self, desired: DesiredCluster) -> list[str]:
        """Where node groups go: the private subnets of our VPC, or the subnets named in the spec."""
        vpc, subnets, _ready = self._network(desired)
        if vpc is None or desired.backend.vpc.id:
            return subnets
        return [s["SubnetId"] for s in self._our_subnets(desired, vpc["VpcId"]) if self._role_of(s) == "private"]

    # -- ensure -------------------------------------------------------------------------------
    def _ensure_network(self, desired: DesiredCluster) -> tuple[list[str], bool]:
        region, spec = self._region(desired), desired.backend.vpc
        if spec.id:
            vpc, ids, ok = self._network(desired)
            if vpc is None or not ok:
                raise PermanentError(f"the VPC {spec.id} / subnets {list(spec.subnet_ids)} named in the spec were not found")
            return ids, False
        if not spec.cidr:
            raise PermanentError("backend.vpc needs either id (+ subnetIds) or cidr")
        changed = False
        c = desired.name
        vpc = self._find_vpc(desired)
        if vpc is None:
            vpc = self._call("ec2", region, "create_vpc", CidrBlock=spec.cidr, TagSpecifications=[
                {"ResourceType": "vpc", "Tags": _as_ec2(self.tags(desired, Name=f"fw-{c}"))}])["Vpc"]
            changed = True
        vpc_id = vpc["VpcId"]
        if vpc.get("State") != "available":
            self._wait(f"VPC {vpc_id} available", lambda: (self._call(
                "ec2", region, "describe_vpcs", VpcIds=[vpc_id])["Vpcs"][0].get("State") == "available"))
        for key, on in self._dns_on(desired, vpc_id).items():  # DNS support first: hostnames need it
            if not on:
                self._call("ec2", region, "modify_vpc_attribute", VpcId=vpc_id, **{key: {"Value": True}})
                changed = True

        # subnets
        have = {(self._role_of(s), s["AvailabilityZone"]): s for s in self._our_subnets(desired, vpc_id)}
        zones: list[str] = []
        for role, az, cidr in self._subnet_plan(desired):
            if role == "private":
                zones.append(az)
            if (role, az) in have:
                continue
            tags = self.tags(desired, Name=f"fw-{c}-{role}-{az}", **{
                ROLE_KEY: role, ELB_ROLE[role]: "1", f"kubernetes.io/cluster/{c}": "shared"})
            self._call("ec2", region, "create_subnet", VpcId=vpc_id, CidrBlock=cidr, AvailabilityZone=az,
                       TagSpecifications=[{"ResourceType": "subnet", "Tags": _as_ec2(tags)}])
            changed = True
        subnets = self._wait(f"subnets of VPC {vpc_id} available", lambda: (
            lambda s: s if len(s) >= 2 * len(zones) and all(x.get("State") == "available" for x in s) else None)(
                self._our_subnets(desired, vpc_id)))
        by = {(self._role_of(s), s["AvailabilityZone"]): s for s in subnets}
        for az in zones:
            pub = by[("public", az)]
            if not pub.get("MapPublicIpOnLaunch"):
                self._call("ec2", region, "modify_subnet_attribute", SubnetId=pub["SubnetId"],
                           MapPublicIpOnLaunch={"Value": True})
                changed = True

        # internet gateway
        parts = self._parts(desired, vpc)
        igw = parts["igw"]
        if igw is None:
            igw = self._call("ec2", region, "create_internet_gateway", TagSpecifications=[
                {"ResourceType": "internet-gateway", "Tags": _as_ec2(self.tags(desired, Name=f"fw-{c}"))}])["InternetGateway"]
            changed = True
        if not any(a.get("VpcId") == vpc_id for a in igw.get("Attachments", [])):
            self._call("ec2", region, "attach_internet_gateway", InternetGatewayId=igw["InternetGatewayId"], VpcId=vpc_id)
            changed = True

        # Elastic IPs and NAT gateways (in the public subnets)
        nat_ids: dict[str, str] = {}
        for az in self._nat_zones(desired, zones):
            name = f"fw-{c}-{az}"
            nat = parts["nats"].get(name)
            if nat is None:
                eip = self._ensure_eip(desired, name)
                nat = self._call("ec2", region, "create_nat_gateway", SubnetId=by[("public", az)]["SubnetId"],
                                 AllocationId=eip["AllocationId"], ConnectivityType="public", TagSpecifications=[
                                     {"ResourceType": "natgateway", "Tags": _as_ec2(self.tags(desired, Name=name))}])["NatGateway"]
                changed = True
            nat_ids[az] = nat["NatGatewayId"]
        for az, nat_id in nat_ids.items():
            self._wait(f"NAT gateway {nat_id} available", lambda n=nat_id: self._nat_state(desired, n) == "available")

        # route tables: public (to the internet gateway), one private per zone (to its NAT gateway)
        tables = parts["tables"]
        changed |= self._ensure_table(desired, vpc_id, tables, f"fw-{c}-public", {"GatewayId": igw["InternetGatewayId"]},
                                      [by[("public", az)]["SubnetId"] for az in zones], parts["all_tables"])
        for az in zones:
            nat_id = nat_ids.get(az) or nat_ids[next(iter(nat_ids))]
            changed |= self._ensure_table(desired, vpc_id, tables, f"fw-{c}-private-{az}", {"NatGatewayId": nat_id},
                                          [by[("private", az)]["SubnetId"]], parts["all_tables"])
        return [s["SubnetId"] for s in subnets], changed

    def _nat_state(self, desired: DesiredCluster, nat_id: str) -> str | None:
        r = self._call("ec2", self._region(desired), "describe_nat_gateways", missing_ok=True, NatGatewayIds=[nat_id])
        found = (r or {}).get("NatGateways") or []
        state = found[0].get("State") if found else None
        if state == "failed":
            raise PermanentError(f"NAT gateway {nat_id} failed: {found[0].get('FailureMessage') or 'no details'}")
        return state

    def _eips(self, desired: DesiredCluster, conflicts: list[str] | None = None) -> dict[str, dict[str, Any]]:
        r = self._call("ec2", self._region(desired), "describe_addresses",
                       Filters=[{"Name": "domain", "Values": ["vpc"]}])
        return self._named("Elastic IP", [a for a in r.get("Addresses", []) if a.get("AllocationId")],
                           desired.name, "AllocationId", conflicts)

    def _ensure_eip(self, desired: DesiredCluster, name: str) -> dict[str, Any]:
        eip = self._eips(desired).get(name)
        if eip is None:
            eip = self._call("ec2", self._region(desired), "allocate_address", Domain="vpc", TagSpecifications=[
                {"ResourceType": "elastic-ip", "Tags": _as_ec2(self.tags(desired, Name=name))}])
        return eip

    def _ensure_table(self, desired: DesiredCluster, vpc_id: str, tables: dict[str, dict[str, Any]], name: str,
                      target: dict[str, str], subnet_ids: list[str], all_tables: list[dict[str, Any]]) -> bool:
        region, changed = self._region(desired), False
        table = tables.get(name)
        if table is None:
            table = self._call("ec2", region, "create_route_table", VpcId=vpc_id, TagSpecifications=[
                {"ResourceType": "route-table", "Tags": _as_ec2(self.tags(desired, Name=name))}])["RouteTable"]
            tables[name] = table
            changed = True
        rt = table["RouteTableId"]
        route = self._default_route(table)
        key, value = next(iter(target.items()))
        if route is None:
            self._call("ec2", region, "create_route", RouteTableId=rt, DestinationCidrBlock=DEFAULT_ROUTE, **target)
            changed = True
        elif route.get(key) != value or route.get("State") == "blackhole":
            self._call("ec2", region, "replace_route", RouteTableId=rt, DestinationCidrBlock=DEFAULT_ROUTE, **target)
            changed = True
        current = {a["SubnetId"]: (t["RouteTableId"], a["RouteTableAssociationId"])
                   for t in all_tables for a in t.get("Associations", []) if a.get("SubnetId")}
        for sid in subnet_ids:
            have = current.get(sid)
            if have is None:
                self._call("ec2", region, "associate_route_table", RouteTableId=rt, SubnetId=sid)
                changed = True
            elif have[0] != rt:
                self._call("ec2", region, "replace_route_table_association", AssociationId=have[1], RouteTableId=rt)
                changed = True
        return changed

    # -- delete -------------------------------------------------------------------------------
    def _delete_network(self, desired: DesiredCluster, done: list[str], skipped: list[str]) -> None:
        """Delete, in reverse order: NAT gateways, their Elastic IPs, the internet gateway, route tables,
        subnets, the VPC. Only what carries our tags; a VPC named in the spec is the user's."""
        region = self._region(desired)
        if desired.backend.vpc.id:
            return
        try:
            vpc = self._find_vpc(desired)
        except OwnershipConflict as e:
            skipped.append(str(e))
            vpc = None
        if vpc is not None:
            vpc_id = vpc["VpcId"]
            parts = self._parts(desired, vpc, skipped)
            for name, nat in parts["nats"].items():
                self._call("ec2", region, "delete_nat_gateway", missing_ok=True, NatGatewayId=nat["NatGatewayId"])
                done.append(f"NAT gateway {nat['NatGatewayId']}")
            for nat in parts["nats"].values():
                self._wait(f"NAT gateway {nat['NatGatewayId']} deleted",
                           lambda n=nat["NatGatewayId"]: self._nat_state(desired, n) in (None, "deleted"))
        self._release_eips(desired, done, skipped)
        if vpc is None:
            return
        igw = parts["igw"]
        if igw is not None:
            for a in igw.get("Attachments", []):
                self._call("ec2", region, "detach_internet_gateway", missing_ok=True,
                           InternetGatewayId=igw["InternetGatewayId"], VpcId=a["VpcId"])
            self._call("ec2", region, "delete_internet_gateway", missing_ok=True, InternetGatewayId=igw["InternetGatewayId"])
            done.append(f"internet gateway {igw['InternetGatewayId']}")
        for name, table in parts["tables"].items():
            if any(a.get("Main") for a in table.get("Associations", [])):
                continue  # the VPC's main table goes with the VPC
            for a in table.get("Associations", []):
                self._call("ec2", region, "disassociate_route_table", missing_ok=True,
                           AssociationId=a["RouteTableAssociationId"])
            self._call("ec2", region, "delete_route_table", missing_ok=True, RouteTableId=table["RouteTableId"])
            done.append(f"route table {table['RouteTableId']}")
        for s in parts["subnets"]:
            self._call("ec2", region, "delete_subnet", missing_ok=True, SubnetId=s["SubnetId"])
            done.append(f"subnet {s['SubnetId']}")
        self._call("ec2", region, "delete_vpc", missing_ok=True, VpcId=vpc_id)
        done.append(f"VPC {vpc_id}")

    def _release_eips(self, desired: DesiredCluster, done: list[str], skipped: list[str]) -> None:
        """Our Elastic IPs (even those of a VPC already gone: an allocation outlives it)."""
        for name, eip in self._eips(desired, skipped).items():
            if eip.get("AssociationId"):
                self._call("ec2", self._region(desired), "disassociate_address", missing_ok=True,
                           AssociationId=eip["AssociationId"])
            self._call("ec2", self._region(desired), "release_address", missing_ok=True,
                       AllocationId=eip["AllocationId"])
            done.append(f"Elastic IP {eip['AllocationId']}")
