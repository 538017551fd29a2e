"""The contract every backend implements (see backends/CONTRACT.md), and what they share.

Flows and tasks talk to backends only through these types. They never branch
on a backend's name: ``backends.registry`` picks the infrastructure backend by
the type of the cluster's backend spec, and every in-cluster step goes to the
``kube`` backend.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator, Protocol, runtime_checkable

from models.desired import DesiredCluster, ObservedCluster
from models.plan import Step

OWNER_KEY = "fleetwright.io/owned-by"  # AWS tag key / vSphere custom attribute name
OWNER_VALUE = "fleetwright"
CLUSTER_KEY = "fleetwright.io/cluster"  # AWS tag key / vSphere custom attribute name
FIELD_MANAGER = "fleetwright"  # Kubernetes server-side-apply field manager


@dataclass(frozen=True)
class KubeAccess:
    """How to reach a cluster's Kubernetes API. ``token`` is a secret: never log it."""

    server: str
    token: str | None = None
    ca_file: str | None = None
    ca_data: str | None = None  # base64 PEM, as in a kubeconfig
    insecure: bool = False
    client_cert_file: str | None = None
    client_key_file: str | None = None

    def __repr__(self) -> str:  # keep secrets out of logs and tracebacks
        return f"KubeAccess(server={self.server!r}, token={'***' if self.token else None})"


@dataclass
class StepResult:
    """What applying one step did. ``changed`` is False when the step found nothing to do."""

    step_id: str
    changed: bool
    detail: str = ""
    outputs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HealthExpectation:
    """What a cluster's health check looks at (built by ``tasks.cluster`` from desired + observed state).

    ``nodes``: the Node names the infrastructure backend made for its workers, each with the kubelet
    version it must run (None: any); each must be registered, and every Node must be Ready.
    None skips the node checks. ``node_versions``: Nodes whose kubelet version is checked when they
    are registered (control-plane hosts: a kubeadm control plane runs a kubelet).
    ``control_plane_version``: the control-plane Pods (a self-hosted control plane's static Pods,
    ``tier=control-plane``) run images of this minor version.
    ``components``: the names of the components whose workloads must be available.
    """

    nodes: dict[str, str | None] | None = None
    node_versions: dict[str, str | None] = field(default_factory=dict)
    system_pods: bool = True
    control_plane_version: str | None = None
    components: tuple[str, ...] = ()


@dataclass(frozen=True)
class HealthProblem:
    """One thing that is not healthy: ``subject`` names the object (``Node/w1``, ``Deployment/ns/x``).

    ``group`` says whose timeout applies (``nodes``, ``kube-system``, ``control-plane``,
    ``component:<name>``); ``final`` is True when waiting cannot cure it (an invalid image name).
    """

    group: str
    subject: str
    why: str
    final: bool = False

    def __str__(self) -> str:
        return f"{self.subject}: {self.why}"


@runtime_checkable
class InfrastructureBackend(Protocol):
    """Makes and changes the cluster itself: network, control plane, node pools, infrastructure add-ons."""

    kind: str

    def observe(self, desired: DesiredCluster) -> ObservedCluster:
        """Read-only: what exists, found by recorded ID or by deterministic name plus ownership mark."""

    def apply(self, desired: DesiredCluster, step: Step) -> StepResult:
        """Carry out one ``target == "infrastructure"`` step. Idempotent; safe to repeat after a crash."""

    def delete(self, desired: DesiredCluster) -> StepResult:
        """Delete everything of this cluster that is marked as ours. Already gone is success."""

    def kube_access(self, desired: DesiredCluster) -> KubeAccess:
        """Credentials for the Kubernetes API of the cluster this backend made."""


@runtime_checkable
class ClusterBackend(Protocol):
    """Works inside a cluster: components and team workspaces."""

    def observe(self, desired: DesiredCluster) -> ObservedCluster:
        ...

    def apply(self, desired: DesiredCluster, step: Step) -> StepResult:
        ...

    def delete(self, desired: DesiredCluster) -> StepResult:
        ...

    def health(self, desired: DesiredCluster, expect: HealthExpectation) -> list[HealthProblem]:
        """What is not healthy now (empty: healthy). Reads only; never waits (the caller's timeouts)."""
        ...


def merge_observations(infra: ObservedCluster, inside: ObservedCluster | None) -> ObservedCluster:
    """One observation from the infrastructure's and the cluster's (in-cluster wins for kubernetes components)."""
    if inside is None:
        return infra
    components = {**infra.components, **inside.components}
    return infra.model_copy(update={"components": components, "workspaces": inside.workspaces,
                                    "in_flight": list(infra.in_flight) + list(inside.in_flight),
                                    "reachable": infra.reachable and inside.reachable})


# --------------------------------------------------------------------------- API call guard
# Backends cannot import Prefect, yet every call they make to a provider API must honour the
# fleet's limit for that API. So backends wrap each call in ``with api_call("aws"):`` and the
# tasks layer installs the guard that enforces the limits (``tasks.locks.install_api_guard``).
# Without a guard (unit tests, a script) the call just runs.

APIS = ("aws", "vsphere", "metal", "kubernetes")
_guard: Callable[[str], ContextManager[None]] | None = None


def set_api_guard(guard: Callable[[str], ContextManager[None]] | None) -> None:
    """Install (or with None remove) the process-wide guard every backend API call goes through."""
    global _guard
    _guard = guard


@contextmanager
def api_call(api: str) -> Iterator[None]:
    """Around ONE call to a provider API (``aws``, ``vsphere``, ``metal``, ``kubernetes``): waits for the limit."""
    guard = _guard
    if guard is None:
        yield
        return
    with guard(api):
        yield


@runtime_checkable
class BatchObserver(Protocol):
    """Optional for an infrastructure backend: observe many clusters in one go (one session, one query).

    Returns an ObservedCluster or the exception raised for each cluster, by cluster name. The sweep
    calls it for the clusters of a batch that share this backend, instead of ``observe`` one by one;
    clusters missing from the answer are observed one by one.
    """

    def observe_many(self, desired: list[DesiredCluster]) -> dict[str, ObservedCluster | Exception]:
        ...
