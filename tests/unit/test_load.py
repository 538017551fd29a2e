import pytest

from models.errors import SpecInvalid
from models.load import load

from .conftest import edit


def problems(files):
    with pytest.raises(SpecInvalid) as e:
        load(files)
    return [str(p) for p in e.value.problems]


def test_example_fleet_is_valid(example_defs):
    assert len(example_defs.clusters) >= 6
    assert {c.spec.backend.type for c in example_defs.clusters.values()} == {"aws", "vsphere", "metal"}
    assert len(example_defs.components) >= 6
    assert sum(len(v) for v in example_defs.models.values()) >= 4
    assert len(example_defs.models["web-standard"]) == 2
    envs = {c.metadata.labels.get("env") for c in example_defs.clusters.values()}
    assert envs == {"dev", "staging", "prod"}
    assert len(example_defs.teams) == 2 and len(example_defs.policies) == 1


def test_unknown_field_is_located(example_files):
    files = edit(example_files, "clusters/aws.yaml", "    region: us-east-1\n", "    region: us-east-1\n    colour: blue\n")
    assert problems(files) == ["clusters/aws.yaml:34: spec.backend.colour: unknown field"]


def test_min_greater_than_max_is_located_at_the_field(example_files):
    files = edit(example_files, "clusters/vsphere.yaml", "- {name: general, maxSize: 4}", "- {name: general, maxSize: 4, minSize: 6}")
    assert problems(files) == ["clusters/vsphere.yaml:41: spec.overrides.nodePools[0].minSize: must be <= maxSize (6 > 4)"]


def test_model_min_greater_than_max(example_files):
    files = edit(example_files, "models/edge-small.yaml", "minSize: 1, maxSize: 3", "minSize: 4, maxSize: 3")
    out = problems(files)
    assert out[0].startswith("models/edge-small.yaml:13: spec.nodePools[0].minSize: must be <= maxSize")


def test_unquoted_version_gets_a_hint(example_files):
    files = edit(example_files, "models/edge-small.yaml", 'kubernetes: {version: "1.20"}', "kubernetes: {version: 1.20}")
    (p,) = problems(files)
    assert p.startswith("models/edge-small.yaml:10: spec.kubernetes.version: must be a string: quote it")


def test_yaml_syntax_error_has_line(example_files):
    files = edit(example_files, "teams/teams.yaml", "  members: [bob]", "  members: [bob")
    (p,) = problems(files)
    assert p.startswith("teams/teams.yaml:") and "YAML syntax" in p


def test_wrong_api_version_and_kind(example_files):
    files = dict(example_files)
    files["x.yaml"] = "apiVersion: v1\nkind: Cluster\n---\napiVersion: fleetwright.io/v1alpha1\nkind: Clusterr\nmetadata: {name: a}\n"
    out = problems(files)
    assert "x.yaml:1: apiVersion: must be 'fleetwright.io/v1alpha1', got 'v1'" in out
    assert any(p.startswith("x.yaml:5: kind: must be one of") for p in out)


def test_duplicate_name(example_files):
    files = dict(example_files)
    files["zz.yaml"] = example_files["policy.yaml"]
    (p,) = problems(files)
    assert p.startswith("zz.yaml:4: metadata.name: duplicate Policy 'fleet': first defined at policy.yaml:4")


def test_model_versions_live_side_by_side(example_defs):
    assert sorted(example_defs.models["web-standard"]) == ["1.0.0", "2.0.0"]


def test_unknown_model_reference(example_files):
    files = edit(example_files, "clusters/aws.yaml", "model: web-standard@1.0.0", "model: web-standard@9.0.0")
    (p,) = problems(files)
    assert p == "clusters/aws.yaml:25: spec.model: no ClusterModel 'web-standard@9.0.0'; known versions: 1.0.0, 2.0.0"


