"""Definitions from a remote Git repository, against the test environment's Git server (smart HTTP, token auth)
and a real Prefect server: credentials from a block, one commit per run, the cache clone, write-back."""
from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from models.errors import PermanentError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "fleet"


@pytest.fixture()
def git_cache(tmp_path, monkeypatch):
    d = tmp_path / "git-cache"
    monkeypatch.setenv("FLEETWRIGHT_GIT_CACHE", str(d))
    return d


@pytest.fixture()
def defs_repo(git_server, prefect_api, git_cache, request):
    git_server.save_block()
    name = "defs-" + request.node.name.replace("_", "-")[:40]
    url = git_server.create(name, seed=EXAMPLES)
    return name, url


def test_a_run_reads_one_commit_whatever_is_pushed_meanwhile(git_server, defs_repo):
    """The first load pins the ref to a commit; a push during the run changes nothing the run reads."""
    from prefect import flow

    from tasks.definitions import DefinitionsSource, load_definitions, revision

    name, url = defs_repo
    first = git_server.head(name)
    seen = {}

    @flow(name="pin-probe")
    def probe():
        src = DefinitionsSource(repo=url, ref="main")
        defs, _ = load_definitions(src)
        seen["first"] = (revision().sha, defs.policies["fleet"].spec.roles[1].members)
        seen["pushed"] = git_server.commit(name, {"policy.yaml": ("members: [dave]", "members: [dave, erin]")},
                                           "auditor erin")
        defs2, _ = load_definitions(src)  # the same run: still the pinned commit
        seen["second"] = (revision().sha, defs2.policies["fleet"].spec.roles[1].members)

    probe()
    assert seen["first"] == (first, ["dave"])
    assert seen["second"] == (first, ["dave"]), "a push during the run changed what the run read"
    assert seen["pushed"] != first and git_server.head(name) == seen["pushed"]

    @flow(name="pin-probe-next")
    def next_run():
        defs, _ = load_definitions(DefinitionsSource(repo=url, ref="main"))
        return revision().sha, defs.policies["fleet"].spec.roles[1].members

    assert next_run() == (seen["pushed"], ["dave", "erin"])  # the next run fetches and reads the new head


def test_artifacts_name_the_commit(git_server, defs_repo):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    from flows.lifecycle import create_cluster
    from tasks.definitions import DefinitionsSource

    name, url = defs_repo
    # no backend connections here: the observation fails, and the run still leaves its artifacts
    state = create_cluster(cluster="edge-lab-01", source=DefinitionsSource(repo=url, ref="main"), dry_run=True,
                           actor="alice", return_state=True)
    with get_client(sync_client=True) as c:
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["create-cluster-summary", "create-cluster-plan", "create-cluster-clusters"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    assert {a.key for a in arts} == {"create-cluster-summary", "create-cluster-clusters"}  # no plan: observe failed
    sha = git_server.head(name)
    for a in arts:
        assert sha in (a.description or ""), (a.key, a.description)
    summary = next(a for a in arts if a.key == "create-cluster-summary")
    assert f"at commit `{sha}`" in summary.data


def test_credentials_come_from_the_block_and_never_show(git_server, defs_repo, git_cache):
    from pydantic import SecretStr

    from tasks.blocks import GitCredentialsBlock
    from tasks.definitions import DefinitionsSource, load_definitions

    name, url = defs_repo
    GitCredentialsBlock(username="fleetwright", token=SecretStr("wrong-token-123")).save("git-wrong", overwrite=True)
    with pytest.raises(PermanentError) as e:
        load_definitions.fn(DefinitionsSource(repo=url, credentials_block="git-wrong"))
    assert "credentials" in str(e.value) and "wrong-token-123" not in str(e.value)
    with pytest.raises(PermanentError, match="no Git credentials block 'nope'"):
        load_definitions.fn(DefinitionsSource(repo=url, credentials_block="nope"))
    with pytest.raises(PermanentError, match="carries credentials"):
        load_definitions.fn(DefinitionsSource(repo=url.replace("http://", f"http://fleetwright:{git_server.token}@")))
    defs, _ = load_definitions.fn(DefinitionsSource(repo=url))  # the default block
    assert "edge-lab-01" in defs.clusters
    # nothing of the credentials is left behind: no askpass script or run directory in the process's private
    # directory, none in the shared temp dir, no token in the cache or anywhere under the private root
    from backends import private

    assert [p.name for p in private.process_dir().iterdir() if p.name.startswith("git")] == []
    assert not [p for p in Path("/tmp").glob("fleetwright-git-*") if p.stat().st_mtime > git_cache.stat().st_mtime - 1]
    for where in (git_cache, private.root()):
        found = subprocess.run(["grep", "-r", "-l", git_server.token, str(where)], capture_output=True, text=True)
        assert found.stdout == "", f"token found in {found.stdout}"


def _descendants(pid: int) -> set[int]:
    parent = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                raw = (p / "stat").read_text()
            except OSError:
                continue
            parent[int(p.name)] = int(raw[raw.rfind(")") + 2:].split()[1])
    out, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, pp in parent.items() if pp in frontier} - out
        out |= frontier
    return out


