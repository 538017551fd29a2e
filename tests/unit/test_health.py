"""The health gates' logic without a cluster: what counts as a problem, what is waited for, what fails at once.

The real proof is against clusters: tests/integration/test_health.py (the test environment's API
servers with the node agent) and tests/integration/test_metal_kubeadm.py (kubelets on machines).
"""
from __future__ import annotations

import pytest

from backends.base import HealthExpectation, HealthProblem
from backends.kube.health import Health, pod_problem
from models.errors import GateFailed
from models.plan import Step
from models.resolve import resolve
from tasks.health import expectation, wait_healthy


def _pod(phase="Pending", waiting=None, ready=False):
    cs = [{"name": "c", "ready": ready, "state": {"waiting": {"reason": waiting, "message": "boom"}} if waiting else
           {"running": {}}}]
    return {"metadata": {"name": "p"}, "status": {"phase": phase, "containerStatuses": cs,
                                                   "conditions": [{"type": "Ready", "status": str(ready)}]}}


def test_pod_problems_say_why_and_which_are_final():
    assert pod_problem(_pod("Running", ready=True)) is None
    assert pod_problem({"status": {"phase": "Succeeded"}}) is None
    why, final = pod_problem(_pod(waiting="ImagePullBackOff"))
    assert "container c waiting: ImagePullBackOff (boom)" == why and not final
    assert pod_problem(_pod(waiting="InvalidImageName"))[1] is True
    assert pod_problem(_pod("Running", ready=False)) == ("Running but not Ready", False)


def test_workload_gaps():
    gap = Health._workload_gap
    dep = {"kind": "Deployment", "metadata": {"generation": 2}, "spec": {"replicas": 2},
           "status": {"observedGeneration": 2, "availableReplicas": 1, "updatedReplicas": 2}}
    assert gap(dep) == ("1 of 2 replicas available (2 updated)", False)
    assert gap({**dep, "status": {**dep["status"], "availableReplicas": 2}}) == (None, False)
    assert gap({**dep, "status": {**dep["status"], "observedGeneration": 1}})[0].startswith("its controller")
    stuck = {**dep, "status": {**dep["status"], "conditions": [
        {"type": "Progressing", "reason": "ProgressDeadlineExceeded", "message": "ReplicaSet x has timed out"}]}}
    assert gap(stuck) == ("rollout failed: ReplicaSet x has timed out", True)
    ds = {"kind": "DaemonSet", "metadata": {"generation": 1}, "spec": {},
          "status": {"observedGeneration": 1, "desiredNumberScheduled": 3, "numberAvailable": 3, "updatedNumberScheduled": 2}}
    assert gap(ds) == ("3 of 3 scheduled Pods available (2 updated)", False)


def test_expectation_follows_the_upgrade_steps(example_defs):
    d = resolve(example_defs, "edge-lab-01")  # metal: lab01-a control plane, lab01-b worker
    from models.desired import observed_from

    obs = observed_from(d)
    e = expectation(d, obs)
    assert e.nodes == {"lab01-b": "1.20"} and e.node_versions == {"lab01-a": "1.20"}
    assert e.control_plane_version is None and "kube-prometheus" in e.components
    cp = expectation(d, obs, Step(id="s1", cluster="edge-lab-01", action="controlPlane.upgrade", object="control-plane", target="infrastructure",
                                  reason="", params={"version": "1.21"}))
    assert cp.control_plane_version == "1.21" and cp.nodes == {"lab01-b": None} and cp.node_versions == {"lab01-a": "1.21"}
    np = expectation(d, obs, Step(id="s2", cluster="edge-lab-01", action="nodePool.upgrade", object="workers", target="infrastructure",
                                  reason="", params={"version": "1.21"}))
    assert np.nodes == {"lab01-b": "1.21"}


def _desired(example_defs):
    return resolve(example_defs, "edge-lab-01")


def test_a_final_problem_fails_at_once_naming_the_object(example_defs):
    calls = []

    def check(d, e):
        calls.append(1)
        return [HealthProblem("component:kube-prometheus", "Deployment/monitoring/prometheus",
                              "0 of 1 replicas available; Pod/monitoring/p container c waiting: InvalidImageName", final=True)]

    with pytest.raises(GateFailed, match="Deployment/monitoring/prometheus: 0 of 1 .*InvalidImageName") as ei:
        wait_healthy(_desired(example_defs), HealthExpectation(), "create", poll=0, check=check)
    assert len(calls) == 1 and ei.value.problems[0].subject == "Deployment/monitoring/prometheus"


def test_not_yet_is_waited_for_until_it_clears(example_defs):
    answers = [[HealthProblem("nodes", "Node/lab01-b", "not Ready (KubeletNotReady)")]] * 3 + [[]]

    def check(d, e):
        return answers.pop(0)

    assert wait_healthy(_desired(example_defs), HealthExpectation(), "create", poll=0, check=check) == 4


def test_a_problem_past_its_timeout_fails_naming_the_node(example_defs, monkeypatch):
    monkeypatch.setenv("FLEETWRIGHT_HEALTH_TIMEOUT_SECONDS", "0")

    def check(d, e):
        return [HealthProblem("nodes", "Node/lab01-b", "not Ready (KubeletNotReady: kubelet stopped)")]

    with pytest.raises(GateFailed, match=r"Node/lab01-b: not Ready \(KubeletNotReady: kubelet stopped\)"):
        wait_healthy(_desired(example_defs), HealthExpectation(), "upgrade", poll=0, check=check)
