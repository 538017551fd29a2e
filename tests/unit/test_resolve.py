from models.load import load
from models.render import COMPONENT_LABEL, MANAGED_BY
from models.resolve import Resolver, resolve, resolve_all

from .conftest import edit


def names(d):
    return [c.name for c in d.components]


def test_ingress_and_storage_are_translated_per_backend(example_defs):
    aws, vs, metal = (resolve(example_defs, n) for n in ("us-web-staging", "dc1-web-dev", "edge-lab-01"))
    assert "aws-load-balancer-controller" in names(aws) and "ingress-nginx" not in names(aws)
    assert "ingress-nginx" in names(vs) and "metallb" in names(vs)
    assert "aws-ebs-csi" in names(aws) and "vsphere-csi" in names(vs) and "local-path" in names(metal)
    ebs = aws.component("aws-ebs-csi")
    assert ebs.source == "eksAddon" and ebs.target == "infrastructure" and ebs.addon["name"] == "aws-ebs-csi-driver"
    assert vs.component("metallb").values["addresses"] == "198.51.100.200-198.51.100.220"  # vSphere's own values
    assert metal.component("metallb").values["addresses"] == "192.0.2.240-192.0.2.250"


def test_helm_component_becomes_flux_helmrelease_and_pulls_in_flux(example_defs):
    d = resolve(example_defs, "us-web-staging")
    lbc = d.component("aws-load-balancer-controller")
    kinds = [o["kind"] for o in lbc.objects]
    assert kinds == ["HelmRepository", "HelmRelease"]  # kube-system is not ours: no Namespace object
    rel = lbc.objects[1]
    assert rel["spec"]["values"]["clusterName"] == "us-web-staging"
    assert names(d).index("flux") < names(d).index("aws-load-balancer-controller")
    assert lbc.depends_on == ["flux"]


def test_variants_defaults_and_overrides(example_defs):
    prod = resolve(example_defs, "eu-web-prod-1")
    (pool,) = prod.node_pools
    assert pool.replicas == 6 and pool.machine["instanceTypes"] == ["m5.xlarge", "m5a.xlarge"]
    assert pool.machine["diskSizeGiB"] == 100
    staging = resolve(example_defs, "us-web-staging")
    assert staging.node_pools[0].replicas == 2 and staging.node_pools[0].machine["instanceTypes"] == ["m5.large"]
    assert staging.control_plane.replicas == 1 and prod.control_plane.replicas == 3
    # model 2.0.0 vs 1.0.0 side by side
    assert prod.model_version == "2.0.0" and staging.model_version == "1.0.0"
    assert prod.component("kube-prometheus").values["retention"] == "30d"
    assert staging.component("kube-prometheus").values["retention"] == "15d"
    assert prod.component("external-dns").values["domain"] == "prod.corp.example.com"  # from ${var.environment}


def test_component_override_and_disable(example_files):
    files = edit(example_files, "clusters/vsphere.yaml", "    controlPlaneReplicas: 1\n",
                 "    controlPlaneReplicas: 1\n    components:\n      ingress-nginx: {values: {replicas: 5}}\n      cert-manager: {enabled: false}\n")
    d = resolve(load(files), "dc1-web-dev")
    nginx = d.component("ingress-nginx")
    dep = next(o for o in nginx.objects if o["kind"] == "Deployment")
    assert dep["spec"]["replicas"] == 5 and "cert-manager" not in names(d)


def test_resolve_is_deterministic_and_hash_tracks_content(example_files):
    a = resolve_all(load(example_files))
    b = resolve_all(load(dict(reversed(list(example_files.items())))))
    assert {k: v.hash for k, v in a.items()} == {k: v.hash for k, v in b.items()}
    assert a["dc1-web-dev"].model_dump() == b["dc1-web-dev"].model_dump()
    changed = resolve_all(load(edit(example_files, "components/load-balancing.yaml", "mode: l2", "mode: bgp")))
    assert changed["dc1-web-dev"].hash != a["dc1-web-dev"].hash
    assert changed["eu-web-prod-1"].hash == a["eu-web-prod-1"].hash  # metallb is not on AWS


def test_vsphere_machines_have_stable_names_and_no_positional_address(example_files):
    """The model names the VMs; their addresses are allocated once by the backend (backends.vsphere.addresses)."""
    before = resolve(load(example_files), "dc1-web-dev")
    after = resolve(load(edit(example_files, "clusters/vsphere.yaml", "workers: 1, workerSize: small", "workers: 3, workerSize: small")), "dc1-web-dev")
    assert [(m.name, m.address) for m in before.machines] == [("dc1-web-dev-cp-0", None), ("dc1-web-dev-general-0", None)]
    assert [m.name for m in after.machines][:2] == [m.name for m in before.machines]
    assert len(after.machines) == 4 and after.machines[0].cpu == 2


