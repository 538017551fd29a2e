"""AwsBackend against the test environment's AWS (moto server + EKS updates/add-ons + faults).

Runs the example fleet's ``us-web-staging`` through plan -> apply -> observe; only steps of
target ``infrastructure`` are the AWS backend's (the rest belongs to the kube backend).
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config as BotoConfig

from backends.aws import AwsBackend, COMPONENT_KEY
from backends.base import CLUSTER_KEY, OWNER_KEY, OWNER_VALUE
from backends.connections import AwsConnection, Connections, KubeEndpoint
from backends.definitions import load_path
from models.desired import DesiredCluster, ObservedCluster
from models.errors import OwnershipConflict, PermanentError, TransientError
from models.spec import AwsAssumeRole
from models.plan import plan
from models.resolve import resolve
from testenv.faults import aws_calls, aws_clear_faults, aws_fault, aws_faults, aws_settings

pytestmark = pytest.mark.timeout(120)

FLEET = Path(__file__).resolve().parents[2] / "examples" / "fleet"
NAME = "us-web-staging"
REGION = "us-east-1"


# --------------------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def desired() -> DesiredCluster:
    return resolve(load_path(FLEET), NAME)


@pytest.fixture
def env(aws_env: dict[str, Any]):
    """The shared AWS server, reset, with short transitions (restored afterwards)."""
    before = aws_settings(aws_env)
    aws_settings(aws_env, update_seconds=0.4, addon_seconds=0.3, create_seconds=0)
    yield aws_env
    aws_clear_faults(aws_env)
    aws_settings(aws_env, **before)


def boto(env: dict[str, Any], service: str):
    return boto3.client(service, endpoint_url=env["endpoint_url"], region_name=REGION,
                        aws_access_key_id=env["access_key_id"], aws_secret_access_key=env["secret_access_key"],
                        config=BotoConfig(retries={"mode": "standard", "total_max_attempts": 5}))


def make_backend(env: dict[str, Any], **aws_kw: Any) -> AwsBackend:
    conn = Connections(aws=AwsConnection(endpoint_url=env["endpoint_url"], access_key_id=env["access_key_id"],
                                         secret_access_key=env["secret_access_key"],
                                         **{"wait_seconds": 0.1, "timeout_seconds": 30, **aws_kw}))
    return AwsBackend(conn)


@pytest.fixture
def backend(env) -> AwsBackend:
    return make_backend(env)


def infra_steps(d: DesiredCluster, observed) -> list:
    p = plan(d, observed)
    assert not p.refused, p.refused
    return [s for s in p.steps if s.target == "infrastructure"]


def converge(backend: AwsBackend, d: DesiredCluster) -> list:
    """plan(desired, observe()) and apply every infrastructure step; returns [(step, result)]."""
    done = []
    for step in infra_steps(d, backend.observe(d)):
        done.append((step, backend.apply(d, step)))
    return done


def with_component(d: DesiredCluster, name: str, **update: Any) -> DesiredCluster:
    comps = [c.model_copy(update=update) if c.name == name else c for c in d.components]
    return d.model_copy(update={"components": comps})


def with_pool(d: DesiredCluster, name: str, **update: Any) -> DesiredCluster:
    return d.model_copy(update={"node_pools": [p.model_copy(update=update) if p.name == name else p
                                               for p in d.node_pools]})


def ours(tags: dict[str, str]) -> bool:
    return tags.get(OWNER_KEY) == OWNER_VALUE and tags.get(CLUSTER_KEY) == NAME


def _tags(items: list[dict[str, str]] | None) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in items or []}


def inventory(env: dict[str, Any]) -> dict[str, Any]:
    """Everything of cluster NAME that exists, found by our tags across the list APIs (not by names)."""
    ec2, iam, eks = boto(env, "ec2"), boto(env, "iam"), boto(env, "eks")

    def mine(items: list[dict[str, Any]], key: str) -> list[str]:
        return sorted(i[key] for i in items if ours(_tags(i.get("Tags"))))

    out: dict[str, Any] = {
        "vpcs": mine(ec2.describe_vpcs()["Vpcs"], "VpcId"),
        "subnets": mine(ec2.describe_subnets()["Subnets"], "SubnetId"),
        "igws": mine(ec2.describe_internet_gateways()["InternetGateways"], "InternetGatewayId"),
        "nats": mine([n for n in ec2.describe_nat_gateways()["NatGateways"] if n["State"] != "deleted"], "NatGatewayId"),
        "route_tables": mine(ec2.describe_route_tables()["RouteTables"], "RouteTableId"),
        "eips": mine(ec2.describe_addresses()["Addresses"], "AllocationId"),
        "roles": sorted(r["RoleName"] for r in iam.list_roles()["Roles"]
                        if ours(_tags(iam.list_role_tags(RoleName=r["RoleName"])["Tags"]))),
        "clusters": eks.list_clusters()["clusters"], "nodegroups": [], "addons": []}
    if NAME in out["clusters"]:
        out["nodegroups"] = eks.list_nodegroups(clusterName=NAME)["nodegroups"]
        out["addons"] = eks.list_addons(clusterName=NAME)["addons"]
    return out


def leftovers(env: dict[str, Any]) -> dict[str, list[str]]:
    """Everything in the account beyond the default VPC's own, tagged or not (must be empty after a delete)."""
    ec2, iam, eks = boto(env, "ec2"), boto(env, "iam"), boto(env, "eks")
    default = {v["VpcId"] for v in ec2.describe_vpcs()["Vpcs"] if v.get("IsDefault")}
    out = {
        "vpcs": [v["VpcId"] for v in ec2.describe_vpcs()["Vpcs"] if v["VpcId"] not in default],
        "subnets": [x["SubnetId"] for x in ec2.describe_subnets()["Subnets"] if x["VpcId"] not in default],
        "igws": [g["InternetGatewayId"] for g in ec2.describe_internet_gateways()["InternetGateways"]
                 if not {a["VpcId"] for a in g.get("Attachments", [])} & default],
        "nats": [n["NatGatewayId"] for n in ec2.describe_nat_gateways()["NatGateways"] if n["State"] != "deleted"],
        "route_tables": [t["RouteTableId"] for t in ec2.describe_route_tables()["RouteTables"] if t["VpcId"] not in default],
        "eips": [a.get("AllocationId") or a["PublicIp"] for a in ec2.describe_addresses()["Addresses"]],
        "security_groups": [g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"]
                            if g["VpcId"] not in default and g["GroupName"] != "default"],  # default: goes with its VPC
        "enis": [n["NetworkInterfaceId"] for n in ec2.describe_network_interfaces()["NetworkInterfaces"]],
        "load_balancers": [lb["LoadBalancerArn"] for lb in boto(env, "elbv2").describe_load_balancers()["LoadBalancers"]]
        + [lb["LoadBalancerName"] for lb in boto(env, "elb").describe_load_balancers()["LoadBalancerDescriptions"]],
        "roles": [r["RoleName"] for r in iam.list_roles()["Roles"]],
        "clusters": eks.list_clusters()["clusters"],
    }
    return {k: v for k, v in out.items() if v}


