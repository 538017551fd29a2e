"""Lifecycle flows against a real Prefect server, moto's EKS and real kube-apiservers.

The tests in this module build on each other in order (one fleet, one story): dry run, policy
denial, create, idempotent re-run, crash and resume, serialisation, waves, approval, drift,
upgrade, onboarding, decommission.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from kubernetes import client as k8s

from models.errors import PolicyDenied

from .conftest import eks, kube_client
from .pauses import in_thread, run_answering

ROOT = Path(__file__).resolve().parents[2]


def src(fleet):
    from tasks.definitions import DefinitionsSource

    return DefinitionsSource(path=str(fleet["root"]))


def artifacts(key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as c:
        return c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def namespaces(fleet, cluster) -> set[str]:
    api = kube_client(fleet["endpoints"][cluster])
    return {n.metadata.name for n in k8s.CoreV1Api(api).list_namespace().items}


def test_dry_run_changes_nothing(aws_fleet):
    from flows.lifecycle import create_cluster

    out = create_cluster(cluster="fw-dev", source=src(aws_fleet), dry_run=True, actor="bob")
    (c,) = out["clusters"]
    assert c["status"] == "planned" and c["steps"][0]["action"] == "infrastructure.ensure"
    assert eks(aws_fleet["aws"]).list_clusters()["clusters"] == []
    assert "monitoring" not in namespaces(aws_fleet, "fw-dev")
    assert artifacts("create-cluster-plan")


def test_policy_denial_stops_before_any_change(aws_fleet):
    from flows.lifecycle import create_cluster

    with pytest.raises(PolicyDenied) as e:
        create_cluster(cluster="fw-dev", source=src(aws_fleet), actor="carol")
    assert [(d.rule, d.object, d.field) for d in e.value.denials] == [("cluster-owner-only", "Cluster/fw-dev", "spec.owner")]
    with pytest.raises(PolicyDenied) as e:
        create_cluster(cluster="fw-dev", source=src(aws_fleet))  # nobody named: no default actor
    assert [(d.rule, d.object, d.field) for d in e.value.denials] == [("person-required", "Cluster/fw-dev", "actor")]
    with pytest.raises(PolicyDenied) as e:
        create_cluster(cluster="fw-dev", source=src(aws_fleet), actor="fleetwright-automation")
    assert [(d.rule, d.object, d.field) for d in e.value.denials] == [("automation-git-only", "Cluster/fw-dev", "actor")]
    assert eks(aws_fleet["aws"]).list_clusters()["clusters"] == []


def test_create_cluster_then_rerun_changes_nothing(aws_fleet):
    from flows.lifecycle import create_cluster

    out = create_cluster(cluster="fw-dev", source=src(aws_fleet), actor="bob")
    (c,) = out["clusters"]
    assert c["status"] == "converged", c
    actions = [d["action"] for d in c["done"]]
    assert actions[:3] == ["infrastructure.ensure", "controlPlane.create", "nodePool.create"]
    assert {"monitoring", "local-path-storage", "flux-system"} <= namespaces(aws_fleet, "fw-dev") or \
        {"monitoring"} <= namespaces(aws_fleet, "fw-dev")
    assert eks(aws_fleet["aws"]).list_nodegroups(clusterName="fw-dev")["nodegroups"] == ["workers"]
    again = create_cluster(cluster="fw-dev", source=src(aws_fleet), actor="bob")
    assert again["clusters"][0]["status"] == "in-sync" and again["clusters"][0]["done"] == []


def test_crash_and_resume_converges_without_duplicates(aws_fleet):
    """Kill the process running create_cluster mid-way (SIGKILL), re-run: one of everything."""
    from flows.lifecycle import create_cluster
    from testenv.faults import aws_settings

    aws_settings(aws_fleet["aws"], create_seconds=3)  # clusters and node groups stay CREATING for a while
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value())
    code = ("import sys; from flows.lifecycle import create_cluster; from tasks.definitions import DefinitionsSource;"
            f"create_cluster(cluster='fw-canary', actor='bob', source=DefinitionsSource(path={str(aws_fleet['root'])!r}))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = eks(aws_fleet["aws"])
    deadline = time.time() + 120
    while time.time() < deadline and "fw-canary" not in api.list_clusters()["clusters"]:
        time.sleep(0.2)
    assert "fw-canary" in api.list_clusters()["clusters"], "the flow never got as far as creating the cluster"
    os.killpg(proc.pid, signal.SIGKILL)  # the worker dies mid-create
    proc.wait(10)
    try:
        out = create_cluster(cluster="fw-canary", source=src(aws_fleet), actor="bob")
    finally:
        aws_settings(aws_fleet["aws"], create_seconds=0)
    assert out["clusters"][0]["status"] == "converged", out
    assert api.list_clusters()["clusters"].count("fw-canary") == 1
    assert api.list_nodegroups(clusterName="fw-canary")["nodegroups"] == ["workers"]
    ec2 = __import__("boto3").client("ec2", endpoint_url=aws_fleet["aws"]["endpoint_url"], region_name="eu-west-1",
                                     aws_access_key_id="testing", aws_secret_access_key="testing")
    vpcs = ec2.describe_vpcs(Filters=[{"Name": "tag:fleetwright.io/cluster", "Values": ["fw-canary"]}])["Vpcs"]
    assert len(vpcs) == 1
    cms = k8s.CoreV1Api(kube_client(aws_fleet["endpoints"]["fw-canary"])).list_namespaced_config_map("monitoring")
    assert [c.metadata.name for c in cms.items].count("prometheus-settings") == 1


def test_two_flows_on_one_cluster_are_serialised(aws_fleet):
    """A flow holding fw-dev's lock makes a second flow on fw-dev wait: its first apply starts after the release."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.lifecycle import create_cluster
    from tasks.locks import cluster_lock

    times: dict[str, datetime] = {}

    @flow(name="hold-cluster-lock")
    def hold(cluster: str, seconds: float):
        with cluster_lock(cluster):
            times["held"] = datetime.now(timezone.utc)
            time.sleep(seconds)
            times["released"] = datetime.now(timezone.utc)

    # fw-dev needs work: its node group was scaled behind fleetwright's back
    eks(aws_fleet["aws"]).update_nodegroup_config(clusterName="fw-dev", nodegroupName="workers",
                                                  scalingConfig={"minSize": 1, "maxSize": 3, "desiredSize": 3})
    holder = in_thread(hold, "fw-dev", 3.0)
    deadline = time.time() + 120
    while "held" not in times and time.time() < deadline:
        time.sleep(0.1)
    assert "held" in times, "the lock holder never got fw-dev's lock"
    state = create_cluster(cluster="fw-dev", source=src(aws_fleet), actor="bob", return_state=True)
    out = state.result()
    holder.join(60)
    (c,) = out["clusters"]
    assert c["status"] == "converged" and [d["action"] for d in c["done"]] == ["nodePool.scale"]
    # the recorded start of the second run's first apply task, against the holder's recorded release
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    applies = sorted((t for t in runs if t.name.startswith("nodePool.scale")), key=lambda t: t.start_time)
    assert applies, [t.name for t in runs]
    assert applies[0].start_time >= times["released"], \
        f"create-cluster applied at {applies[0].start_time} while another flow held fw-dev's lock (released {times['released']})"
    ng = eks(aws_fleet["aws"]).describe_nodegroup(clusterName="fw-dev", nodegroupName="workers")["nodegroup"]
    assert ng["scalingConfig"]["desiredSize"] == 1


