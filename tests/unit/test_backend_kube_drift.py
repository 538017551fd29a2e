"""The kube backend's pure parts: error mapping, drift comparison, the applied form of an object. No server."""
from __future__ import annotations

import base64
import json
import socket

import pytest
import urllib3
from kubernetes.client.exceptions import ApiException

from backends.base import KubeAccess
from backends.kube import KubeBackend, StaleObject, map_error, object_drift, prepare, ref_str
from models.errors import PermanentError, TransientError
from models.render import COMPONENT_LABEL, HASH_ANNOTATION, MANAGED_BY


# --------------------------------------------------------------------------- error mapping


def api_error(code: int, message: str = "boom", reason: str = "", details: dict | None = None,
              headers: dict | None = None) -> ApiException:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
            "reason": reason, "code": code, **({"details": details} if details else {})}
    e = ApiException(status=code, reason=reason or "x", body=json.dumps(body))
    e.headers = headers
    return e


@pytest.mark.parametrize("code", [429, 500, 502, 503, 504])
def test_throttling_and_5xx_are_transient(code):
    err = map_error(api_error(code, "etcdserver: request timed out"), "PATCH", "ConfigMap/a/b")
    assert type(err) is TransientError
    assert str(err).startswith("PATCH ConfigMap/a/b: ") and "etcdserver" in str(err)


def test_429_carries_retry_after():
    err = map_error(api_error(429, "slow down", "TooManyRequests", headers={"Retry-After": "3"}))
    assert isinstance(err, TransientError) and err.delay == 3.0


@pytest.mark.parametrize("code", [401, 403])
def test_auth_failures_are_permanent(code):
    err = map_error(api_error(code, 'configmaps is forbidden: User "x" cannot create resource'), "POST")
    assert type(err) is PermanentError and str(code) in str(err)


def test_terminating_namespace_is_transient():
    err = map_error(api_error(403, 'configmaps "a" is forbidden: unable to create new content in namespace '
                                   'payments because it is being terminated', "Forbidden"), "PATCH")
    assert type(err) is TransientError


def test_conflicts():
    stale = map_error(api_error(409, 'Operation cannot be fulfilled on configmaps "a": the object has been modified; '
                                     'please apply your changes to the latest version and try again', "Conflict"))
    assert isinstance(stale, StaleObject) and isinstance(stale, TransientError)
    assert isinstance(map_error(api_error(409, "x", "Conflict", details={"retryAfterSeconds": 1})), TransientError)
    apply_conflict = map_error(api_error(409, "Apply failed with 1 conflict: conflict with \"kubectl\"", "Conflict"))
    assert type(apply_conflict) is PermanentError
    assert type(map_error(api_error(409, 'namespaces "a" already exists', "AlreadyExists"))) is PermanentError


def test_not_found_is_success_on_get_and_delete_only():
    assert map_error(api_error(404, "not found", "NotFound"), "DELETE", "ConfigMap/a/b") is None
    assert map_error(api_error(404, "not found", "NotFound"), "GET") is None
    err = map_error(api_error(404, 'namespaces "gone" not found', "NotFound"), "PATCH")
    assert type(err) is PermanentError and "gone" in str(err)


def test_invalid_is_permanent_with_the_message():
    msg = 'Deployment.apps "d" is invalid: spec.replicas: Invalid value: -1: must be greater than or equal to 0'
    err = map_error(api_error(422, msg, "Invalid"), "PATCH", "Deployment/a/d")
    assert type(err) is PermanentError and msg in str(err)
    assert type(map_error(api_error(400, "bad", "BadRequest"))) is PermanentError
    # 1.20's server-side apply rejects a list entry without its key field with a (deterministic) 500
    typed = map_error(api_error(500, "failed to create typed patch object: .spec.ports: element 0: associative "
                                     "list with keys has an element that omits key field \"protocol\""))
    assert type(typed) is PermanentError


def test_non_json_error_body():
    e = ApiException(status=503, reason="Service Unavailable", body="<html>proxy</html>")
    assert isinstance(map_error(e), TransientError)


