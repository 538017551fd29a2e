"""Resolved desired state and observed state: what a cluster should be, and what it is.

``DesiredCluster`` comes only from :func:`models.resolve.resolve`; it is fully
resolved (no variables, no references) and carries a content hash.
``ObservedCluster`` comes only from backends' ``observe``; it never comes from
user YAML. ``observed_from`` builds the observation a converged cluster gives.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from .maintenance import DesiredMaintenance
from .spec import AwsBackend, MetalBackend, VsphereBackend


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, alias_generator=to_camel)


class Machine(_Frozen):
    """A VM (vSphere) or host (metal) with a fixed name and static address.

    ``address`` is None for a vSphere VM in the desired state: the backend allocates it once from the
    cluster's ipPool and records it on the VM (``backends.vsphere.addresses``).
    """

    name: str
    role: Literal["controlPlane", "worker"]
    pool: str | None = None
    address: str | None = None
    cpu: int | None = None
    memory_mib: int | None = None


class DesiredControlPlane(_Frozen):
    replicas: int
    size: str
    machine: dict[str, Any] = {}


class DesiredNodePool(_Frozen):
    name: str
    replicas: int
    min_size: int
    max_size: int
    size: str
    machine: dict[str, Any] = {}
    labels: dict[str, str] = {}
    taints: list[str] = []
    autoscaling: bool = False  # an autoscaler owns the size within min_size..max_size


class DesiredComponent(_Frozen):
    name: str
    version: str
    namespace: str
    provides: list[str] = []
    depends_on: list[str] = []
    source: Literal["manifests", "helm", "eksAddon"]
    target: Literal["infrastructure", "kubernetes"]
    values: dict[str, Any] = {}
    objects: list[dict[str, Any]] = []
    addon: dict[str, Any] | None = None
    k8s_min: str = "1.20"
    k8s_max: str | None = None
    protected: bool = False
    hash: str
    health_timeout_seconds: int = 300  # the health gates' bound for its workloads (not in the hash)


class DesiredWorkspace(_Frozen):
    team: str
    namespaces: list[str]
    objects: list[dict[str, Any]]
    hash: str
    role: str = "edit"  # the team's role in its namespaces: view | edit | admin
    groups: list[str] = []
    members: list[str] = []


class DesiredCluster(_Frozen):
    name: str
    labels: dict[str, str]
    model: str
    model_version: str
    drift_mode: Literal["report", "correct"]
    protected: bool
    owner: str | None = None
    backend: AwsBackend | VsphereBackend | MetalBackend = Field(discriminator="type")
    kubernetes_version: str
    control_plane: DesiredControlPlane
    node_pools: list[DesiredNodePool]
    machines: list[Machine] = []
    components: list[DesiredComponent]
    workspaces: list[DesiredWorkspace]
    hash: str
    maintenance: DesiredMaintenance | None = None  # merged windows and blackouts; not in the hash (no cluster change)

    def component(self, name: str) -> DesiredComponent | None:
        return next((c for c in self.components if c.name == name), None)


# --------------------------------------------------------------------------- observed

class FieldDrift(_Frozen):
    """One field whose live value differs from the desired one."""

    path: str
    desired: Any = None
    observed: Any = None

    def __str__(self) -> str:
        return f"{self.path}: desired {self.desired!r}, observed {self.observed!r}"


class ObservedNodePool(_Frozen):
    replicas: int
    min_size: int
    max_size: int
    version: str | None = None
    machine: dict[str, Any] = {}
    status: str = "ACTIVE"


class ObservedComponent(_Frozen):
    version: str
    target: Literal["infrastructure", "kubernetes"] = "kubernetes"
    hash: str | None = None
    drift: list[FieldDrift] = []


class ObservedWorkspace(_Frozen):
    hash: str | None = None
    drift: list[FieldDrift] = []


class ObservedCluster(_Frozen):
    """What the backends found, by ownership marks. No field of it is ever user input."""

    name: str
    infrastructure: bool = False
    exists: bool = False
    kubernetes_version: str | None = None
    control_plane_replicas: int | None = None
    endpoint: str | None = None
    node_pools: dict[str, ObservedNodePool] = {}
    components: dict[str, ObservedComponent] = {}
    workspaces: dict[str, ObservedWorkspace] = {}
    in_flight: list[str] = []
    reachable: bool = True


def observed_from(desired: DesiredCluster) -> ObservedCluster:
    """The observation of a cluster that is exactly as desired."""
    v = desired.kubernetes_version
    return ObservedCluster(
        name=desired.name, infrastructure=True, exists=True, kubernetes_version=v,
        control_plane_replicas=desired.control_plane.replicas, endpoint=None,
        node_pools={p.name: ObservedNodePool(replicas=p.replicas, min_size=p.min_size, max_size=p.max_size,
                                             version=v, machine=p.machine) for p in desired.node_pools},
        components={c.name: ObservedComponent(version=c.version, target=c.target, hash=c.hash) for c in desired.components},
        workspaces={w.team: ObservedWorkspace(hash=w.hash) for w in desired.workspaces},
    )
