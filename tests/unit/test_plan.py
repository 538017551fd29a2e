import pytest

from models.desired import FieldDrift, ObservedCluster, ObservedComponent, ObservedNodePool, ObservedWorkspace, observed_from
from models.load import load
from models.plan import plan
from models.resolve import resolve

from .conftest import edit


@pytest.fixture()
def dev(example_defs):
    return resolve(example_defs, "dc1-web-dev")


def actions(p):
    return [(s.action, s.object) for s in p.steps]


def test_converged_cluster_has_empty_plan(example_defs):
    for name in example_defs.clusters:
        d = resolve(example_defs, name)
        assert plan(d, observed_from(d)).empty


def test_create_from_nothing_in_order(dev):
    p = plan(dev, ObservedCluster(name=dev.name))
    a = [s.action for s in p.steps]
    assert a[:3] == ["infrastructure.ensure", "controlPlane.create", "nodePool.create"]
    comps = [s.object for s in p.steps if s.action == "component.install"]
    assert comps == [c.name for c in dev.components]
    assert a[-1] == "workspace.create"
    assert all(s.reason for s in p.steps)
    assert len({s.id for s in p.steps}) == len(p.steps)


def test_scale(dev):
    obs = observed_from(dev).model_copy(update={"node_pools": {"general": ObservedNodePool(replicas=3, min_size=1, max_size=4, version="1.20", machine=dev.node_pools[0].machine)}})
    p = plan(dev, obs)
    assert actions(p) == [("nodePool.scale", "general")]
    assert p.steps[0].params["replicas"] == 1 and "is 3 (1..4), wants 1 (1..4)" in p.steps[0].reason


def _with_version(example_files, name, version):
    files = edit(example_files, "clusters/vsphere.yaml", "variables: {environment: dev, workers: 1, workerSize: small}",
                 f'variables: {{environment: dev, workers: 1, workerSize: small, kubernetesVersion: "{version}"}}')
    return resolve(load(files), name)


def test_upgrade_one_minor_at_a_time_control_plane_first(example_files):
    base = resolve(load(example_files), "dc1-web-dev")
    target = _with_version(example_files, "dc1-web-dev", "1.22")
    p = plan(target, observed_from(base))
    assert actions(p) == [("controlPlane.upgrade", "dc1-web-dev"), ("nodePool.upgrade", "general"),
                          ("controlPlane.upgrade", "dc1-web-dev"), ("nodePool.upgrade", "general")]
    assert [s.params["version"] for s in p.steps] == ["1.21", "1.21", "1.22", "1.22"]
    assert p.steps[0].id != p.steps[2].id


def test_upgrade_refused_when_a_component_does_not_support_target(example_files):
    base = resolve(load(example_files), "dc1-web-dev")
    target = _with_version(example_files, "dc1-web-dev", "1.31")
    p = plan(target, observed_from(base))
    assert p.refused and not any(s.action.endswith("upgrade") for s in p.steps)
    assert "vsphere-csi 3.1.2 supports Kubernetes 1.20..1.30, not 1.31" in p.refused[0]


def test_downgrade_refused(example_files):
    base = _with_version(example_files, "dc1-web-dev", "1.21")
    target = resolve(load(example_files), "dc1-web-dev")
    p = plan(target, observed_from(base))
    assert p.refused == ["downgrade from Kubernetes 1.21 to 1.20 is not supported"]


def test_interrupted_upgrade_finishes_node_pools(dev):
    obs = observed_from(dev)
    pools = {"general": obs.node_pools["general"].model_copy(update={"version": "1.19"})}
    p = plan(dev, obs.model_copy(update={"node_pools": pools}))
    assert actions(p) == [("nodePool.upgrade", "general")]


def test_component_upgrade_drift_and_values(dev):
    obs = observed_from(dev)
    comps = dict(obs.components)
    comps["ingress-nginx"] = ObservedComponent(version="1.9.0", hash="x")
    comps["metallb"] = comps["metallb"].model_copy(update={"drift": [FieldDrift(path="ConfigMap/metallb-system/metallb-settings.data.mode", desired="l2", observed="bgp")]})
    comps["gatekeeper"] = comps["gatekeeper"].model_copy(update={"hash": "old"})
    p = plan(dev, obs.model_copy(update={"components": comps}))
    assert actions(p) == [("component.configure", "gatekeeper"), ("component.upgrade", "ingress-nginx"), ("component.configure", "metallb")]
    assert "data.mode: desired 'l2', observed 'bgp'" in p.steps[2].reason


def test_only_observed_owned_things_are_removed(dev):
    obs = observed_from(dev)
    comps = dict(obs.components, oldthing=ObservedComponent(version="1.0.0"))
    ws = dict(obs.workspaces, formerteam=ObservedWorkspace(hash="h"))
    pools = dict(obs.node_pools, legacy=ObservedNodePool(replicas=1, min_size=1, max_size=1))
    p = plan(dev, obs.model_copy(update={"components": comps, "workspaces": ws, "node_pools": pools}))
    assert actions(p) == [("workspace.remove", "formerteam"), ("component.remove", "oldthing"), ("nodePool.delete", "legacy")]


def test_workspace_drift(dev):
    obs = observed_from(dev)
    ws = {"payments": ObservedWorkspace(hash=dev.workspaces[0].hash, drift=[FieldDrift(path="ResourceQuota/payments/team-quota", desired="present", observed="missing")])}
    p = plan(dev, obs.model_copy(update={"workspaces": ws}))
    assert actions(p) == [("workspace.update", "payments")]


# --------------------------------------------------------------------------- node pools with an autoscaler