@pytest.mark.parametrize("exc", [
    urllib3.exceptions.MaxRetryError(None, "/api/v1", urllib3.exceptions.NewConnectionError(None, "Connection refused")),
    urllib3.exceptions.ReadTimeoutError(None, "/api/v1", "Read timed out."),
    urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError(104, "reset")),
    ConnectionRefusedError(111, "Connection refused"),
    socket.timeout("timed out"),
])
def test_connection_errors_and_timeouts_are_transient(exc):
    err = map_error(exc, "GET", "/api/v1")
    assert type(err) is TransientError and "unreachable or timed out" in str(err)


def test_tls_verification_failure_is_permanent():
    exc = urllib3.exceptions.MaxRetryError(None, "/version", urllib3.exceptions.SSLError(
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer certificate"))
    assert type(map_error(exc)) is PermanentError
    assert type(map_error(ApiException(status=0, reason="SSLError\ncertificate verify failed"))) is PermanentError


def test_our_errors_pass_through_and_token_never_shows():
    e = TransientError("x")
    assert map_error(e) is e
    b = KubeBackend(KubeAccess(server="https://127.0.0.1:1", token="s3cr3t-token", insecure=True))
    assert "s3cr3t" not in repr(b) and "s3cr3t" not in repr(b.access)
    b.close()


# --------------------------------------------------------------------------- drift


CM = {"apiVersion": "v1", "kind": "ConfigMap",
      "metadata": {"name": "ingress-nginx-controller", "namespace": "ingress-nginx",
                   "labels": {MANAGED_BY: "fleetwright", COMPONENT_LABEL: "ingress-nginx"},
                   "annotations": {HASH_ANNOTATION: "abc", "fleetwright.io/version": "1.10.0"}},
      "data": {"proxy-body-size": "8m", "use-forwarded-headers": "true"}}


def live_of(obj: dict, **changes) -> dict:
    """``obj`` as the API server returns it: server-set metadata, status, managedFields, defaults."""
    out = json.loads(json.dumps(obj))
    out["metadata"].update({"uid": "u-1", "resourceVersion": "42", "creationTimestamp": "2024-01-01T00:00:00Z",
                            "managedFields": [{"manager": "fleetwright", "operation": "Apply"}]})
    out["status"] = {"phase": "Active"}
    for k, v in changes.items():
        out[k] = v
    return out


def test_no_drift_when_live_has_only_server_fields_added():
    assert object_drift(CM, live_of(CM)) == []


def test_changed_data_field_is_named_with_desired_and_observed():
    live = live_of(CM, data={"proxy-body-size": "1m", "use-forwarded-headers": "true", "extra": "ignored"})
    [d] = object_drift(CM, live)
    assert (d.path, d.desired, d.observed) == ("ConfigMap/ingress-nginx/ingress-nginx-controller:data.proxy-body-size", "8m", "1m")


def test_missing_object_is_one_drift_with_observed_none():
    [d] = object_drift(CM, None)
    assert (d.path, d.observed) == ("ConfigMap/ingress-nginx/ingress-nginx-controller", None)
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "payments"}}
    assert object_drift(ns, None)[0].path == "Namespace/payments"


def test_labels_compared_by_key_and_own_annotations_ignored():
    live = live_of(CM)
    live["metadata"]["labels"] = {MANAGED_BY: "someone", COMPONENT_LABEL: "ingress-nginx", "extra": "x"}
    live["metadata"]["annotations"] = {HASH_ANNOTATION: "old", "kubectl.kubernetes.io/last-applied-configuration": "{}"}
    [d] = object_drift(CM, live)
    assert d.path == 'ConfigMap/ingress-nginx/ingress-nginx-controller:metadata.labels["app.kubernetes.io/managed-by"]'
    assert (d.desired, d.observed) == ("fleetwright", "someone")


def test_deployment_defaults_ignored_and_nested_paths():
    dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": "n"},
           "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "a"}},
                    "template": {"metadata": {"labels": {"app": "a"}},
                                 "spec": {"containers": [{"name": "c", "image": "i:1", "args": ["--x=1"]}]}}}}
    live = live_of(dep)
    live["spec"].update({"strategy": {"type": "RollingUpdate"}, "revisionHistoryLimit": 10})
    live["spec"]["template"]["metadata"]["creationTimestamp"] = None
    live["spec"]["template"]["spec"]["containers"][0].update(
        {"imagePullPolicy": "IfNotPresent", "resources": {}, "terminationMessagePath": "/dev/termination-log"})
    assert object_drift(dep, live) == []
    live["spec"]["replicas"] = 5
    live["spec"]["template"]["spec"]["containers"][0]["args"] = ["--x=2"]
    assert [(d.path, d.desired, d.observed) for d in object_drift(dep, live)] == [
        ("Deployment/n/d:spec.replicas", 2, 5),
        ("Deployment/n/d:spec.template.spec.containers[0].args[0]", "--x=1", "--x=2")]


