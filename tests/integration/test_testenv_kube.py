"""The test environment's Kubernetes control planes, exercised over the wire with the official client."""
from __future__ import annotations

import base64
import secrets
import threading
import time

import pytest
import urllib3
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from testenv import kube
from testenv.common import wait_for


def _ns_name(prefix: str = "t") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


@pytest.fixture(scope="module")
def api(kube_cluster):
    c = kube.api_client(kube_cluster)
    yield c
    c.close()


@pytest.fixture
def ns(api):
    core = client.CoreV1Api(api)
    name = _ns_name()
    core.create_namespace({"metadata": {"name": name}})
    yield name
    try:
        core.delete_namespace(name)
    except ApiException as e:
        if e.status != 404:
            raise


def _sa_client(kube_cluster, token: str) -> client.ApiClient:
    return kube.api_client({**kube_cluster, "token": token})


def test_version_tls_and_kubeconfig(kube_cluster):
    # the kubeconfig file works as-is (verifies TLS against the cluster's own CA)
    api = config.new_client_from_config(config_file=kube_cluster["kubeconfig"])
    assert client.VersionApi(api).get_code().git_version == "v1.20.2"
    assert api.configuration.verify_ssl
    # a CA from another run does not verify this server: TLS is really checked
    with pytest.raises(urllib3.exceptions.MaxRetryError):
        bad = kube.api_client({**kube_cluster, "ca_file": "/etc/ssl/certs/ca-certificates.crt"})
        bad.configuration.retries = 0
        client.VersionApi(bad).get_code(_request_timeout=5)


def test_namespace_create_and_delete_is_finalized(api):
    core = client.CoreV1Api(api)
    name = _ns_name()
    core.create_namespace({"metadata": {"name": name, "labels": {"team": "a"}}})
    core.create_namespaced_config_map(name, {"metadata": {"name": "cm"}, "data": {"a": "1"}})
    assert core.read_namespace(name).status.phase == "Active"
    with pytest.raises(ApiException) as e:
        core.create_namespace({"metadata": {"name": name}})
    assert e.value.status == 409
    core.delete_namespace(name)

    def gone() -> bool:
        try:
            core.read_namespace(name)
        except ApiException as e:
            return e.status == 404
        return False

    # the controller manager's namespace controller empties and removes it
    wait_for(gone, 60, f"namespace {name} to be deleted")


def test_rbac_denies_then_rolebinding_grants(api, kube_cluster, ns):
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    # no token at all: anonymous is authenticated as system:anonymous and RBAC forbids it
    anon = kube.api_client({**kube_cluster, "token": ""})
    anon.configuration.api_key = {}
    with pytest.raises(ApiException) as e:
        client.CoreV1Api(anon).list_namespaced_config_map(ns)
    assert e.value.status in (401, 403)
    # a wrong token is rejected
    with pytest.raises(ApiException) as e:
        client.CoreV1Api(_sa_client(kube_cluster, "not-a-token")).list_namespaced_config_map(ns)
    assert e.value.status == 401

    # a service account: its token is minted by the controller manager's token controller
    core.create_namespaced_service_account(ns, {"metadata": {"name": "robot"}})

    def token() -> str | None:
        sa = core.read_namespaced_service_account("robot", ns)
        if not sa.secrets:
            return None
        sec = core.read_namespaced_secret(sa.secrets[0].name, ns)
        return base64.b64decode(sec.data["token"]).decode() if sec.data and "token" in sec.data else None

    robot = client.CoreV1Api(_sa_client(kube_cluster, wait_for(token, 30, "service-account token")))
    with pytest.raises(ApiException) as e:
        robot.list_namespaced_config_map(ns)
    assert e.value.status == 403
    assert "forbidden" in e.value.body

    rbac.create_namespaced_role_binding(ns, {
        "metadata": {"name": "robot-view"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
        "subjects": [{"kind": "ServiceAccount", "name": "robot", "namespace": ns}],
    })
    # RBAC is evaluated per request from the informer cache: allow a moment
    wait_for(lambda: robot.list_namespaced_config_map(ns) is not None, 10, "RoleBinding to take effect")
    with pytest.raises(ApiException) as e:  # view does not allow writes
        robot.create_namespaced_config_map(ns, {"metadata": {"name": "x"}})
    assert e.value.status == 403
    with pytest.raises(ApiException) as e:  # nor other namespaces
        robot.list_namespaced_config_map("default")
    assert e.value.status == 403


def test_resource_quota_is_filled_in_and_enforced(api, ns):
    core = client.CoreV1Api(api)
    core.create_namespaced_resource_quota(ns, {"metadata": {"name": "q"},
                                               "spec": {"hard": {"services": "1", "pods": "5"}}})

    def used():
        q = core.read_namespaced_resource_quota("q", ns)
        return q.status and q.status.used

    # the quota controller (controller manager) fills status.used
    u = wait_for(used, 30, "quota status")
    assert u["pods"] == "0" and u["services"] == "0"
    svc = {"spec": {"ports": [{"port": 80}], "selector": {"app": "x"}}}
    core.create_namespaced_service(ns, {"metadata": {"name": "a"}, **svc})
    with pytest.raises(ApiException) as e:
        core.create_namespaced_service(ns, {"metadata": {"name": "b"}, **svc})
    assert e.value.status == 403 and "exceeded quota" in e.value.body
    wait_for(lambda: used()["services"] == "1", 30, "quota usage to count the service")


def test_crd_and_custom_objects(api, ns):
    ext, co = client.ApiextensionsV1Api(api), client.CustomObjectsApi(api)
    group = f"g{secrets.token_hex(3)}.fleetwright.test"
    crd_name = f"widgets.{group}"
    ext.create_custom_resource_definition({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": crd_name},
        "spec": {"group": group, "scope": "Namespaced",
                 "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
                 "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                     "type": "object", "properties": {"spec": {"type": "object", "properties": {
                         "size": {"type": "integer"}, "tags": {"type": "object",
                                                               "additionalProperties": {"type": "string"}}}}}}}}]},
    })
    try:
        def established() -> bool:
            conds = ext.read_custom_resource_definition(crd_name).status.conditions or []
            return any(c.type == "Established" and c.status == "True" for c in conds)

        wait_for(established, 30, "CRD Established")
        body = {"apiVersion": f"{group}/v1", "kind": "Widget", "metadata": {"name": "w1"},
                "spec": {"size": 3, "tags": {"a": "1", "b": "2"}}}  # a map: exercises the reflect2 fix
        wait_for(lambda: co.create_namespaced_custom_object(group, "v1", ns, "widgets", body), 15,
                 "custom object create")
        got = co.get_namespaced_custom_object(group, "v1", ns, "widgets", "w1")
        assert got["spec"] == {"size": 3, "tags": {"a": "1", "b": "2"}}
        assert [o["metadata"]["name"] for o in co.list_namespaced_custom_object(group, "v1", ns, "widgets")["items"]] == ["w1"]
        with pytest.raises(ApiException) as e:  # schema validation is real
            co.create_namespaced_custom_object(group, "v1", ns, "widgets", {
                "apiVersion": f"{group}/v1", "kind": "Widget", "metadata": {"name": "w2"}, "spec": {"size": "big"}})
        assert e.value.status == 422
    finally:
        ext.delete_custom_resource_definition(crd_name)