def _pool_obs(d, replicas, mn, mx):
    p = d.node_pools[0]
    return observed_from(d).model_copy(update={"node_pools": {p.name: ObservedNodePool(
        replicas=replicas, min_size=mn, max_size=mx, version=d.kubernetes_version, machine=p.machine)}})


def _autoscaled(d, mn=1, mx=4, replicas=2):
    pools = [d.node_pools[0].model_copy(update={"autoscaling": True, "min_size": mn, "max_size": mx, "replicas": replicas})]
    return d.model_copy(update={"node_pools": pools + list(d.node_pools[1:])})


def test_autoscaled_size_inside_the_bounds_is_not_drift(dev):
    d = _autoscaled(dev)
    for replicas in (1, 2, 3, 4):
        assert plan(d, _pool_obs(d, replicas, 1, 4)).empty, replicas
    # the same observation without the autoscaler setting is drift back to replicas
    plain = d.model_copy(update={"node_pools": [d.node_pools[0].model_copy(update={"autoscaling": False})]})
    p = plan(plain, _pool_obs(plain, 3, 1, 4))
    assert actions(p) == [("nodePool.scale", d.node_pools[0].name)] and p.steps[0].params["replicas"] == 2


def test_autoscaled_bounds_are_corrected_and_the_size_kept(dev):
    d = _autoscaled(dev)
    name = d.node_pools[0].name
    p = plan(d, _pool_obs(d, 3, 2, 6))  # bounds changed out of band, size inside the definition's bounds
    assert actions(p) == [("nodePool.scale", name)]
    assert p.steps[0].params == {"replicas": 3, "minSize": 1, "maxSize": 4, "autoscaling": True}
    assert "autoscaler owns the size" in p.steps[0].reason


@pytest.mark.parametrize("have,mn,mx,want", [(9, 1, 10, 4), (0, 0, 4, 1), (6, 1, 6, 4)])
def test_autoscaled_size_outside_the_bounds_goes_to_the_nearest_bound(dev, have, mn, mx, want):
    d = _autoscaled(dev)
    p = plan(d, _pool_obs(d, have, mn, mx))
    assert [s.params["replicas"] for s in p.steps] == [want]  # the bound, not the definition's replicas (2)
    assert p.steps[0].params["minSize"] == 1 and p.steps[0].params["maxSize"] == 4
    assert f"{have} is brought to {want}" in p.steps[0].reason


def test_autoscaling_from_yaml_and_overrides(example_files):
    files = edit(example_files, "clusters/vsphere.yaml", "      - {name: general, maxSize: 4}",
                 "      - {name: general, maxSize: 4, autoscaling: true}")
    defs = load(files)
    d = resolve(defs, "dc1-web-dev")
    assert d.node_pools[0].autoscaling is True
    before = resolve(load(example_files), "dc1-web-dev")
    assert before.node_pools[0].autoscaling is False and before.hash != d.hash


def _pool(dev, **change):
    p = dev.node_pools[0]
    base = dict(replicas=p.replicas, min_size=p.min_size, max_size=p.max_size, version=dev.kubernetes_version, machine=p.machine)
    return {p.name: ObservedNodePool(**(base | change))}


def destructive(p):
    return [(s.action, s.object) for s in p.steps if s.destructive]


def test_removals_are_destructive(dev):
    obs = observed_from(dev)
    comps = dict(obs.components, oldthing=ObservedComponent(version="1.0.0"))
    ws = dict(obs.workspaces, formerteam=ObservedWorkspace(hash="h"))
    pools = dict(obs.node_pools, legacy=ObservedNodePool(replicas=1, min_size=1, max_size=1))
    p = plan(dev, obs.model_copy(update={"components": comps, "workspaces": ws, "node_pools": pools}))
    assert destructive(p) == [("workspace.remove", "formerteam"), ("component.remove", "oldthing"), ("nodePool.delete", "legacy")]


def test_scale_down_below_current_is_destructive_scale_up_is_not(dev):
    want = dev.node_pools[0].replicas
    down = plan(dev, observed_from(dev).model_copy(update={"node_pools": _pool(dev, replicas=want + 2)}))
    assert actions(down) == [("nodePool.scale", "general")] and destructive(down) == [("nodePool.scale", "general")]
    up = plan(dev, observed_from(dev).model_copy(update={"node_pools": _pool(dev, replicas=max(want - 1, 0))}))
    assert actions(up) == [("nodePool.scale", "general")] and destructive(up) == []
    bounds = plan(dev, observed_from(dev).model_copy(update={"node_pools": _pool(dev, max_size=50)}))
    assert actions(bounds) == [("nodePool.scale", "general")] and destructive(bounds) == []


def test_pool_replacement_and_fewer_control_planes_are_destructive(dev):
    obs = observed_from(dev)
    changed = plan(dev, obs.model_copy(update={"node_pools": _pool(dev, machine={**dev.node_pools[0].machine, "cpus": 99})}))
    assert destructive(changed) == [("nodePool.update", "general")]
    more_cp = plan(dev, obs.model_copy(update={"control_plane_replicas": dev.control_plane.replicas + 2}))
    assert destructive(more_cp) == [("controlPlane.scale", dev.name)]
    fewer_cp = plan(dev, obs.model_copy(update={"control_plane_replicas": 0}))
    assert actions(fewer_cp) == [("controlPlane.scale", dev.name)] and destructive(fewer_cp) == []


def test_creation_upgrades_and_repairs_are_not_destructive(dev):
    assert destructive(plan(dev, ObservedCluster(name=dev.name))) == []
    obs = observed_from(dev)
    comps = dict(obs.components, **{"ingress-nginx": ObservedComponent(version="1.9.0", hash="x")})
    assert destructive(plan(dev, obs.model_copy(update={"components": comps}))) == []