def test_wave_halts_when_the_canary_fails(aws_fleet):
    """add-component across the fleet: the canary's API is down, so the rollout stops after it."""
    from flows.lifecycle import add_component
    from models.waves import WavePolicy
    from testenv import kube

    kube.stop_control_plane(aws_fleet["testenv_config"], aws_fleet["cp_names"]["fw-canary"])
    try:
        state = add_component(component="external-dns", selector={"tier": "flowtest"}, source=src(aws_fleet),
                              waves=WavePolicy(max_failure_ratio=0.0), actor="bob", return_state=True)
    finally:
        kube.start_control_plane(aws_fleet["testenv_config"], aws_fleet["cp_names"]["fw-canary"])
    assert state.is_failed()
    assert "add-component: 1 cluster(s) failed: fw-canary: " in str(state.message)
    (summary,) = [a for a in artifacts("add-component-summary") if a.flow_run_id == state.state_details.flow_run_id]
    assert "- **HALTED** at canary: 1 of 1 clusters failed; not started: fw-dev, fw-stage, fw-prod" in summary.data
    # nothing after the canary was touched; the ComponentSet was recorded FIRST (write-back before rollout)
    assert "external-dns" not in namespaces(aws_fleet, "fw-dev")
    recorded = list((aws_fleet["root"] / "componentsets").glob("external-dns-*.yaml"))
    assert len(recorded) == 1
    recorded[0].unlink()  # a person reverts the change; the later tests of this module start from the fleet as it was


