"""Maintenance windows in the flows, against a real Prefect server (with a process worker), moto's EKS and
real kube-apiservers, with the flows' controllable clock (the ``now`` parameter).

One fleet, four clusters in four zones, all looked at as at 2026-07-01 08:00 UTC (a Wednesday):

- fw-canary, Europe/Berlin, daily 09:00 for 4h: open (10:00 local, 3h left)          -> upgraded
- fw-dev, America/New_York, daily 06:00 for 4h: closed (04:00 local), opens 10:00 UTC -> deferred, follow-up run
- fw-stage, Australia/Sydney, daily 16:30 for 2h: open, 30 min left (18:00 local), but a
  control-plane upgrade is estimated at 45m                                           -> deferred (would overrun)
- fw-prod, Europe/London, daily 08:00 for 4h, inside the 'Summer sale' blackout      -> deferred; crosses it only
  with a security override approved by a second person

The rollout goes through the product's deployment and a real process worker; its follow-up run (scheduled at
New York's opening) is then moved to now and run by the worker: it converges fw-dev and defers the rest again.
The tests share the fleet. Each one that needs clusters at 1.20 asks for them (``at_120``): a cluster an earlier
test upgraded is decommissioned and created again, so the tests pass in any order (in file order that costs nothing).
"""
from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from kubernetes import client as k8s

from models.errors import PolicyDenied

from .conftest import eks, kube_client
from .test_flows import in_thread, src
from .workers import deployed_worker

ROOT = Path(__file__).resolve().parents[2]
T = "2026-07-01T08:00:00+00:00"

CLUSTERS = """apiVersion: fleetwright.io/v1alpha1
kind: Cluster
metadata:
  name: fw-canary
  labels: {tier: windowtest, env: dev, zone: berlin}
spec:
  model: edge-small@1.0.0
  driftMode: correct
  owner: payments
  variables: {environment: dev}
  backend: {type: aws, region: eu-west-1, vpc: {cidr: 10.71.0.0/16}}
  maintenance:
    timezone: Europe/Berlin
    windows: [{rrule: FREQ=DAILY, start: "09:00", duration: 4h}]
---
apiVersion: fleetwright.io/v1alpha1
kind: Cluster
metadata:
  name: fw-dev
  labels: {tier: windowtest, env: dev, zone: newyork}
spec:
  model: edge-small@1.0.0
  driftMode: correct
  owner: payments
  variables: {environment: dev}
  backend: {type: aws, region: eu-west-1, vpc: {cidr: 10.72.0.0/16}}
  maintenance:
    timezone: America/New_York
    windows: [{rrule: FREQ=DAILY, start: "06:00", duration: 4h}]
---
apiVersion: fleetwright.io/v1alpha1
kind: Cluster
metadata:
  name: fw-stage
  labels: {tier: windowtest, env: staging, zone: sydney}
spec:
  model: edge-small@1.0.0
  driftMode: correct
  owner: payments
  variables: {environment: staging}
  backend: {type: aws, region: eu-west-1, vpc: {cidr: 10.73.0.0/16}}
  maintenance:
    timezone: Australia/Sydney
    windows: [{rrule: FREQ=DAILY, start: "16:30", duration: 2h}]
---
apiVersion: fleetwright.io/v1alpha1
kind: Cluster
metadata:
  name: fw-prod
  labels: {tier: windowtest, env: prod, zone: london}
spec:
  model: edge-small@1.0.0
  driftMode: correct
  owner: payments
  variables: {environment: prod}
  backend: {type: aws, region: eu-west-1, vpc: {cidr: 10.74.0.0/16}}
  maintenance:
    timezone: Europe/London
    windows: [{rrule: FREQ=DAILY, start: "08:00", duration: 4h}]
    blackouts: [{name: Summer sale, from: "2026-06-28T00:00", to: "2026-07-05T00:00", reason: peak trading}]
"""
ALL = ("fw-canary", "fw-dev", "fw-stage", "fw-prod")