# --------------------------------------------------------------------------- 1, 2: create, idempotence

def test_create_from_nothing(env, backend, desired):
    first = backend.observe(desired)
    assert not first.infrastructure and not first.exists
    done = converge(backend, desired)
    assert [s.action for s, _ in done] == ["infrastructure.ensure", "controlPlane.create", "nodePool.create",
                                           "component.install"]
    assert all(r.changed for _, r in done)
    obs = backend.observe(desired)
    assert infra_steps(desired, obs) == []
    assert obs.infrastructure and obs.exists and obs.kubernetes_version == "1.20" and obs.control_plane_replicas is None
    assert obs.endpoint and not obs.in_flight
    pool = obs.node_pools["general"]
    assert (pool.replicas, pool.min_size, pool.max_size, pool.version) == (2, 1, 20, "1.20")
    assert pool.machine == desired.node_pools[0].machine
    ebs = desired.component("aws-ebs-csi")
    assert obs.components["aws-ebs-csi"].version == ebs.version and obs.components["aws-ebs-csi"].hash == ebs.hash
    assert obs.components["aws-ebs-csi"].target == "infrastructure"
    # everything made is marked as ours
    ec2, iam, eks = boto(env, "ec2"), boto(env, "iam"), boto(env, "eks")
    inv = inventory(env)
    assert len(inv["vpcs"]) == 1 and len(inv["subnets"]) == 2 * desired.backend.vpc.availability_zones
    assert {s["AvailabilityZone"] for s in ec2.describe_subnets(SubnetIds=inv["subnets"])["Subnets"]} == {
        "us-east-1a", "us-east-1b"}
    policies = {"cluster": {"AmazonEKSClusterPolicy"},
                "node": {"AmazonEKSWorkerNodePolicy", "AmazonEKS_CNI_Policy", "AmazonEC2ContainerRegistryReadOnly"}}
    for kind, want in policies.items():
        role = iam.get_role(RoleName=f"fw-{NAME}-{kind}")["Role"]
        assert ours({t["Key"]: t["Value"] for t in role["Tags"]})
        principal = {"cluster": "eks.amazonaws.com", "node": "ec2.amazonaws.com"}[kind]
        assert role["AssumeRolePolicyDocument"]["Statement"][0]["Principal"] == {"Service": principal}
        attached = iam.list_attached_role_policies(RoleName=role["RoleName"])["AttachedPolicies"]
        assert {p["PolicyArn"] for p in attached} == {f"arn:aws:iam::aws:policy/{n}" for n in want}
    c = eks.describe_cluster(name=NAME)["cluster"]
    assert ours(c["tags"]) and c["roleArn"].endswith(f"role/fw-{NAME}-cluster")
    assert sorted(c["resourcesVpcConfig"]["subnetIds"]) == sorted(inv["subnets"])
    ng = eks.describe_nodegroup(clusterName=NAME, nodegroupName="general")["nodegroup"]
    assert ours(ng["tags"]) and ng["instanceTypes"] == ["m5.large"] and ng["nodeRole"].endswith(f"fw-{NAME}-node")
    a = eks.describe_addon(clusterName=NAME, addonName="aws-ebs-csi-driver")["addon"]
    assert ours(a["tags"]) and a["tags"][COMPONENT_KEY] == "aws-ebs-csi" and a["addonVersion"] == "v1.28.0-eksbuild.1"


def _with_vpc(d: DesiredCluster, **update: Any) -> DesiredCluster:
    backend = d.backend.model_copy(update={"vpc": d.backend.vpc.model_copy(update=update)})
    return d.model_copy(update={"backend": backend})


@pytest.mark.parametrize("nat", ["single", "perZone"])
def test_network_nodes_can_join(env, backend, desired, nat):
    """A VPC from a cidr: DNS on, public + private subnet per zone with their ELB roles, an internet gateway,
    NAT gateways with Elastic IPs (one or one per zone), route tables with default routes and associations."""
    d = _with_vpc(desired, nat_gateways=nat)
    steps = infra_steps(d, backend.observe(d))
    assert steps[0].action == "infrastructure.ensure" and backend.apply(d, steps[0]).changed
    assert backend.observe(d).infrastructure
    ec2 = boto(env, "ec2")
    inv = inventory(env)
    zones = 2
    n_nat = 1 if nat == "single" else zones
    assert [len(inv[k]) for k in ("vpcs", "subnets", "igws", "nats", "eips", "route_tables")] == [
        1, 2 * zones, 1, n_nat, n_nat, 1 + zones]
    vpc = inv["vpcs"][0]
    for attr, key in (("enableDnsSupport", "EnableDnsSupport"), ("enableDnsHostnames", "EnableDnsHostnames")):
        assert ec2.describe_vpc_attribute(VpcId=vpc, Attribute=attr)[key]["Value"] is True
    subnets = {x["SubnetId"]: x for x in ec2.describe_subnets(SubnetIds=inv["subnets"])["Subnets"]}
    roles = {}
    for sid, sub in subnets.items():
        t = _tags(sub["Tags"])
        assert t[f"kubernetes.io/cluster/{NAME}"] == "shared"
        role = "public" if t.get("kubernetes.io/role/elb") == "1" else "private"
        assert (t.get("kubernetes.io/role/internal-elb") == "1") == (role == "private")
        assert sub["MapPublicIpOnLaunch"] == (role == "public")
        roles[sid] = (role, sub["AvailabilityZone"])
    assert sorted(roles.values()) == sorted((r, z) for r in ("private", "public") for z in ("us-east-1a", "us-east-1b"))
    igw = ec2.describe_internet_gateways(InternetGatewayIds=inv["igws"])["InternetGateways"][0]
    assert [a["VpcId"] for a in igw["Attachments"]] == [vpc]
    nats = ec2.describe_nat_gateways(NatGatewayIds=inv["nats"])["NatGateways"]
    assert all(n["State"] == "available" and roles[n["SubnetId"]][0] == "public" for n in nats)
    assert {a["AllocationId"] for n in nats for a in n["NatGatewayAddresses"]} == set(inv["eips"])
    tables = ec2.describe_route_tables(RouteTableIds=inv["route_tables"])["RouteTables"]
    for t in tables:
        default = [r for r in t["Routes"] if r.get("DestinationCidrBlock") == "0.0.0.0/0"]
        assoc = [roles[a["SubnetId"]] for a in t["Associations"] if a.get("SubnetId")]
        assert len(default) == 1 and assoc
        if default[0].get("GatewayId") == igw["InternetGatewayId"]:
            assert sorted(assoc) == [("public", "us-east-1a"), ("public", "us-east-1b")]
        else:
            (role, az), = assoc
            nat_az = {n["NatGatewayId"]: roles[n["SubnetId"]][1] for n in nats}[default[0]["NatGatewayId"]]
            assert role == "private" and (nat == "single" or nat_az == az)
    # node groups go to the private subnets; the cluster gets them all
    for s in infra_steps(d, backend.observe(d)):
        backend.apply(d, s)
    ng = boto(env, "eks").describe_nodegroup(clusterName=NAME, nodegroupName="general")["nodegroup"]
    assert sorted(roles[x][0] for x in ng["subnets"]) == ["private", "private"]
    # deleted in reverse order: nothing of ours left, and nothing else either (EIPs released)
    assert backend.delete(d).changed
    assert {k: v for k, v in inventory(env).items() if v} == {}
    assert leftovers(env) == {}