def test_imperative_action_on_an_approval_cluster_needs_a_second_person(aws_fleet):
    """create-cluster on fw-prod (approval: required) pauses; the actor approving it themselves is refused
    and nothing is created; a second person approves, and the approver is recorded."""
    from flows.lifecycle import create_cluster

    def not_created():
        assert "fw-prod" not in eks(aws_fleet["aws"]).list_clusters()["clusters"]

    state = run_answering(create_cluster, "create-cluster", {"approver": "alice", "approve": True},
                          check_paused=not_created, cluster="fw-prod", source=src(aws_fleet), actor="alice")
    assert state.is_failed()
    assert "denied by second-person: Cluster/fw-prod: approver: alice started this and cannot approve it too" in state.message
    not_created()
    state = run_answering(create_cluster, "create-cluster", {"approver": "bob", "approve": True, "comment": "CHG-1"},
                          check_paused=not_created, cluster="fw-prod", source=src(aws_fleet), actor="alice")
    out = state.result()
    assert out["clusters"][0]["status"] == "converged", out
    assert (out["approval"]["approver"], out["approval"]["rule"], out["approval"]["comment"]) == ("bob", "approved", "CHG-1")
    assert "fw-prod" in eks(aws_fleet["aws"]).list_clusters()["clusters"]
    (md,) = [a for a in artifacts("create-cluster-approval") if "bob" in (a.data or "")]
    assert "create-cluster on fw-prod: approved by **bob** (approved); comment: CHG-1" in md.data


def test_rollout_waits_for_approval_then_proceeds(aws_fleet):
    """fw-prod needs approval: the flow pauses, a second person approves, the approver is recorded."""
    from flows.lifecycle import add_component
    from models.waves import WavePolicy

    state = run_answering(add_component, "add-component", {"approver": "bob", "approve": True, "comment": "change CHG-1234"},
                          check_paused=lambda: _absent(aws_fleet, "fw-prod", "cert-manager"),
                          component="cert-manager", selector={"env": "prod", "tier": "flowtest"}, source=src(aws_fleet),
                          waves=WavePolicy(approval_timeout_seconds=120), idempotency_key="approval-test", actor="alice")
    assert state.is_completed(), state
    result = state.result()
    (a,) = result["waves"]["approvals"]
    assert (a["wave"], a["approver"], a["approved"], a["rule"], a["comment"]) == \
        ("wave-0", "bob", True, "approved", "change CHG-1234")
    assert result["waves"]["halted"] is None
    assert "cert-manager" in namespaces(aws_fleet, "fw-prod")


def _absent(fleet, cluster, namespace):
    assert namespace not in namespaces(fleet, cluster), f"{namespace} is on {cluster} before the approval"


@pytest.mark.parametrize("answer,rule", [({"approver": "bob", "approve": False, "comment": "not today"}, "approval-rejected"),
                                         (None, "approval-timed-out")])
