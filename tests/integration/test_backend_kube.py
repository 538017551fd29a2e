"""The kube cluster backend against a real kube-apiserver (v1.20.2, RBAC, no kubelet).

One fresh control plane for this module (``kube_factory``). Every test after the first starts by
converging the example cluster ``dc1-web-dev`` to its definitions, so tests can also run alone;
the first test proves the install from nothing and must run first on the fresh control plane.
Edited definitions are the example text with one small textual change, loaded with
``models.load.load``.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from backends.base import KubeAccess, merge_observations
from backends.definitions import read_tree
from backends.kube import INVENTORY_LABEL, KubeBackend
from models.desired import DesiredCluster, ObservedCluster, observed_from
from models.errors import OwnershipConflict, TransientError
from models.load import load
from models.plan import plan
from models.render import COMPONENT_LABEL, HASH_ANNOTATION, MANAGED_BY
from models.resolve import resolve
from testenv import kube

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "fleet"
CLUSTER = "dc1-web-dev"
OVERRIDE_AT = ("clusters/vsphere.yaml", "    controlPlaneReplicas: 1\n")
INGRESS_CLASS = ("      - apiVersion: networking.k8s.io/v1\n        kind: IngressClass\n"
                 "        metadata: {name: nginx}\n        spec: {controller: k8s.io/ingress-nginx}\n")


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def files() -> dict[str, str]:
    root = str(EXAMPLES) + "/"
    return {k.replace(root, ""): v for k, v in read_tree(EXAMPLES).items()}


def desired_of(files: dict[str, str], *edits: tuple[str, str, str]) -> DesiredCluster:
    out = dict(files)
    for name, old, new in edits:
        assert old in out[name], f"{old!r} not in {name}"
        out[name] = out[name].replace(old, new, 1)
    return resolve(load(out), CLUSTER)


def override(text: str) -> tuple[str, str, str]:
    """A cluster override of dc1-web-dev's components (YAML lines under ``overrides.components``)."""
    name, anchor = OVERRIDE_AT
    return name, anchor, anchor + "    components:\n" + "".join(f"      {line}\n" for line in text.splitlines())


@pytest.fixture(scope="module")
def base(files) -> DesiredCluster:
    return desired_of(files)


@pytest.fixture(scope="module")
def cp(kube_factory):
    return kube_factory()


@pytest.fixture(scope="module")
def backend(cp):
    b = KubeBackend(KubeAccess(server=cp["server"], token=cp["token"], ca_file=cp["ca_file"]))
    yield b
    b.close()


@pytest.fixture(scope="module")
def admin(cp):
    api = kube.api_client(cp)
    yield api
    api.close()


def infra_converged(desired: DesiredCluster) -> ObservedCluster:
    """The infrastructure's observation of a cluster that exists as desired (no in-cluster part)."""
    o = observed_from(desired)
    return o.model_copy(update={"components": {k: v for k, v in o.components.items() if v.target == "infrastructure"},
                                "workspaces": {}})


def cluster_plan(backend: KubeBackend, desired: DesiredCluster):
    p = plan(desired, merge_observations(infra_converged(desired), backend.observe(desired)))
    assert not p.refused, p.refused
    assert all(s.target == "kubernetes" for s in p.steps), [str(s) for s in p.steps]
    return p


def converge(backend: KubeBackend, desired: DesiredCluster) -> list:
    results = []
    for _ in range(3):
        p = cluster_plan(backend, desired)
        if p.empty:
            return results
        results += [backend.apply(desired, s) for s in p.steps]
    pytest.fail(f"did not converge: {[str(s) for s in cluster_plan(backend, desired).steps]}")


def actions(p) -> list[tuple[str, str]]:
    return [(s.action, s.object) for s in p.steps]


