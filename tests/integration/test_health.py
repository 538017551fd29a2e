"""The health check of the kube backend against a real kube-apiserver, with the test environment's node agent.

The control planes of ``testenv/kube.py`` have no kubelet: ``testenv/node_agent.py`` stands in
for it (Nodes Ready at their installed version, Pods Running), so the product's check runs
unchanged here. This module proves the check reads what the API shows: a component's Deployment
becomes available, a Node marked NotReady (the stand-in's way to stop its kubelet) or at the wrong
kubelet version fails the gate by name. The same checks against real kubelets and images that
cannot run: tests/integration/test_metal_kubeadm.py.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from kubernetes import client as k8s

from backends.base import HealthExpectation, KubeAccess
from backends.definitions import load_path
from backends.kube import KubeBackend
from models.errors import GateFailed
from models.plan import Step
from models.resolve import resolve
from tasks.health import wait_healthy
from testenv import kube

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "fleet"
NOT_READY = "testenv.fleetwright.io/not-ready"


@pytest.fixture(scope="module")
def cluster(kube_factory):
    info = kube_factory()
    kb = KubeBackend(KubeAccess(server=info["server"], token=info["token"], ca_file=info["ca_file"]))
    d = resolve(load_path(EXAMPLES), "edge-lab-01")  # metal: lab01-b is its worker; kube-prometheus
    api = kube.api_client(info)
    yield {"kb": kb, "d": d, "core": k8s.CoreV1Api(api), "apps": k8s.AppsV1Api(api)}
    api.close()


def _ready(core, name: str) -> str | None:
    return {c.type: c.status for c in core.read_node(name).status.conditions or []}.get("Ready")


def _wait(fn, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not fn():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_a_component_becomes_available_and_the_gate_passes(cluster):
    kb, d, core = cluster["kb"], cluster["d"], cluster["core"]
    core.create_node(k8s.V1Node(metadata=k8s.V1ObjectMeta(
        name="lab01-b", labels={"fleetwright.io/kubernetes-version": "1.20"})))
    expect = HealthExpectation(nodes={"lab01-b": "1.20"}, components=("kube-prometheus",))
    assert any(p.subject == "Deployment/monitoring/prometheus" and p.why == "does not exist"
               for p in kb.health(d, expect))
    step = Step(id="s", cluster=d.name, action="component.install", object="kube-prometheus", target="kubernetes",
                reason="test")
    kb.apply(d, step)
    wait_healthy(d, expect, "install", check=kb.health)  # the agent's Pods make the Deployment available
    dep = cluster["apps"].read_namespaced_deployment("prometheus", "monitoring")
    assert dep.status.available_replicas == dep.spec.replicas
    node = core.read_node("lab01-b")
    assert node.status.node_info.kubelet_version == "v1.20.0"


def test_the_gate_fails_naming_a_node_not_ready_or_at_the_wrong_version(cluster, monkeypatch):
    kb, d, core = cluster["kb"], cluster["d"], cluster["core"]
    monkeypatch.setenv("FLEETWRIGHT_HEALTH_TIMEOUT_SECONDS", "5")
    with pytest.raises(GateFailed, match=r"Node/lab01-b: kubelet reports v1.20.0, expected 1.21"):
        wait_healthy(d, HealthExpectation(nodes={"lab01-b": "1.21"}), "nodePool.upgrade workers", check=kb.health)
    with pytest.raises(GateFailed, match=r"Node/lab01-x: not registered"):
        wait_healthy(d, HealthExpectation(nodes={"lab01-b": "1.20", "lab01-x": None}), "join", check=kb.health)
    core.patch_node("lab01-b", {"metadata": {"annotations": {NOT_READY: "kubelet stopped by the test"}}})
    try:
        _wait(lambda: _ready(core, "lab01-b") == "False", 60, "the agent reports lab01-b NotReady")
        with pytest.raises(GateFailed, match=r"Node/lab01-b: not Ready \(KubeletNotReady: testenv: kubelet stopped by the test\)"):
            wait_healthy(d, HealthExpectation(nodes={"lab01-b": "1.20"}), "upgrade", check=kb.health)
    finally:
        core.patch_node("lab01-b", {"metadata": {"annotations": {NOT_READY: None}}})
    monkeypatch.setenv("FLEETWRIGHT_HEALTH_TIMEOUT_SECONDS", "60")
    wait_healthy(d, HealthExpectation(nodes={"lab01-b": "1.20"}), "upgrade", check=kb.health)  # Ready again