def test_list_length_change_is_one_drift_on_the_list():
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "namespace": "n"},
           "spec": {"ports": [{"name": "http", "port": 80}, {"name": "https", "port": 443}]}}
    live = live_of(svc)
    live["spec"]["ports"] = [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]
    [d] = object_drift(svc, live)
    assert d.path == "Service/n/s:spec.ports" and len(d.desired) == 2 and len(d.observed) == 1


def test_quantities_compare_by_value_but_config_data_by_text():
    rq = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "q", "namespace": "p"},
          "spec": {"hard": {"requests.cpu": "1000m", "limits.memory": "1Gi", "pods": "10"}}}
    live = live_of(rq)
    live["spec"]["hard"] = {"requests.cpu": "1", "limits.memory": "1024Mi", "pods": "10"}
    assert object_drift(rq, live) == []
    live["spec"]["hard"]["pods"] = "11"
    [d] = object_drift(rq, live)
    assert d.path == 'ResourceQuota/p/q:spec.hard.pods' and (d.desired, d.observed) == ("10", "11")
    live["spec"]["hard"].pop("requests.cpu")
    assert 'ResourceQuota/p/q:spec.hard["requests.cpu"]' in [d.path for d in object_drift(rq, live)]
    cm = {**CM, "data": {"size": "1000m"}}
    assert [d.path for d in object_drift(cm, live_of(cm, data={"size": "1"}))] == [
        "ConfigMap/ingress-nginx/ingress-nginx-controller:data.size"]


def test_empty_desired_values_match_omitted_live_fields():
    np = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "d", "namespace": "p"},
          "spec": {"podSelector": {}, "ingress": [], "policyTypes": ["Ingress"]}}
    live = live_of(np)
    live["spec"] = {"policyTypes": ["Ingress"]}
    assert object_drift(np, live) == []


def test_type_differences_are_drift():
    cm = {**CM, "data": {"replicas": "2"}}
    assert object_drift(cm, live_of(cm, data={"replicas": 2}))
    dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": "n"},
           "spec": {"paused": True}}
    assert object_drift(dep, live_of(dep, spec={"paused": 1}))


def test_secret_string_data_compared_with_live_data():
    sec = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": "n"},
           "stringData": {"password": "hunter2"}}
    enc = base64.b64encode(b"hunter2").decode()
    assert object_drift(sec, live_of(sec, data={"password": enc})) == []
    [d] = object_drift(sec, live_of(sec, data={"password": base64.b64encode(b"other").decode()}))
    assert d.path == "Secret/n/s:stringData.password"


def test_secret_drift_names_the_key_never_the_value():
    """E1: drift of a Secret's data/stringData shows which key differs, never a value (desired or live)."""
    values = {"password": "hunter2", "token": "tok-42", "ok": "same"}
    enc = {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}
    live_values = {"password": base64.b64encode(b"live-pw-9").decode(), "ok": enc["ok"]}  # token missing live
    for field, desired_values in (("stringData", values), ("data", enc)):
        sec = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": "n"},
               field: desired_values}
        drift = object_drift(sec, live_of(sec, data=live_values))
        assert [(d.path, d.observed) for d in drift] == [
            (f"Secret/n/s:{field}.password", "(redacted)"), (f"Secret/n/s:{field}.token", None)]
        text = " ".join(str(d) for d in drift) + repr(drift) + json.dumps([d.model_dump() for d in drift])
        for secret in ("hunter2", "tok-42", "live-pw-9", *enc.values(), *live_values.values()):
            assert secret not in text, secret
        assert object_drift(sec, live_of(sec, data={k: enc[k] for k in values})) == []
    whole = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": "n"}, "data": "hunter2"}
    assert "hunter2" not in str(object_drift(whole, live_of(whole, data={"a": "b"})))


