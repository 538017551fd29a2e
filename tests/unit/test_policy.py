from models.load import load
from models.policy import actor_from, evaluate

from .conftest import edit


def judge(old_files, new_files, who):
    old, new = load(old_files), load(new_files)
    return evaluate(old, new, actor_from(old, who))


def test_actor_identity(example_defs):
    assert actor_from(example_defs, "alice").platform
    assert actor_from(example_defs, "someone", ("platform-admins",)).platform
    bob = actor_from(example_defs, "bob")
    assert not bob.platform and bob.teams == {"payments"}
    assert actor_from(example_defs, "x", ("ds-users",)).teams == {"data-science"}


def test_platform_may_do_everything(example_files):
    new = edit(example_files, "components/platform.yaml", "retention: 15d", "retention: 1d")
    v = judge(example_files, new, "alice")
    assert v.allowed and v.rule == "platform-all"


def test_team_may_change_its_own_workspace(example_files):
    new = edit(example_files, "teams/teams.yaml", "quota: {cpu: \"16\", memory: 32Gi, pods: 100}", "quota: {cpu: \"20\", memory: 32Gi, pods: 120}")
    v = judge(example_files, new, "bob")
    assert v.allowed, v.denials


def test_team_may_not_change_another_teams_workspace(example_files):
    new = edit(example_files, "teams/teams.yaml", "members: [carol]", "members: [carol, bob]")
    v = judge(example_files, new, "bob")
    assert not v.allowed
    (d,) = v.denials
    assert (d.rule, d.object, d.field) == ("own-workspace-only", "Team/data-science", "spec.members[1]") or \
           (d.rule, d.object) == ("own-workspace-only", "Team/data-science")


def test_team_may_tune_unprotected_component_on_its_cluster(example_files):
    new = edit(example_files, "clusters/vsphere.yaml", "    controlPlaneReplicas: 1\n",
               "    controlPlaneReplicas: 1\n    components:\n      ingress-nginx: {values: {replicas: 3}}\n")
    v = judge(example_files, new, "bob")
    assert v.allowed, v.denials


def test_protected_component_values_cannot_be_changed_by_a_team(example_files):
    new = edit(example_files, "clusters/vsphere.yaml", "    controlPlaneReplicas: 1\n",
               "    controlPlaneReplicas: 1\n    components:\n      kube-prometheus: {values: {retention: 1d}}\n")
    v = judge(example_files, new, "bob")
    assert not v.allowed
    d = v.denials[0]
    assert (d.rule, d.object, d.field) == ("protected-component", "Cluster/dc1-web-dev", "components.kube-prometheus.values.retention")
    assert "denied by protected-component: Cluster/dc1-web-dev: components.kube-prometheus.values.retention" in str(d)


def test_protected_component_cannot_be_removed_by_a_team(example_files):
    new = edit(example_files, "clusters/vsphere.yaml", "    controlPlaneReplicas: 1\n",
               "    controlPlaneReplicas: 1\n    components:\n      gatekeeper: {enabled: false}\n")
    v = judge(example_files, new, "bob")
    assert [(d.rule, d.field) for d in v.denials] == [("protected-component", "components.gatekeeper")]
    assert judge(example_files, new, "alice").allowed


def test_team_may_not_change_a_cluster_it_does_not_own(example_files):
    new = edit(example_files, "clusters/metal.yaml", "driftMode: correct", "driftMode: report")
    v = judge(example_files, new, "bob")
    assert [(d.rule, d.object) for d in v.denials] == [("cluster-owner-only", "Cluster/edge-store-01")]
    assert v.denials[0].field == "spec.driftMode"


def test_models_and_components_are_platform_only(example_files):
    new = edit(example_files, "models/edge-small.yaml", "controlPlane: {replicas: 1, size: small}", "controlPlane: {replicas: 1, size: medium}")
    v = judge(example_files, new, "bob")
    assert v.denials[0].rule == "platform-only-kind" and v.denials[0].object == "ClusterModel/edge-small@1.0.0"
    assert v.denials[0].field == "spec.controlPlane.size"


def test_downgrade_of_protected_component_denied(example_files):
    # a team moves its cluster to an older model whose protected component is older (simulated by editing the catalogue)
    older = edit(example_files, "components/platform.yaml", "version: 0.13.0", "version: 0.12.0")
    v = evaluate(load(example_files), load(older), actor_from(load(example_files), "bob"))
    rules = {(d.rule, d.field) for d in v.denials}
    assert ("protected-component", "components.kube-prometheus.version") in rules
    assert ("platform-only-kind", "spec.version") in rules
