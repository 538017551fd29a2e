"""The definitions schema: what a platform team writes in Git.

Every document is ``apiVersion: fleetwright.io/v1alpha1`` with one ``kind``:
``Component``, ``ClusterModel``, ``Cluster``, ``Team`` or ``Policy``. Parsing is
strict (unknown keys are errors) and every spec is frozen. Field names are
camelCase in YAML, as in Kubernetes. Status never comes from these files.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

from .maintenance import FleetMaintenance, MaintenanceSpec

API_VERSION = "fleetwright.io/v1alpha1"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
K8S_MINOR = r"^1\.[0-9]{1,2}$"
SEMVER = r"^[0-9]+\.[0-9]+\.[0-9]+([-+][0-9A-Za-z.-]+)?$"
BACKENDS = ("aws", "vsphere", "metal")


class Spec(BaseModel):
    """Base of every user-written object: strict, frozen, camelCase."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True,
        str_strip_whitespace=False, validate_default=False,
    )


Name = Annotated[str, Field(pattern=DNS_LABEL, max_length=63)]
Labels = dict[Annotated[str, Field(pattern=r"^([a-z0-9.-]+/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")],
              Annotated[str, Field(max_length=63)]]


class Metadata(Spec):
    name: Name
    labels: Labels = Field(default_factory=dict)
    annotations: dict[str, str] = {}


class VersionedMetadata(Metadata):
    version: Annotated[str, Field(pattern=SEMVER)]


# --------------------------------------------------------------------------- Component

Capability = Literal["ingress", "storage", "loadBalancer", "dns", "certificates", "monitoring", "policy",
                     "logging", "gitops", "gpu"]


class KubernetesRange(Spec):
    """Kubernetes minor versions a component supports, inclusive."""

    min: Annotated[str, Field(pattern=K8S_MINOR)] = "1.20"
    max: Annotated[str, Field(pattern=K8S_MINOR)] | None = None


class HelmSource(Spec):
    """A Helm chart, rendered as a Flux ``HelmRepository`` + ``HelmRelease`` (see README)."""

    repository: Annotated[str, Field(pattern=r"^(https?|oci)://")]
    chart: Annotated[str, Field(min_length=1)]
    version: Annotated[str, Field(min_length=1)]


class EksAddonSource(Spec):
    """An EKS managed add-on, installed through the EKS API instead of manifests."""

    name: Annotated[str, Field(min_length=1)]
    version: Annotated[str, Field(min_length=1)] | None = None


class Source(Spec):
    """Exactly one of: plain manifests (with ``${values.x}`` substitution), a Helm chart, an EKS add-on."""

    manifests: list[dict[str, Any]] | None = None
    helm: HelmSource | None = None
    eks_addon: EksAddonSource | None = None

    def kind(self) -> str:
        return "manifests" if self.manifests is not None else "helm" if self.helm else "eksAddon"


class BackendImpl(Spec):
    """How a component differs on one backend: its own source, extra values, or not available."""

    source: Source | None = None
    values: dict[str, Any] = Field(default_factory=dict)
    provides: list[Capability] | None = None
    available: bool = True


class ComponentSpec(Spec):
    version: Annotated[str, Field(pattern=SEMVER)]
    description: str = ""
    namespace: Name
    provides: list[Capability] = Field(default_factory=list)
    depends_on: list[Name] = []
    kubernetes: KubernetesRange = Field(default_factory=KubernetesRange)
    source: Source
    values: dict[str, Any] = Field(default_factory=dict)
    backends: dict[Literal["aws", "vsphere", "metal"], BackendImpl] = {}
    # how long the health gates wait for the component's workloads to become available
    health_timeout_seconds: Annotated[int, Field(ge=1, le=3600)] = 300


class Component(Spec):
    api_version: Literal["fleetwright.io/v1alpha1"]
    kind: Literal["Component"]
    metadata: Metadata
    spec: ComponentSpec


# --------------------------------------------------------------------------- ClusterModel

VarType = Literal["string", "integer", "number", "boolean", "object", "array"]


