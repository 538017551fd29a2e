"""A simulated backend FOR THE SWEEP BENCHMARK ONLY (bench/sweep.py), loaded as a backend plugin.

It implements the backend contract (``InfrastructureBackend`` + ``ClusterBackend``) for every
backend type, so the real ``reconcile-fleet`` deployment can sweep 10,000 generated clusters
without 10,000 real ones. Every observation makes a fixed number of API calls, each one through
``backends.base.api_call`` (so the real API limits apply) and each lasting the configured latency:

* ``FLEETWRIGHT_SIM_LATENCY_MS`` (50): one API call's latency;
* ``FLEETWRIGHT_SIM_INFRA_CALLS`` (3) / ``FLEETWRIGHT_SIM_KUBE_CALLS`` (3): calls per observation,
  infrastructure / in-cluster; an apply makes one call;
* ``FLEETWRIGHT_SIM_DRIFT`` (0.05): the share of clusters that drift (chosen by a hash of the
  name): one in-cluster component has a changed field until it is corrected;
* ``FLEETWRIGHT_SIM_STATE`` (a directory): corrections are recorded there (one file per
  cluster), shared by every worker, and every process appends its call count to ``calls-<pid>``.

Enabled with ``FLEETWRIGHT_BACKEND_PLUGINS=bench.simbackend``; product code has no branch for it.
"""
from __future__ import annotations

import atexit
import hashlib
import os
import threading
import time
from pathlib import Path

from backends.base import KubeAccess, StepResult, api_call
from models.desired import DesiredCluster, FieldDrift, ObservedCluster, observed_from
from models.plan import Step

_calls = {"n": 0}
_lock = threading.Lock()


def _setting(name: str, default: float) -> float:
    return float(os.environ.get(f"FLEETWRIGHT_SIM_{name}", default))


def _state() -> Path:
    p = Path(os.environ.get("FLEETWRIGHT_SIM_STATE", "/tmp/fleetwright-sim"))
    (p / "corrected").mkdir(parents=True, exist_ok=True)
    return p


def _api(desired_type: str) -> str:
    return desired_type  # the infrastructure calls count against the cluster's backend API limit


def _call(api: str) -> None:
    with api_call(api):
        time.sleep(_setting("LATENCY_MS", 50) / 1000.0)
    with _lock:
        _calls["n"] += 1
        if _calls["n"] >= 50:
            _flush()


def _flush() -> None:
    """Add this process's uncounted calls to its file (under ``_lock``, or at exit)."""
    if _calls["n"]:
        with open(_state() / f"calls-{os.getpid()}", "a") as f:
            f.write(f"{_calls['n']}\n")
        _calls["n"] = 0


atexit.register(_flush)


def drifts(name: str) -> bool:
    share = _setting("DRIFT", 0.05)
    h = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < share and not (_state() / "corrected" / name).exists()


class SimInfrastructure:
    """Infrastructure that is always as desired, after ``INFRA_CALLS`` calls."""

    kind = "sim"

    def __init__(self, connections=None):
        self.connections = connections

    def observe(self, desired: DesiredCluster) -> ObservedCluster:
        for _ in range(int(_setting("INFRA_CALLS", 3))):
            _call(_api(desired.backend.type))
        o = observed_from(desired)
        return o.model_copy(update={"components": {k: c for k, c in o.components.items() if c.target == "infrastructure"},
                                    "workspaces": {}})

    def apply(self, desired: DesiredCluster, step: Step) -> StepResult:
        _call(_api(desired.backend.type))
        return StepResult(step.id, changed=True, detail="simulated")

    def delete(self, desired: DesiredCluster) -> StepResult:
        return StepResult("delete", changed=False)

    def kube_access(self, desired: DesiredCluster) -> KubeAccess:
        return KubeAccess(server=f"sim://{desired.name}")


class SimKube:
    """In-cluster state as desired, except a drifted cluster's first component, after ``KUBE_CALLS`` calls."""

    def __init__(self, access: KubeAccess):
        self.access = access

    def observe(self, desired: DesiredCluster) -> ObservedCluster:
        for _ in range(int(_setting("KUBE_CALLS", 3))):
            _call("kubernetes")
        o = observed_from(desired)
        comps = {k: c for k, c in o.components.items() if c.target == "kubernetes"}
        if comps and drifts(desired.name):
            first = sorted(comps)[0]
            comps[first] = comps[first].model_copy(update={"drift": [FieldDrift(
                path=f"ConfigMap/{first}/settings.data.mode", desired="a", observed="b")]})
        return o.model_copy(update={"components": comps, "infrastructure": False})

    def apply(self, desired: DesiredCluster, step: Step) -> StepResult:
        _call("kubernetes")
        (_state() / "corrected" / desired.name).touch()
        return StepResult(step.id, changed=True, detail="simulated")

    def delete(self, desired: DesiredCluster) -> StepResult:
        return StepResult("delete", changed=False)

    def health(self, desired: DesiredCluster, expect) -> list:
        _call("kubernetes")  # one read of the simulated API: a simulated cluster is always healthy
        return []


def register(registry) -> None:
    for kind in ("aws", "vsphere", "metal"):
        registry.register_infrastructure(kind, SimInfrastructure)
    registry.register_in_cluster("sim", SimKube)