def test_secret_drift_in_a_plan_reason_has_no_value(example_defs):
    """The drift text a plan puts in a step's reason (and so in artifacts and logs) has no Secret value."""
    from models.desired import FieldDrift, ObservedComponent, observed_from
    from models.plan import plan
    from models.resolve import resolve

    from backends.kube.drift import REDACTED

    d = resolve(example_defs, "dc1-web-dev")
    comp = next(c for c in d.components if c.target == "kubernetes")
    sec = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": "n"},
           "stringData": {"password": "hunter2"}}
    drift = object_drift(sec, live_of(sec, data={"password": base64.b64encode(b"live-pw").decode()}))
    assert drift == [FieldDrift(path="Secret/n/s:stringData.password", desired=REDACTED, observed=REDACTED)]
    o = observed_from(d)
    o = o.model_copy(update={"components": {**o.components, comp.name: ObservedComponent(
        version=comp.version, hash=comp.hash, drift=drift)}})
    step = next(s for s in plan(d, o).steps if s.object == comp.name)
    assert "stringData.password" in step.reason and "hunter2" not in step.reason and "live-pw" not in step.reason


def test_backends_of_one_cluster_share_one_client_and_rotation_closes_the_old():
    """#13: one ApiClient per endpoint + credentials, reused by every backend; closed on rotation and at exit."""
    from backends.kube import close_clients
    from backends.kube.client import shared_clients

    close_clients()
    a = KubeAccess(server="https://127.0.0.1:1", token="t1", insecure=True)
    b1, b2 = KubeBackend(a), KubeBackend(KubeAccess(server="https://127.0.0.1:1/", token="t1", insecure=True))
    assert b1._api is b2._api and b1._disc is b2._disc and shared_clients() == 1
    other = KubeBackend(KubeAccess(server="https://127.0.0.1:2", token="t1", insecure=True))
    assert other._api is not b1._api and shared_clients() == 2
    b1._api.rest_client.pool_manager.connection_from_url("https://127.0.0.1:1")  # a pool, as after a request
    assert len(b1._api.rest_client.pool_manager.pools) == 1
    rotated = KubeBackend(KubeAccess(server="https://127.0.0.1:1", token="t2", insecure=True))
    assert rotated._api is not b1._api and b1._shared.closed and shared_clients() == 2
    assert len(b1._api.rest_client.pool_manager.pools) == 0  # the old client's connections are closed
    close_clients()
    assert shared_clients() == 0 and rotated._shared.closed and other._shared.closed


def test_custom_object_with_free_form_spec():
    pool = {"apiVersion": "metallb.io/v1beta1", "kind": "IPAddressPool", "metadata": {"name": "default", "namespace": "m"},
            "spec": {"addresses": ["192.0.2.240-192.0.2.250"], "autoAssign": True}}
    assert object_drift(pool, live_of(pool)) == []
    live = live_of(pool, spec={"addresses": ["10.0.0.0/24"], "autoAssign": True})
    assert [d.path for d in object_drift(pool, live)] == ["IPAddressPool/m/default:spec.addresses[0]"]


# --------------------------------------------------------------------------- applied form


def test_prepare_marks_annotates_and_defaults_protocols_without_touching_input():
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s", "namespace": "n", "labels": {"x": "y"}},
           "spec": {"ports": [{"port": 80}, {"port": 53, "protocol": "UDP"}]}}
    dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": "n"},
           "spec": {"template": {"spec": {"containers": [{"name": "c", "ports": [{"containerPort": 8080}]}]}}}}
    out = prepare(svc, COMPONENT_LABEL, "web", "h1", "1.2.3")
    assert out["metadata"]["labels"] == {"x": "y", MANAGED_BY: "fleetwright", COMPONENT_LABEL: "web"}
    assert out["metadata"]["annotations"] == {HASH_ANNOTATION: "h1", "fleetwright.io/version": "1.2.3"}
    assert [p["protocol"] for p in out["spec"]["ports"]] == ["TCP", "UDP"]
    assert "protocol" not in svc["spec"]["ports"][0] and "annotations" not in svc["metadata"]
    d = prepare(dep, "fleetwright.io/workspace", "team", "h2", None)
    assert d["spec"]["template"]["spec"]["containers"][0]["ports"][0]["protocol"] == "TCP"
    assert d["metadata"]["annotations"] == {HASH_ANNOTATION: "h2"}
    assert ref_str(d) == "Deployment/n/d"