class Variable(Spec):
    """A typed variable with a default and constraints, as in Cluster API's ClusterClass."""

    name: Annotated[str, Field(pattern=r"^[a-zA-Z][a-zA-Z0-9_]*$")]
    type: VarType
    description: str = ""
    default: Any = None
    required: bool = False
    enum: list[Any] | None = None
    minimum: float | None = None
    maximum: float | None = None
    pattern: str | None = None

    @field_validator("pattern")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"not a valid regular expression: {e}") from None
        return v


Size = Literal["small", "medium", "large", "xlarge", "gpu"]
IntOrVar = Union[Annotated[int, Field(ge=0)], Annotated[str, Field(pattern=r"^\$\{var\.[a-zA-Z][a-zA-Z0-9_]*\}$")]]
StrOrVar = str


class ControlPlane(Spec):
    replicas: IntOrVar = 3
    size: Size | StrOrVar = "medium"


class NodePool(Spec):
    name: Name
    size: Size | StrOrVar = "medium"
    replicas: IntOrVar = 3
    min_size: IntOrVar = 1
    max_size: IntOrVar = 10
    # An autoscaler (cluster-autoscaler, Karpenter, ...) owns the size within minSize..maxSize:
    # a sweep then corrects only the bounds, and ``replicas`` is the size a new pool starts with.
    autoscaling: bool = False
    labels: dict[str, str] = Field(default_factory=dict)
    taints: list[str] = Field(default_factory=list)


class ModelComponent(Spec):
    """A standard component of a model, with default values for clusters of this model."""

    name: Name
    values: dict[str, Any] = Field(default_factory=dict)


class KubernetesSpec(Spec):
    version: Annotated[str, Field(pattern=K8S_MINOR)] | StrOrVar


class ClusterModelSpec(Spec):
    description: str = ""
    variables: list[Variable] = Field(default_factory=list)
    kubernetes: KubernetesSpec
    control_plane: ControlPlane = Field(default_factory=ControlPlane)
    node_pools: Annotated[list[NodePool], Field(min_length=1)]
    capabilities: dict[Capability, "CapabilityRequest"] = Field(default_factory=dict)
    components: list[ModelComponent] = Field(default_factory=list)
    maintenance: MaintenanceSpec | None = None


class CapabilityRequest(Spec):
    """Ask for a capability; ``prefer`` picks a component when several provide it on a backend."""

    prefer: dict[Literal["aws", "vsphere", "metal"], Name] = Field(default_factory=dict)
    values: dict[str, Any] = {}


ClusterModelSpec.model_rebuild()


class ClusterModel(Spec):
    api_version: Literal["fleetwright.io/v1alpha1"]
    kind: Literal["ClusterModel"]
    metadata: VersionedMetadata
    spec: ClusterModelSpec


# --------------------------------------------------------------------------- Cluster backends

class Vpc(Spec):
    """Use an existing VPC (``id`` + ``subnetIds``) or create one from ``cidr``."""

    id: Annotated[str, Field(pattern=r"^vpc-[0-9a-f]+$")] | None = None
    subnet_ids: list[Annotated[str, Field(pattern=r"^subnet-[0-9a-f]+$")]] = Field(default_factory=list)
    cidr: Annotated[str, Field(pattern=r"^\d{1,3}(\.\d{1,3}){3}/\d{1,2}$")] | None = None
    availability_zones: int = Field(default=2, ge=1, le=6)
    # NAT gateways for the private subnets: one for the VPC (cheaper), or one per zone (no zone is a single point).
    nat_gateways: Literal["single", "perZone"] = "single"


class AwsNodePool(Spec):
    instance_types: Annotated[list[str], Field(min_length=1)]
    disk_size_gib: int = Field(default=50, ge=20, le=16384, alias="diskSizeGiB")
    capacity_type: Literal["ON_DEMAND", "SPOT"] = "ON_DEMAND"


