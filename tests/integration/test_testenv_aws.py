"""The test environment's AWS (moto server + EKS updates/add-ons + faults), over the wire with boto3."""
from __future__ import annotations

import time
from typing import Any

import boto3
import pytest
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from testenv import aws
from testenv.common import Config, read_pid
from testenv.faults import (aws_calls, aws_clear_faults, aws_fault, aws_faults,
                            aws_clear_endpoints, aws_map_endpoint, aws_reset,
                            aws_settings)

pytestmark = pytest.mark.timeout(300)
TRANSITION = 4.0  # seconds a fake EKS transition takes: waits below poll for the end state, never sleep a fixed time


def until(fn, timeout: float = 60, what: str = "condition"):
    """Poll fn() until it returns a truthy value; fail after a generous bound."""
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout}s (last: {v!r})")
        time.sleep(0.2)

RETRY = BotoConfig(retries={"mode": "standard", "total_max_attempts": 5})


@pytest.fixture
def env(aws_env: dict[str, Any]):
    """The shared AWS server, reset, with transitions long enough to be seen in progress on a loaded machine
    (an observed "UPDATING" right after the call must not race the transition), restored afterwards."""
    before = aws_settings(aws_env)
    aws_settings(aws_env, update_seconds=TRANSITION, addon_seconds=TRANSITION)
    yield aws_env
    aws_clear_faults(aws_env)
    aws_settings(aws_env, **before)


def client(env: dict[str, Any], service: str, config: BotoConfig = RETRY):
    return boto3.client(service, config=config, **aws.client_kwargs(env))


