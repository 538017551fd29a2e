"""The CLI over a real git repository: exit codes, error format, diff and policy verdicts."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from backends.definitions import read_git, resolve_ref
from fleetwright.cli import app

from .conftest import EXAMPLES

runner = CliRunner()


def git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture()
def repo(tmp_path):
    r = tmp_path / "defs"
    shutil.copytree(EXAMPLES, r / "fleet")
    git(r.parent, "init", "-q", "-b", "main", str(r))
    git(r, "-c", "user.email=t@e", "-c", "user.name=t", "add", "-A")
    git(r, "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-qm", "base")
    git(r, "tag", "base")
    return r


def commit(repo, rel, old, new, msg):
    p = repo / rel
    p.write_text(p.read_text().replace(old, new, 1))
    git(repo, "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-qam", msg)


def test_read_git_at_ref(repo):
    files = read_git(repo, "base", "fleet")
    assert "fleet/policy.yaml" in files and len(files) == len([p for p in EXAMPLES.rglob("*") if p.suffix in (".yaml", ".ics")])
    assert files["fleet/calendars/trading.ics"].startswith("BEGIN:VCALENDAR")  # calendars are read from git too
    commit(repo, "fleet/policy.yaml", "members: [dave]", "members: [dave, erin]", "auditor")
    assert "erin" not in read_git(repo, "base", "fleet")["fleet/policy.yaml"]
    assert "erin" in read_git(repo, "HEAD", "fleet")["fleet/policy.yaml"]
    assert len(resolve_ref(repo, "HEAD")) == 40


def test_diff_names_affected_clusters_and_judges(repo):
    commit(repo, "fleet/components/load-balancing.yaml", "mode: l2", "mode: bgp", "bgp")
    r = runner.invoke(app, ["diff", str(repo), "--from", "base", "--to", "HEAD", "--path", "fleet", "--format", "json", "--actor", "alice"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert {c["cluster"] for c in out["clusters"]} == {"dc1-web-dev", "dc1-web-prod", "edge-lab-01", "edge-store-01"}
    assert {"path": "components.metallb.values.mode", "old": "l2", "new": "bgp"} in out["clusters"][0]["fields"]
    assert out["policy"]["allowed"] is True
    r = runner.invoke(app, ["diff", str(repo), "--from", "base", "--to", "HEAD", "--path", "fleet", "--actor", "bob"])
    assert r.exit_code == 1
    assert "DENIED (platform-only-kind)" in r.stdout


def test_diff_protected_component_denied_for_team(repo):
    commit(repo, "fleet/clusters/vsphere.yaml", "    controlPlaneReplicas: 1\n",
           "    controlPlaneReplicas: 1\n    components:\n      kube-prometheus: {values: {retention: 1d}}\n", "shorter retention")
    r = runner.invoke(app, ["diff", str(repo), "--from", "base", "--to", "HEAD", "--path", "fleet", "--actor", "bob"])
    assert r.exit_code == 1
    assert "denied by protected-component: Cluster/dc1-web-dev: components.kube-prometheus.values.retention" in r.stdout


def test_diff_bad_ref_is_an_error(repo):
    r = runner.invoke(app, ["diff", str(repo), "--from", "nope", "--to", "HEAD"])
    assert r.exit_code == 1 and "nope" in r.stderr


def test_validate_ok_and_invalid(tmp_path):
    r = runner.invoke(app, ["validate", str(EXAMPLES)])
    assert r.exit_code == 0 and r.stdout.startswith("ok: 7 clusters")
    bad = tmp_path / "fleet"
    shutil.copytree(EXAMPLES, bad)
    p = bad / "clusters" / "aws.yaml"
    p.write_text(p.read_text().replace("region: us-east-1", "region: us-east-1\n    colour: blue"))
    r = runner.invoke(app, ["validate", str(bad)])
    assert r.exit_code == 1
    assert f"{bad}/clusters/aws.yaml:34: spec.backend.colour: unknown field" in r.stderr
    assert "Traceback" not in r.output


def test_usage_errors_exit_2():
    assert runner.invoke(app, ["plan", str(EXAMPLES)]).exit_code == 2
    assert runner.invoke(app, ["plan", str(EXAMPLES), "-c", "nope"]).exit_code == 2
    assert runner.invoke(app, ["frobnicate"]).exit_code == 2


def test_plan_and_render(tmp_path):
    r = runner.invoke(app, ["plan", str(EXAMPLES), "-c", "edge-lab-01", "--format", "json"])
    assert r.exit_code == 0
    steps = json.loads(r.stdout)["steps"]
    assert steps[0]["action"] == "infrastructure.ensure"
    r = runner.invoke(app, ["render", str(EXAMPLES), "-c", "edge-lab-01", "--format", "json"])
    desired = json.loads(r.stdout)
    assert desired["kubernetesVersion"] == "1.20"
    # an observed file equal to the desired state plans nothing
    from models.desired import DesiredCluster, observed_from

    obs = observed_from(DesiredCluster.model_validate(desired))
    f = tmp_path / "obs.json"
    f.write_text(obs.model_dump_json(by_alias=True))
    r = runner.invoke(app, ["plan", str(EXAMPLES), "-c", "edge-lab-01", "--observed", str(f)])
    assert r.exit_code == 0 and "no changes" in r.stdout
    f.write_text('{"name": "edge-lab-01", "exists": "maybe"}')
    r = runner.invoke(app, ["plan", str(EXAMPLES), "-c", "edge-lab-01", "--observed", str(f)])
    assert r.exit_code == 1 and f"{f}:1: exists:" in r.stderr


def test_schema_checks_the_examples(tmp_path):
    import jsonschema
    import yaml

    r = runner.invoke(app, ["schema"])
    schema = json.loads(r.stdout)
    for path in Path(EXAMPLES).rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            jsonschema.validate(doc, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"apiVersion": "fleetwright.io/v1alpha1", "kind": "Team", "metadata": {"name": "x"}, "spec": {"bogus": 1}}, schema)
