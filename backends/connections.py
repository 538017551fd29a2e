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


class Connections(_Cfg):
    aws: AwsConnection = AwsConnection()
    # Named AWS credentials a Cluster can choose with ``backend.credentials`` (other accounts).
    aws_credentials: dict[str, AwsConnection] = {}
    vsphere: VsphereConnection | None = None
    ssh: SshConnection | None = None
    kube_binaries: dict[str, str] = {}  # kube-apiserver, kube-controller-manager, etcd paths on the hosts
    # Test environment only: moto's EKS reports endpoints that do not exist, so each EKS cluster is
    # mapped to a local kube-apiserver here. Empty in production.
    testenv_eks_endpoints: dict[str, KubeEndpoint] = {}


def load_connections(path: str | os.PathLike | None = None) -> Connections:
    """From ``path`` or ``$FLEETWRIGHT_CONNECTIONS`` (JSON), else defaults (real AWS via the boto3 chain)."""
    path = path or os.environ.get("FLEETWRIGHT_CONNECTIONS")
    if not path:
        return Connections()
    return Connections.model_validate(json.loads(Path(path).read_text()))