class AwsAccess(Spec):
    """Who may use an EKS cluster, through EKS access entries."""

    authentication_mode: Literal["API", "API_AND_CONFIG_MAP"] = "API_AND_CONFIG_MAP"
    # A Team's group or member (as written in the Team) -> the IAM role or user ARN its people sign in as.
    # Groups and members that are IAM ARNs themselves need no entry here.
    principals: dict[str, Annotated[str, Field(pattern=r"^arn:aws[-a-z]*:iam::\d{12}:(role|user)/.+$")]] = Field(
        default_factory=dict)


class AwsAssumeRole(Spec):
    """A role fleetwright assumes (STS AssumeRole) to manage a cluster in another account."""

    role_arn: Annotated[str, Field(pattern=r"^arn:aws[-a-z]*:iam::\d{12}:role/.+$")]
    external_id: str | None = None


class AwsBackend(Spec):
    type: Literal["aws"]
    region: Annotated[str, Field(pattern=r"^[a-z]{2}(-gov)?-[a-z]+-\d$")]
    account: Annotated[str, Field(pattern=r"^\d{12}$")] | None = None
    # Whose credentials: a named set of the connections (``aws_credentials``), and/or a role to assume.
    credentials: Name | None = None
    assume_role: AwsAssumeRole | None = None
    vpc: Vpc
    node_pools: dict[Name, AwsNodePool] = Field(default_factory=dict)
    endpoint_public_access: bool = False
    access: AwsAccess = Field(default_factory=AwsAccess)
    tags: dict[str, str] = Field(default_factory=dict)


class IpPool(Spec):
    """Static addresses for VMs, as an inclusive range, with the network's gateway and prefix."""

    start: Annotated[str, Field(pattern=r"^\d{1,3}(\.\d{1,3}){3}$")]
    end: Annotated[str, Field(pattern=r"^\d{1,3}(\.\d{1,3}){3}$")]
    prefix: int = Field(default=24, ge=8, le=32)
    gateway: Annotated[str, Field(pattern=r"^\d{1,3}(\.\d{1,3}){3}$")] | None = None
    dns: list[str] = Field(default_factory=list)


class VsphereBackend(Spec):
    type: Literal["vsphere"]
    server: str | None = None
    datacenter: Annotated[str, Field(min_length=1)]
    cluster: Annotated[str, Field(min_length=1)]
    datastore: Annotated[str, Field(min_length=1)]
    template: Annotated[str, Field(min_length=1)]
    folder: Annotated[str, Field(min_length=1)] = "fleetwright"
    network: Annotated[str, Field(min_length=1)]
    ip_pool: IpPool
    ssh_user: str = "root"


class MetalHost(Spec):
    name: Name
    address: Annotated[str, Field(pattern=r"^\d{1,3}(\.\d{1,3}){3}$")]
    role: Literal["controlPlane", "worker"]
    pool: Name | None = None


class MetalBackend(Spec):
    type: Literal["metal"]
    ssh_user: str = "root"
    hosts: Annotated[list[MetalHost], Field(min_length=1)]


Backend = Annotated[Union[AwsBackend, VsphereBackend, MetalBackend], Field(discriminator="type")]


# --------------------------------------------------------------------------- Cluster

class ComponentOverride(Spec):
    """A cluster's change to one component: extra values, or ``enabled: false`` to leave it out."""

    values: dict[str, Any] = Field(default_factory=dict)
    enabled: bool = True


class NodePoolOverride(Spec):
    name: Name
    replicas: int | None = Field(default=None, ge=0)
    min_size: int | None = Field(default=None, ge=0)
    max_size: int | None = Field(default=None, ge=0)
    autoscaling: bool | None = None
    size: Size | None = None


class Overrides(Spec):
    components: dict[Name, ComponentOverride] = Field(default_factory=dict)
    node_pools: list[NodePoolOverride] = Field(default_factory=list)
    control_plane_replicas: int | None = Field(default=None, ge=1)


