"""Fixtures for flow tests: a real Prefect server (SQLite) and a small AWS fleet on the test environment.

The fleet: four EKS clusters in moto, each mapped to its own real kube-apiserver (moto's endpoints
do not exist), so flows create infrastructure through boto3 and install components and
workspaces through the kubernetes client.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "fleet"

FLEET_CLUSTERS = """apiVersion: fleetwright.io/v1alpha1
kind: Cluster
metadata:
  name: fw-canary
  labels: {{env: dev, tier: {tier}, fleetwright.io/wave: canary}}
spec:
  model: edge-small@1.0.0
  driftMode: correct
  owner: payments
  variables: {{environment: dev}}
  backend: {{type: aws, region: eu-west-1, vpc: {{cidr: 10.61.0.0/16}}}}
---
apiVersion: fleetwright.io/v1alpha1
kind: Cluster
metadata:
  name: fw-dev
  labels: {{env: dev, tier: {tier}}}
spec:
  model: edge-small@1.0.0
  driftMode: correct
  owner: payments
  variables: {{environment: dev}}
  backend: {{type: aws, region: eu-west-1, vpc: {{cidr: 10.62.0.0/16}}}}
---
apiVersion: fleetwright.io/v1alpha1
kind: Cluster
metadata:
  name: fw-stage
  labels: {{env: staging, tier: {tier}}}
spec:
  model: edge-small@1.0.0
  driftMode: report
  owner: payments
  variables: {{environment: staging}}
  backend: {{type: aws, region: eu-west-1, vpc: {{cidr: 10.63.0.0/16}}}}
---
apiVersion: fleetwright.io/v1alpha1
kind: Cluster
metadata:
  name: fw-prod
  labels: {{env: prod, tier: {tier}, fleetwright.io/protected: "true", fleetwright.io/approval: required}}
spec:
  model: edge-small@1.0.0
  driftMode: correct
  owner: payments
  variables: {{environment: prod}}
  backend: {{type: aws, region: eu-west-1, vpc: {{cidr: 10.64.0.0/16}}}}
"""
FLEET = ("fw-canary", "fw-dev", "fw-stage", "fw-prod")


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect server on SQLite for the whole session (prefect_test_harness)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield os.environ.get("PREFECT_API_URL")


@pytest.fixture(scope="module")
def aws_fleet(tmp_path_factory, testenv_config, kube_factory, prefect_api):
    """Definitions for four EKS clusters, a connections file pointing at the test environment, env set."""
    import testenv
    from testenv.connections import write_connections

    aws = testenv.up_part(testenv_config, "aws")
    testenv.load_part("aws").reset(testenv_config)
    root = tmp_path_factory.mktemp("fleet") / "defs"
    for sub in ("components", "models", "teams"):
        shutil.copytree(EXAMPLES / sub, root / sub)
    shutil.copy(EXAMPLES / "policy.yaml", root / "policy.yaml")
    (root / "clusters").mkdir()
    (root / "clusters" / "aws.yaml").write_text(FLEET_CLUSTERS.format(tier="flowtest"))
    # the payments team is granted the test fleet
    teams = root / "teams" / "teams.yaml"
    teams.write_text(teams.read_text().replace("matchLabels: {tier: web}", "matchLabels: {tier: flowtest}")
                     .replace("clusters: [ml-train-dev]", "clusters: []"))
    endpoints = {name: kube_factory(f"flow-{name}") for name in FLEET}
    conns = write_connections(root.parent / "connections.json", {"aws": aws}, endpoints)
    old = {k: os.environ.get(k) for k in ("FLEETWRIGHT_CONNECTIONS", "FLEETWRIGHT_USE_BLOCKS",
                                          "FLEETWRIGHT_RETRY_BASE_SECONDS", "FLEETWRIGHT_LOCK_LEASE_SECONDS")}
    os.environ.update({"FLEETWRIGHT_CONNECTIONS": str(conns), "FLEETWRIGHT_USE_BLOCKS": "0",
                       "FLEETWRIGHT_RETRY_BASE_SECONDS": "0.05", "FLEETWRIGHT_LOCK_LEASE_SECONDS": "60"})
    from tasks.blocks import connections

    connections.cache_clear()
    yield {"root": root, "aws": aws, "endpoints": endpoints, "connections": conns,
           "testenv_config": testenv_config}
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    connections.cache_clear()


def kube_client(endpoint: dict):
    from kubernetes import client

    cfg = client.Configuration()
    cfg.host = endpoint["server"]
    cfg.api_key = {"BearerToken": endpoint["token"]}
    cfg.api_key_prefix = {"BearerToken": "Bearer"}
    cfg.ssl_ca_cert = endpoint.get("ca_file")
    return client.ApiClient(cfg)


def eks(aws: dict, region: str = "eu-west-1"):
    import boto3

    return boto3.client("eks", endpoint_url=aws["endpoint_url"], region_name=region,
                        aws_access_key_id=aws["access_key_id"], aws_secret_access_key=aws["secret_access_key"])


def dump(obj) -> str:
    return json.dumps(obj, indent=1, default=str)[:3000]
