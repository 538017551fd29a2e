"""The one place where Kubernetes API and transport errors become ``models.errors`` (:func:`map_error`)."""
from __future__ import annotations

import json
from typing import Iterable

import urllib3
from kubernetes.client.exceptions import ApiException

from models.errors import FleetwrightError, PermanentError, TransientError


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
