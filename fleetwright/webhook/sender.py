"""Signed deliveries, built the way each Git host builds them.

For a plain Git server that has no webhooks of its own (``git http-backend``, ``git daemon``, a
bare repository over SSH), ``fleetwright webhook post-receive`` is the hook: it reads git's
``<old> <new> <ref>`` lines on stdin and sends one signed generic delivery per updated branch. The
tests, the benchmark and the demo use the same builders, so they send what the hosts send.
"""
from __future__ import annotations

import json
import uuid
from typing import Iterable, Optional

from .verify import hmac_hex


def push_payload(repo_url: str, ref: str, before: str, after: str, pusher: str = "fleetwright") -> dict:
    """A GitHub-shaped push (also Gitea's and the generic provider's)."""
    return {"ref": ref, "before": before, "after": after,
            "repository": {"clone_url": repo_url},
            "pusher": {"name": pusher, "login": pusher}, "sender": {"login": pusher}, "commits": []}


def gitlab_push_payload(repo_url: str, ref: str, before: str, after: str, pusher: str = "fleetwright") -> dict:
    return {"object_kind": "push", "event_name": "push", "ref": ref, "before": before, "after": after,
            "checkout_sha": after, "user_username": pusher, "user_name": pusher,
            "project": {"git_http_url": repo_url, "web_url": repo_url.removesuffix(".git")}, "commits": []}


def signed(provider: str, secret: str, payload: dict | bytes, event: str = "push",
           delivery: Optional[str] = None, generic_header: str = "X-Fleetwright-Signature") -> tuple[dict, bytes]:
    """``(headers, body)`` of one delivery as ``provider`` sends it, signed with ``secret``."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    delivery = delivery or str(uuid.uuid4())
    sig = hmac_hex(secret.encode(), body)
    h = {"Content-Type": "application/json"}
    if provider == "github":
        h.update({"X-GitHub-Event": event, "X-GitHub-Delivery": delivery, "X-Hub-Signature-256": f"sha256={sig}"})
    elif provider == "gitea":
        h.update({"X-Gitea-Event": event, "X-Gitea-Delivery": delivery, "X-Gitea-Signature": sig})
    elif provider == "gitlab":
        name = {"push": "Push Hook", "merge_request": "Merge Request Hook"}.get(event, event)
        h.update({"X-Gitlab-Event": name, "X-Gitlab-Token": secret, "Idempotency-Key": delivery,
                  "X-Gitlab-Event-UUID": delivery})
    elif provider == "generic":
        h.update({"X-Fleetwright-Event": event, "X-Fleetwright-Delivery": delivery, generic_header: f"sha256={sig}"})
    else:
        raise ValueError(f"unknown provider {provider!r}")
    return h, body


def post_receive(url: str, secret: str, repo_url: str, lines: Iterable[str], pusher: str = "",
                 timeout: float = 10.0) -> list[tuple[str, int]]:
    """Send one generic delivery per ``<old> <new> <ref>`` line; returns ``(ref, HTTP status)`` each."""
    import httpx

    out = []
    with httpx.Client(timeout=timeout) as client:
        for line in lines:
            parts = line.split()
            if len(parts) != 3:
                continue
            old, new, ref = parts
            headers, body = signed("generic", secret, push_payload(repo_url, ref, old, new, pusher or "git"))
            r = client.post(f"{url.rstrip('/')}/hooks/generic", headers=headers, content=body)
            out.append((ref, r.status_code))
    return out
