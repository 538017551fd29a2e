"""Write-back before rollout, and a sweep in the middle of an add-component wave: real Git server, real Prefect
server, moto's EKS mapped to real kube-apiservers."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from kubernetes import client as k8s

from .conftest import EXAMPLES, kube_client
from .pauses import in_thread, paused_run, run_answering

pytestmark = pytest.mark.timeout(1500)
BOB = {"approver": "bob", "approve": True, "comment": "git-rollout test"}  # payments (owns the gr-* clusters)

CLUSTERS = """apiVersion: fleetwright.io/v1alpha1
kind: Cluster
metadata:
  name: gr-canary
  labels: {env: dev, tier: gitrace, fleetwright.io/wave: canary}
spec:
  model: edge-small@1.0.0
  driftMode: correct
  owner: payments
  variables: {environment: dev}
  backend: {type: aws, region: eu-west-1, vpc: {cidr: 10.71.0.0/16}}
---
apiVersion: fleetwright.io/v1alpha1
kind: Cluster
metadata:
  name: gr-dev
  labels: {env: dev, tier: gitrace, fleetwright.io/approval: required}
spec:
  model: edge-small@1.0.0
  driftMode: correct
  owner: payments
  variables: {environment: dev}
  backend: {type: aws, region: eu-west-1, vpc: {cidr: 10.72.0.0/16}}