def _alive(pid: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return raw[raw.rfind(")") + 2:].split()[0] != "Z"


def test_a_process_killed_mid_push_leaves_no_git_process_and_no_credentials(git_server, defs_repo, tmp_path):
    """SIGKILL the process while the server holds its push: git's whole tree dies and the token files go with it."""
    import os
    import signal
    import time

    name, url = defs_repo
    priv = tmp_path / "private"
    code = ("import sys; from backends.git import RemoteRepo, GitCredentials; from pydantic import SecretStr;"
            f"r = RemoteRepo({url!r}, GitCredentials(username='fleetwright', token=SecretStr(sys.stdin.readline().strip())));"
            "r.fetch(); base = r.resolve('main'); print('fetched', flush=True);"
            "r.write_back(base, 'main', {'componentsets/k.yaml': 'kind: k\\n'}, message='k', author='alice')")
    env = dict(os.environ, FLEETWRIGHT_PRIVATE_DIR=str(priv), FLEETWRIGHT_GIT_CACHE=str(tmp_path / "cache"))
    with git_server.hold_next_push() as hold:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            proc.stdin.write(git_server.token + "\n")
            proc.stdin.close()
            assert proc.stdout.readline().strip() == "fetched", proc.stderr.read()
            hold.wait_held()  # the push is under way, waiting on the server
            askpass = list(priv.glob("p*/git-*/askpass"))
            assert len(askpass) == 1, list(priv.rglob("*"))  # the token's script is there while the push runs
            tree = _descendants(proc.pid)
            assert len(tree) >= 2, tree  # the watchdog and git (and git-remote-http)
            proc.kill()
            proc.wait(30)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and ([p for p in tree if _alive(p)] or askpass[0].exists()):
                time.sleep(0.2)
            assert [p for p in tree if _alive(p)] == [], "a git process outlived the process that started it"
            assert not askpass[0].exists(), "the credentials outlived the killed process"
            assert [p.name for p in priv.iterdir()] == [], list(priv.rglob("*"))  # its process directory too
        finally:
            if proc.poll() is None:
                proc.kill()
    assert git_server.head(name) != "" and "componentsets/k.yaml" not in git_server.git(
        "--git-dir", f"{git_server.section['root']}/{name}.git", "ls-tree", "-r", "--name-only", "main")
    found = subprocess.run(["grep", "-r", "-l", git_server.token, str(tmp_path)], capture_output=True, text=True)
    assert found.stdout == "", f"token found in {found.stdout}"


def test_two_processes_fetch_one_cache_at_once(git_server, defs_repo, git_cache):
    """Two flow processes on one worker fetch the same cache clone at the same moment: both read the head."""
    name, url = defs_repo
    sha = git_server.commit(name, {"policy.yaml": ("members: [dave]", "members: [dave, frank]")}, "frank")
    code = ("import sys; from backends.git import RemoteRepo, GitCredentials; from pydantic import SecretStr;"
            f"r = RemoteRepo({url!r}, GitCredentials(username='fleetwright', token=SecretStr(sys.argv[1])));"
            "r.fetch(); print(r.resolve('main'))")
    procs = [subprocess.Popen([sys.executable, "-c", code, git_server.token], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    assert {o.strip() for o, _ in outs} == {sha}
    assert len(list(git_cache.glob("*.git"))) == 1


def test_write_back_is_rebased_onto_a_moved_branch(git_server, defs_repo):
    """The branch moves after the run read it: the push is rejected, fetched, rebased, pushed on the new head."""
    from backends.git import RemoteRepo, WriteConflict
    from tasks.blocks import git_credentials

    name, url = defs_repo
    repo = RemoteRepo(url, git_credentials())
    repo.fetch()
    base = repo.resolve("main")
    other = git_server.commit(name, {"policy.yaml": ("members: [dave]", "members: [dave, erin]")}, "someone else")
    res = repo.write_back(base, "main", {"componentsets/x.yaml": "kind: x\n"}, message="add x", author="alice")
    assert res.attempts == 2 and res.rebased_onto == [other]
    assert git_server.head(name) == res.sha
    parent = git_server.git("--git-dir", f"{git_server.section['root']}/{name}.git", "rev-parse", f"{res.sha}^").strip()
    assert parent == other  # on top of the other push: nothing of it lost
    files = repo.read(res.sha)
    assert "erin" in files["policy.yaml"] and files["componentsets/x.yaml"] == "kind: x\n"
    # the same change again: already there, nothing pushed
    again = repo.write_back(base, "main", {"componentsets/x.yaml": "kind: x\n"}, message="add x", author="alice")
    assert again.unchanged and git_server.head(name) == res.sha
    with pytest.raises(WriteConflict, match="componentsets/x.yaml exists"):
        repo.write_back(res.sha, "main", {"componentsets/x.yaml": "kind: y\n"}, message="add y", author="alice")
    assert git_server.head(name) == res.sha


def test_write_back_gives_up_after_bounded_retries(git_server, defs_repo):
    """Someone pushes before every attempt: after 2 attempts the write-back fails with the reason, nothing pushed."""
    from backends.git import PushRejected, RemoteRepo
    from tasks.blocks import git_credentials

    name, url = defs_repo
    repo = RemoteRepo(url, git_credentials())
    repo.fetch()
    base = repo.resolve("main")
    n = {"i": 0}

    def interfere(sha):  # the pre-push check runs before each attempt: push something else right then
        n["i"] += 1
        git_server.commit(name, {f"notes/{n['i']}.txt": "x\n"}, f"interfere {n['i']}")

    with pytest.raises(PushRejected, match="rejected 2 times"):
        repo.write_back(base, "main", {"componentsets/y.yaml": "kind: y\n"}, message="add y", author="alice",
                        attempts=2, check=interfere)
    files = repo.read(git_server.head(name))
    assert "componentsets/y.yaml" not in files


def test_a_held_push_is_rejected_then_rebased(git_server, defs_repo):
    """A real race: the server holds our push while someone else's lands, then ours is non-fast-forward."""
    from backends.git import RemoteRepo
    from tasks.blocks import git_credentials

    name, url = defs_repo
    repo = RemoteRepo(url, git_credentials())
    repo.fetch()
    base = repo.resolve("main")
    box = {}
    with git_server.hold_next_push() as hold:
        t = threading.Thread(target=lambda: box.setdefault("res", repo.write_back(
            base, "main", {"componentsets/z.yaml": "kind: z\n"}, message="add z", author="alice")))
        t.start()
        hold.wait_held()
        box["other"] = git_server.commit(name, {"notes/race.txt": "x\n"}, "raced")
    t.join(120)
    res = box["res"]
    assert res.attempts == 2 and res.rebased_onto == [box["other"]] and git_server.head(name) == res.sha
