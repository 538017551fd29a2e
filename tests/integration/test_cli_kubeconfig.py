"""`fleetwright kubeconfig CLUSTER`: credentials from the backends, a file only its owner reads, no secret logged.

An EKS cluster made in moto (through the AWS backend) whose API is a real kube-apiserver of the test
environment: the kubeconfig the CLI writes is used by a kubernetes client to list namespaces there.
Without the test environment's endpoint map, the EKS path itself: the endpoint and CA from
``describe_cluster`` and an ``aws eks get-token`` style token.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import eks

ROOT = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "fleetwright")


@pytest.fixture(scope="module")
def fw_dev(aws_fleet):
    """fw-dev made by the backends (no flow needed: converge is what create-cluster runs)."""
    from backends.definitions import load_path
    from models.resolve import resolve
    from tasks.cluster import converge

    out = converge(resolve(load_path(aws_fleet["root"]), "fw-dev"), dry_run=False, idempotency_key="kubeconfig-test",
                   step_filter=lambda s: s.target == "infrastructure")
    assert out.status == "converged", out
    return aws_fleet


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], cwd=ROOT, env=env or dict(os.environ), capture_output=True, text=True, timeout=120)


def test_kubeconfig_to_a_private_file_reaches_the_api(fw_dev, tmp_path):
    from kubernetes import client as k8s
    from kubernetes import config as kconfig

    out = tmp_path / "fw-dev.kubeconfig"
    r = cli("kubeconfig", "fw-dev", "-d", str(fw_dev["root"]), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    token = fw_dev["endpoints"]["fw-dev"]["token"]
    assert token not in r.stdout + r.stderr and r.stdout == ""
    assert r.stderr.strip() == f"wrote {out} (mode 0600)"
    doc = yaml.safe_load(out.read_text())
    assert doc["current-context"] == "fw-dev"
    assert doc["clusters"][0]["cluster"]["server"] == fw_dev["endpoints"]["fw-dev"]["server"]
    assert doc["users"][0]["user"]["token"] == token
    api = kconfig.new_client_from_config(config_file=str(out))
    names = {n.metadata.name for n in k8s.CoreV1Api(api).list_namespace().items}
    assert {"default", "kube-system"} <= names
    out.write_text("old")  # an existing file is replaced and made private again
    out.chmod(0o644)
    assert cli("kubeconfig", "fw-dev", "-d", str(fw_dev["root"]), "-o", str(out)).returncode == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and yaml.safe_load(out.read_text()) == doc


def test_kubeconfig_to_stdout_and_errors(fw_dev):
    r = cli("kubeconfig", "fw-dev", "-d", str(fw_dev["root"]))
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["users"][0]["user"]["token"] == fw_dev["endpoints"]["fw-dev"]["token"]
    assert r.stderr == ""
    unknown = cli("kubeconfig", "fw-nope", "-d", str(fw_dev["root"]))
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: no Cluster 'fw-nope'; known: fw-canary, fw-dev")


def test_kubeconfig_of_an_eks_cluster_uses_its_endpoint_and_a_token(fw_dev, tmp_path):
    """Without the test environment's endpoint map: what a real EKS cluster gets."""
    conns = json.loads(Path(fw_dev["connections"]).read_text())
    conns.pop("testenv_eks_endpoints", None)
    plain = tmp_path / "connections.json"
    plain.write_text(json.dumps(conns))
    r = cli("kubeconfig", "fw-dev", "-d", str(fw_dev["root"]), env=dict(os.environ, FLEETWRIGHT_CONNECTIONS=str(plain)))
    assert r.returncode == 0, r.stderr
    doc = yaml.safe_load(r.stdout)
    c = eks(fw_dev["aws"]).describe_cluster(name="fw-dev")["cluster"]
    assert doc["clusters"][0]["cluster"] == {"server": c["endpoint"],
                                             "certificate-authority-data": c["certificateAuthority"]["data"]}
    token = doc["users"][0]["user"]["token"]
    assert token.startswith("k8s-aws-v1.") and token not in r.stderr
