"""Signature checks, on the raw body bytes, against every active secret (so a rotation accepts both).

Each check answers the position of the secret that matched (for the log: "secret #2", never the
value), or None. Comparisons are constant-time (``hmac.compare_digest``).
"""
from __future__ import annotations

import hashlib
import hmac
from typing import Optional, Sequence


def hmac_hex(secret: bytes, body: bytes) -> str:
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def _match_digest(given: str, body: bytes, secrets: Sequence[bytes]) -> Optional[int]:
    given = given.strip().lower()
    if len(given) != 64:
        return None
    found = None
    for i, secret in enumerate(secrets):  # no early exit: the time taken does not say which secret matched
        if hmac.compare_digest(hmac_hex(secret, body), given) and found is None:
            found = i
    return found


def hmac_prefixed(header: Optional[str], body: bytes, secrets: Sequence[bytes], prefix: str = "sha256=") -> Optional[int]:
    """GitHub's ``X-Hub-Signature-256: sha256=<hex>`` (and the generic header with its own prefix)."""
    if not header or not secrets:
        return None
    header = header.strip()
    if prefix:
        if not header.lower().startswith(prefix.lower()):
            return None
        header = header[len(prefix):]
    return _match_digest(header, body, secrets)


def gitea_signature(header: Optional[str], body: bytes, secrets: Sequence[bytes]) -> Optional[int]:
    """Gitea / Forgejo ``X-Gitea-Signature``: the bare hex HMAC-SHA256 of the body."""
    if not header or not secrets:
        return None
    return _match_digest(header, body, secrets)


def gitlab_token(header: Optional[str], secrets: Sequence[bytes]) -> Optional[int]:
    """GitLab ``X-Gitlab-Token``: the secret itself, compared in constant time (no HMAC in GitLab)."""
    if not header or not secrets:
        return None
    try:  # ASGI servers decode header bytes as latin-1: encoding back gives the bytes that were sent
        given = header.encode("latin-1")
    except UnicodeEncodeError:
        return None
    found = None
    for i, secret in enumerate(secrets):
        if hmac.compare_digest(given, secret) and found is None:
            found = i
    return found
