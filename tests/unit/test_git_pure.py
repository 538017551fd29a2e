"""Pure parts of the Git source: URL handling, identity mapping, what a diff dispatches."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from backends.definitions import read_tree
from backends.git import check_url, is_remote, redact
from models.diff import diff_fleet
from models.errors import PermanentError, SpecInvalid
from models.load import load
from models.policy import actor_from, evaluate, person_for
from models.resolve import resolve_all

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "fleet"


def test_remote_urls():
    for url in ("https://git.example.com/a/b.git", "ssh://git@host:22/a.git", "git@github.com:org/fleet.git",
                "file:///srv/git/fleet.git", "http://127.0.0.1:8080/x.git"):
        assert is_remote(url), url
    for path in ("/srv/defs", "defs", "./x", "C:/x"):
        assert not is_remote(path), path
    with pytest.raises(PermanentError, match="carries credentials") as e:
        check_url("https://bob:s3cret@git.example.com/a.git")
    assert "s3cret" not in str(e.value)
    assert redact("fatal: https://bob:s3cret@h/x") == "fatal: https://bob:***@h/x"


def test_git_identities_map_to_people_strictly(tmp_path):
    defs = load(read_tree(EXAMPLES))
    assert person_for(defs, "alice") == "alice" and person_for(defs, "ALICE") == "alice"
    assert person_for(defs, "fleetwright") == "fleetwright-automation"
    assert person_for(defs, "dave") == "git:dave"  # a person, but no Git identity listed for him
    assert person_for(defs, "") == "git:unknown"
    assert not actor_from(defs, person_for(defs, "mallory")).platform
    bad = tmp_path / "fleet"
    shutil.copytree(EXAMPLES, bad)
    p = bad / "policy.yaml"
    p.write_text(p.read_text().replace("gitIdentities: {", "gitIdentities: {'bad login': x, "))
    with pytest.raises(SpecInvalid, match="policy.yaml:.*gitIdentities"):
        load(read_tree(bad))


def _change(tmp_path, edits: dict[str, tuple[str, str]]):
    new = tmp_path / "new"
    shutil.copytree(EXAMPLES, new)
    for rel, (a, b) in edits.items():
        f = new / rel
        assert a in f.read_text(), (rel, a)
        f.write_text(f.read_text().replace(a, b, 1))
    old_defs, new_defs = load(read_tree(EXAMPLES)), load(read_tree(new))
    return old_defs, new_defs, diff_fleet(resolve_all(old_defs), resolve_all(new_defs))


def test_dispatch_model_bump_is_one_rollout_over_its_clusters(tmp_path):
    from flows.sync import dispatch_plan

    old, new, changes = _change(tmp_path, {"models/edge-small.yaml": ("maxSize: 3}", "maxSize: 5}")})
    plan = dispatch_plan(old, new, changes)
    assert plan == {"create": [], "rollout": ["edge-lab-01", "edge-store-01"], "onboard": [], "removed": [],
                    "teams_removed": []}


def test_dispatch_team_change_onboards_and_leaves_workspace_only_clusters(tmp_path):
    from flows.sync import dispatch_plan

    old, new, changes = _change(tmp_path, {"teams/teams.yaml": ("pods: 200", "pods: 300")})
    plan = dispatch_plan(old, new, changes)
    assert plan["onboard"] == ["data-science"] and plan["rollout"] == [] and changes


def test_dispatch_removed_cluster_is_reported_only(tmp_path):
    from flows.sync import dispatch_plan

    new_dir = tmp_path / "n"
    shutil.copytree(EXAMPLES, new_dir)
    f = new_dir / "clusters" / "metal.yaml"
    f.write_text(next(d for d in f.read_text().split("\n---\n") if "edge-store-01" in d))
    old, new = load(read_tree(EXAMPLES)), load(read_tree(new_dir))
    plan = dispatch_plan(old, new, diff_fleet(resolve_all(old), resolve_all(new)))
    assert plan["removed"] == ["edge-lab-01"] and plan["create"] == [] and plan["rollout"] == []


def test_protected_component_push_by_team_member_is_denied(tmp_path):
    old, new, _ = _change(tmp_path, {"clusters/vsphere.yaml": (
        "    controlPlaneReplicas: 1\n",
        "    controlPlaneReplicas: 1\n    components:\n      kube-prometheus: {values: {retention: 1d}}\n")})
    v = evaluate(old, new, actor_from(old, person_for(old, "bob")))
    assert not v.allowed and "protected-component" in {d.rule for d in v.denials}


def test_repository_names_compare_as_git_hosts_do():
    from flows.sync import _norm

    assert _norm("https://github.com/Org/Fleet.git") == _norm("git@github.com:org/fleet") == _norm("ssh://git@github.com/org/fleet.git/")
    assert _norm("https://github.com/org/fleet") != _norm("https://github.com/org/other")
