"""The cluster backend: components and team workspaces inside a running cluster, by server-side apply.

``KubeBackend(access)`` implements :class:`backends.base.ClusterBackend` against the Kubernetes
API named by a :class:`~backends.base.KubeAccess` (bearer token, CA file or data, client
certificates, or ``insecure``). It needs nothing but the API server.

How it works
------------
* **Generic objects.** Any ``apiVersion``/``kind`` is mapped to its REST path with discovery
  (``/api/v1``, ``/apis/<group>/<version>``), fetched lazily per group-version and cached; a
  group-version is fetched again when a kind is missing from it (new CRDs) and after this
  backend has made a CRD ``Established``. Requests go through the official client's
  ``ApiClient`` (its TLS, auth and connection pool) with connect/read timeouts.
* **Apply.** Every object of a component (``desired.component(step.object).objects``) or a
  workspace is applied with server-side apply, field manager ``fleetwright``, ``force=True``,
  annotated ``fleetwright.io/spec-hash`` (component or workspace hash) and
  ``fleetwright.io/version`` (component version). Before anything is written every object is
  read: one that exists without ``app.kubernetes.io/managed-by=fleetwright`` makes the step
  raise :class:`OwnershipConflict` naming it, and nothing at all is changed (no adoption).
  An existing object is applied with its ``metadata.resourceVersion`` as a precondition, so an
  object that changed hands between the read and the write is never taken over (the write
  fails with a conflict, is read again and re-checked, at most twice). The pre-existing system
  namespaces (``default``, ``kube-system``, ...) are never applied, changed or deleted even when
  a component lives in one. CRDs come first in the rendered order; the apply waits until each is
  ``Established`` (and discovery serves it) before the first object after them.
* **Inventory** (as ``kubectl apply --prune``'s ApplySet or Flux's inventory). The refs of
  everything applied are recorded in a ConfigMap ``fleetwright-inventory-<component>`` in the
  component namespace (``fleetwright-workspace-inventory-<team>`` in a workspace's first
  namespace), itself marked as ours plus ``fleetwright.io/inventory=component|workspace``.
  An apply first records the union of the old and the new refs (a crash mid-apply leaves no
  orphan), applies, prunes, then records only the new refs together with the new
  ``spec-hash``/``version`` annotations: the inventory's annotations are the commit point, so an
  interrupted apply is seen as "not done yet" by ``observe`` and planned again.
* **Prune / remove.** Candidates are found by label (``managed-by=fleetwright`` AND
  ``fleetwright.io/component=<name>`` or ``fleetwright.io/workspace=<team>``) for every kind in
  the desired set, in the inventory and ``Namespace``; so a kind removed from the manifests is
  still pruned. Only objects carrying our labels are deleted (with a UID precondition), in
  reverse order: custom objects and workloads, config, RBAC, CRDs, namespaces last;
  ``component.remove`` waits until the namespaces are gone, so the same component can be
  installed again at once.
* **Change detection.** ``StepResult.changed`` is True when an object was created, its
  ``resourceVersion`` moved (the API server does not write a no-op server-side apply, measured
  on 1.20), something was pruned or deleted, or the inventory moved. A second apply reports
  ``changed=False``.
* **Observe.** For each desired component (target ``kubernetes``) and workspace whose inventory
  or objects exist: version and hash from the inventory's annotations (or, without inventory,
  the objects'), and a field-by-field drift list (:func:`object_drift`) comparing only the
  fields fleetwright sets in the desired object with the live one; server-set fields, defaults,
  ``status``, ``managedFields``, ``resourceVersion`` are never looked at; a missing object is
  drift with ``observed=None``. Inventories of components and workspaces that are no longer
  desired are reported too, so the plan removes them. ``observe`` never writes.
* **Errors** are mapped in one place, :func:`map_error`.

Helm
----
Components with a ``helm`` source arrive already rendered by ``models.render`` as a Flux
``HelmRepository`` plus ``HelmRelease``; this backend applies them like any other objects. There
is no ``helm`` binary in the worker image and no chart download from the control plane: the
install is GitOps-native, the Flux helm-controller in the cluster pulls the chart and installs,
upgrades or rolls it back, and what fleetwright owns (and can diff, prune and refuse to adopt)
stays plain Kubernetes objects.

Kubernetes 1.20 quirk: server-side apply there rejects ``Service.spec.ports`` and container
``ports`` entries without ``protocol`` (part of the list key); the backend fills in the API
server's own default ``TCP`` before applying, which does not change what the object means.
"""
from __future__ import annotations

import base64
import copy
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Iterable

import urllib3
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from kubernetes.utils.quantity import parse_quantity

from models.desired import (DesiredCluster, FieldDrift, ObservedCluster, ObservedComponent,
                            ObservedWorkspace)
from models.errors import FleetwrightError, OwnershipConflict, PermanentError, TransientError
from models.plan import Step
from models.render import COMPONENT_LABEL, HASH_ANNOTATION, MANAGED_BY, MANAGER, WORKSPACE_LABEL

from .base import FIELD_MANAGER, KubeAccess, StepResult

log = logging.getLogger(__name__)