@pytest.fixture(scope="module")
def fleet(aws_fleet):
    (aws_fleet["root"] / "clusters" / "aws.yaml").write_text(CLUSTERS)
    from flows.lifecycle import create_cluster

    for name in ALL:  # creating is not held back by windows
        out = create_cluster(cluster=name, source=src(aws_fleet), actor="alice")
        assert out["clusters"][0]["status"] == "converged", out
    return aws_fleet


@pytest.fixture(scope="module")
def worker(fleet, prefect_api, tmp_path_factory):
    """The product's own rollout-fleet deployment (prefect.yaml) on a process work pool, and a worker for it."""
    with deployed_worker(prefect_api, ["rollout-fleet"], tmp_path_factory.mktemp("worker") / "worker.log") as proc:
        yield proc


@pytest.fixture
def at_120(fleet):
    """``at_120(*names)``: those clusters (default: all four) are at 1.20 when the test starts, whatever ran before it."""
    def ensure(*names: str) -> None:
        from flows.lifecycle import create_cluster, decommission_cluster

        now = versions(fleet)
        for name in names or ALL:
            if now[name] != "1.20":
                decommission_cluster(cluster=name, confirm=name, source=src(fleet), actor="alice")
                out = create_cluster(cluster=name, source=src(fleet), actor="alice")
                assert out["clusters"][0]["status"] == "converged", out
        assert {n: v for n, v in versions(fleet).items() if n in (names or ALL)} == dict.fromkeys(names or ALL, "1.20")
    return ensure


def versions(fleet) -> dict[str, str]:
    api = eks(fleet["aws"])
    return {n: api.describe_cluster(name=n)["cluster"]["version"] for n in ALL}


def run_artifact(key: str, flow_run_id) -> list[dict]:
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as c:
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]),
                                                               flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    assert arts, f"no artifact {key} for run {flow_run_id}"
    data = arts[0].data
    return json.loads(data) if isinstance(data, str) and arts[0].type == "table" else data


