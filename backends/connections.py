"""Connection settings for the backends: endpoints and credentials, never flow parameters.

In production these come from Prefect blocks (see ``tasks.blocks``) or the
standard SDK chains (boto3's credential chain, a kubeconfig); a JSON file named
by ``FLEETWRIGHT_CONNECTIONS`` serves the demo and the tests. Secrets are
``SecretStr`` so they never print.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from typing import Literal

from pydantic import BaseModel, ConfigDict, SecretStr


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AwsConnection(_Cfg):
    endpoint_url: str | None = None  # None: real AWS
    access_key_id: SecretStr | None = None  # None: the standard boto3 credential chain
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    profile_name: str | None = None
    max_attempts: int = 5
    wait_seconds: float = 2.0  # polling interval while waiting for ACTIVE
    timeout_seconds: float = 1800.0


class KubeEndpoint(_Cfg):
    """A fixed Kubernetes endpoint for a cluster, used instead of the backend's own."""

    server: str
    token: SecretStr | None = None
    ca_file: str | None = None
    insecure: bool = False


class VsphereConnection(_Cfg):
    host: str
    port: int = 443
    user: str
    password: SecretStr
    insecure: bool = False
    # a VM just powered on is not yet a host: how long its guest may take to boot (and cloud-init to
    # set its address) until its SSH port answers, before the step fails (transient: retried)
    boot_timeout_seconds: float = 300.0


class SshConnection(_Cfg):
    """How Ansible reaches hosts. Host keys are checked (``StrictHostKeyChecking=yes``) against
    ``known_hosts_file`` (or ssh's default files when None); only ``host_key_checking=False`` turns
    that off, for test machines. ``extra_args`` must not change host-key checking itself."""

    user: str = "root"
    private_key_file: str
    port: int = 22
    known_hosts_file: str | None = None
    host_key_checking: bool = True
    extra_args: str = "-o ServerAliveInterval=2 -o ServerAliveCountMax=2"
    supervisor: str | None = None  # the test environment's process supervisor on hosts without systemd


class KubeNodeSettings(_Cfg):
    """How the playbooks install Kubernetes on metal hosts and vSphere VMs (the kubeadm path): a site
    setting, the same for every cluster of the site. ``source="artefacts"`` is the air-gapped mode
    (as Kubespray's offline mode): kubelet/kubeadm/kubectl/crictl from
    ``<artefacts_url>/kubernetes/<version>/`` (checked against its ``SHA256SUMS``) and, with
    ``preload_images``, the images from ``<artefacts_url>/images/<version>/*.tar``; otherwise the
    kubelet/kubeadm/kubectl packages (``apt_repository``) and images pulled from ``image_repository``."""

    source: Literal["packages", "artefacts"] = "packages"
    artefacts_url: str = ""
    preload_images: bool = False
    image_repository: str = "k8s.gcr.io"
    versions: dict[str, str] = {}  # Kubernetes minor -> exact version, e.g. {"1.20": "v1.20.2"}
    apt_repository: str = ""
    skip_phases: list[str] = []  # kubeadm init phases to skip, e.g. addon/coredns where CoreDNS cannot be had
    ignore_preflight_errors: list[str] = []
    pod_subnet: str = "10.244.0.0/16"
    service_subnet: str = "10.96.0.0/12"
    control_plane_endpoint: str = ""  # host[:port] (a VIP or DNS name); default: the first control-plane host
    cert_sans: list[str] = []
    cgroup_driver: Literal["cgroupfs", "systemd"] = "cgroupfs"
    conntrack_max_per_core: int | None = None  # kube-proxy; 0 leaves the kernel's conntrack size alone
    token_ttl: str = "15m"


class Connections(_Cfg):
    aws: AwsConnection = AwsConnection()
    # Named AWS credentials a Cluster can choose with ``backend.credentials`` (other accounts).
    aws_credentials: dict[str, AwsConnection] = {}
    vsphere: VsphereConnection | None = None
    ssh: SshConnection | None = None
    kube_binaries: dict[str, str] = {}  # kube-apiserver, kube-controller-manager, etcd paths on the hosts
    kubernetes: KubeNodeSettings = KubeNodeSettings()  # the kubeadm path's install settings
    # Test environment only: moto's EKS reports endpoints that do not exist, so each EKS cluster is
    # mapped to a local kube-apiserver here. Empty in production.
    testenv_eks_endpoints: dict[str, KubeEndpoint] = {}


def load_connections(path: str | os.PathLike | None = None) -> Connections:
    """From ``path`` or ``$FLEETWRIGHT_CONNECTIONS`` (JSON), else defaults (real AWS via the boto3 chain)."""
    path = path or os.environ.get("FLEETWRIGHT_CONNECTIONS")
    if not path:
        return Connections()
    return Connections.model_validate(json.loads(Path(path).read_text()))