def test_unknown_component_in_model(example_files):
    files = edit(example_files, "models/edge-small.yaml", "- name: kube-prometheus", "- name: kube-prometheuss")
    (p,) = problems(files)
    assert p == "models/edge-small.yaml:18: spec.components[0].name: no Component 'kube-prometheuss'"


def test_team_cluster_reference(example_files):
    files = edit(example_files, "teams/teams.yaml", "clusters: [ml-train-dev]", "clusters: [ml-train-dev, nope]")
    (p,) = problems(files)
    assert p == "teams/teams.yaml:39: spec.placement.clusters[1]: no Cluster 'nope'"


def test_variable_checks(example_files):
    files = edit(example_files, "clusters/aws.yaml", "variables: {environment: prod, workers: 6}", "variables: {environment: prod, workers: 99}")
    assert problems(files) == ["clusters/aws.yaml:10: spec.variables.workers: must be <= 50, got 99"]
    files = edit(example_files, "clusters/aws.yaml", "variables: {environment: prod, workers: 6}", "variables: {environment: prod, workerz: 6}")
    assert "declares no variable 'workerz'" in problems(files)[0]
    files = edit(example_files, "clusters/aws.yaml", "variables: {environment: prod, workers: 6}", "variables: {workers: 6}")
    assert problems(files) == ["clusters/aws.yaml:10: spec.variables: variable 'environment' is required by model web-standard@2.0.0 and has no default"]
    files = edit(example_files, "clusters/aws.yaml", "variables: {environment: prod, workers: 6}", "variables: {environment: prod, workers: six}")
    assert "must be of type integer" in problems(files)[0]


def test_duplicate_host_address_across_clusters(example_files):
    files = edit(example_files, "clusters/metal.yaml", "address: 127.0.1.112", "address: 127.0.1.101")
    (p,) = problems(files)
    assert p == "clusters/metal.yaml:16: spec.backend.hosts[0].address: address 127.0.1.101 is already used by cluster 'edge-lab-01'"


def test_namespace_claimed_by_two_teams(example_files):
    files = edit(example_files, "teams/teams.yaml", "- name: training", "- name: payments")
    (p,) = problems(files)
    assert p == "teams/teams.yaml:11: spec.namespaces[0].name: namespace 'payments' is already claimed by team 'data-science'"


def test_ip_pool_too_small(example_files):
    files = edit(example_files, "clusters/vsphere.yaml", "end: 127.0.1.29", "end: 127.0.1.22")
    (p,) = problems(files)
    assert "spec.backend.ipPool: has 3 addresses, but the control plane and node pools (at maxSize) need 5" in p


def test_capability_missing_on_backend(example_files):
    files = edit(example_files, "components/storage.yaml", "    aws: {available: false}\n    vsphere: {available: false}\n",
                 "    aws: {available: false}\n    vsphere: {available: false}\n    metal: {available: false}\n")
    out = problems(files)
    assert any("asks for capability 'storage', and no component provides it on metal" in p for p in out)


def test_every_error_collected_not_just_first(example_files):
    files = edit(example_files, "clusters/aws.yaml", "    region: us-east-1\n", "    region: us-east-1\n    colour: blue\n")
    files = edit(files, "teams/teams.yaml", "role: edit", "role: superuser")
    assert len(problems(files)) == 2


def test_checks_off_still_validates_each_document(example_files):
    """A shard reading the commit its fleet run checked skips the fleet-wide checks, not validation."""
    bad_ref = edit(example_files, "clusters/aws.yaml", "model: web-standard@1.0.0", "model: web-standard@9.0.0")
    assert problems(bad_ref)  # a fleet-wide check: found with checks on ...
    assert load(bad_ref, checks=False).clusters  # ... and not looked for with them off
    bad_field = edit(example_files, "clusters/aws.yaml", "    region: us-east-1\n", "    region: us-east-1\n    colour: blue\n")
    with pytest.raises(SpecInvalid):
        load(bad_field, checks=False)
