"""End to end: a push to the real Git server, a signed webhook, the real ``sync-from-git`` deployment run by a
worker, and the rollout it starts changing a cluster.

Nothing is stood in: the receiver is ``fleetwright webhook serve``; ``sync-from-git`` and ``rollout-fleet`` are the
product's deployments from ``prefect.yaml``, run by ``prefect worker start`` on a process pool; the cluster is a
moto EKS cluster mapped to a real kube-apiserver. The assertions read Prefect and the cluster.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest
from kubernetes import client as k8s

from fleetwright.webhook.sender import push_payload, signed

from .conftest import EXAMPLES, kube_client
from .test_webhook import Receiver, wait_for
from .workers import deployed_worker

pytestmark = pytest.mark.timeout(1200)
ROOT = Path(__file__).resolve().parents[2]
BLOCK = "webhook-e2e-secrets"
SECRET = "e2e-secret-4b1f09"
CLUSTER = """apiVersion: fleetwright.io/v1alpha1
kind: Cluster
metadata:
  name: wh-web
  labels: {env: dev, tier: whe2e}
spec:
  model: edge-small@1.0.0
  driftMode: correct
  owner: payments
  variables: {environment: dev}
  backend: {type: aws, region: eu-west-1, vpc: {cidr: 10.81.0.0/16}}
"""
COMPONENT_SET = """apiVersion: fleetwright.io/v1alpha1
kind: ComponentSet
metadata:
  name: external-dns-whe2e
spec:
  description: DNS records for the webhook test cluster
  clusterSelector: {matchLabels: {tier: whe2e}}
  components:
    - name: external-dns
      values: {domain: e2e.corp.example.com}