VERSION_ANNOTATION = "fleetwright.io/version"
INVENTORY_LABEL = "fleetwright.io/inventory"  # component | workspace
INVENTORY_KEY = "objects"
SYSTEM_NAMESPACES = frozenset({"default", "kube-system", "kube-public", "kube-node-lease"})
APPLY_PATCH = "application/apply-patch+yaml"
_CRD_API = "apiextensions.k8s.io/v1"
_CRD = "CustomResourceDefinition"


# --------------------------------------------------------------------------- errors


class StaleObject(TransientError):
    """The object changed between our read and our write (HTTP 409 Conflict): read again and retry."""


def _status_of(exc: ApiException) -> dict:
    try:
        body = json.loads(exc.body) if exc.body else {}
    except (TypeError, ValueError):
        body = {}
    return body if isinstance(body, dict) else {}


def _chain(exc: BaseException) -> Iterable[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = getattr(exc, "reason", None) if isinstance(getattr(exc, "reason", None), BaseException) else (
            exc.__cause__ or exc.__context__)


def map_error(exc: BaseException, verb: str = "", what: str = "") -> FleetwrightError | None:
    """The one place where Kubernetes API and transport errors become ``models.errors``.

    Returns None when the error means success: 404 on DELETE (already gone) and on GET (absent).
    Messages carry the API server's ``Status.message`` only, never request headers or tokens.
    """
    if isinstance(exc, FleetwrightError):
        return exc
    where = " ".join(p for p in (verb, what) if p)
    prefix = f"{where}: " if where else ""
    if isinstance(exc, ApiException):
        code = int(exc.status or 0)
        st = _status_of(exc)
        msg = st.get("message") or (exc.reason or "")
        reason = st.get("reason") or ""
        details = st.get("details") if isinstance(st.get("details"), dict) else {}
        if code == 404 and verb.upper() in ("GET", "DELETE"):
            return None
        if code == 0:  # the client turned a TLS failure into status 0
            if "CERTIFICATE_VERIFY_FAILED" in msg or "certificate verify failed" in msg:
                return PermanentError(f"{prefix}TLS verification of the API server failed: {msg}")
            return TransientError(f"{prefix}API server connection failed: {msg}")
        if code == 429:
            delay = None
            try:
                delay = float((exc.headers or {}).get("Retry-After") or details.get("retryAfterSeconds") or 0) or None
            except (TypeError, ValueError, AttributeError):
                pass
            return TransientError(f"{prefix}throttled by the API server (429): {msg}", delay=delay)
        if code == 401:
            return PermanentError(f"{prefix}authentication to the API server failed (401): {msg}")
        if code == 403:
            if "being terminated" in msg:  # namespace still terminating: creating in it works again soon
                return TransientError(f"{prefix}{msg}")
            return PermanentError(f"{prefix}forbidden (403): {msg}")
        if code == 409:
            if reason == "AlreadyExists":
                return PermanentError(f"{prefix}already exists (409): {msg}")
            if details.get("retryAfterSeconds") or "the object has been modified" in msg \
                    or "latest version" in msg:
                return StaleObject(f"{prefix}conflict (409), retryable: {msg}")
            return PermanentError(f"{prefix}conflict (409): {msg}")
        if code == 404:
            return PermanentError(f"{prefix}not found (404): {msg}")
        if code in (400, 422):
            return PermanentError(f"{prefix}invalid ({code}): {msg}")
        if code == 500 and "failed to create typed patch object" in msg:  # deterministic SSA schema error
            return PermanentError(f"{prefix}invalid for server-side apply: {msg}")
        if code == 410 or code >= 500:
            return TransientError(f"{prefix}API server error ({code}): {msg}")
        return PermanentError(f"{prefix}API server refused ({code}): {msg}")
    if isinstance(exc, (urllib3.exceptions.HTTPError, OSError)):  # refused, reset, timeouts, DNS, TLS
        for e in _chain(exc):
            text = str(e)
            if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
                return PermanentError(f"{prefix}TLS verification of the API server failed")
        kind = type(exc).__name__
        inner = getattr(exc, "reason", None)
        if isinstance(inner, BaseException):
            kind = f"{kind}/{type(inner).__name__}"
        return TransientError(f"{prefix}API server unreachable or timed out ({kind})")
    return None if exc is None else PermanentError(f"{prefix}{type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- objects and drift


_SIMPLE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_QUANTITY_PARENTS = {"hard", "limits", "requests", "default", "defaultRequest", "max", "min",
                     "maxLimitRequestRatio", "capacity"}
_OWN_ANNOTATIONS = {HASH_ANNOTATION, VERSION_ANNOTATION}
_MISSING = object()


def group_of(api_version: str) -> str:
    return api_version.rsplit("/", 1)[0] if "/" in api_version else ""


def ref_str(obj: dict) -> str:
    """``Kind/namespace/name`` (``Kind/name`` for cluster-scoped objects)."""
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{obj.get('kind')}/{ns}/{meta.get('name')}" if ns else f"{obj.get('kind')}/{meta.get('name')}"


def _join(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if _SIMPLE_KEY.match(str(key)):
        return f"{path}.{key}" if path else str(key)
    return f'{path}["{key}"]'


def _empty(v: Any) -> bool:
    return v is None or v is _MISSING or v == {} or v == [] or v == ""


def _same_scalar(d: Any, live: Any, quantity: bool) -> bool:
    if d == live and type(d) is type(live):
        return True
    if isinstance(d, (int, float)) and isinstance(live, (int, float)) and not isinstance(d, bool) \
            and not isinstance(live, bool):
        return d == live
    if quantity and isinstance(d, (str, int, float)) and isinstance(live, (str, int, float)):
        try:
            return parse_quantity(d) == parse_quantity(live)
        except (ValueError, TypeError, ArithmeticError):
            return False
    return False


def _compare(d: Any, live: Any, path: str, out: list, ref: str, quantities: bool, key: str = "",
             parent: str = "") -> None:
    """Compare desired ``d`` (at ``key``, inside the mapping at ``parent``) with ``live``."""
    if isinstance(d, dict):
        if not isinstance(live, dict):
            if not (d == {} and _empty(live)):
                out.append(FieldDrift(path=f"{ref}:{path}", desired=d, observed=None if live is _MISSING else live))
            return
        for k, v in d.items():
            _compare(v, live.get(k, _MISSING), _join(path, k), out, ref, quantities, str(k), key)
        return
    if isinstance(d, list):
        if not isinstance(live, list):
            if not (d == [] and _empty(live)):
                out.append(FieldDrift(path=f"{ref}:{path}", desired=d, observed=None if live is _MISSING else live))
            return
        if len(d) != len(live):
            out.append(FieldDrift(path=f"{ref}:{path}", desired=d, observed=live))
            return
        for i, (dv, lv) in enumerate(zip(d, live)):
            _compare(dv, lv, _join(path, i), out, ref, quantities, key, parent)
        return
    if d is None and _empty(live):
        return
    if live is _MISSING or not _same_scalar(d, live, quantities and parent in _QUANTITY_PARENTS):
        out.append(FieldDrift(path=f"{ref}:{path}", desired=d, observed=None if live is _MISSING else live))


def object_drift(desired: dict, live: dict | None) -> list[FieldDrift]:
    """Every field fleetwright sets in ``desired`` whose live value differs, as ``Kind/ns/name:field.path``.

    Only fields present in ``desired`` are looked at (labels and annotations key by key, except
    fleetwright's own hash/version annotations, which ``observe`` reads from the inventory);
    server-set fields and defaults are therefore ignored. Quantities under ``hard``/``limits``/
    ``requests``/``default``... compare by value (``1000m`` == ``1``); a Secret's ``stringData``
    is compared with the live base64 ``data``. A missing object is one drift with
    ``observed=None``.
    """
    ref = ref_str(desired)
    if live is None:
        return [FieldDrift(path=ref, desired="present", observed=None)]
    out: list[FieldDrift] = []
    dmeta, lmeta = desired.get("metadata") or {}, live.get("metadata") or {}
    for fld in ("labels", "annotations"):
        want = {k: v for k, v in (dmeta.get(fld) or {}).items() if k not in _OWN_ANNOTATIONS}
        have = lmeta.get(fld) or {}
        for k in want:
            if have.get(k) != want[k]:
                out.append(FieldDrift(path=f"{ref}:{_join('metadata.' + fld, k)}", desired=want[k], observed=have.get(k)))
    kind = desired.get("kind")
    quantities = kind not in ("ConfigMap", "Secret")
    for key, value in desired.items():
        if key in ("apiVersion", "kind", "metadata", "status"):
            continue
        if kind == "Secret" and key == "stringData" and isinstance(value, dict):
            data = live.get("data") or {}
            for k, v in value.items():
                have = data.get(k)
                try:
                    have = base64.b64decode(have).decode() if have is not None else None
                except (ValueError, UnicodeDecodeError):
                    pass
                if have != v:
                    out.append(FieldDrift(path=f"{ref}:{_join('stringData', k)}", desired=v, observed=have))
            continue
        _compare(value, live.get(key, _MISSING), _join("", key), out, ref, quantities, key)
    return out


def _pod_specs(obj: dict) -> list[dict]:
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    if obj.get("kind") == "Pod":
        return [spec]
    tmpl = spec.get("template")
    if obj.get("kind") == "CronJob":
        tmpl = ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template")
    pod = tmpl.get("spec") if isinstance(tmpl, dict) else None
    return [pod] if isinstance(pod, dict) else []


def prepare(obj: dict, label: str, owner: str, spec_hash: str, version: str | None) -> dict:
    """The object as fleetwright applies it: ownership labels, hash/version annotations, TCP defaults."""
    o = copy.deepcopy(obj)
    meta = o.setdefault("metadata", {})
    meta.setdefault("labels", {}).update({MANAGED_BY: MANAGER, label: owner})
    ann = meta.setdefault("annotations", {})
    ann[HASH_ANNOTATION] = spec_hash
    if version:
        ann[VERSION_ANNOTATION] = version
    if o.get("kind") == "Service":
        for p in (o.get("spec") or {}).get("ports") or []:
            if isinstance(p, dict):
                p.setdefault("protocol", "TCP")
    for pod in _pod_specs(o):
        for fld in ("containers", "initContainers"):
            for c in pod.get(fld) or []:
                for p in (c.get("ports") or []) if isinstance(c, dict) else []:
                    if isinstance(p, dict):
                        p.setdefault("protocol", "TCP")
    return o


def _ours(live: dict) -> bool:
    return ((live.get("metadata") or {}).get("labels") or {}).get(MANAGED_BY) == MANAGER


def _system_namespace(obj: dict) -> bool:
    return obj.get("kind") == "Namespace" and obj.get("apiVersion") == "v1" \
        and (obj.get("metadata") or {}).get("name") in SYSTEM_NAMESPACES


_DELETE_RANK = {"Namespace": 0, _CRD: 1, "ServiceAccount": 2, "ClusterRole": 3, "Role": 3,
                "ClusterRoleBinding": 4, "RoleBinding": 4, "ConfigMap": 5, "Secret": 5}


# --------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class _Res:
    api_version: str
    kind: str
    plural: str
    namespaced: bool

    @property
    def base(self) -> str:
        return "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"

    def collection(self, namespace: str | None = None) -> str:
        if self.namespaced and namespace:
            return f"{self.base}/namespaces/{namespace}/{self.plural}"
        return f"{self.base}/{self.plural}"

    def item(self, namespace: str | None, name: str) -> str:
        return f"{self.collection(namespace)}/{name}"


@dataclass(frozen=True)
class _Owner:
    kind: str  # "component" | "workspace"
    name: str

    @property
    def label(self) -> str:
        return COMPONENT_LABEL if self.kind == "component" else WORKSPACE_LABEL

    @property
    def selector(self) -> str:
        return f"{MANAGED_BY}={MANAGER},{self.label}={self.name}"

    @property
    def inventory_name(self) -> str:
        return f"fleetwright-inventory-{self.name}" if self.kind == "component" \
            else f"fleetwright-workspace-inventory-{self.name}"

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


Key = tuple  # (group, kind, namespace, name)


def _key(api_version: str, kind: str, namespace: str | None, name: str) -> Key:
    return (group_of(api_version), kind, namespace or "", name)


def _is_inventory(item: dict) -> bool:
    return INVENTORY_LABEL in ((item.get("metadata") or {}).get("labels") or {})


def _inventory_refs(inv: dict) -> list[list[str]]:
    try:
        refs = json.loads((inv.get("data") or {}).get(INVENTORY_KEY) or "[]")
    except ValueError:
        return []
    return [r for r in refs if isinstance(r, list) and len(r) == 4 and all(isinstance(x, str) for x in r)]


# --------------------------------------------------------------------------- the backend


def api_client(access: KubeAccess) -> k8s.ApiClient:
    c = k8s.Configuration()
    c.host = access.server.rstrip("/")
    if access.token:
        c.api_key = {"BearerToken": access.token}
        c.api_key_prefix = {"BearerToken": "Bearer"}
    if access.ca_file:
        c.ssl_ca_cert = access.ca_file
    elif access.ca_data:
        c.ca_cert_data = base64.b64decode(access.ca_data).decode()
    c.verify_ssl = not access.insecure
    if access.client_cert_file:
        c.cert_file = access.client_cert_file
        c.key_file = access.client_key_file
    # SDK-level retries: connection set-up only, never a request that may have reached the server
    c.retries = urllib3.util.Retry(total=2, connect=2, read=0, status=0, other=0, redirect=0, backoff_factor=0.2)
    return k8s.ApiClient(c)


class KubeBackend:
    """Components and workspaces in one cluster, by server-side apply (see the module docstring)."""

    kind = "kube"

    def __init__(self, access: KubeAccess, *, timeout: tuple[float, float] = (5.0, 30.0),
                 crd_timeout: float = 60.0, namespace_timeout: float = 120.0, poll: float = 0.2):
        self.access = access
        self._api = api_client(access)
        self._timeout = timeout
        self._crd_timeout = crd_timeout
        self._ns_timeout = namespace_timeout
        self._poll = poll
        self._disc: dict[str, dict[str, _Res]] = {}

    def __repr__(self) -> str:
        return f"KubeBackend({self.access!r})"

    def close(self) -> None:
        self._api.close()

    # ------------------------------------------------------------------ transport

    def _request(self, method: str, path: str, *, body: Any = None, query: list | None = None,
                 content_type: str | None = None, what: str = "") -> dict | None:
        """One API call; JSON in and out. Errors go through :func:`map_error` (None: absent)."""
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        try:
            m, url, hdrs, b, _ = self._api.param_serialize(method, path, query_params=query or None,
                                                           header_params=headers, body=body,
                                                           auth_settings=["BearerToken"])
            r = self._api.call_api(m, url, header_params=hdrs, body=b, _request_timeout=self._timeout)
            data = r.read()
            if not 200 <= r.status < 300:
                raise ApiException(http_resp=r)
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as e:
            err = map_error(e, method, what or path)
            if err is None:
                return None
            raise err from e
        try:
            return json.loads(data) if data else {}
        except ValueError:
            raise TransientError(f"{method} {what or path}: the API server answered with something that is not JSON") from None

    # ------------------------------------------------------------------ discovery

    def _group_version(self, api_version: str, refresh: bool = False) -> dict[str, _Res]:
        if not refresh and api_version in self._disc:
            return self._disc[api_version]
        path = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        doc = self._request("GET", path, what=f"discovery {api_version}")
        if not doc:
            self._disc.pop(api_version, None)
            return {}
        kinds = {r["kind"]: _Res(api_version, r["kind"], r["name"], bool(r.get("namespaced")))
                 for r in doc.get("resources") or [] if "/" not in r.get("name", "/")}
        self._disc[api_version] = kinds
        return kinds

    def _resource(self, api_version: str, kind: str, wait: float = 0.0) -> _Res | None:
        """The REST resource for ``apiVersion``/``kind``; None when the server does not serve it."""
        res = self._group_version(api_version).get(kind)
        if res is not None:
            return res
        deadline = time.monotonic() + wait
        while True:
            res = self._group_version(api_version, refresh=True).get(kind)
            if res is not None or time.monotonic() >= deadline:
                return res
            time.sleep(self._poll)

    def _served(self, obj: dict, wait: float = 0.0) -> _Res | None:
        return self._resource(obj["apiVersion"], obj["kind"], wait)

    # ------------------------------------------------------------------ reads

    def _get(self, res: _Res, obj: dict) -> dict | None:
        meta = obj["metadata"]
        return self._request("GET", res.item(meta.get("namespace"), meta["name"]), what=ref_str(obj))

    def _list(self, res: _Res, selector: str) -> list[dict]:
        doc = self._request("GET", res.collection(), query=[("labelSelector", selector)],
                            what=f"{res.kind} list") or {}
        items = doc.get("items") or []
        for it in items:
            it.setdefault("apiVersion", res.api_version)
            it.setdefault("kind", res.kind)
        return items

    def _inventories(self, owner: _Owner | None = None) -> list[dict]:
        res = self._resource("v1", "ConfigMap")
        selector = f"{MANAGED_BY}={MANAGER},{INVENTORY_LABEL}"
        if owner is not None:
            selector = f"{MANAGED_BY}={MANAGER},{INVENTORY_LABEL}={owner.kind},{owner.label}={owner.name}"
        return self._list(res, selector)

    def _normalise(self, obj: dict, crd_scopes: dict[tuple[str, str], bool]) -> dict:
        """Drop ``metadata.namespace`` from cluster-scoped objects (discovery or the CRD in the same set)."""
        res = self._served(obj)
        namespaced = res.namespaced if res is not None else crd_scopes.get((obj["apiVersion"], obj["kind"]), True)
        if not namespaced and "namespace" in obj["metadata"]:
            obj = {**obj, "metadata": {k: v for k, v in obj["metadata"].items() if k != "namespace"}}
        return obj

    @staticmethod
    def _crd_kinds(objs: list[dict]) -> dict[tuple[str, str], bool]:
        out = {}
        for o in objs:
            if o.get("kind") == _CRD:
                spec = o.get("spec") or {}
                kind = (spec.get("names") or {}).get("kind")
                for v in spec.get("versions") or []:
                    out[(f"{spec.get('group')}/{v.get('name')}", kind)] = spec.get("scope", "Namespaced") == "Namespaced"
        return out

    # ------------------------------------------------------------------ observe

    def observe(self, desired: DesiredCluster) -> ObservedCluster:
        invs = self._inventories()
        by_owner: dict[tuple[str, str], list[dict]] = {}
        for inv in invs:
            labels = inv["metadata"].get("labels") or {}
            kind = labels.get(INVENTORY_LABEL)
            name = labels.get(COMPONENT_LABEL if kind == "component" else WORKSPACE_LABEL)
            if kind in ("component", "workspace") and name:
                by_owner.setdefault((kind, name), []).append(inv)

        components: dict[str, ObservedComponent] = {}
        for c in desired.components:
            if c.target != "kubernetes":
                continue
            owner = _Owner("component", c.name)
            found = self._observe_set(owner, [prepare(o, owner.label, c.name, c.hash, c.version) for o in c.objects],
                                      by_owner.get(("component", c.name), []))
            if found is not None:
                version, spec_hash, drift = found
                components[c.name] = ObservedComponent(version=version or "unknown", hash=spec_hash, drift=drift)
        workspaces: dict[str, ObservedWorkspace] = {}
        for w in desired.workspaces:
            owner = _Owner("workspace", w.team)
            found = self._observe_set(owner, [prepare(o, owner.label, w.team, w.hash, None) for o in w.objects],
                                      by_owner.get(("workspace", w.team), []), need_version=False)
            if found is not None:
                workspaces[w.team] = ObservedWorkspace(hash=found[1], drift=found[2])
        wanted_c = {c.name for c in desired.components}
        wanted_w = {w.team for w in desired.workspaces}
        for (kind, name), found_invs in sorted(by_owner.items()):
            ann = self._inventory_annotations(found_invs)
            if kind == "component" and name not in wanted_c:
                components[name] = ObservedComponent(version=ann.get(VERSION_ANNOTATION) or "unknown",
                                                     hash=ann.get(HASH_ANNOTATION))
            elif kind == "workspace" and name not in wanted_w:
                workspaces[name] = ObservedWorkspace(hash=ann.get(HASH_ANNOTATION))
        return ObservedCluster(name=desired.name, components=components, workspaces=workspaces)

    @staticmethod
    def _inventory_annotations(invs: list[dict]) -> dict[str, str]:
        for inv in invs:
            ann = inv["metadata"].get("annotations") or {}
            if HASH_ANNOTATION in ann:
                return ann
        return {}

    def _observe_set(self, owner: _Owner, objs: list[dict], invs: list[dict], need_version: bool = True):
        """(version, hash, drift) of one component or workspace, or None when nothing of it exists."""
        crd_scopes = self._crd_kinds(objs)
        drift: list[FieldDrift] = []
        found: list[dict] = []
        for obj in objs:
            if _system_namespace(obj):
                continue
            obj = self._normalise(obj, crd_scopes)
            res = self._served(obj)
            live = self._get(res, obj) if res is not None else None
            if live is not None and not _ours(live):
                raise OwnershipConflict(f"{owner}: {ref_str(obj)} exists without {MANAGED_BY}={MANAGER}; "
                                        "fleetwright will not adopt, change or delete it")
            if live is not None:
                found.append(live)
            drift.extend(object_drift(obj, live))
        if not invs and not found:
            return None
        ann = self._inventory_annotations(invs)
        if not ann:  # no committed inventory: the objects' own annotations
            ann = next(((o["metadata"].get("annotations") or {}) for o in found
                        if HASH_ANNOTATION in (o["metadata"].get("annotations") or {})), {})
        if not ann or (need_version and VERSION_ANNOTATION not in ann):
            return None  # an install that never finished: planned as an install again
        return ann.get(VERSION_ANNOTATION), ann.get(HASH_ANNOTATION), drift

    # ------------------------------------------------------------------ apply

    def apply(self, desired: DesiredCluster, step: Step) -> StepResult:
        action = step.action
        if action in ("component.install", "component.upgrade", "component.configure"):
            comp = desired.component(step.object)
            if comp is None:
                raise PermanentError(f"{step.id}: component {step.object} is not in the desired state of {desired.name}")
            if comp.target != "kubernetes":
                raise PermanentError(f"{step.id}: component {comp.name} is carried out by the infrastructure backend")
            changed, detail, outputs = self._apply_set(_Owner("component", comp.name), comp.objects, comp.namespace,
                                                       comp.hash, comp.version)
        elif action == "component.remove":
            comp = desired.component(step.object)
            changed, detail, outputs = self._remove_set(_Owner("component", step.object), comp.objects if comp else [])
        elif action in ("workspace.create", "workspace.update"):
            ws = next((w for w in desired.workspaces if w.team == step.object), None)
            if ws is None:
                raise PermanentError(f"{step.id}: team {step.object} has no workspace on {desired.name}")
            changed, detail, outputs = self._apply_set(_Owner("workspace", ws.team), ws.objects, ws.namespaces[0],
                                                       ws.hash, None)
        elif action == "workspace.remove":
            ws = next((w for w in desired.workspaces if w.team == step.object), None)
            changed, detail, outputs = self._remove_set(_Owner("workspace", step.object), ws.objects if ws else [])
        else:
            raise PermanentError(f"{step.id}: {action} is not an in-cluster step")
        log.info("%s: %s", step.id, detail)
        return StepResult(step_id=step.id, changed=changed, detail=detail, outputs=outputs)

    def _apply_set(self, owner: _Owner, objects: list[dict], inv_ns: str, spec_hash: str,
                   version: str | None) -> tuple[bool, str, dict]:
        prepared = [prepare(o, owner.label, owner.name, spec_hash, version) for o in objects]
        crd_scopes = self._crd_kinds(prepared)
        objs = [o for o in (self._normalise(o, crd_scopes) for o in prepared) if not _system_namespace(o)]
        invs = self._inventories(owner)
        old_refs = [r for inv in invs for r in _inventory_refs(inv)]
        old_ann = {k: v for k, v in self._inventory_annotations(invs).items() if k in _OWN_ANNOTATIONS}

        # pre-flight: every object read, every conflict found, before anything is written
        lives: dict[Key, dict | None] = {}
        conflicts, unserved = [], []
        for o in objs:
            m = o["metadata"]
            res = self._served(o)
            if res is None and (o["apiVersion"], o["kind"]) not in crd_scopes:
                unserved.append(f"{o['kind']} ({o['apiVersion']})")
                continue
            live = self._get(res, o) if res is not None else None
            if live is not None and not _ours(live):
                conflicts.append(ref_str(o))
            lives[_key(o["apiVersion"], o["kind"], m.get("namespace"), m["name"])] = live
        if conflicts:
            raise OwnershipConflict(f"{owner}: {', '.join(conflicts)} exist(s) without {MANAGED_BY}={MANAGER}; "
                                    "fleetwright will not adopt, change or delete them")
        if unserved:
            raise TransientError(f"{owner}: the API server does not serve {', '.join(sorted(set(unserved)))}; "
                                 "is the component providing its CRD installed?")

        new_refs = [[o["apiVersion"], o["kind"], o["metadata"].get("namespace") or "", o["metadata"]["name"]] for o in objs]
        union = new_refs + [r for r in old_refs if _key(*r) not in {_key(*n) for n in new_refs}]
        changed_refs: list[str] = []
        inventory_moved = False
        inv_written = False
        pending_crds: list[str] = []
        for o in objs:
            if not inv_written and o["kind"] != "Namespace":
                inventory_moved |= self._write_inventory(owner, inv_ns, union, old_ann)
                inv_written = True
            if pending_crds and o["kind"] != _CRD:
                self._wait_established(pending_crds)
                pending_crds = []
            m = o["metadata"]
            key = _key(o["apiVersion"], o["kind"], m.get("namespace"), m["name"])
            res = self._served(o, wait=self._crd_timeout if (o["apiVersion"], o["kind"]) in crd_scopes else 0.0)
            if res is None:
                raise TransientError(f"{owner}: {o['kind']} ({o['apiVersion']}) is not served yet")
            if self._apply_object(owner, res, o, lives.get(key)):
                changed_refs.append(ref_str(o))
            if o["kind"] == _CRD:
                pending_crds.append(m["name"])
        if pending_crds:
            self._wait_established(pending_crds)
        if not inv_written:
            inventory_moved |= self._write_inventory(owner, inv_ns, union, old_ann)

        kinds = {(r[0], r[1]) for r in new_refs + old_refs}
        keep = {_key(*r) for r in new_refs}
        pruned, _ = self._delete_owned(owner, kinds, keep)

        final_ann = {HASH_ANNOTATION: spec_hash, **({VERSION_ANNOTATION: version} if version else {})}
        inventory_moved |= self._write_inventory(owner, inv_ns, new_refs, final_ann)
        for inv in invs:  # inventories left at an old place (namespace changed)
            m = inv["metadata"]
            if (m.get("namespace"), m.get("name")) != (inv_ns, owner.inventory_name):
                self._delete_item(self._resource("v1", "ConfigMap"), inv)
                inventory_moved = True
        changed = bool(changed_refs or pruned or inventory_moved)
        detail = (f"{owner}: {len(objs)} objects applied, {len(changed_refs)} changed, {len(pruned)} pruned"
                  if changed else f"{owner}: {len(objs)} objects already as desired")
        return changed, detail, {"changed": changed_refs, "pruned": pruned}

    def _apply_object(self, owner: _Owner, res: _Res, obj: dict, live: dict | None) -> bool:
        """Server-side apply one object; True when the API server wrote something."""
        m = obj["metadata"]
        path = res.item(m.get("namespace"), m["name"])
        query = [("fieldManager", FIELD_MANAGER), ("force", "true")]
        for attempt in range(3):
            body = obj
            if live is not None:  # precondition: the object we checked is the object we write
                body = {**obj, "metadata": {**m, "resourceVersion": live["metadata"]["resourceVersion"]}}
            try:
                out = self._request("PATCH", path, body=body, query=query, content_type=APPLY_PATCH, what=ref_str(obj))
            except StaleObject:
                if attempt == 2:
                    raise
                live = self._get(res, obj)
                if live is not None and not _ours(live):
                    raise OwnershipConflict(f"{owner}: {ref_str(obj)} was taken by someone else "
                                            f"(no {MANAGED_BY}={MANAGER}); fleetwright will not adopt it") from None
                continue
            return live is None or (out or {}).get("metadata", {}).get("resourceVersion") != live["metadata"]["resourceVersion"]
        return True  # pragma: no cover

    def _write_inventory(self, owner: _Owner, namespace: str, refs: list[list[str]], annotations: dict) -> bool:
        res = self._resource("v1", "ConfigMap")
        obj = {"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": owner.inventory_name, "namespace": namespace,
                            "labels": {MANAGED_BY: MANAGER, owner.label: owner.name, INVENTORY_LABEL: owner.kind},
                            "annotations": dict(annotations)},
               "data": {INVENTORY_KEY: json.dumps(refs)}}
        live = self._get(res, obj)
        if live is not None and not _ours(live):
            raise OwnershipConflict(f"{owner}: ConfigMap/{namespace}/{owner.inventory_name} exists without "
                                    f"{MANAGED_BY}={MANAGER}; fleetwright will not adopt it")
        return self._apply_object(owner, res, obj, live)

    def _wait_established(self, names: list[str]) -> None:
        res = self._resource(_CRD_API, _CRD)
        deadline = time.monotonic() + self._crd_timeout
        groups = set()
        for name in names:
            while True:
                crd = self._request("GET", res.item(None, name), what=f"{_CRD}/{name}") or {}
                conds = {c.get("type"): c.get("status") for c in (crd.get("status") or {}).get("conditions") or []}
                if conds.get("Established") == "True":
                    spec = crd.get("spec") or {}
                    groups |= {f"{spec.get('group')}/{v.get('name')}" for v in spec.get("versions") or []}
                    break
                if time.monotonic() >= deadline:
                    raise TransientError(f"{_CRD}/{name} is not Established after {self._crd_timeout:.0f}s")
                time.sleep(self._poll)
        for gv in groups:
            self._disc.pop(gv, None)

    # ------------------------------------------------------------------ prune, remove, delete

    def _find_owned(self, owner: _Owner, kinds: set[tuple[str, str]]) -> list[tuple[_Res, dict]]:
        """Every object with ``owner``'s labels of the given kinds (one version per group/kind), inventories excluded."""
        out, seen = [], set()
        for api_version, kind in sorted(kinds | {("v1", "Namespace")}):
            gk = (group_of(api_version), kind)
            if gk in seen:
                continue
            res = self._resource(api_version, kind)
            if res is None:
                continue
            seen.add(gk)
            out.extend((res, it) for it in self._list(res, owner.selector) if not _is_inventory(it))
        return out

    def _delete_owned(self, owner: _Owner, kinds: set[tuple[str, str]], keep: set[Key]
                      ) -> tuple[list[str], list[tuple[_Res, dict]]]:
        """Delete ``owner``'s objects of ``kinds`` not in ``keep``, reverse order; (deleted, namespaces deleted)."""
        victims = []
        for res, it in self._find_owned(owner, kinds):
            m = it["metadata"]
            if _key(it["apiVersion"], it["kind"], m.get("namespace") if res.namespaced else None, m["name"]) in keep:
                continue
            if _system_namespace(it):
                continue
            victims.append((res, it))
        victims.sort(key=lambda v: -_DELETE_RANK.get(v[1]["kind"], 9))
        deleted = []
        for res, it in victims:
            if self._delete_item(res, it):
                deleted.append(ref_str(it))
        return deleted, [(res, it) for res, it in victims if it["kind"] == "Namespace"]

    def _delete_item(self, res: _Res, item: dict) -> bool:
        m = item["metadata"]
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        if m.get("uid"):
            body["preconditions"] = {"uid": m["uid"]}
        out = self._request("DELETE", res.item(m.get("namespace"), m["name"]), body=body, what=ref_str(item))
        return out is not None

    def _wait_gone(self, items: list[tuple[_Res, dict]]) -> None:
        deadline = time.monotonic() + self._ns_timeout
        for res, it in items:
            while self._get(res, it) is not None:
                if time.monotonic() >= deadline:
                    raise TransientError(f"{ref_str(it)} is still terminating after {self._ns_timeout:.0f}s")
                time.sleep(self._poll * 2)

    def _remove_set(self, owner: _Owner, desired_objects: list[dict], wait: bool = True) -> tuple[bool, str, dict]:
        """Delete everything of ``owner``; with ``wait``, until its namespaces are gone (else in ``outputs``)."""
        invs = self._inventories(owner)
        kinds = {(o["apiVersion"], o["kind"]) for o in desired_objects}
        kinds |= {(r[0], r[1]) for inv in invs for r in _inventory_refs(inv)}
        deleted, namespaces = self._delete_owned(owner, kinds, set())
        if wait:
            self._wait_gone(namespaces)
        cm = self._resource("v1", "ConfigMap")
        for inv in invs:  # inventories outside the deleted namespaces
            if self._delete_item(cm, inv):
                deleted.append(ref_str(inv))
        changed = bool(deleted or invs)
        detail = f"{owner}: {len(deleted)} objects deleted" if changed else f"{owner}: nothing of it exists"
        return changed, detail, {"deleted": deleted, "namespaces": [] if wait else namespaces}

    def delete(self, desired: DesiredCluster) -> StepResult:
        """Remove every workspace and in-cluster component of ours (desired or found by inventory).

        Workspaces first, then components in reverse dependency order; all namespaces are
        deleted before waiting for them once, at the end.
        """
        found = []
        for inv in self._inventories():
            labels = inv["metadata"].get("labels") or {}
            found.append((labels.get(INVENTORY_LABEL), labels.get(COMPONENT_LABEL) or labels.get(WORKSPACE_LABEL)))
        teams = list(dict.fromkeys([w.team for w in desired.workspaces] + [n for k, n in found if k == "workspace" and n]))
        known = [c.name for c in desired.components if c.target == "kubernetes"]
        comps = list(dict.fromkeys([n for k, n in found if k == "component" and n and n not in known]
                                   + list(reversed(known))))
        objects = {("component", c.name): c.objects for c in desired.components}
        objects.update({("workspace", w.team): w.objects for w in desired.workspaces})
        changed, deleted, namespaces = False, [], []
        for owner in [_Owner("workspace", t) for t in teams] + [_Owner("component", c) for c in comps]:
            ch, _, out = self._remove_set(owner, objects.get((owner.kind, owner.name), []), wait=False)
            changed |= ch
            deleted += out["deleted"]
            namespaces += out["namespaces"]
        self._wait_gone(namespaces)
        detail = f"{len(deleted)} objects of fleetwright deleted" if changed else "nothing of fleetwright's was left"
        return StepResult(step_id=f"{desired.name}/delete/kubernetes", changed=changed, detail=detail,
                          outputs={"deleted": deleted})
