"""The production topology, tested: a Prefect server on PostgreSQL, 3 process workers on one pool,
every flow deployed from prefect.yaml, the automations from automations/.

One story over three EKS clusters (moto + a real kube-apiserver each), run through the deployments:
a rollout creates them; a sharded sweep corrects one, reports one (state ``Drift``, events read
back from the server) while the API limit bounds the concurrent AWS calls; a second sweep is
not queued behind it; a worker killed mid-sweep takes only its shard down (re-run, summary says
so); a worker killed while submitting a sweep, or while running one, does not block the next one
(the automations crash the run, which frees the deployment's slot); no "database is locked" anywhere.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
from kubernetes import client as k8s

from .conftest import EXAMPLES, eks, kube_client

CLUSTERS = """apiVersion: fleetwright.io/v1alpha1
kind: Cluster
metadata:
  name: {name}
  labels: {{env: dev, tier: dist}}
spec:
  model: edge-small@1.0.0
  driftMode: {mode}
  owner: payments
  variables: {{environment: dev}}
  backend: {{type: aws, region: eu-west-1, vpc: {{cidr: {cidr}}}}}
"""
FLEET = {"d-a": ("correct", "10.71.0.0/16"), "d-b": ("correct", "10.72.0.0/16"), "d-c": ("report", "10.73.0.0/16")}
AWS_LIMIT = 2  # fleet-wide concurrent AWS API calls
ZOMBIE_SECONDS, UNSTARTED_SECONDS = 90, 240  # the automations' windows here (the README's defaults: 120, 300)


@pytest.fixture(scope="module")
def dist(tmp_path_factory, testenv_config, kube_factory, _aws_session, postgres_env):
    import testenv
    from testenv.connections import write_connections
    from testenv.prefect_stack import Stack

    aws = _aws_session
    testenv.load_part("aws").reset(testenv_config)
    root = tmp_path_factory.mktemp("dist") / "defs"
    for sub in ("components", "models", "teams"):
        shutil.copytree(EXAMPLES / sub, root / sub)
    shutil.copy(EXAMPLES / "policy.yaml", root / "policy.yaml")
    teams = root / "teams" / "teams.yaml"  # the payments team is granted this fleet
    teams.write_text(teams.read_text().replace("matchLabels: {tier: web}", "matchLabels: {tier: dist}")
                     .replace("clusters: [ml-train-dev]", "clusters: []"))
    (root / "clusters").mkdir()
    (root / "clusters" / "dist.yaml").write_text("---\n".join(
        CLUSTERS.format(name=n, mode=m, cidr=c) for n, (m, c) in FLEET.items()))
    run = os.urandom(3).hex()
    endpoints = {n: kube_factory(f"dist{run}-{n}") for n in FLEET}
    conns = write_connections(root.parent / "connections.json", {"aws": aws}, endpoints)
    env = {"FLEETWRIGHT_CONNECTIONS": str(conns), "FLEETWRIGHT_USE_BLOCKS": "0", "FLEETWRIGHT_DEFINITIONS": str(root),
           "FLEETWRIGHT_RETRY_BASE_SECONDS": "0.05", "FLEETWRIGHT_LOCK_LEASE_SECONDS": "60",
           "FLEETWRIGHT_API_LIMITS": f"aws={AWS_LIMIT}:200,kubernetes=50:500"}
    stack = Stack(testenv_config, f"dist{run}", workers=3, worker_limit=2, env=env,
                  automation_settings={"ZOMBIE_SECONDS": str(ZOMBIE_SECONDS),
                                       "UNSTARTED_SECONDS": str(UNSTARTED_SECONDS)})
    old = {k: os.environ.get(k) for k in ("PREFECT_API_URL", *env)}
    try:
        stack.start()
        os.environ.update(env)
        os.environ["PREFECT_API_URL"] = stack.api
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from tasks.blocks import connections

        connections.cache_clear()
        with temporary_settings(updates={PREFECT_API_URL: stack.api}):
            yield {"stack": stack, "aws": aws, "endpoints": endpoints, "root": root}
    finally:
        stack.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def deploy(name: str, timeout: float = 600, **params):
    from prefect.deployments import run_deployment

    return run_deployment(f"{name}/{name}", parameters=params, timeout=timeout, poll_interval=2)


def read_run(run_id):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as c:
        return c.read_flow_run(run_id)


def shard_runs(parent_id) -> list:
    """The reconcile-shard runs a fleet run started (as its subflows)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowFilter, FlowFilterName, FlowRunFilter,
                                                FlowRunFilterParentFlowRunId)

    with get_client(sync_client=True) as c:
        return c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["reconcile-shard"])),
                                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(
                                    any_=[parent_id])))