class ClusterSpec(Spec):
    model: Annotated[str, Field(pattern=r"^[a-z0-9][-a-z0-9]*@[0-9]+\.[0-9]+\.[0-9]+([-+][0-9A-Za-z.-]+)?$")]
    drift_mode: Literal["report", "correct"] = "report"
    owner: Name | None = None
    variables: dict[str, Any] = Field(default_factory=dict)
    components: list[ModelComponent] = Field(default_factory=list)
    overrides: Overrides = Field(default_factory=Overrides)
    backend: Backend
    maintenance: MaintenanceSpec | None = None


class Cluster(Spec):
    api_version: Literal["fleetwright.io/v1alpha1"]
    kind: Literal["Cluster"]
    metadata: Metadata
    spec: ClusterSpec


# --------------------------------------------------------------------------- Team

class Quota(Spec):
    cpu: str = "8"
    memory: str = "16Gi"
    pods: int = Field(default=50, ge=1)
    storage: str | None = None


class LimitDefaults(Spec):
    cpu: str = "500m"
    memory: str = "512Mi"


class TeamNamespace(Spec):
    name: Name
    quota: Quota = Field(default_factory=Quota)
    limits: LimitDefaults = Field(default_factory=LimitDefaults)


class GitOpsSource(Spec):
    url: Annotated[str, Field(pattern=r"^(https?|ssh)://|^git@")]
    ref: str = "main"
    path: str = "./"
    interval: Annotated[str, Field(pattern=r"^[0-9]+[smh]$")] = "5m"
    secret_ref: Name | None = None


class Selector(Spec):
    match_labels: dict[str, str] = Field(default_factory=dict)


class Placement(Spec):
    """Which clusters a team is granted: by name, by label selector, or both."""

    clusters: list[Name] = Field(default_factory=list)
    selector: Selector | None = None


class TeamSpec(Spec):
    description: str = ""
    members: list[str] = Field(default_factory=list)
    groups: list[str] = []
    role: Literal["view", "edit", "admin"] = "edit"
    namespaces: Annotated[list[TeamNamespace], Field(min_length=1)]
    gitops: GitOpsSource | None = None
    placement: Placement


class Team(Spec):
    api_version: Literal["fleetwright.io/v1alpha1"]
    kind: Literal["Team"]
    metadata: Metadata
    spec: TeamSpec


# --------------------------------------------------------------------------- Policy

class Role(Spec):
    name: Name
    members: list[str] = Field(default_factory=list)
    groups: list[str] = []
    all_access: bool = False


GitIdentity = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,253}$")]


class PolicySpec(Spec):
    protected_components: list[Name] = Field(default_factory=list)
    roles: list[Role] = []
    platform_role: Name = "platform"
    # Who a Git identity is: {git login or commit email: person}. A push reported by a webhook is judged
    # as that person (their roles and teams by the names in roles[].members and Team members). Only
    # listed identities count; anyone else is judged as "git:<login>", who may change nothing.
    git_identities: dict[GitIdentity, Annotated[str, Field(min_length=1, max_length=253)]] = Field(default_factory=dict)
    maintenance: FleetMaintenance | None = None


class Policy(Spec):
    api_version: Literal["fleetwright.io/v1alpha1"]
    kind: Literal["Policy"]
    metadata: Metadata
    spec: PolicySpec


# --------------------------------------------------------------------------- ComponentSet

class ComponentSetSpec(Spec):
    """Components added to every cluster a label selector picks (as Cluster API's ClusterResourceSet)."""

    description: str = ""
    cluster_selector: Selector
    components: Annotated[list[ModelComponent], Field(min_length=1)]


class ComponentSet(Spec):
    api_version: Literal["fleetwright.io/v1alpha1"]
    kind: Literal["ComponentSet"]
    metadata: Metadata
    spec: ComponentSetSpec


Document = Annotated[Union[Component, ClusterModel, Cluster, Team, Policy, ComponentSet], Field(discriminator="kind")]
KINDS = {"Component": Component, "ClusterModel": ClusterModel, "Cluster": Cluster, "Team": Team, "Policy": Policy,
         "ComponentSet": ComponentSet}