def make_cluster(env: dict[str, Any], name: str = "c1", version: str = "1.29") -> tuple[Any, str]:
    iam = client(env, "iam")
    role = iam.create_role(RoleName=f"{name}-role", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    eks = client(env, "eks")
    eks.create_cluster(name=name, version=version, roleArn=role,
                       resourcesVpcConfig={"subnetIds": ["subnet-1", "subnet-2"]})
    eks.create_nodegroup(clusterName=name, nodegroupName="ng1", subnets=["subnet-1"],
                         nodeRole=role, version=version,
                         scalingConfig={"minSize": 1, "maxSize": 3, "desiredSize": 2})
    return eks, role


def wait_update(eks: Any, timeout: float = 60, **kw: Any) -> list[str]:
    """Poll describe_update until it is no longer InProgress; return the statuses seen."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = eks.describe_update(**kw)["update"]["status"]
        seen.append(st)
        if st != "InProgress":
            return seen
        time.sleep(0.1)
    raise AssertionError(f"update still InProgress after {timeout}s")


def test_cluster_and_nodegroup_version_update(env):
    eks, _ = make_cluster(env)
    assert eks.describe_cluster(name="c1")["cluster"]["status"] == "ACTIVE"

    upd = eks.update_cluster_version(name="c1", version="1.30")["update"]
    assert upd["status"] == "InProgress" and upd["type"] == "VersionUpdate"
    assert {"type": "Version", "value": "1.30"} in upd["params"]
    assert eks.describe_cluster(name="c1")["cluster"]["status"] == "UPDATING"
    with pytest.raises(ClientError) as ei:  # one update at a time
        eks.update_cluster_version(name="c1", version="1.30")
    assert ei.value.response["Error"]["Code"] == "ResourceInUseException"
    seen = wait_update(eks, name="c1", updateId=upd["id"])
    assert seen[0] == "InProgress" and seen[-1] == "Successful"
    c = eks.describe_cluster(name="c1")["cluster"]
    assert (c["status"], c["version"]) == ("ACTIVE", "1.30")
    assert eks.list_updates(name="c1")["updateIds"] == [upd["id"]]

    with pytest.raises(ClientError) as ei:  # minor versions one at a time, like EKS
        eks.update_cluster_version(name="c1", version="1.32")
    assert ei.value.response["Error"]["Code"] == "InvalidRequestException"

    upd = eks.update_nodegroup_version(clusterName="c1", nodegroupName="ng1")["update"]
    assert upd["status"] == "InProgress"
    assert eks.describe_nodegroup(clusterName="c1", nodegroupName="ng1")["nodegroup"]["status"] == "UPDATING"
    seen = wait_update(eks, name="c1", updateId=upd["id"], nodegroupName="ng1")
    assert seen[-1] == "Successful"
    ng = eks.describe_nodegroup(clusterName="c1", nodegroupName="ng1")["nodegroup"]
    assert (ng["status"], ng["version"]) == ("ACTIVE", "1.30")
    assert eks.list_updates(name="c1", nodegroupName="ng1")["updateIds"] == [upd["id"]]
    with pytest.raises(ClientError) as ei:  # a node group cannot pass its cluster
        eks.update_nodegroup_version(clusterName="c1", nodegroupName="ng1", version="1.31")
    assert ei.value.response["Error"]["Code"] == "InvalidParameterException"


def test_nodegroup_scaling_passes_through_updating(env):
    eks, _ = make_cluster(env)
    upd = eks.update_nodegroup_config(clusterName="c1", nodegroupName="ng1",
                                      scalingConfig={"minSize": 1, "maxSize": 5, "desiredSize": 4})["update"]
    assert (upd["status"], upd["type"]) == ("InProgress", "ConfigUpdate")
    assert {"type": "DesiredSize", "value": "4"} in upd["params"]
    assert eks.describe_nodegroup(clusterName="c1", nodegroupName="ng1")["nodegroup"]["status"] == "UPDATING"
    assert wait_update(eks, name="c1", updateId=upd["id"], nodegroupName="ng1")[-1] == "Successful"
    ng = eks.describe_nodegroup(clusterName="c1", nodegroupName="ng1")["nodegroup"]
    assert ng["status"] == "ACTIVE"
    assert ng["scalingConfig"] == {"minSize": 1, "maxSize": 5, "desiredSize": 4}
    with pytest.raises(ClientError) as ei:
        eks.update_nodegroup_config(clusterName="c1", nodegroupName="ng1",
                                    scalingConfig={"minSize": 3, "maxSize": 5, "desiredSize": 2})
    assert ei.value.response["Error"]["Code"] == "InvalidParameterException"


def test_addons_lifecycle(env):
    eks, _ = make_cluster(env)
    a = eks.create_addon(clusterName="c1", addonName="coredns", addonVersion="v1.11.1-eksbuild.4")["addon"]
    assert a["status"] == "CREATING"
    with pytest.raises(ClientError) as ei:
        eks.create_addon(clusterName="c1", addonName="coredns")
    assert ei.value.response["Error"]["Code"] == "ResourceInUseException"
    assert eks.list_addons(clusterName="c1")["addons"] == ["coredns"]
    a = until(lambda: (x := eks.describe_addon(clusterName="c1", addonName="coredns")["addon"])["status"] == "ACTIVE" and x,
              what="coredns ACTIVE")
    assert a["addonVersion"] == "v1.11.1-eksbuild.4"

    upd = eks.update_addon(clusterName="c1", addonName="coredns", addonVersion="v1.11.3-eksbuild.1")["update"]
    assert (upd["status"], upd["type"]) == ("InProgress", "AddonUpdate")
    assert eks.describe_addon(clusterName="c1", addonName="coredns")["addon"]["status"] == "UPDATING"
    assert wait_update(eks, name="c1", updateId=upd["id"], addonName="coredns")[-1] == "Successful"
    a = eks.describe_addon(clusterName="c1", addonName="coredns")["addon"]
    assert (a["status"], a["addonVersion"]) == ("ACTIVE", "v1.11.3-eksbuild.1")

    versions = eks.describe_addon_versions(addonName="coredns")["addons"][0]["addonVersions"]
    assert "v1.11.3-eksbuild.1" in [v["addonVersion"] for v in versions]

    assert eks.delete_addon(clusterName="c1", addonName="coredns")["addon"]["status"] == "DELETING"
    until(lambda: eks.list_addons(clusterName="c1")["addons"] == [], what="coredns deleted")
    with pytest.raises(ClientError) as ei:
        eks.describe_addon(clusterName="c1", addonName="coredns")
    assert ei.value.response["Error"]["Code"] == "ResourceNotFoundException"


def test_throttling_is_survived_by_standard_retries(env):
    eks, _ = make_cluster(env)
    aws_calls(env, clear=True)
    f = aws_fault(env, service="eks", action="DescribeCluster", status=429, count=2, latency_ms=50)
    r = eks.describe_cluster(name="c1")
    assert r["cluster"]["name"] == "c1"
    assert r["ResponseMetadata"]["RetryAttempts"] == 2
    faults = aws_faults(env)
    (got,) = [x for x in faults["faults"] if x["id"] == f["id"]]
    assert (got["injected"], got["remaining"], got["matched"]) == (2, 0, 3)
    assert aws_calls(env)["eks:DescribeCluster"] == 3
    # other calls are untouched
    assert eks.list_clusters()["ResponseMetadata"]["RetryAttempts"] == 0

    # without retries the caller sees the real AWS error shape
    aws_fault(env, service="eks", action="ListClusters", status=429, count=1)
    no_retry = client(env, "eks", BotoConfig(retries={"mode": "standard", "total_max_attempts": 1}))
    with pytest.raises(ClientError) as ei:
        no_retry.list_clusters()
    assert ei.value.response["Error"]["Code"] == "ThrottlingException"
    assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 429

    # query protocol services get their own throttling codes (XML bodies)
    aws_fault(env, service="iam", action="ListRoles", status=429, count=1)
    with pytest.raises(ClientError) as ei:
        client(env, "iam", BotoConfig(retries={"mode": "standard", "total_max_attempts": 1})).list_roles()
    assert ei.value.response["Error"]["Code"] == "Throttling"


def test_5xx_faults(env):
    eks, _ = make_cluster(env)
    aws_fault(env, service="eks", action="ListClusters", status=500, count=1)
    r = eks.list_clusters()
    assert r["clusters"] == ["c1"] and r["ResponseMetadata"]["RetryAttempts"] == 1

    aws_fault(env, service="ec2", action="DescribeVpcs", status=503)  # for good
    ec2 = client(env, "ec2", BotoConfig(retries={"mode": "standard", "total_max_attempts": 2}))
    with pytest.raises(ClientError) as ei:
        ec2.describe_vpcs()
    assert ei.value.response["Error"]["Code"] == "ServiceUnavailable"
    assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert aws_faults(env)["injected"] == 1 + 2
    aws_clear_faults(env)
    assert ec2.describe_vpcs()["Vpcs"]


def test_latency_only_fault(env):
    sts = client(env, "sts")
    aws_fault(env, service="sts", action="GetCallerIdentity", status=0, latency_ms=300)
    t = time.monotonic()
    assert sts.get_caller_identity()["Account"] == "123456789012"
    assert time.monotonic() - t >= 0.3
    assert aws_faults(env)["delayed"] == 1


def test_reset_gives_a_clean_account(env):
    make_cluster(env)
    eks = client(env, "eks")
    eks.create_addon(clusterName="c1", addonName="vpc-cni")
    aws_fault(env, service="eks", action="ListClusters", status=500, rate=0.5)
    aws_reset(env)
    assert aws_faults(env)["faults"] == []
    assert eks.list_clusters()["clusters"] == []
    assert client(env, "iam").list_roles()["Roles"] == []
    make_cluster(env)  # same names again: nothing is left over
    assert eks.list_addons(clusterName="c1")["addons"] == []


def test_create_transition_and_endpoint_mapping(env):
    aws_settings(env, create_seconds=TRANSITION)
    role = client(env, "iam").create_role(RoleName="r2", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    eks = client(env, "eks")
    c = eks.create_cluster(name="c2", version="1.30", roleArn=role,
                           resourcesVpcConfig={"subnetIds": ["subnet-1"]})["cluster"]
    assert c["status"] == "CREATING"
    with pytest.raises(ClientError):  # not ACTIVE yet
        eks.create_nodegroup(clusterName="c2", nodegroupName="ng1", subnets=["subnet-1"], nodeRole=role)
    until(lambda: eks.describe_cluster(name="c2")["cluster"]["status"] == "ACTIVE", what="c2 ACTIVE")
    ng = eks.create_nodegroup(clusterName="c2", nodegroupName="ng1", subnets=["subnet-1"],
                              nodeRole=role)["nodegroup"]
    assert ng["status"] == "CREATING"
    until(lambda: eks.describe_nodegroup(clusterName="c2", nodegroupName="ng1")["nodegroup"]["status"] == "ACTIVE",
          what="ng1 ACTIVE")

    try:
        aws_map_endpoint(env, "c2", "https://127.0.1.11:6443", "Q0EtREFUQQ==")
        c = eks.describe_cluster(name="c2")["cluster"]
        assert c["endpoint"] == "https://127.0.1.11:6443"
        assert c["certificateAuthority"]["data"] == "Q0EtREFUQQ=="
    finally:
        aws_clear_endpoints(env)
    assert eks.describe_cluster(name="c2")["cluster"]["endpoint"] != "https://127.0.1.11:6443"


def test_up_is_idempotent_and_down_stops_the_server(tmp_path):
    cfg = Config(state_dir=tmp_path / "state", cache_dir=tmp_path / "cache")
    try:
        t = time.monotonic()
        sec = aws.up(cfg)
        took = time.monotonic() - t
        assert sec == aws.up(cfg)
        assert set(sec) >= {"endpoint_url", "region", "access_key_id", "secret_access_key", "control_url"}
        assert sec["endpoint_url"].startswith("http://127.0.0.1:")
        assert aws.status(cfg)["healthy"] is True
        sts = boto3.client("sts", **aws.client_kwargs(sec))
        assert sts.get_caller_identity()["Account"] == "123456789012"
        pid = read_pid("aws", cfg)
        print(f"aws up took {took:.2f}s")
    finally:
        aws.down(cfg)
    assert read_pid("aws", cfg) is None
    assert aws.status(cfg)["running"] is False
    import os
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