def cluster_rows(flow: str, run_id) -> list[dict]:
    """The run's cluster-by-status table artifact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as c:
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[f"{flow}-clusters"]), flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    data = arts[0].data if arts else "[]"
    return data if isinstance(data, list) else json.loads(data)


def summary_md(run_id) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as c:
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["reconcile-fleet-summary"]), flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    return arts[0].data if arts else ""


def events(api: str, names: list[str], resource_ids: list[str]) -> list[dict]:
    body = {"filter": {"event": {"name": names}, "resource": {"id": resource_ids}, "order": "ASC"}, "limit": 50}
    req = urllib.request.Request(f"{api}/events/filter", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)["events"]


def wait_until(fn, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = fn()
        if out:
            return out
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def test_1_rollout_creates_the_fleet(dist):
    fr = deploy("rollout-fleet", selector={"tier": "dist"})
    assert fr.state.is_completed(), fr.state
    rows = cluster_rows("rollout-fleet", fr.id)
    assert sorted(r["status"] for r in rows) == ["converged"] * 3, rows
    assert "prometheus-settings" in {m.metadata.name for m in k8s.CoreV1Api(
        kube_client(dist["endpoints"]["d-b"])).list_namespaced_config_map("monitoring").items}


def test_2_sharded_sweep_corrects_reports_and_bounds_aws_calls(dist):
    from testenv.faults import aws_clear_faults, aws_concurrency, aws_fault

    core = k8s.CoreV1Api(kube_client(dist["endpoints"]["d-b"]))
    core.patch_namespaced_config_map("prometheus-settings", "monitoring", {"data": {"retention": "1h"}})
    eks(dist["aws"]).update_nodegroup_config(clusterName="d-c", nodegroupName="workers",
                                             scalingConfig={"minSize": 1, "maxSize": 3, "desiredSize": 2})
    aws_fault(dist["aws"], service="*", action="*", status=0, latency_ms=150)  # calls overlap: the limit must hold
    aws_concurrency(dist["aws"], reset=True)
    try:
        fr = deploy("reconcile-fleet", selector={"tier": "dist"}, shard_size=1, parallel_shards=3)
    finally:
        aws_clear_faults(dist["aws"])
    peak = aws_concurrency(dist["aws"])["peak"]
    # report-mode drift: a named Completed state, not a crash
    assert fr.state.is_completed() and fr.state.name == "Drift", fr.state
    assert "d-c" in fr.state.message and "d-b" not in fr.state.message, fr.state.message
    shards = shard_runs(fr.id)
    assert len(shards) == 3 and all(s.state.is_completed() for s in shards), [(s.name, s.state) for s in shards]
    md = summary_md(fr.id)
    assert "3 clusters." in md and "| corrected | 1 |" in md and "| drift | 1 |" in md and "## Shards" in md, md
    assert core.read_namespaced_config_map("prometheus-settings", "monitoring").data["retention"] == "3d"
    # at most AWS_LIMIT AWS calls at once across all shards and workers, as the AWS server saw them
    assert 1 <= peak <= AWS_LIMIT, peak
    # one event per drifted cluster, with the cluster as its resource, read back from the server
    evs = wait_until(lambda: events(dist["stack"].api, ["fleetwright.cluster.drift"], ["fleetwright.cluster.d-c"]),
                     60, "the drift event of d-c")
    assert evs[0]["resource"]["prefect.resource.name"] == "d-c" and evs[0]["payload"]["status"] == "drift"
    assert not events(dist["stack"].api, ["fleetwright.cluster.drift", "fleetwright.cluster.failed"],
                      ["fleetwright.cluster.d-a", "fleetwright.cluster.d-b"])


def test_3_no_backlog_of_sweeps(dist):
    from prefect.deployments import run_deployment

    from flows.reconcile import reconcile_fleet
    from testenv.faults import aws_clear_faults, aws_fault

    aws_fault(dist["aws"], service="*", action="*", status=0, latency_ms=400)  # a sweep longer than its schedule
    try:
        first = run_deployment("reconcile-fleet/reconcile-fleet", parameters={"selector": {"tier": "dist"}}, timeout=0)
        wait_until(lambda: read_run(first.id).state.is_running(), 120, "the first sweep to run")
        second = run_deployment("reconcile-fleet/reconcile-fleet", parameters={"selector": {"tier": "dist"}},
                                timeout=120, poll_interval=1)
        assert second.state.is_cancelled(), second.state  # the deployment's CANCEL_NEW: never queued
        # a sweep started outside the deployment finds the running one and skips, saying which
        state = reconcile_fleet(selector={"tier": "dist"}, return_state=True)
        assert state.is_completed() and state.name == "Skipped" and str(first.id) in state.message, state
        done = wait_until(lambda: (s := read_run(first.id).state).is_final() and s, 300, "the first sweep to end")
        assert done.name == "Drift", done
    finally:
        aws_clear_faults(dist["aws"])


def worker_running(run_id, stack) -> tuple | None:
    """(run, the worker whose process runs it) once the run has a process on one of the stack's workers."""
    fr = read_run(run_id)
    if fr.infrastructure_pid:
        w = stack.worker_of(int(str(fr.infrastructure_pid).rsplit(":", 1)[-1]))
        if w is not None:
            return fr, w
    return None