def test_network_resumes_and_never_adopts(env, backend, desired):
    """A crash after AllocateAddress: the re-run finds the Elastic IP by name + tags and reuses it. A same-named
    untagged internet gateway is refused, never attached or deleted."""
    ec2 = boto(env, "ec2")
    step = infra_steps(desired, backend.observe(desired))[0]
    tags = [{"Key": "Name", "Value": f"fw-{NAME}-us-east-1a"}, {"Key": OWNER_KEY, "Value": OWNER_VALUE},
            {"Key": CLUSTER_KEY, "Value": NAME}]
    eip = ec2.allocate_address(Domain="vpc", TagSpecifications=[{"ResourceType": "elastic-ip", "Tags": tags}])
    assert backend.apply(desired, step).changed
    assert inventory(env)["eips"] == [eip["AllocationId"]]
    assert not backend.apply(desired, step).changed
    backend.delete(desired)
    assert leftovers(env) == {}
    foreign = ec2.create_internet_gateway(TagSpecifications=[{"ResourceType": "internet-gateway", "Tags": [
        {"Key": "Name", "Value": f"fw-{NAME}"}]}])["InternetGateway"]["InternetGatewayId"]
    with pytest.raises(OwnershipConflict, match=foreign):
        backend.apply(desired, step)
    backend.delete(desired)
    assert ec2.describe_internet_gateways(InternetGatewayIds=[foreign])["InternetGateways"]
    ec2.delete_internet_gateway(InternetGatewayId=foreign)


def test_second_apply_changes_nothing(env, backend, desired):
    done = converge(backend, desired)
    before = backend.observe(desired)
    calls = aws_calls(env)
    again = [backend.apply(desired, s) for s, _ in done]
    assert [r.changed for r in again] == [False] * len(done), [r.detail for r in again]
    assert backend.observe(desired) == before
    after = aws_calls(env)
    mutating = {k: after.get(k, 0) - calls.get(k, 0) for k in after
                if k.split(":")[1].startswith(("Create", "Update", "Attach", "Delete", "Tag", "Modify", "Associate",
                                                   "Allocate", "Replace", "Release", "Detach", "Disassociate"))}
    assert not any(mutating.values()), mutating
    inv = inventory(env)
    assert (len(inv["vpcs"]), len(inv["subnets"]), len(inv["roles"])) == (1, 4, 2)
    assert inv["nodegroups"] == ["general"] and inv["addons"] == ["aws-ebs-csi-driver"]
    # a fresh backend (a restarted worker) finds the same things: no local state
    assert make_backend(env).observe(desired) == before


def test_resume_after_a_crash_mid_create(env, backend, desired):
    """A worker died right after CreateCluster: the re-run waits for CREATING and finishes, no duplicate."""
    aws_settings(env, create_seconds=5.0)  # CREATING long enough to be observed on a loaded CI machine
    steps = infra_steps(desired, backend.observe(desired))
    backend.apply(desired, steps[0])  # infrastructure.ensure
    subnets = inventory(env)["subnets"]
    role = boto(env, "iam").get_role(RoleName=f"fw-{NAME}-cluster")["Role"]["Arn"]
    boto(env, "eks").create_cluster(name=NAME, version="1.20", roleArn=role, resourcesVpcConfig={"subnetIds": subnets},
                                    tags=backend.tags(desired))  # what the dead worker's create_cluster did
    obs = backend.observe(desired)
    assert obs.exists and obs.in_flight == [f"EKS cluster {NAME} CREATING"]
    rest = infra_steps(desired, obs)
    assert [s.action for s in rest] == ["nodePool.create", "component.install"]
    for s in rest:  # nodePool.create waits for the cluster to leave CREATING
        assert backend.apply(desired, s).changed
    # controlPlane.create again: the cluster is there, the crashed run never made its access entries: now it does
    assert backend.apply(desired, steps[1]).changed
    assert not backend.apply(desired, steps[1]).changed
    assert infra_steps(desired, backend.observe(desired)) == []
    inv = inventory(env)
    assert inv["clusters"] == [NAME] and inv["nodegroups"] == ["general"] and len(inv["vpcs"]) == 1


# --------------------------------------------------------------------------- 3: changes

def test_scale_upgrade_and_addon_change(env, backend, desired):
    converge(backend, desired)
    # scale: workers 2 -> 4
    scaled = with_pool(desired, "general", replicas=4)
    steps = infra_steps(scaled, backend.observe(scaled))
    assert [s.action for s in steps] == ["nodePool.scale"]
    assert backend.apply(scaled, steps[0]).changed
    assert backend.observe(scaled).node_pools["general"].replicas == 4
    assert not backend.apply(scaled, steps[0]).changed

    # Kubernetes 1.20 -> 1.21: control plane (seen UPDATING while it runs), then the node pool
    up = scaled.model_copy(update={"kubernetes_version": "1.21"})
    steps = infra_steps(up, backend.observe(up))
    assert [(s.action, s.params["version"]) for s in steps] == [("controlPlane.upgrade", "1.21"),
                                                               ("nodePool.upgrade", "1.21")]
    aws_settings(env, update_seconds=20.0)  # a window many observations wide, on a loaded machine too
    box: dict[str, Any] = {}
    t = threading.Thread(target=lambda: box.setdefault("r", backend.apply(up, steps[0])))
    watcher = make_backend(env)
    t.start()
    seen_in_flight = []
    while t.is_alive():
        o = watcher.observe(up)
        if o.in_flight:
            seen_in_flight.append((o.kubernetes_version, tuple(o.in_flight)))
        time.sleep(0.15)
    t.join()
    # the node-group upgrade below is started by hand and must still run when apply looks at it
    aws_settings(env, update_seconds=8.0)
    assert (("1.20", (f"EKS cluster {NAME} UPDATING",))) in seen_in_flight
    r = box["r"]
    assert r.changed and r.outputs["statuses"][0] == "InProgress" and r.outputs["statuses"][-1] == "Successful"
    obs = backend.observe(up)
    assert obs.kubernetes_version == "1.21" and obs.node_pools["general"].version == "1.20"
    assert infra_steps(up, obs)[0].action == "nodePool.upgrade"
    assert not backend.apply(up, steps[0]).changed  # the control plane step again: nothing to do
    # the node pool upgrade was started elsewhere (a crashed worker): wait for it, start no second one
    eks = boto(env, "eks")
    eks.update_nodegroup_version(clusterName=NAME, nodegroupName="general", version="1.21")
    r = backend.apply(up, steps[1])
    assert r.changed and "waited for the running upgrade" in r.detail
    assert len(eks.list_updates(name=NAME, nodegroupName="general")["updateIds"]) == 2  # scale + this upgrade
    obs = backend.observe(up)
    assert obs.node_pools["general"].version == "1.21" and infra_steps(up, obs) == []

    # add-on version change: aws-ebs-csi 1.28.0 -> 1.30.0
    newer = with_component(up, "aws-ebs-csi", version="1.30.0", hash="0123456789abcdef",
                           addon={"name": "aws-ebs-csi-driver", "version": "v1.30.0-eksbuild.1"})
    steps = infra_steps(newer, backend.observe(newer))
    assert [(s.action, s.object) for s in steps] == [("component.upgrade", "aws-ebs-csi")]
    res = backend.apply(newer, steps[0])
    assert res.changed and "Successful" in res.outputs["statuses"]
    obs = backend.observe(newer)
    assert obs.components["aws-ebs-csi"].version == "1.30.0" and infra_steps(newer, obs) == []
    assert boto(env, "eks").describe_addon(clusterName=NAME, addonName="aws-ebs-csi-driver")["addon"][
        "addonVersion"] == "v1.30.0-eksbuild.1"
    assert not backend.apply(newer, steps[0]).changed
    # the old desired state sees the newer add-on as a change again (observed by our tags or raw version)
    assert [s.action for s in infra_steps(up, obs)] == ["component.upgrade"]


