"""A scheduled sweep never deletes by itself: destructive repairs wait for a person's approval.

fw-dev (driftMode: correct) carries two things fleetwright owns that its definition no longer names:
the component external-dns (installed by fleetwright, not in the model) and a node group ``extra``
(made by fleetwright, not in the model). The sweep repairs a ConfigMap drift at once, holds the two
removals, lists them, and asks once. Rejected or timed out: nothing is removed, and the run says so.
Approved: both are removed and the approver is recorded. Real Prefect server, moto's EKS, a real
kube-apiserver.
"""
from __future__ import annotations

import os

import pytest
from kubernetes import client as k8s

from .conftest import eks, kube_client
from .pauses import run_answering

SELECTOR = {"tier": "flowtest", "env": "dev"}  # fw-canary (not created: absent) and fw-dev


def src(fleet):
    from tasks.definitions import DefinitionsSource

    return DefinitionsSource(path=str(fleet["root"]))


@pytest.fixture(scope="module")
def fw_dev(aws_fleet):
    from flows.lifecycle import create_cluster
    from tasks.guard import forget_imperative

    # a cluster of the same name in another module of this Prefect server may have left a write-back-off record
    forget_imperative("fw-dev", "external-dns")

    out = create_cluster(cluster="fw-dev", source=src(aws_fleet), actor="bob")
    assert out["clusters"][0]["status"] == "converged", out
    return aws_fleet


def add_extras(fleet) -> None:
    """Things of ours the definition does not name: a component and a node pool, made by fleetwright itself."""
    from backends.definitions import load_path
    from models.resolve import Resolver
    from models.spec import ModelComponent
    from tasks.cluster import converge

    r = Resolver(load_path(fleet["root"]))
    # a fresh key every call: with one key, a later call takes the install from the step cache (done
    # once already) while an approved sweep has removed it since
    key = f"extras-{os.urandom(4).hex()}"
    with_dns = r.resolve("fw-dev", (ModelComponent(name="external-dns"),))
    out = converge(with_dns, dry_run=False, idempotency_key=key, step_filter=lambda s: s.object == "external-dns",
                   versions_matter=False)
    assert out.status in ("converged", "in-sync"), out
    d = r.resolve("fw-dev")
    extra = d.node_pools[0].model_copy(update={"name": "extra"})
    with_pool = d.model_copy(update={"node_pools": [*d.node_pools, extra], "hash": d.hash + "-extra"})
    out = converge(with_pool, dry_run=False, idempotency_key=key, step_filter=lambda s: s.object == "extra")
    assert out.status in ("converged", "in-sync"), out
    assert_extras_present(fleet)


def namespaces(fleet) -> set[str]:
    return {n.metadata.name for n in k8s.CoreV1Api(kube_client(fleet["endpoints"]["fw-dev"])).list_namespace().items}


def pools(fleet) -> list[str]:
    return sorted(eks(fleet["aws"]).list_nodegroups(clusterName="fw-dev")["nodegroups"])


def assert_extras_present(fleet) -> None:
    assert "external-dns" in namespaces(fleet)
    assert pools(fleet) == ["extra", "workers"]


def drift_retention(fleet) -> k8s.CoreV1Api:
    core = k8s.CoreV1Api(kube_client(fleet["endpoints"]["fw-dev"]))
    core.patch_namespaced_config_map("prometheus-settings", "monitoring", {"data": {"retention": "1h"}})
    return core


def held_artifact() -> list[dict]:
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as c:
        (art,) = c.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["reconcile-fleet-held"])))
    rows = art.data if isinstance(art.data, list) else json.loads(art.data)
    return [(r["cluster"], r["action"], r["object"]) for r in rows]


HELD = [("fw-dev", "component.remove", "external-dns"), ("fw-dev", "nodePool.delete", "extra")]


def while_paused(fleet, core):
    """While the sweep waits: the removals are listed and not done; the ConfigMap repair is already done."""
    def check():
        assert held_artifact() == HELD
        assert_extras_present(fleet)
        assert core.read_namespaced_config_map("prometheus-settings", "monitoring").data["retention"] == "3d"
    return check


@pytest.mark.parametrize("answer,rule", [({"approver": "bob", "approve": False, "comment": "keep it"}, "approval-rejected"),
                                         ({"approver": "carol", "approve": True}, "approver-authorized"),
                                         (None, "approval-timed-out")])
def test_sweep_does_nothing_destructive_without_approval(fw_dev, answer, rule):
    from flows.reconcile import reconcile_fleet

    add_extras(fw_dev)
    core = drift_retention(fw_dev)
    state = run_answering(reconcile_fleet, "reconcile-fleet", answer, check_paused=while_paused(fw_dev, core),
                          selector=SELECTOR, source=src(fw_dev), approval_timeout_seconds=6 if answer is None else 120)
    assert_extras_present(fw_dev)
    assert state.is_completed() and state.name == "Drift", state  # drift that stays, as in report mode
    assert "destructive repairs not approved, nothing destructive done: fw-dev" in state.message
    result = state.result()
    assert result["counts"] == {"absent": 1, "awaiting-approval": 1}
    assert (result["approval"]["approved"], result["approval"]["rule"]) == (False, rule)
    assert [(s["cluster"], s["action"], s["object"]) for s in result["approval"]["steps"]] == HELD
    by = {c["cluster"]: c for c in result["clusters"]}
    assert by["fw-canary"]["status"] == "absent"
    dev = by["fw-dev"]
    assert dev["status"] == "awaiting-approval"
    assert [d["action"] for d in dev["done"]] == ["component.configure"]  # the non-destructive repair went ahead
    assert [(h["action"], h["object"]) for h in dev["held"]] == [(a, o) for _, a, o in HELD]
    assert dev["reason"].startswith(f"destructive repairs not done ({rule}): ")
    assert dev["reason"].endswith("waiting: component.remove external-dns; nodePool.delete extra")


