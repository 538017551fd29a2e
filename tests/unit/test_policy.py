import pytest

from models.load import load
from models.policy import AUTOMATION, actor_from, authorize, evaluate, judge_approval

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
    assert (d.rule, d.object, d.field) == ("own-workspace-only", "Team/data-science", "spec.members")


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


# --- who starts an action, and who approves it ---------------------------------------------------

def denial(v):
    assert not v.allowed, v
    (d,) = v.denials
    return d.rule, d.object, d.field


def test_example_policy_gives_the_automation_identity_no_role(example_defs):
    who = actor_from(example_defs, AUTOMATION)
    assert not who.platform and who.roles == frozenset() and who.teams == frozenset()


@pytest.mark.parametrize("action,kw", [("create", {"cluster": "dc1-web-dev"}), ("upgrade", {"cluster": "dc1-web-dev"}),
                                       ("decommission", {"cluster": "dc1-web-dev"}), ("onboard_team", {"team": "payments"}),
                                       ("add_component", {"component": "external-dns"})])
def test_an_imperative_action_needs_a_person(example_defs, action, kw):
    obj = f"Cluster/{kw['cluster']}" if "cluster" in kw else f"Team/{kw['team']}" if "team" in kw else f"Component/{kw['component']}"
    for nobody in ("", "  "):
        v = authorize(example_defs, actor_from(example_defs, nobody), action, **kw)
        assert denial(v) == ("person-required", obj, "actor")
        assert "there is no default actor" in str(v.denials[0])


@pytest.mark.parametrize("action,says", [("decommission", "may not decommission"),
                                         ("add_component", "may not add or change components by parameter"),
                                         ("create", "may not create"), ("upgrade", "may not change a Kubernetes version"),
                                         ("onboard_team", "may not onboard team")])
def test_automation_may_only_converge_git(example_defs, action, says):
    v = authorize(example_defs, actor_from(example_defs, AUTOMATION), action, cluster="dc1-web-dev", component="external-dns")
    assert denial(v) == ("automation-git-only", "Cluster/dc1-web-dev", "actor")
    assert says in v.denials[0].message


def test_automation_may_converge_the_committed_definitions(example_defs):
    v = authorize(example_defs, actor_from(example_defs, AUTOMATION), "reconcile", cluster="dc1-web-prod")
    assert v.allowed and v.rule == "automation-git-only"


def test_no_role_lifts_the_automation_rule(example_files):
    files = edit(example_files, "policy.yaml", "members: [alice]", f"members: [alice, {AUTOMATION}]")
    defs = load(files)
    who = actor_from(defs, AUTOMATION)
    assert who.platform
    assert denial(authorize(defs, who, "decommission", cluster="dc1-web-dev")) == \
        ("automation-git-only", "Cluster/dc1-web-dev", "actor")


def test_a_named_person_is_judged_by_roles(example_defs):
    assert authorize(example_defs, actor_from(example_defs, "alice"), "decommission", cluster="dc1-web-dev").rule == "platform-all"
    assert denial(authorize(example_defs, actor_from(example_defs, "bob"), "decommission", cluster="dc1-web-dev")) == \
        ("platform-only-action", "Cluster/dc1-web-dev", "")
    assert authorize(example_defs, actor_from(example_defs, "bob"), "create", cluster="dc1-web-prod").rule == "team-scope"


def approval(defs, approver, actor="bob", approve=True, clusters=("dc1-web-prod",)):
    return judge_approval(defs, actor=actor, approver=approver, approve=approve, clusters=list(clusters), what="create dc1-web-prod")


def test_approval_by_a_second_person(example_defs):
    v = approval(example_defs, "alice")
    assert v.allowed and v.rule == "approved" and v.actor == "alice"
    assert approval(example_defs, " alice ").allowed  # names are compared without surrounding blanks


@pytest.mark.parametrize("approver,actor,approve,rule,field", [
    ("alice", "bob", False, "approval-rejected", "approve"),
    ("", "bob", True, "approver-named", "approver"),
    (AUTOMATION, "bob", True, "approver-is-a-person", "approver"),
    ("bob", "bob", True, "second-person", "approver"),
    (" bob", "bob ", True, "second-person", "approver"),
    ("carol", "bob", True, "approver-authorized", "approver"),
])
def test_approval_denials_name_their_rule(example_defs, approver, actor, approve, rule, field):
    assert denial(approval(example_defs, approver, actor, approve)) == (rule, "Cluster/dc1-web-prod", field)


def test_an_owner_team_member_may_approve_a_sweeps_repairs(example_defs):
    """A sweep has no person as its actor: the cluster's own team (or the platform) approves."""
    assert judge_approval(example_defs, actor=None, approver="bob", approve=True, clusters=["dc1-web-dev"],
                          what="destructive repairs").allowed
    v = judge_approval(example_defs, actor=None, approver="bob", approve=True, clusters=["dc1-web-dev", "ml-train-dev"],
                       what="destructive repairs")
    assert denial(v) == ("approver-authorized", "Cluster/ml-train-dev", "approver")