def test_spec_tags_zones_and_instance_types(env):
    """eu-web-prod-1: eu-west-1, three zones, two instance types, 100 GiB disks, the spec's own tags everywhere."""
    prod = resolve(load_path(FLEET), "eu-web-prod-1")
    b = make_backend(env)
    converge(b, prod)
    obs = b.observe(prod)
    assert infra_steps(prod, obs) == [] and obs.node_pools["general"].replicas == 6
    assert obs.node_pools["general"].machine == {"instanceTypes": ["m5.xlarge", "m5a.xlarge"], "diskSizeGiB": 100,
                                                 "capacityType": "ON_DEMAND"}
    kw = dict(endpoint_url=env["endpoint_url"], region_name="eu-west-1", aws_access_key_id="testing",
              aws_secret_access_key="testing")
    ec2, iam, eks = boto3.client("ec2", **kw), boto3.client("iam", **kw), boto3.client("eks", **kw)
    want = {"cost-center": "payments", "data-classification": "confidential", OWNER_KEY: OWNER_VALUE,
            CLUSTER_KEY: "eu-web-prod-1"}
    f = [{"Name": f"tag:{CLUSTER_KEY}", "Values": ["eu-web-prod-1"]}]
    subnets = ec2.describe_subnets(Filters=f)["Subnets"]
    assert sorted(s["AvailabilityZone"] for s in subnets) == sorted(["eu-west-1a", "eu-west-1b", "eu-west-1c"] * 2)
    network = (ec2.describe_vpcs(Filters=f)["Vpcs"] + subnets + ec2.describe_internet_gateways(Filters=f)["InternetGateways"]
               + [n for n in ec2.describe_nat_gateways()["NatGateways"] if n["State"] == "available"]
               + ec2.describe_addresses()["Addresses"] + ec2.describe_route_tables(Filters=f)["RouteTables"])
    assert len(network) == 1 + 6 + 1 + 1 + 1 + 4
    tagsets = [{t["Key"]: t["Value"] for t in x["Tags"]} for x in network]
    tagsets += [{t["Key"]: t["Value"] for t in iam.get_role(RoleName=f"fw-eu-web-prod-1-{k}")["Role"]["Tags"]}
                for k in ("cluster", "node")]
    tagsets += [eks.describe_cluster(name="eu-web-prod-1")["cluster"]["tags"],
                eks.describe_nodegroup(clusterName="eu-web-prod-1", nodegroupName="general")["nodegroup"]["tags"],
                eks.describe_addon(clusterName="eu-web-prod-1", addonName="aws-ebs-csi-driver")["addon"]["tags"]]
    assert len(tagsets) == 19 and all(want.items() <= t.items() for t in tagsets)


# --------------------------------------------------------------------------- 3b: many clusters at once

EC2_LISTINGS = ("ec2:DescribeVpcs", "ec2:DescribeSubnets", "ec2:DescribeInternetGateways", "ec2:DescribeNatGateways",
                "ec2:DescribeRouteTables", "ec2:DescribeAvailabilityZones")


def test_observe_many_reads_ec2_in_one_listing_per_kind(env, backend, desired):
    """observe_many answers exactly what observe does for each cluster (one converged, one with a half-built VPC, one
    absent, one whose VPC name a foreign VPC holds), with one EC2 listing per kind for the whole batch."""
    ds = {n: desired.model_copy(update={"name": n}) for n in (NAME, "many-b", "many-c", "many-d")}
    converge(backend, ds[NAME])
    vpc = boto(env, "ec2").create_vpc(CidrBlock="10.90.0.0/16", TagSpecifications=[{"ResourceType": "vpc", "Tags": [
        {"Key": "Name", "Value": "fw-many-b"}, {"Key": OWNER_KEY, "Value": OWNER_VALUE},
        {"Key": CLUSTER_KEY, "Value": "many-b"}]}])["Vpc"]["VpcId"]  # ours, nothing else in it yet
    boto(env, "ec2").create_vpc(CidrBlock="10.91.0.0/16", TagSpecifications=[{"ResourceType": "vpc", "Tags": [
        {"Key": "Name", "Value": "fw-many-d"}]}])  # not ours
    one_by_one = {}
    aws_calls(env, clear=True)
    for n, d in ds.items():
        try:
            one_by_one[n] = make_backend(env).observe(d)
        except OwnershipConflict as e:
            one_by_one[n] = e
    single = aws_calls(env)
    aws_calls(env, clear=True)
    many = make_backend(env).observe_many(list(ds.values()))
    batched = aws_calls(env)
    assert set(many) == set(ds)
    for n in (NAME, "many-b", "many-c"):
        assert many[n] == one_by_one[n], n
    assert one_by_one[NAME].exists and one_by_one[NAME].infrastructure
    assert not one_by_one["many-b"].infrastructure and not one_by_one["many-c"].exists
    assert isinstance(many["many-d"], OwnershipConflict) and str(many["many-d"]) == str(one_by_one["many-d"])
    for op in EC2_LISTINGS:  # one page each here; one by one it was one call per cluster that has a VPC
        assert batched.get(op, 0) == 1, (op, batched)
    assert single["ec2:DescribeVpcs"] == 4 and single["ec2:DescribeSubnets"] == 2, single
    assert sum(batched.values()) < sum(single.values()), (batched, single)
    assert not batched.get("sts:GetCallerIdentity"), batched  # asked once per process and identity
    boto(env, "ec2").delete_vpc(VpcId=vpc)


# --------------------------------------------------------------------------- 4: delete

def test_delete_leaves_nothing(env, backend, desired):
    converge(backend, desired)
    assert inventory(env)["nodegroups"] == ["general"]
    r = backend.delete(desired)
    assert r.changed and not r.outputs["skipped"]
    assert {k: v for k, v in inventory(env).items() if v} == {}
    assert leftovers(env) == {}
    again = backend.delete(desired)
    assert not again.changed
    obs = backend.observe(desired)
    assert not obs.exists and not obs.infrastructure