"""


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, testenv_config, kube_factory, prefect_api, _aws_session, git_server):
    """One EKS cluster created from a repository on the Git server, a worker for the product's deployments,
    and a receiver for that repository."""
    import testenv
    from testenv.connections import write_connections

    testenv.load_part("aws").reset(testenv_config)
    d = tmp_path_factory.mktemp("whe2e")
    root = d / "defs"
    for sub in ("components", "models", "teams"):
        shutil.copytree(EXAMPLES / sub, root / sub)
    shutil.copy(EXAMPLES / "policy.yaml", root / "policy.yaml")
    teams = root / "teams" / "teams.yaml"  # the example team is granted a cluster this fleet does not have
    teams.write_text(teams.read_text().replace("clusters: [ml-train-dev]", "clusters: []"))
    (root / "clusters").mkdir()
    (root / "clusters" / "aws.yaml").write_text(CLUSTER)
    run = os.urandom(3).hex()
    endpoint = kube_factory(f"whe2e{run}")
    conns = write_connections(d / "connections.json", {"aws": _aws_session}, {"wh-web": endpoint})
    name = f"whe2e-{run}"
    git_server.save_block()
    url = git_server.create(name, seed=root)
    env = {"FLEETWRIGHT_CONNECTIONS": str(conns), "FLEETWRIGHT_USE_BLOCKS": "0", "FLEETWRIGHT_GIT_CACHE": str(d / "cache"),
           "FLEETWRIGHT_RETRY_BASE_SECONDS": "0.05", "FLEETWRIGHT_DEFINITIONS_REPO": url,
           "FLEETWRIGHT_DEFINITIONS_REF": "main"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from tasks.blocks import connections

    connections.cache_clear()
    from flows.lifecycle import create_cluster
    from tasks.definitions import DefinitionsSource

    made = create_cluster(cluster="wh-web", source=DefinitionsSource(repo=url, ref="main"), actor="alice")
    assert made["clusters"][0]["status"] == "converged", made
    # the product's deployments, and a worker that runs them (its flow runs inherit this environment)
    wlog = d / "worker.log"
    stack = contextlib.ExitStack()
    stack.enter_context(deployed_worker(prefect_api, ["sync-from-git", "rollout-fleet"], wlog))
    from prefect.blocks.system import Secret

    Secret(value=json.dumps([SECRET])).save(BLOCK, overwrite=True)
    cfg = d / "webhook.yaml"
    cfg.write_text(f"deployment: sync-from-git/sync-from-git\nsecret_block: {BLOCK}\ndebounce_seconds: 1\n"
                   f"repositories:\n  - url: {url}\n    branches: [main]\n")
    rx = Receiver(cfg, d / "rx.log").start()
    try:
        yield {"url": url, "name": name, "endpoint": endpoint, "rx": rx, "worker_log": wlog}
    finally:
        rx.stop()
        stack.close()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        connections.cache_clear()


def final(run_id, timeout: float, what: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as c:
        return wait_for(lambda: (lambda fr: fr if fr.state and fr.state.is_final() else None)(c.read_flow_run(run_id)),
                        timeout, what, every=2)


def runs_with_key(key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterIdempotencyKey

    with get_client(sync_client=True) as c:
        return c.read_flow_runs(flow_run_filter=FlowRunFilter(idempotency_key=FlowRunFilterIdempotencyKey(any_=[key])))


def artifacts_of(run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as c:
        return c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))


def namespaces(endpoint) -> set[str]:
    return {n.metadata.name for n in k8s.CoreV1Api(kube_client(endpoint)).list_namespace().items}


def deliver(e2e, before: str, after: str, delivery: str):
    h, body = signed("github", SECRET, push_payload(e2e["url"], "refs/heads/main", before, after, "alice"),
                     event="push", delivery=delivery)
    r = e2e["rx"].post("github", h, body)
    assert r.status_code == 202 and r.json()["status"] == "accepted", r.text
    if r.json()["flow_run_id"]:
        return r.json()["flow_run_id"]
    # answered within its second while Prefect was slow: the receiver creates the run in the background
    return wait_for(lambda: next((f.id for f in sync_runs() if f.parameters.get("after") == after), None), 120,
                    f"the sync run of {after[:12]} created in the background", every=1)


def sync_runs() -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as c:
        return c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["sync-from-git"])))


def test_a_signed_push_rolls_the_change_out_through_the_real_sync(e2e, git_server):
    assert "external-dns" not in namespaces(e2e["endpoint"])
    before = git_server.head(e2e["name"])
    after = git_server.commit(e2e["name"], {"componentsets/external-dns-whe2e.yaml": COMPONENT_SET},
                              "external-dns for the webhook test cluster", author="alice")
    sync_id = deliver(e2e, before, after, "e2e-delivery-1")
    sync = final(sync_id, 600, "the sync-from-git run to finish")
    assert sync.state.type.value == "COMPLETED", (sync.state, e2e["worker_log"].read_text()[-3000:])
    assert sync.deployment_id is not None and sync.parameters["after"] == after
    (art,) = [a for a in artifacts_of(sync.id) if a.key == "sync-from-git"]
    assert after in art.data and after in art.description and "is **alice**: ALLOWED" in art.data
    # exactly one rollout, over exactly that cluster, pinned to the pushed commit, run by the worker
    (rollout,) = wait_for(lambda: runs_with_key(f"{after}:rollout-fleet"), 60, "the rollout the sync started")
    assert rollout.parameters["clusters"] == ["wh-web"] and rollout.parameters["source"]["ref"] == after
    assert str(rollout.id) in art.data  # linked from the sync's artifact
    done = final(rollout.id, 600, "the rollout to finish")
    assert done.state.type.value == "COMPLETED", (done.state, e2e["worker_log"].read_text()[-3000:])
    assert "external-dns" in namespaces(e2e["endpoint"]), "the push was not rolled out"
    summaries = [a for a in artifacts_of(rollout.id) if a.key == "rollout-fleet-summary"]
    assert summaries and after in summaries[0].data, [a.key for a in artifacts_of(rollout.id)]
    # the same commit again (a replay or a second hook) starts nothing: the receiver knows the commit
    h, body = signed("github", SECRET, push_payload(e2e["url"], "refs/heads/main", before, after, "alice"),
                     event="push", delivery="e2e-delivery-2")
    assert e2e["rx"].post("github", h, body).json()["status"] == "duplicate"
    # a late delivery of the older commit (before the push) rolls nothing back: the real sync finds it superseded
    late = final(deliver(e2e, "0" * 40, before, "e2e-delivery-late"), 600, "the late sync to finish")
    assert late.state.type.value == "COMPLETED", late.state
    (lart,) = [a for a in artifacts_of(late.id) if a.key == "sync-from-git"]
    assert "superseded" in lart.description and "Nothing was started" in lart.data
    assert runs_with_key(f"{before}:rollout-fleet") == []
    assert "external-dns" in namespaces(e2e["endpoint"])
