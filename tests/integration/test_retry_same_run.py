"""The UI's Retry on a crashed run: the SAME flow run (so the same idempotency key) runs again on a worker.

A create-cluster deployment run is killed (SIGKILL of the flow-run process the worker started) while
its EKS cluster is CREATING. The worker reports it Crashed. The test then does what the Prefect UI's
Retry button does (the run's state set to Scheduled "AwaitingRetry", forced) and the worker runs the
same flow run id again: the steps the dead attempt finished come from their cached results (no new
call), the rest completes, and the account holds one VPC, one cluster and one node group.
"""
from __future__ import annotations

import os
import signal

import boto3
import pytest

from .conftest import eks
from .workers import (assert_not_redone, crashed, deployed_worker, finished_steps, flow_run_processes,
                      retry_like_the_ui, wait_until)

pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def worker(aws_fleet, prefect_api, tmp_path_factory):
    """The product's create-cluster deployment (prefect.yaml) on a process pool, and one worker."""
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    with deployed_worker(prefect_api, ["create-cluster"], log) as proc:
        yield {"proc": proc, "log": log}


def test_retry_of_a_crashed_run_resumes_the_same_run_without_duplicates(aws_fleet, worker):
    from prefect.deployments import run_deployment

    from testenv.faults import aws_settings

    api = eks(aws_fleet["aws"])
    params = {"cluster": "fw-canary", "actor": "alice", "source": {"path": str(aws_fleet["root"])}}
    aws_settings(aws_fleet["aws"], create_seconds=8)  # the cluster stays CREATING: a window to kill in
    try:
        fr = run_deployment(name="create-cluster/create-cluster", parameters=params, timeout=0)
        # killed while its node group is CREATING: the infrastructure and control-plane steps are finished
        wait_until(lambda: "fw-canary" in api.list_clusters()["clusters"]
                   and api.list_nodegroups(clusterName="fw-canary")["nodegroups"], 600,
                   f"the run to create the node group ({worker['log'].read_text()[-2000:]})")
        pids = wait_until(lambda: flow_run_processes(fr.id), 60, "the flow run's process")
        for pid in pids:  # the flow-run process dies as an OOM kill would take it; the worker lives on
            os.kill(pid, signal.SIGKILL)
        crashed(fr.id)
        first, done_before = finished_steps(fr.id)
        assert any(n.startswith("controlPlane.create") for n in done_before), sorted(first)
        retry_like_the_ui(fr.id, worker["log"])
    finally:
        aws_settings(aws_fleet["aws"], create_seconds=0)
    assert_not_redone(fr.id, first, done_before)

    # one of everything, counted where duplicates can exist: VPCs and subnets by our tag
    assert api.list_clusters()["clusters"].count("fw-canary") == 1
    assert api.list_nodegroups(clusterName="fw-canary")["nodegroups"] == ["workers"]
    ec2 = boto3.client("ec2", endpoint_url=aws_fleet["aws"]["endpoint_url"], region_name="eu-west-1",
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    tag = [{"Name": "tag:fleetwright.io/cluster", "Values": ["fw-canary"]}]
    assert len(ec2.describe_vpcs(Filters=tag)["Vpcs"]) == 1
    vpc = ec2.describe_vpcs(Filters=tag)["Vpcs"][0]["VpcId"]
    subnets = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"]
    assert len({s["CidrBlock"] for s in subnets}) == len(subnets), [s["CidrBlock"] for s in subnets]