def read(fn, *args):
    try:
        return fn(*args)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def wait_absent(fn, *args, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while read(fn, *args) is not None:
        assert time.monotonic() < deadline, f"{fn.__name__}{args} still there"
        time.sleep(0.3)


# --------------------------------------------------------------------------- 1-2: install, idempotence


def test_1_install_from_nothing_in_plan_order(backend, base, admin):
    p = cluster_plan(backend, base)
    kube_components = [c.name for c in base.components if c.target == "kubernetes"]
    assert actions(p) == [("component.install", n) for n in kube_components] + [("workspace.create", "payments")]
    t0 = time.monotonic()
    results = [backend.apply(base, s) for s in p.steps]
    took = time.monotonic() - t0
    assert all(r.changed for r in results), [r.detail for r in results]
    print(f"install of {len(p.steps)} steps took {took:.2f}s")

    assert cluster_plan(backend, base).empty
    # custom object after its CRD, with ownership marks and annotations
    custom = client.CustomObjectsApi(admin)
    pool = custom.get_namespaced_custom_object("metallb.io", "v1beta1", "metallb-system", "ipaddresspools", "default")
    metallb = base.component("metallb")
    assert pool["metadata"]["labels"][MANAGED_BY] == "fleetwright"
    assert pool["metadata"]["labels"][COMPONENT_LABEL] == "metallb"
    assert pool["metadata"]["annotations"][HASH_ANNOTATION] == metallb.hash
    assert pool["metadata"]["annotations"]["fleetwright.io/version"] == metallb.version
    assert [m["manager"] for m in pool["metadata"]["managedFields"]] == ["fleetwright"]
    assert all(m["operation"] == "Apply" for m in pool["metadata"]["managedFields"])
    # the workspace's Flux objects and the inventory
    kust = custom.get_namespaced_custom_object("kustomize.toolkit.fluxcd.io", "v1beta2", "payments", "kustomizations", "payments")
    assert kust["spec"]["serviceAccountName"] == "gitops-reconciler"
    inv = client.CoreV1Api(admin).read_namespaced_config_map("fleetwright-inventory-metallb", "metallb-system")
    assert inv.metadata.labels[INVENTORY_LABEL] == "component"
    assert inv.metadata.annotations[HASH_ANNOTATION] == metallb.hash


def test_2_second_apply_changes_nothing(backend, base):
    converge(backend, base)
    steps = plan(base, merge_observations(infra_converged(base), ObservedCluster(name=base.name))).steps
    assert len(steps) == 8
    t0 = time.monotonic()
    results = [backend.apply(base, s) for s in steps]
    print(f"second apply of {len(steps)} steps took {time.monotonic() - t0:.2f}s")
    assert [r.changed for r in results] == [False] * len(steps), [r.detail for r in results if r.changed]
    t0 = time.monotonic()
    assert cluster_plan(backend, base).empty
    print(f"observe + plan took {time.monotonic() - t0:.2f}s")


# --------------------------------------------------------------------------- 3: configure, upgrade


def test_3_values_change_configures_and_version_bump_upgrades(backend, base, files, admin):
    converge(backend, base)
    apps, core = client.AppsV1Api(admin), client.CoreV1Api(admin)
    edit = override("ingress-nginx: {values: {replicas: 3, proxyBodySize: 16m}}")
    changed = desired_of(files, edit)
    p = cluster_plan(backend, changed)
    assert actions(p) == [("component.configure", "ingress-nginx")]
    # the drift against the new values names the fields that will change
    assert "ingress-nginx-controller:data.proxy-body-size: desired '16m', observed '8m'" in p.steps[0].reason
    assert "ingress-nginx-controller:spec.replicas: desired 3, observed 2" in p.steps[0].reason
    r = backend.apply(changed, p.steps[0])
    assert r.changed
    assert apps.read_namespaced_deployment("ingress-nginx-controller", "ingress-nginx").spec.replicas == 3
    assert core.read_namespaced_config_map("ingress-nginx-controller", "ingress-nginx").data["proxy-body-size"] == "16m"
    observed = backend.observe(changed).components["ingress-nginx"]
    assert observed.hash == changed.component("ingress-nginx").hash and not observed.drift
    assert cluster_plan(backend, changed).empty

    bumped = desired_of(files, edit, ("components/ingress.yaml", "  version: 1.10.0\n", "  version: 1.11.0\n"))
    p = cluster_plan(backend, bumped)
    assert actions(p) == [("component.upgrade", "ingress-nginx")]
    assert backend.apply(bumped, p.steps[0]).changed
    assert backend.observe(bumped).components["ingress-nginx"].version == "1.11.0"
    dep = apps.read_namespaced_deployment("ingress-nginx-controller", "ingress-nginx")
    assert dep.metadata.annotations["fleetwright.io/version"] == "1.11.0"
    assert cluster_plan(backend, bumped).empty
    converge(backend, base)


# --------------------------------------------------------------------------- 4: remove


def test_4_removed_component_and_workspace_are_gone(backend, base, files, admin):
    converge(backend, base)
    core, apps = client.CoreV1Api(admin), client.AppsV1Api(admin)
    smaller = desired_of(files, override("kube-prometheus: {enabled: false}"),
                         ("teams/teams.yaml", "matchLabels: {tier: web}", "matchLabels: {tier: none}"))
    p = cluster_plan(backend, smaller)
    # with no team workspace left, flux (only pulled in for GitOps) goes too, CRDs and all
    assert actions(p) == [("workspace.remove", "payments"), ("component.remove", "kube-prometheus"),
                          ("component.remove", "flux")]
    t0 = time.monotonic()
    results = [backend.apply(smaller, s) for s in p.steps]
    print(f"removal of a workspace (2 namespaces) and a component took {time.monotonic() - t0:.2f}s")
    assert all(r.changed for r in results)
    for ns in ("monitoring", "payments", "payments-batch", "flux-system"):
        assert read(core.read_namespace, ns) is None, ns
    crds = client.ApiextensionsV1Api(admin)
    assert read(crds.read_custom_resource_definition, "kustomizations.kustomize.toolkit.fluxcd.io") is None
    assert read(apps.read_namespaced_deployment, "prometheus", "monitoring") is None
    assert read(client.RbacAuthorizationV1Api(admin).read_namespaced_role_binding, "team-payments", "payments") is None
    observed = backend.observe(smaller)
    assert not {"kube-prometheus", "flux"} & set(observed.components) and "payments" not in observed.workspaces
    assert cluster_plan(backend, smaller).empty
    # removing again is success with nothing to do; installing again works at once
    assert not backend.apply(smaller, p.steps[1]).changed
    converge(backend, base)
    assert core.read_namespace("monitoring").status.phase == "Active"


# --------------------------------------------------------------------------- 5: prune


def test_5_prune_removes_only_our_dropped_objects(backend, base, files, admin):
    converge(backend, base)
    core, net = client.CoreV1Api(admin), client.NetworkingV1Api(admin)
    core.create_namespaced_config_map("ingress-nginx", {"metadata": {"name": "hand-made"}, "data": {"a": "1"}})
    net.create_ingress_class({"metadata": {"name": "hand-made"}, "spec": {"controller": "example.com/other"}})
    before = core.read_namespaced_config_map("hand-made", "ingress-nginx").metadata.resource_version
    try:
        without = desired_of(files, ("components/ingress.yaml", INGRESS_CLASS, ""))
        assert "IngressClass" not in {o["kind"] for o in without.component("ingress-nginx").objects}
        p = cluster_plan(backend, without)
        assert actions(p) == [("component.configure", "ingress-nginx")]
        r = backend.apply(without, p.steps[0])
        assert r.changed and r.outputs["pruned"] == ["IngressClass/nginx"]
        assert read(net.read_ingress_class, "nginx") is None  # a kind no longer in the set: found by inventory
        cm = core.read_namespaced_config_map("hand-made", "ingress-nginx")
        assert cm.metadata.resource_version == before and cm.data == {"a": "1"}
        assert net.read_ingress_class("hand-made").spec.controller == "example.com/other"
        assert cluster_plan(backend, without).empty
        converge(backend, base)
        assert net.read_ingress_class("nginx").metadata.labels[COMPONENT_LABEL] == "ingress-nginx"
    finally:
        core.delete_namespaced_config_map("hand-made", "ingress-nginx")
        net.delete_ingress_class("hand-made")


# --------------------------------------------------------------------------- 6: no adoption


def test_6_same_named_foreign_object_is_refused_and_untouched(backend, base, admin):
    converge(backend, base)
    core = client.CoreV1Api(admin)
    core.delete_namespaced_config_map("gatekeeper-settings", "gatekeeper-system")
    core.create_namespaced_config_map("gatekeeper-system", {"metadata": {"name": "gatekeeper-settings"},
                                                            "data": {"enforcementAction": "by-hand"}})
    before = core.read_namespaced_config_map("gatekeeper-settings", "gatekeeper-system")
    step = next(s for s in plan(base, merge_observations(infra_converged(base), ObservedCluster(name=base.name))).steps
                if s.object == "gatekeeper")
    try:
        with pytest.raises(OwnershipConflict, match="ConfigMap/gatekeeper-system/gatekeeper-settings"):
            backend.apply(base, step)
        with pytest.raises(OwnershipConflict, match="gatekeeper-settings"):
            backend.observe(base)
        after = core.read_namespaced_config_map("gatekeeper-settings", "gatekeeper-system")
        assert after.metadata.resource_version == before.metadata.resource_version
        assert after.data == {"enforcementAction": "by-hand"} and not after.metadata.labels
    finally:
        core.delete_namespaced_config_map("gatekeeper-settings", "gatekeeper-system")
    converge(backend, base)


# --------------------------------------------------------------------------- 7: drift


def test_7_drift_is_observed_by_field_and_repaired(backend, base, admin):
    converge(backend, base)
    core = client.CoreV1Api(admin)
    core.patch_namespaced_config_map("ingress-nginx-controller", "ingress-nginx",
                                     {"data": {"proxy-body-size": "1m"}}, field_manager="kubectl-edit")
    core.delete_namespaced_resource_quota("team-quota", "payments")
    observed = backend.observe(base)
    drift = observed.components["ingress-nginx"].drift
    assert [(d.path, d.desired, d.observed) for d in drift] == [
        ("ConfigMap/ingress-nginx/ingress-nginx-controller:data.proxy-body-size", "8m", "1m")]
    ws_drift = observed.workspaces["payments"].drift
    assert [(d.path, d.observed) for d in ws_drift] == [("ResourceQuota/payments/team-quota", None)]
    assert all(not c.drift for n, c in observed.components.items() if n != "ingress-nginx")

    p = cluster_plan(backend, base)
    assert actions(p) == [("component.configure", "ingress-nginx"), ("workspace.update", "payments")]
    assert "data.proxy-body-size" in p.steps[0].reason
    assert all(backend.apply(base, s).changed for s in p.steps)
    assert core.read_namespaced_config_map("ingress-nginx-controller", "ingress-nginx").data["proxy-body-size"] == "8m"
    assert core.read_namespaced_resource_quota("team-quota", "payments").spec.hard["pods"] == "100"
    assert cluster_plan(backend, base).empty


# --------------------------------------------------------------------------- 8: transient fault


def test_8_apiserver_down_mid_apply_is_transient_and_resumes(backend, base, files, admin, cp, testenv_config, monkeypatch):
    converge(backend, base)
    changed = desired_of(files, override("kube-prometheus: {values: {retention: 7d}}"))
    p = cluster_plan(backend, changed)
    assert actions(p) == [("component.configure", "kube-prometheus")]
    real = backend._apply_object
    calls = []

    def crash_after_two(*args, **kw):  # Namespace and inventory written, then the API server goes away
        calls.append(args[2]["kind"])
        if len(calls) == 3:
            kube.stop_control_plane(testenv_config, cp["name"])
        return real(*args, **kw)

    monkeypatch.setattr(backend, "_apply_object", crash_after_two)
    try:
        t0 = time.monotonic()
        with pytest.raises(TransientError):
            backend.apply(changed, p.steps[0])
        assert calls[:2] == ["Namespace", "ConfigMap"]  # the inventory (union) was written before the crash
        monkeypatch.setattr(backend, "_apply_object", real)
        with pytest.raises(TransientError, match="unreachable"):
            backend.apply(changed, p.steps[0])
        with pytest.raises(TransientError):
            backend.observe(changed)
        print(f"TransientError while down after {time.monotonic() - t0:.2f}s")
    finally:
        t0 = time.monotonic()
        kube.start_control_plane(testenv_config, cp["name"])
        print(f"control plane restart took {time.monotonic() - t0:.2f}s")
    # the interrupted step is still planned (the inventory's hash was not committed), and finishes
    p = cluster_plan(backend, changed)
    assert actions(p) == [("component.configure", "kube-prometheus")]
    assert backend.apply(changed, p.steps[0]).changed
    assert cluster_plan(backend, changed).empty
    core = client.CoreV1Api(admin)
    cms = core.list_config_map_for_all_namespaces(label_selector=f"{COMPONENT_LABEL}=kube-prometheus").items
    assert sorted(c.metadata.name for c in cms) == ["fleetwright-inventory-kube-prometheus", "prometheus-settings"]
    assert core.read_namespaced_config_map("prometheus-settings", "monitoring").data["retention"] == "7d"
    deps = client.AppsV1Api(admin).list_deployment_for_all_namespaces(label_selector=f"{COMPONENT_LABEL}=kube-prometheus")
    assert [d.metadata.name for d in deps.items] == ["prometheus"]
    converge(backend, base)


# --------------------------------------------------------------------------- 9: RBAC of the GitOps account


def test_9_gitops_service_account_acts_only_in_team_namespaces(backend, base, admin, cp):
    converge(backend, base)
    token = client.CoreV1Api(admin).create_namespaced_service_account_token(
        "gitops-reconciler", "payments", {"spec": {"audiences": ["https://kubernetes.default.svc"],
                                                   "expirationSeconds": 600}}).status.token
    via_token = kube.api_client({**cp, "token": token})
    via_impersonation = kube.api_client(cp)
    via_impersonation.set_default_header("Impersonate-User", "system:serviceaccount:payments:gitops-reconciler")
    try:
        for n, api in enumerate((via_token, via_impersonation)):
            core = client.CoreV1Api(api)
            for ns in ("payments", "payments-batch"):
                core.create_namespaced_config_map(ns, {"metadata": {"name": f"app-{n}"}, "data": {"k": "v"}})
            for ns in ("default", "ingress-nginx"):
                with pytest.raises(ApiException) as e:
                    core.create_namespaced_config_map(ns, {"metadata": {"name": f"app-{n}"}})
                assert e.value.status == 403
            with pytest.raises(ApiException) as e:
                core.create_namespace({"metadata": {"name": f"escape-{n}"}})
            assert e.value.status == 403
    finally:
        via_token.close()
        via_impersonation.close()


# --------------------------------------------------------------------------- 10: delete everything


def test_10_delete_removes_all_of_ours_and_nothing_else(backend, base, admin):
    converge(backend, base)
    core = client.CoreV1Api(admin)
    core.create_namespaced_config_map("default", {"metadata": {"name": "not-ours"}, "data": {"a": "1"}})
    t0 = time.monotonic()
    r = backend.delete(base)
    print(f"delete of every component and workspace took {time.monotonic() - t0:.2f}s")
    assert r.changed and len(r.outputs["deleted"]) > 40
    observed = backend.observe(base)
    assert observed.components == {} and observed.workspaces == {}
    ours = f"{MANAGED_BY}=fleetwright"
    assert core.list_namespace(label_selector=ours).items == []
    assert client.ApiextensionsV1Api(admin).list_custom_resource_definition(label_selector=ours).items == []
    assert client.StorageV1Api(admin).list_storage_class(label_selector=ours).items == []
    assert core.read_namespaced_config_map("not-ours", "default").data == {"a": "1"}
    assert not backend.delete(base).changed  # already gone is success
    p = cluster_plan(backend, base)
    assert [s.action for s in p.steps] == ["component.install"] * 7 + ["workspace.create"]


# --------------------------------------------------------------------------- 11: access and auth errors


def test_11_access_by_ca_data_and_auth_failures_are_permanent(base, cp):
    import base64

    from models.errors import PermanentError

    ca_data = base64.b64encode(Path(cp["ca_file"]).read_bytes()).decode()
    ok = KubeBackend(KubeAccess(server=cp["server"], token=cp["token"], ca_data=ca_data))
    bad_token = KubeBackend(KubeAccess(server=cp["server"], token="not-a-token", ca_file=cp["ca_file"]))
    bad_ca = KubeBackend(KubeAccess(server=cp["server"], token=cp["token"], ca_file="/etc/ssl/certs/ca-certificates.crt"))
    try:
        assert ok.observe(base).name == base.name
        with pytest.raises(PermanentError, match="401") as e:
            bad_token.observe(base)
        assert "not-a-token" not in str(e.value)
        with pytest.raises(PermanentError, match="TLS verification"):
            bad_ca.observe(base)
    finally:
        for b in (ok, bad_token, bad_ca):
            b.close()


# --------------------------------------------------------------------------- 12: a Helm-sourced component


PODINFO = """---
apiVersion: fleetwright.io/v1alpha1
kind: Component
metadata:
  name: podinfo
spec:
  version: 6.5.4
  description: a Helm chart, installed by Flux's helm-controller from a HelmRelease
  namespace: podinfo
  kubernetes: {min: "1.20"}
  values:
    replicaCount: 2
  source:
    helm:
      repository: https://stefanprodan.github.io/podinfo
      chart: podinfo
      version: 6.5.4
"""


def test_12_helm_component_is_applied_as_flux_objects(backend, base, files, admin):
    converge(backend, base)
    with_helm = desired_of(files, ("components/ingress.yaml", "aws: {available: false}\n",
                                   "aws: {available: false}\n" + PODINFO),
                           ("models/web-standard.yaml", "    - name: gatekeeper\n---", "    - name: gatekeeper\n    - name: podinfo\n---"))
    podinfo = with_helm.component("podinfo")
    assert podinfo.source == "helm" and "flux" in podinfo.depends_on
    p = cluster_plan(backend, with_helm)
    assert actions(p) == [("component.install", "podinfo")]
    assert backend.apply(with_helm, p.steps[0]).changed
    custom = client.CustomObjectsApi(admin)
    release = custom.get_namespaced_custom_object("helm.toolkit.fluxcd.io", "v2beta1", "podinfo", "helmreleases", "podinfo")
    assert release["spec"]["values"] == {"replicaCount": 2}
    assert release["spec"]["chart"]["spec"]["sourceRef"] == {"kind": "HelmRepository", "name": "podinfo"}
    repo = custom.get_namespaced_custom_object("source.toolkit.fluxcd.io", "v1beta2", "podinfo", "helmrepositories", "podinfo")
    assert repo["spec"]["url"] == "https://stefanprodan.github.io/podinfo"
    assert cluster_plan(backend, with_helm).empty
    # a value edited in the HelmRelease by hand is drift like any other field
    custom.patch_namespaced_custom_object("helm.toolkit.fluxcd.io", "v2beta1", "podinfo", "helmreleases", "podinfo",
                                          {"spec": {"values": {"replicaCount": 5}}})
    [d] = backend.observe(with_helm).components["podinfo"].drift
    assert (d.path, d.desired, d.observed) == ("HelmRelease/podinfo/podinfo:spec.values.replicaCount", 2, 5)
    converge(backend, base)


# --------------------------------------------------------------------------- 13: Secret values never shown


SECRET = ("      - apiVersion: v1\n        kind: Secret\n        metadata: {name: acme-account}\n"
          "        stringData: {apiKey: s3cr3t-desired-0451, user: acme}\n")


def test_13_a_changed_secret_shows_its_key_never_its_value(backend, base, files, admin, caplog):
    """E1: a Secret edited in the cluster is drift by key; no value in the drift, the plan, the step, the logs."""
    import base64
    import logging

    caplog.set_level(logging.DEBUG)
    with_secret = desired_of(files, ("components/cert-manager.yaml", "    manifests:\n", "    manifests:\n" + SECRET))
    converge(backend, with_secret)
    core = client.CoreV1Api(admin)
    live = core.read_namespaced_secret("acme-account", "cert-manager")
    assert base64.b64decode(live.data["apiKey"]).decode() == "s3cr3t-desired-0451"
    core.patch_namespaced_secret("acme-account", "cert-manager",
                                 {"data": {"apiKey": base64.b64encode(b"l1ve-changed-9876").decode()}})
    observed = backend.observe(with_secret)
    drift = observed.components["cert-manager"].drift
    assert [(d.path, d.desired, d.observed) for d in drift] == [
        ("Secret/cert-manager/acme-account:stringData.apiKey", "(redacted)", "(redacted)")]
    p = cluster_plan(backend, with_secret)
    assert actions(p) == [("component.configure", "cert-manager")]
    r = backend.apply(with_secret, p.steps[0])
    assert r.changed
    shown = " ".join([observed.model_dump_json(), p.model_dump_json() if hasattr(p, "model_dump_json") else repr(p),
                      " ".join(s.reason for s in p.steps), repr(r), caplog.text])
    for value in ("s3cr3t-desired-0451", "l1ve-changed-9876", base64.b64encode(b"s3cr3t-desired-0451").decode(),
                  base64.b64encode(b"l1ve-changed-9876").decode()):
        assert value not in shown, value
    live = core.read_namespaced_secret("acme-account", "cert-manager")
    assert base64.b64decode(live.data["apiKey"]).decode() == "s3cr3t-desired-0451"  # repaired
    assert cluster_plan(backend, with_secret).empty
    converge(backend, base)