def test_wave_not_approved_halts_before_it(aws_fleet, answer, rule):
    """A rejected or timed-out approval: the wave is not started, its record says why, nothing is installed."""
    from flows.lifecycle import add_component
    from models.waves import WavePolicy

    state = run_answering(add_component, "add-component", answer, check_paused=lambda: _absent(aws_fleet, "fw-prod", "external-dns"),
                          component="external-dns", selector={"env": "prod", "tier": "flowtest"}, source=src(aws_fleet),
                          waves=WavePolicy(approval_timeout_seconds=6 if answer is None else 120), actor="alice")
    assert state.is_completed(), state  # halted by a person's decision, nothing failed
    record = state.result()["waves"]
    (a,) = record["approvals"]
    assert (a["wave"], a["approved"], a["rule"]) == ("wave-0", False, rule)
    assert record["halted"] == {"wave": "wave-0", "rule": rule, "reason": f"not approved: {a['reason']}",
                                "not_started": ["fw-prod"]}
    if answer is None:
        assert a["approver"] is None and a["reason"] == "no approval within 6s: nothing was done"
    else:
        assert a["approver"] == "bob" and a["reason"] == "bob did not approve wave wave-0"
    _absent(aws_fleet, "fw-prod", "external-dns")
    recorded = aws_fleet["root"] / "componentsets" / "external-dns-env-prod-tier-flowtest.yaml"
    if recorded.exists():  # recorded before the rollout (write-back first): a person reverts it
        recorded.unlink()


def test_reconcile_reports_and_corrects_drift(aws_fleet):
    from flows.lifecycle import create_cluster
    from flows.reconcile import reconcile_fleet

    assert create_cluster(cluster="fw-stage", source=src(aws_fleet), actor="bob")["clusters"][0]["status"] == "converged"
    core = k8s.CoreV1Api(kube_client(aws_fleet["endpoints"]["fw-dev"]))
    core.patch_namespaced_config_map("prometheus-settings", "monitoring", {"data": {"retention": "1h"}})
    eks(aws_fleet["aws"]).update_nodegroup_config(clusterName="fw-stage", nodegroupName="workers",
                                                  scalingConfig={"minSize": 1, "maxSize": 3, "desiredSize": 2})
    state = reconcile_fleet(source=src(aws_fleet), batch_size=2, approval_timeout_seconds=20, return_state=True)
    # report mode: a named state, not a crash; the drifted cluster in its message
    assert state.is_completed() and state.name == "Drift" and "fw-stage" in state.message, state
    assert "fw-dev" not in state.message  # corrected, not reported
    by = {c["cluster"]: c for c in state.result()["clusters"]}
    assert by["fw-dev"]["status"] == "corrected"
    assert any("retention" in d for d in by["fw-dev"]["drift"])
    assert by["fw-stage"]["status"] == "drift"
    assert [d for d in by["fw-stage"]["drift"] if d.startswith("nodePool.scale workers: ")], by["fw-stage"]["drift"]
    assert core.read_namespaced_config_map("prometheus-settings", "monitoring").data["retention"] == "3d"
    ng = eks(aws_fleet["aws"]).describe_nodegroup(clusterName="fw-stage", nodegroupName="workers")["nodegroup"]
    assert ng["scalingConfig"]["desiredSize"] == 2  # reported, not touched
    assert artifacts("reconcile-fleet-clusters")


