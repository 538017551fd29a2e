"""`fleetwright kubeconfig CLUSTER`: a kubeconfig with the credentials the backends give (as clusterctl's).

Self-contained: CA and client certificates are embedded as ``*-data``, so the file works on another
machine. It holds a secret (a token or a client key): written to stdout or to a file created with
mode 0600, never logged.
"""
from __future__ import annotations

import base64
import os
from pathlib import Path

import yaml

from backends.base import KubeAccess
from models.desired import DesiredCluster


def _b64_file(path: str) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def render(name: str, access: KubeAccess) -> str:
    cluster: dict = {"server": access.server}
    if access.ca_data:
        cluster["certificate-authority-data"] = access.ca_data
    elif access.ca_file:
        cluster["certificate-authority-data"] = _b64_file(access.ca_file)
    if access.insecure:
        cluster["insecure-skip-tls-verify"] = True
    user: dict = {}
    if access.token:
        user["token"] = access.token
    if access.client_cert_file and access.client_key_file:
        user["client-certificate-data"] = _b64_file(access.client_cert_file)
        user["client-key-data"] = _b64_file(access.client_key_file)
    user_name = f"{name}-admin"
    doc = {"apiVersion": "v1", "kind": "Config", "preferences": {},
           "clusters": [{"name": name, "cluster": cluster}],
           "users": [{"name": user_name, "user": user}],
           "contexts": [{"name": name, "context": {"cluster": name, "user": user_name}}],
           "current-context": name}
    return yaml.safe_dump(doc, sort_keys=False)


def kubeconfig_for(desired: DesiredCluster) -> str:
    """Ask the cluster's backend how to reach its API (credentials from the blocks or connections file)."""
    from backends import registry
    from tasks.blocks import connections

    return render(desired.name, registry.infrastructure(desired, connections()).kube_access(desired))


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (also when the file existed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)