def test_metal_machines_come_from_hosts(example_defs):
    d = resolve(example_defs, "edge-store-01")
    assert [(m.name, m.role, m.address) for m in d.machines] == [
        ("store01-a", "controlPlane", "127.0.1.101"), ("store01-b", "worker", "127.0.1.102")]


def test_objects_carry_ownership_and_crds_come_first(example_defs):
    d = resolve(example_defs, "dc1-web-dev")
    for c in d.components:
        for o in c.objects:
            assert o["metadata"]["labels"][MANAGED_BY] == "fleetwright"
            assert o["metadata"]["labels"][COMPONENT_LABEL] == c.name
    kinds = [o["kind"] for o in d.component("metallb").objects]
    assert kinds.index("CustomResourceDefinition") < kinds.index("IPAddressPool")
    cm = next(o for o in d.component("flux").objects if o["kind"] == "ConfigMap")
    assert cm["data"]["concurrency"] == "4"  # ConfigMap data is always text


def test_workspaces(example_defs):
    d = resolve(example_defs, "dc1-web-dev")
    (ws,) = d.workspaces
    assert ws.team == "payments" and ws.namespaces == ["payments", "payments-batch"]
    kinds = sorted({o["kind"] for o in ws.objects})
    assert kinds == ["GitRepository", "Kustomization", "LimitRange", "Namespace", "NetworkPolicy",
                     "ResourceQuota", "RoleBinding", "ServiceAccount"]
    ks = next(o for o in ws.objects if o["kind"] == "Kustomization")
    assert ks["spec"]["serviceAccountName"] == "gitops-reconciler" and ks["metadata"]["namespace"] == "payments"
    q = next(o for o in ws.objects if o["kind"] == "ResourceQuota" and o["metadata"]["namespace"] == "payments")
    assert q["spec"]["hard"]["pods"] == "100"
    assert resolve(example_defs, "edge-lab-01").workspaces == []
    assert "flux" in names(d)  # a workspace with a GitOps source needs Flux's APIs


def test_dependencies_are_ordered(example_defs):
    d = resolve(example_defs, "eu-web-prod-1")
    n = names(d)
    for c in d.components:
        for dep in c.depends_on:
            assert n.index(dep) < n.index(c.name)


def test_resolver_shares_rendered_components(example_defs):
    r = Resolver(example_defs)
    a, b = r.resolve("edge-store-01"), r.resolve("edge-lab-01")
    assert a.component("local-path") is b.component("local-path")


def test_component_set_adds_components_by_selector(example_files):
    files = dict(example_files)
    files["componentsets/dns.yaml"] = """apiVersion: fleetwright.io/v1alpha1
kind: ComponentSet
metadata: {name: dns-for-dev}
spec:
  clusterSelector: {matchLabels: {env: dev}}
  components:
    - name: external-dns
      values: {domain: dev.example.net}
"""
    r = resolve_all(load(files))
    assert r["dc1-web-dev"].component("external-dns").values["domain"] == "dev.example.net"
    assert r["edge-lab-01"].component("external-dns") is not None
    assert r["us-web-staging"].component("external-dns") is None


def test_extra_components_from_a_flow(example_defs):
    from models.spec import ModelComponent

    d = Resolver(example_defs).resolve("edge-lab-01", (ModelComponent(name="cert-manager"),))
    assert "cert-manager" in names(d)
    assert d.hash != resolve(example_defs, "edge-lab-01").hash


def test_disabling_a_component_a_cluster_does_not_have_names_its_removal(example_files):
    """``enabled: false`` for a known Component the cluster does not have is allowed (how the definitions name the
    removal of a component added with write-back off); values for one it does not have, or an unknown name, are not."""
    import pytest

    from models.errors import SpecInvalid

    old = "  overrides:\n    controlPlaneReplicas: 1\n"
    off = edit(example_files, "clusters/aws.yaml", old, old + "    components: {external-dns: {enabled: false}}\n")
    assert "external-dns" not in names(resolve(load(off), "us-web-staging"))
    for bad in ("{external-dns: {values: {domain: x}}}", "{no-such-thing: {enabled: false}}"):
        files = edit(example_files, "clusters/aws.yaml", old, old + f"    components: {bad}\n")
        with pytest.raises(SpecInvalid, match="overrides.components"):
            resolve(load(files), "us-web-staging")