def test_server_side_apply(api, ns):
    core = client.CoreV1Api(api)

    def apply(data: dict, manager: str = "fleetwright"):
        return core.patch_namespaced_config_map(
            "cfg", ns, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg", "namespace": ns},
                        "data": data},
            field_manager=manager, force=True, _content_type="application/apply-patch+yaml")

    assert apply({"k": "v"}).data == {"k": "v"}
    # a second apply by the same manager owns the whole set: k is dropped
    assert apply({"k2": "v2"}).data == {"k2": "v2"}
    # another manager's fields are kept
    apply({"other": "x"}, manager="someone-else")
    assert core.read_namespaced_config_map("cfg", ns).data == {"k2": "v2", "other": "x"}
    managers = {m.manager for m in core.read_namespaced_config_map("cfg", ns).metadata.managed_fields}
    assert {"fleetwright", "someone-else"} <= managers


def test_watch_sees_changes(api, ns):
    """A watch from a list's resourceVersion sees every later change, however late the watch starts."""
    core = client.CoreV1Api(api)
    events: list[tuple[str, str]] = []
    rv = core.list_namespaced_config_map(ns).metadata.resource_version

    def watcher() -> None:
        w = watch.Watch()
        for ev in w.stream(core.list_namespaced_config_map, ns, resource_version=rv, timeout_seconds=60,
                           _request_timeout=90):
            events.append((ev["type"], ev["object"].metadata.name))
            if ev["type"] == "DELETED":
                w.stop()

    core.create_namespaced_config_map(ns, {"metadata": {"name": "w"}})
    core.patch_namespaced_config_map("w", ns, {"data": {"x": "1"}})
    core.delete_namespaced_config_map("w", ns)
    th = threading.Thread(target=watcher, daemon=True)
    th.start()  # after the changes: the resourceVersion, not timing, makes the watch see them
    th.join(90)
    assert not th.is_alive(), events
    assert ("ADDED", "w") in events and ("MODIFIED", "w") in events and ("DELETED", "w") in events


@pytest.fixture(scope="module")
def second(kube_factory):
    return kube_factory()


def test_two_control_planes_are_isolated(api, kube_cluster, second):
    assert second["server"] != kube_cluster["server"]
    assert second["token"] != kube_cluster["token"]
    core1 = client.CoreV1Api(api)
    core2 = client.CoreV1Api(kube.api_client(second))
    name = _ns_name("iso")
    core2.create_namespace({"metadata": {"name": name}})
    assert name in {n.metadata.name for n in core2.list_namespace().items}
    with pytest.raises(ApiException) as e:
        core1.read_namespace(name)
    assert e.value.status == 404
    # tokens are per control plane
    with pytest.raises(ApiException) as e:
        client.CoreV1Api(kube.api_client({**kube_cluster, "token": second["token"]})).list_namespace()
    assert e.value.status == 401
    # so are the CAs: mgmt's CA does not verify the second server
    wrong_ca = kube.api_client({**second, "ca_file": kube_cluster["ca_file"]})
    wrong_ca.configuration.retries = 0
    with pytest.raises(urllib3.exceptions.MaxRetryError):
        client.VersionApi(wrong_ca).get_code(_request_timeout=5)


def test_apiserver_stop_and_restart_fault(testenv_config, second):
    core = client.CoreV1Api(kube.api_client(second))
    name = _ns_name("keep")
    core.create_namespace({"metadata": {"name": name}})
    kube.stop_control_plane(testenv_config, second["name"])
    down = kube.api_client(second)
    down.configuration.retries = 0
    with pytest.raises(urllib3.exceptions.MaxRetryError):
        client.CoreV1Api(down).list_namespace(_request_timeout=3)
    t0 = time.monotonic()
    again = kube.start_control_plane(testenv_config, second["name"])
    assert time.monotonic() - t0 < 60
    assert again["server"] == second["server"] and again["token"] == second["token"]
    # same endpoint, same data (it lives in etcd under the control plane's prefix)
    assert client.CoreV1Api(kube.api_client(again)).read_namespace(name).metadata.name == name