"""
NAMES = ("gr-canary", "gr-dev")


@pytest.fixture(scope="module")
def race_fleet(tmp_path_factory, testenv_config, kube_factory, prefect_api, _aws_session, git_server):
    import testenv
    from testenv.connections import write_connections

    testenv.load_part("aws").reset(testenv_config)
    root = tmp_path_factory.mktemp("race") / "defs"
    for sub in ("components", "models", "teams"):
        shutil.copytree(EXAMPLES / sub, root / sub)
    shutil.copy(EXAMPLES / "policy.yaml", root / "policy.yaml")
    teams = root / "teams" / "teams.yaml"  # the example team is granted a cluster this fleet does not have
    teams.write_text(teams.read_text().replace("clusters: [ml-train-dev]", "clusters: []"))
    (root / "clusters").mkdir()
    (root / "clusters" / "aws.yaml").write_text(CLUSTERS)
    run = os.urandom(3).hex()
    endpoints = {n: kube_factory(f"race{run}-{n}") for n in NAMES}
    conns = write_connections(root.parent / "connections.json", {"aws": _aws_session}, endpoints)
    old = {k: os.environ.get(k) for k in ("FLEETWRIGHT_CONNECTIONS", "FLEETWRIGHT_USE_BLOCKS", "FLEETWRIGHT_GIT_CACHE",
                                          "FLEETWRIGHT_RETRY_BASE_SECONDS")}
    os.environ.update({"FLEETWRIGHT_CONNECTIONS": str(conns), "FLEETWRIGHT_USE_BLOCKS": "0",
                       "FLEETWRIGHT_GIT_CACHE": str(root.parent / "git-cache"), "FLEETWRIGHT_RETRY_BASE_SECONDS": "0.05"})
    from tasks.blocks import connections

    connections.cache_clear()
    git_server.save_block()
    url = git_server.create(f"race-{run}", seed=root)
    yield {"root": root, "url": url, "repo": f"race-{run}", "endpoints": endpoints}
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    connections.cache_clear()


def namespaces(fleet, cluster) -> set[str]:
    return {n.metadata.name for n in k8s.CoreV1Api(kube_client(fleet["endpoints"][cluster])).list_namespace().items}


def kept(summary: dict) -> set[tuple[str, str]]:
    return {(k["cluster"], k["object"]) for k in summary.get("kept", [])}


def test_a_sweep_in_the_middle_of_an_add_component_wave_never_removes_it(race_fleet, git_server):
    from prefect.flow_runs import resume_flow_run

    from flows.lifecycle import add_component, create_cluster
    from flows.reconcile import reconcile_fleet
    from models.waves import WavePolicy
    from tasks.definitions import DefinitionsSource

    src = DefinitionsSource(repo=race_fleet["url"], ref="main")
    assert create_cluster(cluster="gr-canary", source=src, actor="alice")["clusters"][0]["status"] == "converged"
    # gr-dev is labelled approval: required, so its creation by alice waits for a second person
    made = run_answering(create_cluster, "create-cluster", BOB, cluster="gr-dev", source=src, actor="alice")
    assert made.is_completed() and made.result()["clusters"][0]["status"] == "converged", made
    before = git_server.head(race_fleet["repo"])  # what a sweep that started before the push reads
    box = {}
    since = time.time() - 1
    t = in_thread(lambda: box.setdefault("state", add_component(
        component="external-dns", selector={"tier": "gitrace"}, values={"domain": "dev.corp.example.com"}, source=src,
        waves=WavePolicy(approval_timeout_seconds=900), idempotency_key="race-test", actor="alice", return_state=True)))
    run = paused_run("add-component", timeout=600, since=since)  # at gr-dev's wave, after the canary wave
    # the ComponentSet was pushed FIRST, and the canary wave installed from that commit
    pushed = git_server.head(race_fleet["repo"])
    assert pushed != before
    assert "external-dns" in namespaces(race_fleet, "gr-canary")
    assert "external-dns" not in namespaces(race_fleet, "gr-dev")
    # a sweep that read the definitions before the push, running in the middle of the rollout: at its commit
    # external-dns is not part of gr-canary, but the branch's head wants it, so the removal is dropped (not held
    # for an approval either: nobody is asked, nothing is pruned)
    old = reconcile_fleet(source=DefinitionsSource(repo=race_fleet["url"], ref=before), approval_timeout_seconds=60,
                          return_state=True)
    summary = old.result(raise_on_failure=False)
    assert "external-dns" in namespaces(race_fleet, "gr-canary"), "the sweep removed what the rollout added"
    assert summary["counts"] == {"in-sync": 2}, summary  # nothing held for approval, nothing failed
    assert ("gr-canary", "external-dns") in kept(summary), summary.get("kept")
    assert summary["approval"] is None
    # the rollout goes on: a second person approves gr-dev's wave, and it installs there from the pushed commit
    resume_flow_run(run.id, run_input=BOB)
    t.join(600)
    assert not t.is_alive(), "add-component did not finish after the approval"
    state = box["state"]
    assert state.is_completed(), state
    res = state.result()
    assert res["write_back"]["mode"] == "push" and res["write_back"]["sha"] == pushed
    assert "external-dns" in namespaces(race_fleet, "gr-dev") and "external-dns" in namespaces(race_fleet, "gr-canary")
    files = git_server.git("--git-dir", f"{git_server.section['root']}/{race_fleet['repo']}.git", "show",
                           f"{pushed}:componentsets/external-dns-tier-gitrace.yaml")
    assert "external-dns" in files and "dev.corp.example.com" in files
    # and a sweep at the new head finds both clusters in sync: nothing to add, nothing to remove, nothing kept
    new = reconcile_fleet(source=src, approval_timeout_seconds=60, return_state=True).result(raise_on_failure=False)
    assert new["counts"] == {"in-sync": 2}, new
    assert kept(new) == set() and new["approval"] is None


def test_write_back_branch_mode_pushes_a_review_branch_and_stops(race_fleet, git_server):
    from flows.lifecycle import add_component
    from tasks.definitions import DefinitionsSource

    head = git_server.head(race_fleet["repo"])
    out = add_component(component="cert-manager", selector={"tier": "gitrace"}, write_back="branch",
                        source=DefinitionsSource(repo=race_fleet["url"], ref="main"), actor="alice")
    wb = out["write_back"]
    assert wb["mode"] == "branch" and wb["branch"].startswith("fleetwright/add-cert-manager-tier-gitrace")
    assert git_server.head(race_fleet["repo"]) == head  # main untouched
    assert git_server.head(race_fleet["repo"], wb["branch"]) == wb["sha"]
    assert "cert-manager" not in namespaces(race_fleet, "gr-canary")  # nothing rolled out


def test_write_back_off_is_for_directories_and_the_sweep_keeps_what_it_added(race_fleet, git_server):
    from flows.lifecycle import add_component
    from flows.reconcile import reconcile_fleet
    from models.errors import PermanentError
    from tasks.definitions import DefinitionsSource

    with pytest.raises(PermanentError, match="only for a directory source"):
        add_component(component="metallb", selector={"fleetwright.io/wave": "canary"}, write_back="off",
                      source=DefinitionsSource(repo=race_fleet["url"], ref="main"), actor="alice")
    d = DefinitionsSource(path=str(race_fleet["root"]))  # the definitions as a plain directory
    sets = race_fleet["root"] / "componentsets"
    sets.mkdir(exist_ok=True)  # with the first test's external-dns, so the sweep below has only cert-manager to judge
    (sets / "external-dns-tier-gitrace.yaml").write_text(git_server.git(
        "--git-dir", f"{git_server.section['root']}/{race_fleet['repo']}.git", "show",
        "main:componentsets/external-dns-tier-gitrace.yaml"))
    out = add_component(component="cert-manager", selector={"fleetwright.io/wave": "canary"}, write_back="off", source=d, actor="alice")
    assert out["clusters"][0]["status"] == "converged"
    assert [f.name for f in sets.iterdir()] == ["external-dns-tier-gitrace.yaml"]  # nothing recorded
    sweep = reconcile_fleet(source=d, selector={"tier": "gitrace"}, approval_timeout_seconds=60,
                            return_state=True).result(raise_on_failure=False)
    assert "cert-manager" in namespaces(race_fleet, "gr-canary"), "the sweep pruned an imperative add"
    assert ("gr-canary", "cert-manager") in kept(sweep) and sweep["approval"] is None, sweep
    assert sweep["counts"] == {"in-sync": 2}, sweep
    # the definitions name the removal: then the sweep removes it
    p = race_fleet["root"] / "clusters" / "aws.yaml"
    text = p.read_text()
    p.write_text(text.replace("  variables: {environment: dev}\n  backend: {type: aws, region: eu-west-1, vpc: {cidr: 10.71",
                              "  variables: {environment: dev}\n  overrides: {components: {cert-manager: {enabled: false}}}\n"
                              "  backend: {type: aws, region: eu-west-1, vpc: {cidr: 10.71", 1))
    try:  # a removal is destructive: the sweep holds it until a person approves (the sweep's actor is automation)
        state = run_answering(reconcile_fleet, "reconcile-fleet", {"approver": "alice", "approve": True},
                              source=d, selector={"tier": "gitrace"}, approval_timeout_seconds=600)
        out = state.result(raise_on_failure=False)
        assert ("gr-canary", "cert-manager") not in kept(out), out
        assert out["approval"] and out["approval"]["approved"], out
        deadline = time.time() + 120
        while "cert-manager" in namespaces(race_fleet, "gr-canary") and time.time() < deadline:
            time.sleep(1)
        assert "cert-manager" not in namespaces(race_fleet, "gr-canary")
    finally:
        p.write_text(text)
