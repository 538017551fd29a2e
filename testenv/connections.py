"""Connections for fleetwright's backends pointed at this test environment.

Test environment only: it says where moto, vcsim and the SSH hosts are, and
maps EKS clusters (whose moto endpoints do not exist) to local kube-apiservers.
Production configuration never goes through this module.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


# kubeadm preflight checks the machines cannot pass: SystemVerification (an nspawn machine has no
# kernel config or modules to inspect); ImagePull (kubeadm 1.20's preflight pulls the CoreDNS image
# even when its addon phase is skipped, and Debian has none)
MACHINE_PREFLIGHT_IGNORES = ["SystemVerification", "ImagePull"]


def machine_settings(machines: dict[str, Any]) -> dict[str, Any]:
    """The kubeadm path's site settings for the test machines: the air-gapped mode, with the
    artefacts (binaries, locally built images) served by ``testenv/machines.py``."""
    from testenv import kube

    return {"source": "artefacts", "artefacts_url": machines["artefacts_url"], "preload_images": True,
            "image_repository": machines["image_repository"],
            "versions": {v.lstrip("v").rsplit(".", 1)[0]: v for v in (kube.KUBE_VERSION, kube.UPGRADE_VERSION)},
            # Debian has no CoreDNS image to build from
            "skip_phases": ["addon/coredns"], "ignore_preflight_errors": MACHINE_PREFLIGHT_IGNORES,
            # conntrack's table size is global: a machine must not change the host's
            "conntrack_max_per_core": 0}


def connections(env: dict[str, Any], eks_endpoints: dict[str, dict] | None = None,
                machines: bool = False) -> dict[str, Any]:
    """A ``backends.connections.Connections`` document (JSON-able) for this environment.

    ``machines``: the metal/vSphere hosts are the machines part's (kubeadm path: its SSH key, no
    supervisor, the artefact settings) instead of the fast SSH hosts (the test-only supervisor path).
    """
    out: dict[str, Any] = {}
    aws = env.get("aws") or {}
    if aws.get("endpoint_url"):
        out["aws"] = {"endpoint_url": aws["endpoint_url"], "access_key_id": aws["access_key_id"],
                      "secret_access_key": aws["secret_access_key"], "wait_seconds": 0.2, "timeout_seconds": 120}
    vs = env.get("vsphere") or {}
    if vs.get("host"):
        out["vsphere"] = {"host": vs["host"], "port": vs["port"], "user": vs["user"], "password": vs["password"],
                          "insecure": bool(vs.get("insecure", True))}
    hosts = env.get("hosts") or {}
    ms = env.get("machines") or {}
    if machines:
        out["ssh"] = {"user": ms.get("user", "root"), "private_key_file": ms["private_key"],
                      "known_hosts_file": ms["known_hosts"]}
        out["kubernetes"] = machine_settings(ms)
    elif hosts.get("private_key"):
        # host keys are checked as in production: the hosts' keys are signed by the test CA it trusts
        out["ssh"] = {"user": hosts.get("user", "root"), "private_key_file": hosts["private_key"],
                      "known_hosts_file": hosts.get("known_hosts"), "supervisor": hosts.get("supervisor")}
    binaries = (env.get("kube") or {}).get("binaries")
    if binaries:
        out["kube_binaries"] = binaries
    if eks_endpoints:
        out["testenv_eks_endpoints"] = {
            name: {"server": ep["server"], "token": ep["token"], "ca_file": ep.get("ca_file")}
            for name, ep in eks_endpoints.items()}
    return out


def write_connections(path: Path | str, env: dict[str, Any], eks_endpoints: dict[str, dict] | None = None,
                      machines: bool = False) -> Path:
    path = Path(path)
    path.write_text(json.dumps(connections(env, eks_endpoints, machines=machines), indent=2))
    path.chmod(0o600)
    return path