def test_delete_removes_what_controllers_left_in_the_vpc(env, backend, desired):
    """Load balancers (elbv2 + classic), their target group, an ENI and security groups that controllers made
    for the cluster (its API dead: nothing deleted them in-cluster) are deleted first; then the network goes,
    with no DependencyViolation loop, and nothing is left in the account."""
    converge(backend, desired)
    ec2, elbv2, elb = boto(env, "ec2"), boto(env, "elbv2"), boto(env, "elb")
    vpc = inventory(env)["vpcs"][0]
    subnets = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"]
    public = [x["SubnetId"] for x in subnets if _tags(x["Tags"]).get("kubernetes.io/role/elb") == "1"]
    private = [x["SubnetId"] for x in subnets if _tags(x["Tags"]).get("kubernetes.io/role/internal-elb") == "1"]
    lbc = [{"Key": "elbv2.k8s.aws/cluster", "Value": NAME}, {"Key": "ingress.k8s.aws/stack", "Value": "web/shop"}]
    k8s = [{"Key": f"kubernetes.io/cluster/{NAME}", "Value": "owned"}]
    sg_lb = ec2.create_security_group(GroupName="k8s-web-shop", Description="lb", VpcId=vpc, TagSpecifications=[
        {"ResourceType": "security-group", "Tags": lbc}])["GroupId"]
    sg_nodes = ec2.create_security_group(GroupName="k8s-elb-a1b2", Description="svc", VpcId=vpc, TagSpecifications=[
        {"ResourceType": "security-group", "Tags": k8s}])["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=sg_nodes, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 80, "ToPort": 80, "UserIdGroupPairs": [{"GroupId": sg_lb}]}])
    ec2.authorize_security_group_ingress(GroupId=sg_lb, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "UserIdGroupPairs": [{"GroupId": sg_nodes}]}])
    alb = elbv2.create_load_balancer(Name="k8s-web-shop-1234", Subnets=public, SecurityGroups=[sg_lb], Tags=lbc,
                                     Scheme="internet-facing", Type="application")["LoadBalancers"][0]["LoadBalancerArn"]
    tg = elbv2.create_target_group(Name="k8s-web-shop-80", Protocol="HTTP", Port=80, VpcId=vpc, TargetType="ip",
                                   Tags=lbc)["TargetGroups"][0]["TargetGroupArn"]
    elbv2.create_listener(LoadBalancerArn=alb, Protocol="HTTP", Port=80,
                          DefaultActions=[{"Type": "forward", "TargetGroupArn": tg}])
    elb.create_load_balancer(LoadBalancerName="a1b2c3d4", Subnets=public, SecurityGroups=[sg_nodes], Tags=k8s,
                             Listeners=[{"Protocol": "TCP", "LoadBalancerPort": 80, "InstancePort": 30080}])
    eni = ec2.create_network_interface(SubnetId=private[0], Groups=[sg_nodes], TagSpecifications=[
        {"ResourceType": "network-interface", "Tags": [{"Key": "cluster.k8s.amazonaws.com/name", "Value": NAME}]}])
    # someone else's load balancer in another VPC is left alone
    other_vpc = ec2.create_vpc(CidrBlock="10.77.0.0/16")["Vpc"]["VpcId"]
    other_subnet = ec2.create_subnet(VpcId=other_vpc, CidrBlock="10.77.1.0/24", AvailabilityZone="us-east-1a")
    elb.create_load_balancer(LoadBalancerName="theirs", Subnets=[other_subnet["Subnet"]["SubnetId"]], Tags=k8s,
                             Listeners=[{"Protocol": "TCP", "LoadBalancerPort": 80, "InstancePort": 80}])
    assert len(leftovers(env)["load_balancers"]) == 3
    assert eni["NetworkInterface"]["NetworkInterfaceId"] in leftovers(env)["enis"]  # beside the NAT gateway's

    r = backend.delete(desired)
    assert r.changed and not r.outputs["skipped"]
    for what in ("load balancer k8s-web-shop-1234", "classic load balancer a1b2c3d4", "target group k8s-web-shop-80",
                 f"network interface {eni['NetworkInterface']['NetworkInterfaceId']}", f"security group {sg_lb}",
                 f"security group {sg_nodes}"):
        assert what in r.outputs["deleted"], what
    assert {k: v for k, v in inventory(env).items() if v} == {}
    left = leftovers(env)
    assert left.pop("load_balancers") == ["theirs"]
    assert left["vpcs"] == [other_vpc] and left["subnets"] == [other_subnet["Subnet"]["SubnetId"]], left
    theirs = ec2.describe_security_groups(Filters=[{"Name": "vpc-id", "Values": [other_vpc]}])["SecurityGroups"]
    assert set(left.get("security_groups", [])) <= {g["GroupId"] for g in theirs}  # moto's group for "theirs"
    elb.delete_load_balancer(LoadBalancerName="theirs")
    for g in theirs:
        if g["GroupName"] != "default":
            ec2.delete_security_group(GroupId=g["GroupId"])
    ec2.delete_subnet(SubnetId=other_subnet["Subnet"]["SubnetId"])
    ec2.delete_vpc(VpcId=other_vpc)
    assert leftovers(env) == {}


def _with_access(d: DesiredCluster, **update: Any) -> DesiredCluster:
    backend = d.backend.model_copy(update={"access": d.backend.access.model_copy(update=update)})
    return d.model_copy(update={"backend": backend})


def access_entries(env: dict[str, Any]) -> dict[str, dict[str, Any]]:
    eks = boto(env, "eks")
    out = {}
    for p in eks.list_access_entries(clusterName=NAME)["accessEntries"]:
        e = eks.describe_access_entry(clusterName=NAME, principalArn=p)["accessEntry"]
        pols = eks.list_associated_access_policies(clusterName=NAME, principalArn=p)["associatedAccessPolicies"]
        out[p] = {"groups": e["kubernetesGroups"], "ours": ours(e["tags"]),
                  "policies": {a["policyArn"].rsplit("/", 1)[1]: a["accessScope"] for a in pols}}
    return out


