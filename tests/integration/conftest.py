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
def prefect_api(tmp_path_factory):
    """A real ``prefect server start`` on its SQLite database, with its background services (lease reaping)."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    home = tmp_path_factory.mktemp("prefect-home")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false",
               PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS="2", PREFECT_LOGGING_LEVEL="WARNING")
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240  # a loaded 2-core machine (8 parallel sessions) took 89 s
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except Exception:  # noqa: BLE001
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited: {(home / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"prefect server did not become healthy in 240s: {(home / 'server.log').read_text()[-2000:]}")
    old = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_RESULTS_LOCAL_STORAGE_PATH")}
    os.environ["PREFECT_API_URL"] = url
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(home / "results")
    try:
        with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield url
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def aws_fleet(tmp_path_factory, testenv_config, kube_factory, prefect_api, _aws_session):
    """Definitions for four EKS clusters, a connections file pointing at the test environment, env set."""
    import testenv
    from testenv.connections import write_connections

    aws = _aws_session  # started (and stopped at session end) by the testenv plugin
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
    run = os.urandom(3).hex()  # fresh control planes every run: never reuse a kept one's data
    cp_names = {name: f"flow{run}-{name}" for name in FLEET}
    endpoints = {name: kube_factory(cp_names[name]) for name in FLEET}
    conns = write_connections(root.parent / "connections.json", {"aws": aws}, endpoints)
    old = {k: os.environ.get(k) for k in ("FLEETWRIGHT_CONNECTIONS", "FLEETWRIGHT_USE_BLOCKS",
                                          "FLEETWRIGHT_RETRY_BASE_SECONDS", "FLEETWRIGHT_LOCK_LEASE_SECONDS")}
    os.environ.update({"FLEETWRIGHT_CONNECTIONS": str(conns), "FLEETWRIGHT_USE_BLOCKS": "0",
                       "FLEETWRIGHT_RETRY_BASE_SECONDS": "0.05", "FLEETWRIGHT_LOCK_LEASE_SECONDS": "60"})
    from tasks.blocks import connections

    connections.cache_clear()
    yield {"root": root, "aws": aws, "endpoints": endpoints, "connections": conns, "cp_names": cp_names,
           "testenv_config": testenv_config}
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    connections.cache_clear()


def kube_client(endpoint: dict):
    """An API client for a test control plane, built by the kube backend itself."""
    from backends.base import KubeAccess
    from backends.kube import api_client

    return api_client(KubeAccess(server=endpoint["server"], token=endpoint["token"], ca_file=endpoint.get("ca_file")))


def eks(aws: dict, region: str = "eu-west-1"):
    import boto3

    return boto3.client("eks", endpoint_url=aws["endpoint_url"], region_name=region,
                        aws_access_key_id=aws["access_key_id"], aws_secret_access_key=aws["secret_access_key"])


def dump(obj) -> str:
    return json.dumps(obj, indent=1, default=str)[:3000]
