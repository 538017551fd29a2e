"""The transport: one ``ApiClient`` per cluster, JSON requests, discovery of REST resources, reads.

Every request goes through :meth:`Client._request`, which maps errors with :func:`.errors.map_error`.

**One client per cluster, reused.** Tasks make a ``KubeBackend`` per call; each used to build its
own ``ApiClient`` (a new connection pool, new TLS handshakes, discovery again) and never closed
it. Now every backend for the same endpoint and credentials shares the process's one
:class:`_Shared` (``ApiClient`` plus discovery cache; urllib3's pool is thread-safe). At most
``FLEETWRIGHT_KUBE_CLIENTS`` (default 64) are kept, least recently used first out; a client is
closed when it leaves the cache, when the credentials for its server change (a rotated token),
and at interpreter exit. :func:`api_client` still makes a private client its caller closes.
"""
from __future__ import annotations

import atexit
import base64
import hashlib
import json
import os
import threading
import time
from collections import OrderedDict
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from models.errors import TransientError

from ..base import KubeAccess, api_call
from .errors import map_error
from .objects import CRD, Res, ref_str


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
    return _GuardedApiClient(c)


class _GuardedApiClient(k8s.ApiClient):
    """Every request waits for the ``kubernetes`` API limit (``backends.base.api_call``)."""

    def call_api(self, *args, **kwargs):
        with api_call("kubernetes"):
            return super().call_api(*args, **kwargs)


class _Shared:
    """What every backend of one cluster endpoint + credentials shares in a process."""

    def __init__(self, access: KubeAccess):
        self.api = api_client(access)
        self.discovery: dict[str, dict[str, Res]] = {}
        self.closed = False

    def close(self) -> None:
        self.closed = True
        self.api.close()


_CLIENTS: OrderedDict[tuple, _Shared] = OrderedDict()
_CLIENTS_LOCK = threading.Lock()


def _cache_key(access: KubeAccess) -> tuple:
    secret = hashlib.sha256((access.token or "").encode()).hexdigest()  # never keep the token in a key
    return (access.server.rstrip("/"), secret, access.ca_file, access.ca_data, access.insecure,
            access.client_cert_file, access.client_key_file)


def shared_client(access: KubeAccess) -> _Shared:
    """The process's client for ``access`` (made on first use, then reused by every backend and thread)."""
    key = _cache_key(access)
    closing: list[_Shared] = []
    with _CLIENTS_LOCK:
        shared = _CLIENTS.get(key)
        if shared is not None:
            _CLIENTS.move_to_end(key)
        else:
            for k in [k for k in _CLIENTS if k[0] == key[0]]:  # same server, other credentials: rotated
                closing.append(_CLIENTS.pop(k))
            shared = _CLIENTS[key] = _Shared(access)
            limit = max(1, int(os.environ.get("FLEETWRIGHT_KUBE_CLIENTS", "64")))
            while len(_CLIENTS) > limit:
                closing.append(_CLIENTS.popitem(last=False)[1])
    for old in closing:
        old.close()
    return shared


def shared_clients() -> int:
    """How many clients the process keeps (for tests and metrics)."""
    with _CLIENTS_LOCK:
        return len(_CLIENTS)


def close_clients() -> None:
    """Close every shared client (at interpreter exit; also after a test)."""
    with _CLIENTS_LOCK:
        items = list(_CLIENTS.values())
        _CLIENTS.clear()
    for s in items:
        s.close()


atexit.register(close_clients)