def test_rollout_fleet_converges_the_committed_definitions(aws_fleet):
    """rollout-fleet as the automation identity: in waves, canary first; drift on fw-dev is repaired."""
    from flows.lifecycle import rollout_fleet
    from models.waves import WavePolicy

    core = k8s.CoreV1Api(kube_client(aws_fleet["endpoints"]["fw-dev"]))
    core.patch_namespaced_config_map("prometheus-settings", "monitoring", {"data": {"retention": "2h"}})
    out = rollout_fleet(selector={"tier": "flowtest", "env": "dev"}, source=src(aws_fleet), waves=WavePolicy(bake_seconds=3))
    record = out["waves"]
    assert [(w["name"], w["clusters"]) for w in record["waves"]] == [("canary", ["fw-canary"]), ("wave-1", ["fw-dev"])]
    assert record["halted"] is None and record["approvals"] == []
    canary, wave1 = record["timeline"]
    assert wave1["started"] - canary["finished"] >= 3  # baked between the waves
    by = {c["cluster"]: c for c in out["clusters"]}
    assert by["fw-dev"]["status"] == "converged"
    assert [d["action"] for d in by["fw-dev"]["done"]] == ["component.configure"]
    assert core.read_namespaced_config_map("prometheus-settings", "monitoring").data["retention"] == "3d"
    upgrade = rollout_fleet(selector={"tier": "flowtest", "env": "dev"}, source=src(aws_fleet), to_version="1.22",
                            return_state=True)  # a version by parameter is not what Git says
    assert upgrade.is_failed() and "denied by automation-git-only: Cluster/fw-canary: actor" in upgrade.message


def test_upgrade_one_minor_with_gates_and_preflight(aws_fleet):
    from flows.lifecycle import upgrade_cluster

    refused = upgrade_cluster(cluster="fw-dev", to_version="1.31", source=src(aws_fleet), actor="bob", return_state=True)
    assert refused.is_failed() and "supports Kubernetes" in str(refused.message)
    assert eks(aws_fleet["aws"]).describe_cluster(name="fw-dev")["cluster"]["version"] == "1.20"
    out = upgrade_cluster(cluster="fw-dev", to_version="1.21", source=src(aws_fleet), actor="bob")
    done = [d["action"] for d in out["clusters"][0]["done"]]
    assert done == ["controlPlane.upgrade", "nodePool.upgrade"]
    api = eks(aws_fleet["aws"])
    assert api.describe_cluster(name="fw-dev")["cluster"]["version"] == "1.21"
    assert api.describe_nodegroup(clusterName="fw-dev", nodegroupName="workers")["nodegroup"]["version"] == "1.21"


def test_onboard_team(aws_fleet):
    """bob onboards his team. fw-prod (approval: required) got the workspace from create-cluster already:
    nothing would change there, so no approval is asked (the second person is proven on create-cluster)."""
    from flows.lifecycle import onboard_team

    with pytest.raises(PolicyDenied) as e:
        onboard_team(team="payments", source=src(aws_fleet), actor="carol")
    assert [(d.rule, d.object) for d in e.value.denials] == [("own-workspace-only", "Team/payments")]
    out = onboard_team(team="payments", source=src(aws_fleet), actor="bob")
    assert {c["cluster"] for c in out["clusters"]} == {"fw-canary", "fw-dev", "fw-stage", "fw-prod"}
    assert out["approval"] is None
    api = kube_client(aws_fleet["endpoints"]["fw-stage"])
    assert {"payments", "payments-batch"} <= namespaces(aws_fleet, "fw-stage")
    assert {"payments", "payments-batch"} <= namespaces(aws_fleet, "fw-prod")
    quota = k8s.CoreV1Api(api).read_namespaced_resource_quota("team-quota", "payments")
    assert quota.spec.hard["pods"] == "100"


def test_decommission(aws_fleet):
    from flows.lifecycle import decommission_cluster

    protected = decommission_cluster(cluster="fw-prod", confirm="fw-prod", source=src(aws_fleet), actor="alice",
                                     return_state=True)
    assert protected.is_failed()
    assert "fw-prod is protected (label fleetwright.io/protected=true): remove the label in Git first" in protected.message
    with pytest.raises(PolicyDenied) as e:
        decommission_cluster(cluster="fw-stage", confirm="fw-stage", source=src(aws_fleet), actor="bob")
    assert [(d.rule, d.object) for d in e.value.denials] == [("platform-only-action", "Cluster/fw-stage")]
    with pytest.raises(PolicyDenied) as e:
        decommission_cluster(cluster="fw-stage", confirm="fw-stage", source=src(aws_fleet), actor="fleetwright-automation")
    assert [(d.rule, d.object) for d in e.value.denials] == [("automation-git-only", "Cluster/fw-stage")]
    assert "may not decommission" in e.value.denials[0].message
    assert "fw-stage" in eks(aws_fleet["aws"]).list_clusters()["clusters"]
    decommission_cluster(cluster="fw-stage", confirm="fw-stage", source=src(aws_fleet), actor="alice")
    assert "fw-stage" not in eks(aws_fleet["aws"]).list_clusters()["clusters"]
    assert "payments" not in namespaces(aws_fleet, "fw-stage")