def final(run_id, timeout: float, what: str):
    return wait_until(lambda: (s := read_run(run_id).state).is_final() and s, timeout, what, interval=2)


# How long an automation takes to crash a dead run: its window after the run's last event (a heartbeat comes every
# 30 s), then the server's proactive evaluation, with a generous margin for a loaded machine.
CRASH_BOUND = ZOMBIE_SECONDS + 30 + 180
UNSTARTED_BOUND = UNSTARTED_SECONDS + 240


@pytest.mark.heavy  # about 4 minutes (a killed shard is crashed 60-90 s after its last heartbeat, then re-run)
def test_4_worker_killed_mid_sweep_takes_only_its_shard_down(dist):
    from prefect.deployments import run_deployment

    from testenv.faults import aws_clear_faults, aws_fault

    stack = dist["stack"]
    aws_fault(dist["aws"], service="*", action="*", status=0, latency_ms=1500)  # shards run long enough to kill one
    worker = None
    try:
        fr = run_deployment("reconcile-fleet/reconcile-fleet",
                            parameters={"selector": {"tier": "dist"}, "shard_size": 1}, timeout=0)
        _, fleet_worker = wait_until(lambda: worker_running(fr.id, stack), 300, "the sweep to run on a worker")

        def running_shard():  # on another worker than the fleet run's: only shards die
            for s in shard_runs(fr.id):
                if s.state.is_running() and (found := worker_running(s.id, stack)) and found[1] != fleet_worker:
                    return found
            return None

        _, worker = wait_until(running_shard, 300, "a shard running on another worker than the sweep's")
        pids = set(stack.kill_worker(worker))  # the worker and its flow-run processes: one shard, or two (--limit 2)
    finally:
        aws_clear_faults(dist["aws"])  # the other shards and the re-runs need no slow calls
    killed = [s for s in shard_runs(fr.id) if s.infrastructure_pid
              and int(str(s.infrastructure_pid).rsplit(":", 1)[-1]) in pids]
    try:
        assert killed and len(killed) <= 2, killed
        ended = [final(s.id, UNSTARTED_BOUND, "a killed shard to be crashed") for s in killed]
        done = final(fr.id, 420, "the sweep to end")
    finally:
        stack.start_worker(worker)
    for s, st in zip(killed, ended):  # running: no heartbeat; one still starting on it: never started
        assert st.is_crashed() and "its worker is gone" in (st.message or ""), (s.name, st)
    assert any("heartbeat" in (st.message or "") for st in ended), ended
    # Completed (named Drift when test 2's drift on d-c is still there), with the re-runs in its message
    assert done.is_completed() and f"re-run after their worker died: {len(killed)}" in done.message, done
    md = summary_md(fr.id)
    assert "re-run after a crash" in md and all(f"re-run after run {s.id} ended Crashed" in md for s in killed), md
    assert len(shard_runs(fr.id)) == 3 + len(killed)  # the shards on the other workers ran once