class Client:
    """The API server of one cluster: requests, discovery, reads (the base of ``KubeBackend``)."""

    def __init__(self, access: KubeAccess, *, timeout: tuple[float, float] = (5.0, 30.0),
                 crd_timeout: float = 60.0, namespace_timeout: float = 120.0, poll: float = 0.2):
        self.access = access
        self._shared = shared_client(access)
        self._api = self._shared.api
        self._timeout = timeout
        self._crd_timeout = crd_timeout
        self._ns_timeout = namespace_timeout
        self._poll = poll
        self._disc = self._shared.discovery  # shared: discovery is the same for every backend of the cluster

    def __repr__(self) -> str:
        return f"KubeBackend({self.access!r})"

    def close(self) -> None:
        """Nothing to do: the shared client is closed by the cache (rotation, eviction, exit)."""

    # ------------------------------------------------------------------ transport

    def _request(self, method: str, path: str, *, body: Any = None, query: list | None = None,
                 content_type: str | None = None, what: str = "") -> dict | None:
        """One API call; JSON in and out. Errors go through :func:`map_error` (None: absent)."""
        status, doc, exc = self._exchange(method, path, body=body, query=query, content_type=content_type,
                                          what=what)
        if exc is not None:
            err = map_error(exc, method, what or path)
            if err is None:
                return None
            raise err from exc
        return doc

    def _exchange(self, method: str, path: str, *, body: Any = None, query: list | None = None,
                  content_type: str | None = None, what: str = "") -> tuple[int, dict, ApiException | None]:
        """One API call that returns ``(status, JSON body, ApiException or None)`` for any HTTP answer.

        For callers that act on the status themselves (an eviction's 429); transport errors
        (refused, timeouts, TLS) are mapped and raised here.
        """
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        try:
            m, url, hdrs, b, _ = self._api.param_serialize(method, path, query_params=query or None,
                                                           header_params=headers, body=body,
                                                           auth_settings=["BearerToken"])
            r = self._api.call_api(m, url, header_params=hdrs, body=b, _request_timeout=self._timeout)
            data = r.read()
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as e:
            err = map_error(e, method, what or path)
            if err is None:  # pragma: no cover - transport errors are never "absent"
                raise TransientError(f"{method} {what or path}: no answer") from e
            raise err from e
        if not 200 <= r.status < 300:
            exc = ApiException(http_resp=r)
            try:
                doc = json.loads(data) if data else {}
            except ValueError:
                doc = {}
            return r.status, doc if isinstance(doc, dict) else {}, exc
        try:
            return r.status, (json.loads(data) if data else {}), None
        except ValueError:
            raise TransientError(f"{method} {what or path}: the API server answered with something that is not JSON") from None

    # ------------------------------------------------------------------ discovery

    def _group_version(self, api_version: str, refresh: bool = False) -> dict[str, Res]:
        if not refresh and api_version in self._disc:
            return self._disc[api_version]
        path = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        doc = self._request("GET", path, what=f"discovery {api_version}")
        if not doc:
            self._disc.pop(api_version, None)
            return {}
        kinds = {r["kind"]: Res(api_version, r["kind"], r["name"], bool(r.get("namespaced")))
                 for r in doc.get("resources") or [] if "/" not in r.get("name", "/")}
        self._disc[api_version] = kinds
        return kinds

    def _resource(self, api_version: str, kind: str, wait: float = 0.0) -> Res | None:
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

    def _served(self, obj: dict, wait: float = 0.0) -> Res | None:
        return self._resource(obj["apiVersion"], obj["kind"], wait)

    # ------------------------------------------------------------------ reads

    def _get(self, res: Res, obj: dict) -> dict | None:
        meta = obj["metadata"]
        return self._request("GET", res.item(meta.get("namespace"), meta["name"]), what=ref_str(obj))

    def _list(self, res: Res, selector: str) -> list[dict]:
        doc = self._request("GET", res.collection(), query=[("labelSelector", selector)],
                            what=f"{res.kind} list") or {}
        items = doc.get("items") or []
        for it in items:
            it.setdefault("apiVersion", res.api_version)
            it.setdefault("kind", res.kind)
        return items
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
            if o.get("kind") == CRD:
                spec = o.get("spec") or {}
                kind = (spec.get("names") or {}).get("kind")
                for v in spec.get("versions") or []:
                    out[(f"{spec.get('group')}/{v.get('name')}", kind)] = spec.get("scope", "Namespaced") == "Namespaced"
        return out

    # ------------------------------------------------------------------ observe