def scheduled_follow_ups(deployment_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState,
                                                FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as c:
        return c.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


def test_dry_run_asks_what_would_happen_at_a_time(fleet, at_120):
    """The clock is a parameter: at 08:00 UTC only Berlin's window is open; at 10:30 UTC New York's is too."""
    from flows.lifecycle import rollout_fleet

    at_120()
    sel = {"tier": "windowtest"}
    at8 = rollout_fleet(selector=sel, source=src(fleet), to_version="1.21", dry_run=True, now=T, actor="bob")
    by = {c["cluster"]: c for c in at8["clusters"]}
    assert by["fw-canary"]["status"] == "planned"
    assert {n: by[n]["status"] for n in ("fw-dev", "fw-stage", "fw-prod")} == dict.fromkeys(("fw-dev", "fw-stage", "fw-prod"), "deferred")
    assert at8["windows"]["follow_up"]["scheduled"] is False and "a dry run schedules nothing" in at8["windows"]["follow_up"]["why"]
    at1030 = rollout_fleet(selector=sel, source=src(fleet), to_version="1.21", dry_run=True,
                           now="2026-07-01T10:30:00+00:00", actor="bob")
    assert {c["cluster"]: c["status"] for c in at1030["clusters"]}["fw-dev"] == "planned"
    assert versions(fleet) == dict.fromkeys(ALL, "1.20")  # a dry run changes nothing
    with pytest.raises(PolicyDenied) as e:  # a real run with a shifted clock: the platform role only
        rollout_fleet(selector=sel, source=src(fleet), to_version="1.21", now=T, actor="bob")
    assert "platform-only-clock" in str(e.value)


def test_sweep_observes_at_any_time_and_repairs_in_the_window(fleet):
    """reconcile-fleet reports fw-dev's drift at 08:00 UTC but leaves the repair for its window.

    A dry run says the repair would wait and why; a real run with a shifted clock is refused for the
    automation identity (platform-only-clock) and runs for a platform member named as its actor."""
    from flows.reconcile import reconcile_fleet

    core = k8s.CoreV1Api(kube_client(fleet["endpoints"]["fw-dev"]))
    core.patch_namespaced_config_map("prometheus-settings", "monitoring", {"data": {"retention": "1h"}})
    sel = {"zone": "newyork"}
    dry = reconcile_fleet(selector=sel, source=src(fleet), now=T, dry_run=True)  # the automation may ask
    dev = {c["cluster"]: c for c in dry["clusters"]}["fw-dev"]
    assert dev["status"] == "deferred" and any("retention" in d for d in dev["drift"]), dev
    assert dev["reason"].startswith("a real run would defer the repair: outside its maintenance window "
                                    "(FREQ=DAILY at 06:00 for 4h America/New_York"), dev["reason"]
    assert "next window 2026-07-01 06:00–10:00 America/New_York (2026-07-01 10:00–14:00 UTC)" in dev["reason"]
    assert dry["windows"]["deferred"]["fw-dev"]["next_utc"] == "2026-07-01 10:00–14:00 UTC"
    assert "a dry run schedules nothing (a real run would, for 2026-07-01 10:01 UTC)" in dry["windows"]["follow_up"]["why"]
    in_window = reconcile_fleet(selector=sel, source=src(fleet), now="2026-07-01T11:00:00+00:00", dry_run=True)
    assert in_window["clusters"][0]["status"] == "drift"  # inside its window: the repair would be made
    with pytest.raises(PolicyDenied) as e:  # the automation never shifts a real run's clock
        reconcile_fleet(selector=sel, source=src(fleet), now=T)
    assert "platform-only-clock" in str(e.value)
    assert core.read_namespaced_config_map("prometheus-settings", "monitoring").data["retention"] == "1h"

    out = reconcile_fleet(selector=sel, source=src(fleet), now=T, actor="alice")
    dev = {c["cluster"]: c for c in out["clusters"]}["fw-dev"]
    assert dev["status"] == "deferred" and any("retention" in d for d in dev["drift"]), dev
    assert dev["reason"].startswith("outside its maintenance window"), dev["reason"]
    assert (out["actor"], out["windows"]["actor"], out["windows"]["clock"]) == ("alice", "alice", T)
    assert core.read_namespaced_config_map("prometheus-settings", "monitoring").data["retention"] == "1h"
    assert out["windows"]["follow_up"]["scheduled"] is False  # not run from a deployment: said so
    assert "not started from a deployment" in out["windows"]["follow_up"]["why"]
    inside = reconcile_fleet(selector=sel, source=src(fleet), now="2026-07-01T11:00:00+00:00", actor="alice")
    assert inside["clusters"][0]["status"] == "corrected"
    assert core.read_namespaced_config_map("prometheus-settings", "monitoring").data["retention"] == "3d"


def test_upgrade_and_add_component_wait_for_the_window(fleet, at_120):
    """upgrade-cluster and add-component (real runs, as alice at 08:00 UTC) leave fw-dev alone until New York's
    window opens, say why, and change nothing."""
    from flows.lifecycle import add_component, upgrade_cluster

    at_120("fw-dev")
    up = upgrade_cluster(cluster="fw-dev", to_version="1.21", source=src(fleet), now=T, actor="alice")
    (dev,) = up["clusters"]
    assert dev["status"] == "deferred" and dev["done"] == [], dev
    assert dev["reason"].startswith("outside its maintenance window (FREQ=DAILY at 06:00 for 4h America/New_York")
    rec = up["windows"]["deferred"]["fw-dev"]
    assert (rec["step"], rec["rule"], rec["next_utc"]) == ("controlPlane.upgrade", "window", "2026-07-01 10:00–14:00 UTC")
    assert versions(fleet)["fw-dev"] == "1.20"

    from tasks.guard import forget_imperative

    try:
        add = add_component(component="external-dns", selector={"zone": "newyork"}, source=src(fleet), now=T,
                            actor="alice", write_back="off")
    finally:  # write-back off records the add in a Prefect Variable the server keeps: other modules' fw-dev must not see it
        forget_imperative("fw-dev", "external-dns")
    (dev,) = add["clusters"]
    assert dev["status"] == "deferred" and dev["done"] == [], dev
    assert add["windows"]["deferred"]["fw-dev"]["step"] == "component.install"
    namespaces = [n.metadata.name for n in k8s.CoreV1Api(kube_client(fleet["endpoints"]["fw-dev"])).list_namespace().items]
    assert "kube-system" in namespaces and "external-dns" not in namespaces


def test_rollout_converges_open_windows_and_defers_the_rest_with_a_follow_up_run(fleet, worker, at_120):
    """Through the deployment (a real worker): three zones, one converges, the others wait, one follow-up run.

    alice (platform) starts it: an upgrade by parameter names a person, and only a platform member may
    run a real change with a shifted clock."""
    from prefect.deployments import run_deployment

    at_120()
    params = {"selector": {"tier": "windowtest"}, "source": {"path": str(fleet["root"])}, "to_version": "1.21", "now": T,
              "actor": "alice"}
    before = datetime.now(timezone.utc)
    fr = run_deployment(name="rollout-fleet/rollout-fleet", parameters=params, timeout=600, poll_interval=2)
    after = datetime.now(timezone.utc)
    assert fr.state and fr.state.is_completed(), fr.state
    assert versions(fleet) == {"fw-canary": "1.21", "fw-dev": "1.20", "fw-stage": "1.20", "fw-prod": "1.20"}

    status = {r["cluster"]: r for r in run_artifact("rollout-fleet-clusters", fr.id)}
    assert {n: status[n]["status"] for n in ALL} == {"fw-canary": "converged", "fw-dev": "deferred",
                                                      "fw-stage": "deferred", "fw-prod": "deferred"}
    deferred = {r["cluster"]: r for r in run_artifact("rollout-fleet-deferred", fr.id)}
    assert set(deferred) == {"fw-dev", "fw-stage", "fw-prod"}
    dev = deferred["fw-dev"]
    assert dev["rule"] == "window" and dev["blocked by"].startswith("outside its maintenance window (FREQ=DAILY at 06:00")
    assert dev["next window (local)"] == "2026-07-01 06:00–10:00 America/New_York"
    assert dev["next window (UTC)"] == "2026-07-01 10:00–14:00 UTC"
    stage = deferred["fw-stage"]  # open, but the step would overrun: not started
    assert stage["rule"] == "estimate" and stage["step"] == "controlPlane.upgrade"
    assert stage["blocked by"].startswith("controlPlane.upgrade takes about 45m, but the window closes at "
                                          "2026-07-01 18:30 Australia/Sydney (in ")  # 30m less the run's time
    assert stage["next window (local)"] == "2026-07-02 16:30–18:30 Australia/Sydney"
    prod = deferred["fw-prod"]
    assert prod["rule"] == "blackout" and prod["blocked by"].startswith(
        "blackout 'Summer sale' until 2026-07-05 00:00 Europe/London (scope all, from Cluster/fw-prod: peak trading)")
    assert prod["next window (local)"] == "2026-07-05 08:00–12:00 Europe/London"

    # one follow-up run of the same deployment, at New York's opening (+1 min), in the same shifted clock
    runs = scheduled_follow_ups(fr.deployment_id)
    assert len(runs) == 1, runs
    (nxt,) = runs
    assert nxt.parameters["now"] == "2026-07-01T10:01:00+00:00"
    p = nxt.parameters  # the run's own parameters, with their defaults filled in
    assert (p["selector"], p["to_version"], p["source"]["path"], p["actor"]) == (params["selector"], "1.21",
                                                                                params["source"]["path"], "alice")
    lead = timedelta(hours=2, minutes=1)  # 08:00 -> 10:01 on the run's clock, which started between before and after
    assert before + lead - timedelta(seconds=2) <= nxt.expected_start_time <= after + lead + timedelta(seconds=2)

    assert nxt.idempotency_key.startswith(f"fleetwright-follow-up-{fr.deployment_id}-")  # a retried run adds none

    # The follow-up, moved from two hours ahead to now (its own clock reads 10:01 UTC): New York's window is open,
    # so it converges fw-dev; Sydney's has closed and London's blackout still holds: deferred again, one new follow-up.
    from prefect.client.orchestration import get_client
    from prefect.states import Scheduled

    with get_client(sync_client=True) as c:
        c.set_flow_run_state(nxt.id, Scheduled(scheduled_time=datetime.now(timezone.utc)), force=True)
    done = _finished_run(nxt.id, time.time() + 600)
    assert done.state.is_completed(), done.state
    assert versions(fleet) == {"fw-canary": "1.21", "fw-dev": "1.21", "fw-stage": "1.20", "fw-prod": "1.20"}
    status = {r["cluster"]: r["status"] for r in run_artifact("rollout-fleet-clusters", nxt.id)}
    assert status == {"fw-canary": "in-sync", "fw-dev": "converged", "fw-stage": "deferred", "fw-prod": "deferred"}
    deferred = {r["cluster"]: r for r in run_artifact("rollout-fleet-deferred", nxt.id)}
    assert deferred["fw-stage"]["rule"] == "window" and deferred["fw-prod"]["rule"] == "blackout"
    (again,) = scheduled_follow_ups(fr.deployment_id)  # at Sydney's next opening
    assert again.id != nxt.id and again.parameters["now"] == "2026-07-02T06:31:00+00:00"


def _finished_run(run_id, deadline: float):
    from prefect.client.orchestration import get_client

    fr = None
    with get_client(sync_client=True) as c:
        while time.time() < deadline:
            fr = c.read_flow_run(run_id)
            if fr.state is not None and fr.state.is_final():
                return fr
            time.sleep(2)
    raise AssertionError(f"flow run {run_id} did not finish in time: {fr.state if fr else None}")


def _paused_run(since: float):
    """The rollout-fleet run this test started, once it waits for the override's approval."""
    from .pauses import paused_run

    return paused_run("rollout-fleet", timeout=120, since=since).id


def _override_run(fleet, box):
    from flows.lifecycle import rollout_fleet

    box["out"] = rollout_fleet(selector={"zone": "london"}, source=src(fleet), to_version="1.21", now=T, actor="alice",
                               security_override={"reason": "CVE-2026-0001: kube-apiserver fix, cannot wait"},
                               return_state=True)


@pytest.mark.parametrize("approver, outcome", [
    ("alice", "refused (second-person): alice started this and cannot approve it too: a second person must approve"),
    ("dave", "refused (approver-authorized): dave is neither in the platform role nor in the team that owns fw-prod"),
], ids=["the-requester", "an-auditor-outside-the-team"])
def test_security_override_needs_a_second_person(fleet, at_120, approver, outcome):
    """Judged by the rules of every approval: the requester cannot approve it herself, nor can an auditor outside
    the owning team; fw-prod stays deferred inside its blackout."""
    from prefect.flow_runs import resume_flow_run

    at_120("fw-prod")
    box, since = {}, time.time() - 1
    t = in_thread(_override_run, fleet, box)
    run_id = _paused_run(since)
    resume_flow_run(run_id, run_input={"approver": approver, "approve": True})
    t.join(300)
    out = box["out"].result()
    assert out["clusters"][0]["status"] == "deferred"
    assert out["windows"]["override"]["outcome"] == outcome
    assert out["windows"]["override"]["granted"] is False
    assert versions(fleet)["fw-prod"] == "1.20"


def test_security_override_crosses_a_blackout_after_approval(fleet, at_120):
    from prefect.flow_runs import resume_flow_run

    at_120("fw-prod")
    box, since = {}, time.time() - 1
    t = in_thread(_override_run, fleet, box)
    run_id = _paused_run(since)
    assert versions(fleet)["fw-prod"] == "1.20"  # nothing changes before the approval
    resume_flow_run(run_id, run_input={"approver": "bob", "approve": True, "comment": "checked the advisory"})
    t.join(600)
    state = box["out"]
    assert state.is_completed(), state
    out = state.result()
    assert out["clusters"][0]["status"] == "converged"
    ov = out["windows"]["override"]
    assert (ov["requester"], ov["approver"], ov["granted"], ov["rule"]) == ("alice", "bob", True, "approved")
    assert ov["reason"].startswith("CVE-2026-0001") and "blackout 'Summer sale'" in ov["clusters"]["fw-prod"]
    assert versions(fleet)["fw-prod"] == "1.21"
    summary = run_artifact("rollout-fleet-summary", run_id)
    assert "requested by **alice**" in str(summary) and "approved by bob" in str(summary)