@pytest.mark.heavy  # about 6 minutes (a run that never started is crashed UNSTARTED_SECONDS after submission)
def test_5_worker_killed_while_submitting_does_not_block_the_next_sweep(dist):
    from prefect.deployments import run_deployment

    stack = dist["stack"]
    # The worker proposes Pending, then Submitting, and starts the run's process; this one only sleeps, so the run
    # stays Submitting (holding the deployment's one concurrency slot) until the worker, and the process, are killed.
    stuck = run_deployment("reconcile-fleet/reconcile-fleet", parameters={"selector": {"tier": "dist"}},
                           job_variables={"command": "sleep 3600"}, timeout=0)

    def submitted():
        found = worker_running(stuck.id, stack)
        return found if found and found[0].state.is_pending() else None

    run, worker = wait_until(submitted, 300, "a worker to submit the sweep")
    assert run.state.name == "Submitting", run.state
    stack.kill_worker(worker)  # the machine is gone while the run is being submitted
    try:
        held = deploy("reconcile-fleet", selector={"tier": "dist"}, timeout=300)
        assert held.state.is_cancelled(), held.state  # the slot is still held: a sweep now is not queued behind it
        crashed = wait_until(lambda: (s := read_run(stuck.id).state).is_crashed() and s, UNSTARTED_BOUND,
                             "the stuck sweep to be crashed", interval=2)
    finally:
        stack.start_worker(worker)
    assert "worker is gone" in (crashed.message or ""), crashed
    nxt = deploy("reconcile-fleet", selector={"tier": "dist"}, timeout=420)
    assert nxt.state.is_completed(), nxt.state  # it ran (Drift or Completed): the slot was freed


@pytest.mark.heavy  # about 4 minutes (a killed sweep is crashed 60-90 s after its last heartbeat)
def test_6_worker_killed_while_running_a_sweep_frees_its_slot(dist):
    from prefect.deployments import run_deployment

    from testenv.faults import aws_clear_faults, aws_fault

    stack = dist["stack"]
    aws_fault(dist["aws"], service="*", action="*", status=0, latency_ms=1500)  # a sweep long enough to kill
    worker = None
    try:
        fr = run_deployment("reconcile-fleet/reconcile-fleet",
                            parameters={"selector": {"tier": "dist"}, "shard_size": 0}, timeout=0)  # in its own run
        run, worker = wait_until(lambda: (f := worker_running(fr.id, stack)) and f[0].state.is_running() and f,
                                 300, "the sweep to run on a worker")
        stack.kill_worker(worker)
    finally:
        aws_clear_faults(dist["aws"])
    try:
        crashed = final(fr.id, CRASH_BOUND, "the killed sweep to be crashed")
    finally:
        if worker is not None:
            stack.start_worker(worker)
    assert crashed.is_crashed() and "heartbeat" in (crashed.message or ""), crashed
    nxt = deploy("reconcile-fleet", selector={"tier": "dist"}, timeout=420)
    assert nxt.state.is_completed(), nxt.state  # it ran (Drift or Completed): the slot was freed


def test_7_no_database_is_locked_anywhere(dist):
    text = dist["stack"].log_text()
    assert text and "database is locked" not in text