def test_access_entries(env, backend, desired):
    """Clusters use EKS access entries: fleetwright's own principal is cluster admin; each Team granted the
    cluster gets its groups' (and members') principals with the Team's role, scoped to its namespaces."""
    converge(backend, desired)
    eks = boto(env, "eks")
    me = "arn:aws:iam::123456789012:user/moto"  # who the test credentials are, as STS says
    c = eks.describe_cluster(name=NAME)["cluster"]
    assert c["accessConfig"]["authenticationMode"] == "API_AND_CONFIG_MAP"
    assert c["accessConfig"]["bootstrapClusterCreatorAdminPermissions"] is False
    assert access_entries(env) == {me: {"groups": [], "ours": True,
                                        "policies": {"AmazonEKSClusterAdminPolicy": {"type": "cluster"}}}}
    # the Team's group and member map to IAM principals; API only
    role, bob = "arn:aws:iam::123456789012:role/payments-devs", "arn:aws:iam::123456789012:user/bob"
    d = _with_access(desired, authentication_mode="API", principals={"payments-devs": role, "bob": bob})
    steps = infra_steps(d, backend.observe(d))
    assert [s.action for s in steps] == ["infrastructure.ensure"]
    assert backend.apply(d, steps[0]).changed
    ns = {"type": "namespace", "namespaces": ["payments", "payments-batch"]}
    assert access_entries(env) == {
        me: {"groups": [], "ours": True, "policies": {"AmazonEKSClusterAdminPolicy": {"type": "cluster"}}},
        role: {"groups": ["payments-devs"], "ours": True, "policies": {"AmazonEKSEditPolicy": ns}},
        bob: {"groups": [], "ours": True, "policies": {"AmazonEKSEditPolicy": ns}}}
    assert eks.describe_cluster(name=NAME)["cluster"]["accessConfig"]["authenticationMode"] == "API"
    assert infra_steps(d, backend.observe(d)) == [] and not backend.apply(d, steps[0]).changed
    # the team's role changes to view; bob is no longer mapped: his entry goes
    viewers = d.model_copy(update={"workspaces": [w.model_copy(update={"role": "view"}) for w in d.workspaces]})
    viewers = _with_access(viewers, principals={"payments-devs": role})
    steps = infra_steps(viewers, backend.observe(viewers))
    assert [s.action for s in steps] == ["infrastructure.ensure"] and backend.apply(viewers, steps[0]).changed
    assert access_entries(env)[role]["policies"] == {"AmazonEKSViewPolicy": ns} and bob not in access_entries(env)
    # someone else's entry for a principal we want is refused, never changed
    eks.create_access_entry(clusterName=NAME, principalArn=bob, kubernetesGroups=["ops"])
    with pytest.raises(OwnershipConflict, match="access entry"):
        backend.apply(d, steps[0])
    assert access_entries(env)[bob] == {"groups": ["ops"], "ours": False, "policies": {}}


def test_several_accounts_by_assumed_role_and_named_credentials(env, desired):
    """A cluster whose backend names a role to assume lives in that role's account; a cluster naming a
    credentials set uses those credentials. Clients are shared per (identity, region, service)."""
    other = "111111111111"
    role = f"arn:aws:iam::{other}:role/fleetwright"
    d = desired.model_copy(update={"backend": desired.backend.model_copy(update={
        "assume_role": AwsAssumeRole(role_arn=role)})})
    b = make_backend(env)
    for s in infra_steps(d, b.observe(d))[:2]:  # network + roles, then the EKS cluster (with access entries)
        b.apply(d, s)
    mine = inventory(env)  # the test credentials' own account (123456789012)
    assert mine["vpcs"] == [] and mine["roles"] == [] and mine["clusters"] == []
    sts = boto(env, "sts")
    c = sts.assume_role(RoleArn=role, RoleSessionName="check")["Credentials"]
    kw = dict(endpoint_url=env["endpoint_url"], region_name=REGION, aws_access_key_id=c["AccessKeyId"],
              aws_secret_access_key=c["SecretAccessKey"], aws_session_token=c["SessionToken"])
    assert boto3.client("sts", **kw).get_caller_identity()["Account"] == other
    theirs = boto3.client("ec2", **kw).describe_vpcs(Filters=[{"Name": f"tag:{CLUSTER_KEY}", "Values": [NAME]}])["Vpcs"]
    assert len(theirs) == 1
    eks = boto3.client("eks", **kw)
    assert eks.describe_cluster(name=NAME)["cluster"]["arn"].split(":")[4] == other
    assert eks.list_access_entries(clusterName=NAME)["accessEntries"] == [role]  # the assumed role is admin
    assert b.observe(d).exists and make_backend(env).observe(d).infrastructure
    # shared clients: another backend instance (another task) gets the same client for the same identity
    t = b._region(d)
    assert make_backend(env).client("eks", t) is b.client("eks", t)
    assert make_backend(env).client("eks", b._region(desired)) is not b.client("eks", t)
    # named credentials: a set the connections know; an unknown name is a clear permanent error
    named = desired.model_copy(update={"backend": desired.backend.model_copy(update={"credentials": "lab"})})
    with pytest.raises(PermanentError, match="no AWS credentials named 'lab'"):
        make_backend(env).observe(named)
    conn = Connections(aws=AwsConnection(endpoint_url=env["endpoint_url"], access_key_id="wrong", secret_access_key="x"),
                       aws_credentials={"lab": AwsConnection(endpoint_url=env["endpoint_url"], access_key_id="testing",
                                                             secret_access_key="testing", wait_seconds=0.1)})
    assert not AwsBackend(conn).observe(named).exists  # the lab account (the test account) has no such cluster