def test_idempotency_key_skips_finished_steps(aws_fleet):
    """A step finished under a key is not run again under that key (a retried run); a new key runs it."""
    from backends.definitions import load_path
    from models.plan import Step
    from models.resolve import resolve
    from tasks.cluster import apply_step

    desired = resolve(load_path(aws_fleet["root"]), "fw-canary")
    step = Step(id="fw-canary/nodePool.scale/workers", cluster="fw-canary", action="nodePool.scale",
                target="infrastructure", object="workers", reason="test",
                params={"replicas": 1, "minSize": 1, "maxSize": 3})
    api = eks(aws_fleet["aws"])

    def scale(n):
        api.update_nodegroup_config(clusterName="fw-canary", nodegroupName="workers",
                                    scalingConfig={"minSize": 1, "maxSize": 3, "desiredSize": n})

    def size():
        return api.describe_nodegroup(clusterName="fw-canary", nodegroupName="workers")["nodegroup"]["scalingConfig"]["desiredSize"]

    key = f"idem-{time.time_ns()}"
    scale(2)
    first = apply_step(desired, step, key, return_state=True)
    assert first.is_completed() and size() == 1
    scale(3)
    again = apply_step(desired, step, key, return_state=True)
    assert again.name == "Cached" and size() == 3  # skipped as done under this key
    fresh = apply_step(desired, step, key + "-new", return_state=True)
    assert fresh.is_completed() and fresh.name != "Cached" and size() == 1


def test_force_decommission_of_a_cluster_whose_api_is_dead(aws_fleet):
    """fw-dev's Kubernetes API is dead: decommission fails in its in-cluster phase and deletes nothing;
    with force the in-cluster phase is skipped and the cluster, its node group and its VPC are gone."""
    from flows.lifecycle import decommission_cluster
    from testenv import kube

    api = eks(aws_fleet["aws"])
    ec2 = __import__("boto3").client("ec2", endpoint_url=aws_fleet["aws"]["endpoint_url"], region_name="eu-west-1",
                                     aws_access_key_id="testing", aws_secret_access_key="testing")
    tag = [{"Name": "tag:fleetwright.io/cluster", "Values": ["fw-dev"]}]
    assert "fw-dev" in api.list_clusters()["clusters"] and len(ec2.describe_vpcs(Filters=tag)["Vpcs"]) == 1
    kube.stop_control_plane(aws_fleet["testenv_config"], aws_fleet["cp_names"]["fw-dev"])
    try:
        state = decommission_cluster(cluster="fw-dev", confirm="fw-dev", source=src(aws_fleet), actor="alice",
                                     return_state=True)
        assert state.is_failed(), state
        assert "fw-dev" in api.list_clusters()["clusters"]  # nothing deleted: the infrastructure phase never began
        assert api.list_nodegroups(clusterName="fw-dev")["nodegroups"] == ["workers"]
        out = decommission_cluster(cluster="fw-dev", confirm="fw-dev", source=src(aws_fleet), actor="alice", force=True)
    finally:
        kube.start_control_plane(aws_fleet["testenv_config"], aws_fleet["cp_names"]["fw-dev"])
    (c,) = out["clusters"]
    assert c["status"] == "converged", c
    assert {"step": "in-cluster", "changed": False, "detail": "skipped (force): the API is not used"} in c["done"], c["done"]
    assert "fw-dev" not in api.list_clusters()["clusters"]
    assert ec2.describe_vpcs(Filters=tag)["Vpcs"] == []
