"""``sync-from-git`` against the test environment's Git server and a real Prefect server.

The lifecycle deployments are registered on the server (on a work pool with no worker), so the
runs ``sync-from-git`` starts stay Scheduled and the tests read exactly what was started, with
which parameters.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from models.errors import PolicyDenied

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "fleet"
POOL = "fw-sync-test"
IDENTITIES = "  gitIdentities: {alice-gh: alice, bob-gh: bob}\n"


@pytest.fixture(scope="module")
def deployments(prefect_api):
    """create-cluster, rollout-fleet, onboard-team and sync-from-git registered on the server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    entry = {"create-cluster": "flows/lifecycle.py:create_cluster", "rollout-fleet": "flows/lifecycle.py:rollout_fleet",
             "onboard-team": "flows/lifecycle.py:onboard_team", "sync-from-git": "flows/sync.py:sync_from_git"}
    ids = {}
    with get_client(sync_client=True) as c:
        try:
            c.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
        except Exception:  # noqa: BLE001 - exists (a re-run on a kept server)
            pass
        for name, ep in entry.items():
            fid = c.create_flow_from_name(name)
            ids[name] = c.create_deployment(flow_id=fid, name=name, work_pool_name=POOL, entrypoint=ep,
                                            path=str(ROOT), enforce_parameter_schema=False)
    return ids


@pytest.fixture()
def fleet_repo(git_server, prefect_api, deployments, tmp_path, monkeypatch, request):
    seed = tmp_path / "seed"
    shutil.copytree(EXAMPLES, seed)
    pol = seed / "policy.yaml"
    text = re.sub(r"(?m)^  gitIdentities: .*\n", "", pol.read_text())  # the example maps other logins
    pol.write_text(text.replace("  platformRole: platform\n", "  platformRole: platform\n" + IDENTITIES))
    name = "sync-" + request.node.name.replace("_", "-")[5:40]
    url = git_server.create(name, seed=seed)
    git_server.save_block()
    monkeypatch.setenv("FLEETWRIGHT_DEFINITIONS_REPO", url)
    monkeypatch.setenv("FLEETWRIGHT_GIT_CACHE", str(tmp_path / "git-cache"))
    return name, url


def runs_of(deployments, name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as c:
        return c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployments[name]])))


def all_runs(deployments) -> dict[str, int]:
    return {n: len(runs_of(deployments, n)) for n in ("create-cluster", "rollout-fleet", "onboard-team")}


def test_model_version_bump_starts_one_rollout_over_that_models_clusters(git_server, fleet_repo, deployments, tmp_path):
    from flows.sync import sync_from_git

    name, url = fleet_repo
    before = git_server.head(name)
    metal = (EXAMPLES / "clusters" / "metal.yaml").read_text().replace("model: edge-small@1.0.0", "model: edge-small@1.1.0")
    model = (EXAMPLES / "models" / "edge-small.yaml").read_text().replace("version: 1.0.0", "version: 1.1.0") \
        .replace("maxSize: 3}", "maxSize: 5}")
    after = git_server.commit(name, {"models/edge-small.yaml": model, "clusters/metal.yaml": metal},
                              "edge-small 1.1.0: bigger worker pools", author="alice")
    counts = all_runs(deployments)
    out = sync_from_git(repo=url, after=after, before=before, pusher="alice-gh")
    assert out["verdict"]["allowed"] and out["person"] == "alice"
    assert out["plan"]["create"] == [] and out["plan"]["onboard"] == []
    rollouts = runs_of(deployments, "rollout-fleet")
    assert len(rollouts) == counts["rollout-fleet"] + 1
    (run,) = [r for r in rollouts if r.idempotency_key == f"{after}:rollout-fleet"]
    assert sorted(run.parameters["clusters"]) == ["edge-lab-01", "edge-store-01"]  # exactly that model's clusters
    assert run.parameters["source"]["ref"] == after and run.parameters["source"]["base_ref"] == before
    assert run.parameters["actor"] == "alice"
    assert all_runs(deployments)["create-cluster"] == counts["create-cluster"]
    assert all_runs(deployments)["onboard-team"] == counts["onboard-team"]
    # the same push delivered again (or by the poll) starts nothing new
    again = sync_from_git(repo=url, after=after, before=before, pusher="alice-gh")
    assert [r["run"] for r in again["runs"]] == [r["run"] for r in out["runs"]]
    assert all_runs(deployments)["rollout-fleet"] == counts["rollout-fleet"] + 1