@pytest.mark.timeout(600)  # may start this worker's Prefect server first
def test_named_credentials_from_a_prefect_block(env, desired, prefect_api, monkeypatch, tmp_path):
    """A Cluster's ``backend.credentials: lab`` picks the AwsCredentials block ``fleetwright-aws-lab`` saved on
    the Prefect server: here the keys of another account (111111111111, by an STS role), so the cluster it sees
    is that account's. The block's secret never appears in the connections' repr."""
    from prefect_aws import AwsCredentials

    from tasks import blocks

    other = "111111111111"
    c = boto(env, "sts").assume_role(RoleArn=f"arn:aws:iam::{other}:role/lab", RoleSessionName="lab")["Credentials"]
    kw = dict(endpoint_url=env["endpoint_url"], region_name=REGION, aws_access_key_id=c["AccessKeyId"],
              aws_secret_access_key=c["SecretAccessKey"], aws_session_token=c["SessionToken"])
    role = boto3.client("iam", **kw).create_role(RoleName="lab-eks", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    boto3.client("eks", **kw).create_cluster(name=NAME, version="1.20", roleArn=role,
                                             resourcesVpcConfig={"subnetIds": ["subnet-1"]}, tags=make_backend(env).tags(desired))
    AwsCredentials(aws_access_key_id=c["AccessKeyId"], aws_secret_access_key=c["SecretAccessKey"],
                   aws_session_token=c["SessionToken"]).save("fleetwright-aws-lab", overwrite=True)
    try:
        monkeypatch.setenv("FLEETWRIGHT_USE_BLOCKS", "1")
        f = tmp_path / "connections.json"  # the default account's keys; no named sets in the file
        f.write_text(json.dumps({"aws": {"endpoint_url": env["endpoint_url"], "access_key_id": "testing",
                                         "secret_access_key": "testing", "wait_seconds": 0.1}}))
        monkeypatch.setenv("FLEETWRIGHT_CONNECTIONS", str(f))
        blocks.connections.cache_clear()
        conns = blocks.connections()
        assert set(conns.aws_credentials) >= {"lab"} and c["SecretAccessKey"] not in repr(conns)
        named = desired.model_copy(update={"backend": desired.backend.model_copy(update={"credentials": "lab"})})
        seen = AwsBackend(conns).observe(named)
        assert seen.exists and seen.kubernetes_version == "1.20"  # the other account's cluster
        assert not AwsBackend(conns).observe(desired).exists  # the default credentials: the test account has none
        with pytest.raises(PermanentError, match="no AWS credentials named 'nope'"):
            AwsBackend(conns).observe(desired.model_copy(update={"backend": desired.backend.model_copy(
                update={"credentials": "nope"})}))
    finally:
        blocks.connections.cache_clear()
        boto3.client("eks", **kw).delete_cluster(name=NAME)
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as pc:
            pc.delete_block_document(AwsCredentials.load("fleetwright-aws-lab")._block_document_id)


# --------------------------------------------------------------------------- 5: adoption refused

def test_adoption_refused(env, backend, desired):
    iam, eks, ec2 = boto(env, "iam"), boto(env, "eks"), boto(env, "ec2")
    role = iam.create_role(RoleName="someone-elses", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    eks.create_cluster(name=NAME, version="1.20", roleArn=role, resourcesVpcConfig={"subnetIds": ["subnet-1"]},
                       tags={"team": "other"})
    with pytest.raises(OwnershipConflict, match=f"EKS cluster {NAME}"):
        backend.observe(desired)
    steps = infra_steps(desired, ObservedCluster(name=NAME))
    assert backend.apply(desired, steps[0]).changed  # our own VPC and roles are fine
    for s in steps[1:]:
        with pytest.raises(OwnershipConflict):
            backend.apply(desired, s)
    r = backend.delete(desired)
    assert any(f"EKS cluster {NAME}" in s for s in r.outputs["skipped"])
    c = eks.describe_cluster(name=NAME)["cluster"]
    assert c["status"] == "ACTIVE" and c["tags"] == {"team": "other"}
    assert iam.get_role(RoleName="someone-elses")
    # a foreign VPC with our deterministic name is refused too, and never deleted
    vpc = ec2.create_vpc(CidrBlock="10.99.0.0/16", TagSpecifications=[
        {"ResourceType": "vpc", "Tags": [{"Key": "Name", "Value": f"fw-{NAME}"}]}])["Vpc"]["VpcId"]
    with pytest.raises(OwnershipConflict, match=vpc):
        backend.apply(desired, steps[0])
    backend.delete(desired)
    assert ec2.describe_vpcs(VpcIds=[vpc])["Vpcs"]


# --------------------------------------------------------------------------- 6: transient faults

def test_transient_faults_survived(env, backend, desired):
    aws_fault(env, service="eks", action="DescribeCluster", status=429, count=2)
    aws_fault(env, service="eks", action="CreateNodegroup", status=429, count=1)
    aws_fault(env, service="ec2", action="CreateVpc", status=503, count=1)
    aws_fault(env, service="iam", action="CreateRole", status=500, count=1)
    aws_fault(env, service="*", action="*", status=0, latency_ms=15)
    done = converge(backend, desired)
    assert all(r.changed for _, r in done)
    stats = aws_faults(env)
    injected = {(f["service"], f["action"]): f["injected"] for f in stats["faults"]}
    assert injected[("eks", "CreateNodegroup")] == 1 and injected[("ec2", "CreateVpc")] == 1
    assert injected[("eks", "DescribeCluster")] == 2 and injected[("iam", "CreateRole")] == 1
    assert stats["delayed"] > 10
    aws_clear_faults(env)
    inv = inventory(env)
    assert (len(inv["vpcs"]), len(inv["roles"]), inv["nodegroups"]) == (1, 2, ["general"])
    assert infra_steps(desired, backend.observe(desired)) == []
    # retries exhausted: a TransientError for the task layer to retry, never a hang
    impatient = make_backend(env, max_attempts=2)
    aws_fault(env, service="eks", action="DescribeCluster", status=503, count=50)
    with pytest.raises(TransientError, match="DescribeCluster"):
        impatient.observe(desired)
    aws_clear_faults(env)
    aws_fault(env, service="eks", action="UpdateNodegroupConfig", status=429, count=50)
    with pytest.raises(TransientError, match="ThrottlingException"):
        impatient.apply(with_pool(desired, "general", replicas=3), infra_steps(
            with_pool(desired, "general", replicas=3), impatient.observe(desired))[0])


# --------------------------------------------------------------------------- 7: drift

def test_out_of_band_scale_is_drift(env, backend, desired):
    converge(backend, desired)
    eks = boto(env, "eks")
    aws_settings(env, update_seconds=6.0)  # a window wide enough for a loaded machine
    eks.update_nodegroup_config(clusterName=NAME, nodegroupName="general",
                                scalingConfig={"minSize": 1, "maxSize": 20, "desiredSize": 5})
    obs = backend.observe(desired)
    assert obs.node_pools["general"].replicas == 5
    assert obs.in_flight == ["EKS node group general UPDATING"]
    steps = infra_steps(desired, obs)
    assert [s.action for s in steps] == ["nodePool.scale"]
    assert "is 5 (1..20), wants 2" in steps[0].reason and steps[0].params["replicas"] == 2
    # a worker that gives up waiting for the running update raises TransientError and changes nothing
    with pytest.raises(TransientError, match="timed out .* waiting for EKS node group general ACTIVE"):
        make_backend(env, timeout_seconds=0.2).apply(desired, steps[0])
    assert backend.observe(desired).node_pools["general"].replicas == 5
    r = backend.apply(desired, steps[0])  # waits for the out-of-band update, then restores
    assert r.changed
    obs = backend.observe(desired)
    assert obs.node_pools["general"].replicas == 2 and infra_steps(desired, obs) == []


def test_autoscaled_pool_keeps_the_autoscalers_size(env, backend, desired):
    """A pool with ``autoscaling``: a size changed behind fleetwright's back inside the bounds is not drift;
    outside them it is brought to the bound, not to the definition's replicas."""
    auto = with_pool(desired, "general", autoscaling=True, replicas=2, min_size=1, max_size=6)
    converge(backend, auto)
    eks = boto(env, "eks")

    def live() -> dict:
        return eks.describe_nodegroup(clusterName=NAME, nodegroupName="general")["nodegroup"]["scalingConfig"]

    def settle() -> None:  # wait for the out-of-band update to finish (the test env's transition)
        deadline = time.monotonic() + 30
        while eks.describe_nodegroup(clusterName=NAME, nodegroupName="general")["nodegroup"]["status"] != "ACTIVE":
            assert time.monotonic() < deadline, "node group never became ACTIVE"
            time.sleep(0.1)

    eks.update_nodegroup_config(clusterName=NAME, nodegroupName="general", scalingConfig={"desiredSize": 5})
    settle()
    obs = backend.observe(auto)
    assert obs.node_pools["general"].replicas == 5 and infra_steps(auto, obs) == []  # inside 1..6: the autoscaler's
    # outside the bounds (someone widened them and scaled up): bounds corrected, size to the upper bound
    eks.update_nodegroup_config(clusterName=NAME, nodegroupName="general",
                                scalingConfig={"minSize": 1, "maxSize": 12, "desiredSize": 9})
    settle()
    steps = infra_steps(auto, backend.observe(auto))
    assert [s.action for s in steps] == ["nodePool.scale"] and steps[0].params["replicas"] == 6
    assert backend.apply(auto, steps[0]).changed
    assert live() == {"minSize": 1, "maxSize": 6, "desiredSize": 6}
    # bounds narrowed in Git below the live size: the size follows the new upper bound
    narrower = with_pool(auto, "general", max_size=4, replicas=2)
    steps = infra_steps(narrower, backend.observe(narrower))
    assert [s.action for s in steps] == ["nodePool.scale"]
    assert backend.apply(narrower, steps[0]).changed
    assert live() == {"minSize": 1, "maxSize": 4, "desiredSize": 4}
    assert infra_steps(narrower, backend.observe(narrower)) == []
    # the same out-of-band size without the setting is drift back to the definition's replicas
    plain = with_pool(narrower, "general", autoscaling=False)
    steps = infra_steps(plain, backend.observe(plain))
    assert [s.params["replicas"] for s in steps] == [2]


BIGGER = {"instanceTypes": ["m5.xlarge"], "diskSizeGiB": 80, "capacityType": "ON_DEMAND"}


def pool_groups(env: dict[str, Any]) -> dict[str, str]:
    """Node groups of the cluster with their status, read through the API."""
    eks = boto(env, "eks")
    return {n: eks.describe_nodegroup(clusterName=NAME, nodegroupName=n)["nodegroup"]["status"]
            for n in eks.list_nodegroups(clusterName=NAME)["nodegroups"]}


def test_machine_change_replaces_the_node_group_create_before_destroy(env, backend, desired):
    """Instance types and disk size of an EKS managed node group are immutable: nodePool.update creates a new
    node group, waits until it is ACTIVE, and only then deletes the old one. Watched through the API while it
    runs: the pool never has zero ACTIVE node groups."""
    converge(backend, desired)
    bigger = with_pool(desired, "general", machine=BIGGER, labels={"tier": "web"}, taints=["dedicated=web:NoSchedule"])
    steps = infra_steps(bigger, backend.observe(bigger))
    assert [s.action for s in steps] == ["nodePool.update"] and "diskSizeGiB, instanceTypes" in steps[0].reason
    new_name = backend.replacement_name("general", BIGGER)
    aws_settings(env, create_seconds=6.0)  # the new node group is CREATING for a while, many polls wide
    box: dict[str, Any] = {}
    t = threading.Thread(target=lambda: box.setdefault("r", backend.apply(bigger, steps[0])))
    t.start()
    seen: list[dict[str, str]] = []
    while t.is_alive():
        groups = pool_groups(env)
        seen.append(groups)
        assert "ACTIVE" in groups.values(), f"no ACTIVE node group during the replacement: {seen}"
        time.sleep(0.1)
    t.join()
    aws_settings(env, create_seconds=0)
    assert box["r"].changed and box["r"].outputs["nodegroup"] == new_name
    assert {"general": "ACTIVE", new_name: "CREATING"} in seen  # both existed, the old one serving
    assert pool_groups(env) == {new_name: "ACTIVE"}
    obs = backend.observe(bigger)
    assert obs.node_pools["general"].machine == BIGGER and infra_steps(bigger, obs) == [] and not obs.in_flight
    ng = boto(env, "eks").describe_nodegroup(clusterName=NAME, nodegroupName=new_name)["nodegroup"]
    assert ng["labels"] == {"tier": "web"} and ng["tags"]["fleetwright.io/node-pool"] == "general"
    assert ng["taints"] == [{"key": "dedicated", "value": "web", "effect": "NO_SCHEDULE"}]
    assert not backend.apply(bigger, steps[0]).changed
    # the renamed node group is scaled and deleted as the pool's
    scaled = with_pool(bigger, "general", replicas=3)
    steps = infra_steps(scaled, backend.observe(scaled))
    assert [s.action for s in steps] == ["nodePool.scale"] and backend.apply(scaled, steps[0]).changed
    assert boto(env, "eks").describe_nodegroup(clusterName=NAME, nodegroupName=new_name)["nodegroup"][
        "scalingConfig"]["desiredSize"] == 3


def test_node_group_replacement_resumes_after_a_crash(env, backend, desired):
    """The worker dies between creating the new node group and deleting the old (here: DeleteNodegroup is
    refused). A re-run with a fresh backend finds both by their tags, creates nothing, and deletes the old."""
    converge(backend, desired)
    bigger = with_pool(desired, "general", machine=BIGGER)
    step = infra_steps(bigger, backend.observe(bigger))[0]
    aws_fault(env, service="eks", action="DeleteNodegroup", status=403, code="AccessDeniedException")
    with pytest.raises(Exception, match="DeleteNodegroup"):
        backend.apply(bigger, step)
    aws_clear_faults(env)
    new_name = backend.replacement_name("general", BIGGER)
    assert pool_groups(env) == {"general": "ACTIVE", new_name: "ACTIVE"}
    obs = make_backend(env).observe(bigger)
    assert obs.node_pools["general"].machine != BIGGER and any("replacement of pool general" in f for f in obs.in_flight)
    steps = infra_steps(bigger, obs)
    assert [s.action for s in steps] == ["nodePool.update"]
    aws_calls(env, clear=True)
    r = make_backend(env).apply(bigger, steps[0])
    assert r.changed and r.outputs["nodegroup"] == new_name
    assert aws_calls(env).get("eks:CreateNodegroup", 0) == 0 and aws_calls(env).get("eks:DeleteNodegroup") == 1
    assert pool_groups(env) == {new_name: "ACTIVE"}
    assert infra_steps(bigger, backend.observe(bigger)) == []


# --------------------------------------------------------------------------- 8: kube access

def test_kube_access(env, desired, kube_factory):
    api = kube_factory()
    conn = Connections(aws=AwsConnection(endpoint_url=env["endpoint_url"], access_key_id="testing",
                                         secret_access_key="testing"),
                       testenv_eks_endpoints={NAME: KubeEndpoint(server=api["server"], token=api["token"],
                                                                 ca_file=api["ca_file"])})
    access = AwsBackend(conn).kube_access(desired)
    assert access.server == api["server"] and api["token"] not in repr(access)
    from kubernetes import client

    cfg = client.Configuration()
    cfg.host, cfg.ssl_ca_cert = access.server, access.ca_file
    cfg.api_key = {"authorization": f"Bearer {access.token}"}
    names = {n.metadata.name for n in client.CoreV1Api(client.ApiClient(cfg)).list_namespace().items}
    assert {"default", "kube-system"} <= names


def test_kube_access_real_aws_shape(env, backend, desired):
    """Without a test mapping: endpoint and CA from DescribeCluster, an `eks get-token` style token."""
    converge(backend, desired)
    access = backend.kube_access(desired)
    c = boto(env, "eks").describe_cluster(name=NAME)["cluster"]
    assert access.server == c["endpoint"] and access.ca_data == c["certificateAuthority"]["data"]
    assert access.token.startswith("k8s-aws-v1.") and access.token not in repr(access)
    import base64
    from urllib.parse import parse_qs, urlsplit

    body = access.token[len("k8s-aws-v1."):]
    url = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()
    q = parse_qs(urlsplit(url).query)
    assert url.startswith(env["endpoint_url"]) and q["Action"] == ["GetCallerIdentity"]
    assert "x-k8s-aws-id" in q["X-Amz-SignedHeaders"][0]