def test_sweep_carries_out_destructive_repairs_once_approved(fw_dev):
    from flows.reconcile import reconcile_fleet

    add_extras(fw_dev)
    core = drift_retention(fw_dev)
    state = run_answering(reconcile_fleet, "reconcile-fleet", {"approver": "alice", "approve": True, "comment": "CHG-9"},
                          check_paused=while_paused(fw_dev, core), selector=SELECTOR, source=src(fw_dev),
                          approval_timeout_seconds=120)
    assert state.is_completed() and state.name == "Completed", state
    result = state.result()
    assert result["counts"] == {"absent": 1, "corrected": 1}
    a = result["approval"]
    assert (a["approved"], a["approver"], a["rule"], a["comment"]) == (True, "alice", "approved", "CHG-9")
    dev = {c["cluster"]: c for c in result["clusters"]}["fw-dev"]
    assert dev["status"] == "corrected" and dev["reason"] == "destructive repairs approved by alice"
    assert [d["action"] for d in dev["done"]] == ["component.configure", "component.remove", "nodePool.delete"]
    assert "external-dns" not in namespaces(fw_dev)
    assert pools(fw_dev) == ["workers"]
    again = reconcile_fleet(selector=SELECTOR, source=src(fw_dev), approval_timeout_seconds=6)
    assert again["counts"] == {"absent": 1, "in-sync": 1} and again["approval"] is None


@pytest.fixture(scope="module")
def shard_worker(fw_dev, prefect_api, tmp_path_factory):
    """The product's reconcile-fleet and reconcile-shard deployments (prefect.yaml) on a process worker."""
    from .workers import deployed_worker

    log = tmp_path_factory.mktemp("shard-worker") / "worker.log"
    # limit 3: the fleet run waits in one slot while its shards run in the others
    with deployed_worker(prefect_api, ["reconcile-fleet", "reconcile-shard"], log, limit=3) as proc:
        yield {"proc": proc, "log": log}


def _artifact(key: str, flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as c:
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]),
                                                               flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    assert arts, f"no artifact {key} for run {flow_run_id}"
    return arts[0].data


def run_table(key: str, flow_run_id) -> list[dict]:
    import json

    data = _artifact(key, flow_run_id)
    return data if isinstance(data, list) else json.loads(data)


def run_markdown(key: str, flow_run_id) -> str:
    return _artifact(key, flow_run_id)


def test_a_sharded_sweep_holds_in_its_shards_and_asks_once_in_the_fleet_run(fw_dev, shard_worker):
    """The deployment run shards (one cluster per shard): the shards repair the ConfigMap and hold the removals;
    the fleet run lists every held repair of every shard, asks once, and carries them out once approved."""
    import time

    from prefect.deployments import run_deployment
    from prefect.flow_runs import resume_flow_run

    from .pauses import paused_run
    from .workers import read_run, wait_until

    add_extras(fw_dev)
    core = drift_retention(fw_dev)
    since = time.time() - 1
    fr = run_deployment("reconcile-fleet/reconcile-fleet", timeout=0,
                        parameters={"selector": SELECTOR, "source": src(fw_dev), "shard_size": 1,
                                    "approval_timeout_seconds": 300})
    paused = paused_run("reconcile-fleet", timeout=420, since=since)
    assert paused.id == fr.id
    while_paused(fw_dev, core)()
    resume_flow_run(fr.id, run_input={"approver": "alice", "approve": True, "comment": "CHG-11"})
    state = wait_until(lambda: (s := read_run(fr.id).state) and s.is_final() and s, 420,
                       "the sharded sweep to end: " + shard_worker["log"].read_text()[-2000:], interval=2)
    assert state.is_completed() and state.name == "Completed", state
    assert "external-dns" not in namespaces(fw_dev)
    assert pools(fw_dev) == ["workers"]
    rows = {r["cluster"]: r for r in run_table("reconcile-fleet-clusters", fr.id)}  # the fleet summary's table
    assert {n: r["status"] for n, r in rows.items()} == {"fw-canary": "absent", "fw-dev": "corrected"}
    assert rows["fw-dev"]["reason"] == "destructive repairs approved by alice"
    assert rows["fw-dev"]["done"] == 3  # component.configure in its shard, then component.remove and nodePool.delete
    md = run_markdown("reconcile-fleet-summary", fr.id)
    assert "| absent | 1 |" in md and "| corrected | 1 |" in md, md
    line = next(ln for ln in md.splitlines() if ln.startswith("- destructive repairs on "))
    assert line.startswith("- destructive repairs on fw-dev: approved by **alice** (approved)") and \
        line.endswith("; comment: CHG-11"), line
    assert held_artifact() == HELD  # the list the person was asked about: every shard's held repairs
    # it really was sharded: two reconcile-shard runs under the fleet run, one cluster each
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowFilter, FlowFilterName, FlowRunFilter,
                                                FlowRunFilterParentFlowRunId)

    with get_client(sync_client=True) as c:
        shards = c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["reconcile-shard"])),
                                  flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(
                                      any_=[fr.id])))
    assert sorted(s.parameters["clusters"][0] for s in shards) == ["fw-canary", "fw-dev"]