def test_a_new_cluster_starts_one_create_and_a_team_change_onboards(git_server, fleet_repo, deployments):
    from flows.sync import sync_from_git

    name, url = fleet_repo
    before = git_server.head(name)
    metal = (EXAMPLES / "clusters" / "metal.yaml").read_text()
    lab = next(d for d in metal.split("\n---\n") if "name: edge-lab-01" in d)
    new = lab.replace("edge-lab-01", "edge-lab-02").replace("127.0.1.", "127.0.3.")
    teams = (EXAMPLES / "teams" / "teams.yaml").read_text().replace("pods: 200", "pods: 300")
    after = git_server.commit(name, {"clusters/metal.yaml": metal.rstrip() + "\n---\n" + new,
                                     "teams/teams.yaml": teams}, "edge-lab-02; more pods for data-science", author="alice")
    counts = all_runs(deployments)
    out = sync_from_git(repo=url, after=after, before=before, pusher="alice-gh")
    assert out["plan"]["create"] == ["edge-lab-02"] and out["plan"]["onboard"] == ["data-science"]
    assert out["plan"]["rollout"] == [], out["plan"]  # ml-train-dev's only change is data-science's workspace
    creates = [r for r in runs_of(deployments, "create-cluster") if r.idempotency_key == f"{after}:create-cluster:edge-lab-02"]
    assert len(creates) == 1 and creates[0].parameters["cluster"] == "edge-lab-02"
    assert all_runs(deployments)["create-cluster"] == counts["create-cluster"] + 1
    onboards = [r for r in runs_of(deployments, "onboard-team") if r.idempotency_key == f"{after}:onboard-team:data-science"]
    assert len(onboards) == 1 and onboards[0].parameters["team"] == "data-science"
    assert all_runs(deployments)["rollout-fleet"] == counts["rollout-fleet"]


def test_a_late_delivery_of_an_older_commit_rolls_nothing_back(git_server, fleet_repo, deployments):
    """Pushes A then B; B's sync (A's delivery lost) rolls out both changes; A's late delivery starts nothing."""
    from flows.sync import sync_from_git

    name, url = fleet_repo
    base = git_server.head(name)
    assert sync_from_git(repo=url, after=base, before=base, pusher="alice-gh")["runs"] == []  # the last synced commit
    metal = (EXAMPLES / "clusters" / "metal.yaml").read_text().replace("model: edge-small@1.0.0", "model: edge-small@1.1.0")
    model = (EXAMPLES / "models" / "edge-small.yaml").read_text().replace("version: 1.0.0", "version: 1.1.0")
    a = git_server.commit(name, {"models/edge-small.yaml": model, "clusters/metal.yaml": metal}, "edge-small 1.1.0",
                          author="alice")
    b = git_server.commit(name, {"clusters/vsphere.yaml": (
        "    controlPlaneReplicas: 1\n",
        "    controlPlaneReplicas: 1\n    components:\n      kube-prometheus: {values: {retention: 1d}}\n")},
        "shorter retention", author="alice")
    counts = all_runs(deployments)
    out = sync_from_git(repo=url, after=b, before=a, pusher="alice-gh")  # the delivery says a..b
    assert out["before"] == base, "the diff starts at the last synced commit, not at the delivery's before"
    (run,) = [r for r in runs_of(deployments, "rollout-fleet") if r.idempotency_key == f"{b}:rollout-fleet"]
    assert sorted(run.parameters["clusters"]) == ["dc1-web-dev", "edge-lab-01", "edge-store-01"]
    assert all_runs(deployments)["rollout-fleet"] == counts["rollout-fleet"] + 1
    # A's delivery arrives late (or is replayed): the branch is past it, so nothing starts and nothing rolls back
    late = sync_from_git(repo=url, after=a, before=base, pusher="alice-gh")
    assert late["status"] == "superseded" and late["head"] == b and late["runs"] == [], late
    assert all_runs(deployments)["rollout-fleet"] == counts["rollout-fleet"] + 1
    # a rollout an earlier sync of A started, running only now: dc1-web-dev changed again in B, so it is left to
    # B's rollout (rolling it out at A would undo B's change); the run touches no cluster
    from flows.lifecycle import rollout_fleet
    from tasks.definitions import DefinitionsSource

    src_a = DefinitionsSource(repo=url, ref=a, base_ref=base, branch="main")
    old_run = rollout_fleet(source=src_a, clusters=["dc1-web-dev"], actor="alice", idempotency_key=f"{a}:rollout-fleet")
    assert [(c["cluster"], c["status"]) for c in old_run["clusters"]] == [("dc1-web-dev", "superseded")], old_run
    assert b in old_run["clusters"][0]["reason"]
    # a commit that is not on the branch at all (force-pushed away, or another branch's) rolls nothing out either
    side = git_server.commit(name, {"NOTES.md": "side\n"}, "side", author="alice", branch="side") \
        if _branch(git_server, name, "side", base) else None
    gone = sync_from_git(repo=url, after=side, pusher="alice-gh")
    assert gone["status"] == "not-on-branch" and gone["runs"] == [], gone
    assert all_runs(deployments) == {**counts, "rollout-fleet": counts["rollout-fleet"] + 1}


def _branch(git_server, name: str, branch: str, at: str) -> bool:
    git_server.git("--git-dir", f"{git_server.section['root']}/{name}.git", "update-ref", f"refs/heads/{branch}", at)
    return True


def test_a_team_members_push_to_a_protected_component_starts_nothing(git_server, fleet_repo, deployments):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.sync import sync_from_git

    name, url = fleet_repo
    before = git_server.head(name)
    after = git_server.commit(name, {"clusters/vsphere.yaml": (
        "    controlPlaneReplicas: 1\n",
        "    controlPlaneReplicas: 1\n    components:\n      kube-prometheus: {values: {retention: 1d}}\n")},
        "shorter retention", author="bob")
    counts = all_runs(deployments)
    with pytest.raises(PolicyDenied, match="protected-component"):
        sync_from_git(repo=url, after=after, before=before, pusher="bob-gh")
    assert all_runs(deployments) == counts  # nothing started
    with get_client(sync_client=True) as c:
        (art,) = [a for a in c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["sync-from-git"])))
                  if after in (a.description or "")]
    assert "denied by protected-component" in art.description or "protected-component" in art.description
    assert "**protected-component**: Cluster/dc1-web-dev: components.kube-prometheus.values.retention" in art.data
    assert "is **bob**" in art.data and "Nothing was started" in art.data
    # an identity the Policy does not list may change nothing
    with pytest.raises(PolicyDenied):
        sync_from_git(repo=url, after=after, before=before, pusher="mallory")


def test_a_pull_request_is_a_dry_run(git_server, fleet_repo, deployments):
    from flows.sync import sync_from_git

    name, url = fleet_repo
    base = git_server.head(name)
    head = git_server.commit(name, {"components/load-balancing.yaml": ("mode: l2", "mode: bgp")}, "bgp",
                             author="alice", branch="main")
    counts = all_runs(deployments)
    out = sync_from_git(repo=url, after=head, before=base, pusher="alice-gh", event="pull_request")
    assert out["dry_run"] and out["runs"] == [] and all_runs(deployments) == counts
    assert {c["cluster"] for c in out["clusters"]} == {"dc1-web-dev", "dc1-web-prod", "edge-lab-01", "edge-store-01"}
    assert out["verdict"]["allowed"]


def test_unknown_repository_is_refused(fleet_repo):
    from flows.sync import sync_from_git
    from models.errors import PermanentError

    with pytest.raises(PermanentError, match="not this worker's definitions repository"):
        sync_from_git(repo="https://git.example.com/other.git", after="0" * 40)


def test_the_poll_syncs_a_push_whose_webhook_was_lost(git_server, fleet_repo, deployments):
    """The fallback: the branch moved with no webhook; the poll starts one sync-from-git for the new head."""
    import yaml

    from flows.sync import poll_git

    name, url = fleet_repo
    first = poll_git(repo=url, actor="alice")
    assert first == {"status": "baseline", "head": git_server.head(name)}
    assert poll_git(repo=url, actor="alice")["status"] == "up-to-date"
    base = git_server.head(name)
    after = git_server.commit(name, {"NOTES.md": "lost webhook\n"}, "a push whose delivery was lost", author="alice")
    n = len(runs_of(deployments, "sync-from-git"))
    out = poll_git(repo=url, actor="alice")
    assert out["status"] == "started" and out["head"] == after and out["before"] == base
    again = poll_git(repo=url, actor="alice")  # the sync has not run yet (no worker): the same run, not a second one
    assert again["run"] == out["run"]
    runs = runs_of(deployments, "sync-from-git")
    assert len(runs) == n + 1
    (run,) = [r for r in runs if str(r.id) == out["run"]]
    assert run.parameters["after"] == after and run.parameters["before"] == base and run.parameters["pusher"] == "alice"
    # the product's schedule: every 5 minutes
    deps = {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    assert deps["sync-from-git-poll"]["schedules"][0]["interval"] == 300
