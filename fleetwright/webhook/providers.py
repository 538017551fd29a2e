"""What each Git host sends, reduced to one shape: a ``Delivery``.

Header and payload formats (from the hosts' documentation):

- GitHub: ``X-GitHub-Event`` (push, ping, pull_request), ``X-GitHub-Delivery`` (a GUID, kept on a
  redelivery), ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>``; push has ``ref``,
  ``before``, ``after``, ``repository.clone_url|ssh_url|html_url``, ``pusher.name``, ``sender.login``.
- GitLab: ``X-Gitlab-Event`` (``Push Hook``, ``Merge Request Hook``, ...), ``X-Gitlab-Token`` (the
  secret itself), ``Idempotency-Key`` (same across retries, GitLab 17.4+) or ``X-Gitlab-Event-UUID``;
  push has ``object_kind``, ``ref``, ``before``, ``after``, ``user_username``,
  ``project.git_http_url|git_ssh_url|web_url``; a merge request has ``object_attributes``
  (``action``, ``iid``, ``target_branch``, ``last_commit.id``).
- Gitea / Forgejo: ``X-Gitea-Event`` (or ``X-Forgejo-Event``), ``X-Gitea-Delivery``,
  ``X-Gitea-Signature: <hex HMAC-SHA256>``; payloads shaped like GitHub's, pusher ``pusher.login``.
- Generic: a GitHub-shaped push payload, with configurable signature / event / delivery headers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

ZERO_SHA = "0" * 40


class BadPayload(ValueError):
    """The body is not the JSON the provider sends (answered 400, starts nothing)."""


@dataclass
class Delivery:
    provider: str
    event: str                 # push | pull_request | ping | the provider's own name for anything else
    delivery_id: str = ""
    repo_urls: list[str] = field(default_factory=list)
    ref: str = ""              # refs/heads/<branch> (a pull request: its target branch)
    before: str = ""
    after: str = ""
    pusher: str = ""
    pr_number: Optional[int] = None
    action: str = ""           # pull request action (opened, synchronize, ...)

    @property
    def branch(self) -> str:
        return self.ref[len("refs/heads/"):] if self.ref.startswith("refs/heads/") else ""


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


def _s(v: Any) -> str:
    return v if isinstance(v, str) else ""


def _urls(*values: Any) -> list[str]:
    return [v for v in values if isinstance(v, str) and v]


# pull request actions that change what would be merged (others: closed, labeled, ... start nothing)
PR_ACTIONS = {"opened", "reopened", "synchronize", "synchronized", "open", "reopen", "update"}


def _github_like(provider: str, event: str, delivery_id: str, p: dict) -> Delivery:
    repo = p.get("repository") or {}
    urls = _urls(_get(repo, "clone_url"), _get(repo, "ssh_url"), _get(repo, "html_url"), _get(repo, "git_url"))
    if event == "push":
        pusher = _s(_get(p, "pusher", "name")) or _s(_get(p, "pusher", "login")) or _s(_get(p, "pusher", "username")) \
            or _s(_get(p, "sender", "login"))
        if provider == "gitea":
            pusher = _s(_get(p, "pusher", "login")) or _s(_get(p, "pusher", "username")) or _s(_get(p, "sender", "login")) \
                or pusher
        return Delivery(provider, "push", delivery_id, urls, _s(p.get("ref")), _s(p.get("before")),
                        _s(p.get("after")), pusher)
    if event == "pull_request":
        pr = p.get("pull_request") or {}
        base = _s(_get(pr, "base", "ref"))
        return Delivery(provider, "pull_request", delivery_id, urls, f"refs/heads/{base}" if base else "",
                        _s(_get(pr, "base", "sha")), _s(_get(pr, "head", "sha")),
                        _s(_get(pr, "user", "login")) or _s(_get(p, "sender", "login")),
                        pr.get("number") if isinstance(pr.get("number"), int) else p.get("number"),
                        _s(p.get("action")))
    return Delivery(provider, event, delivery_id, urls)


def parse(provider: str, headers: Mapping[str, str], payload: Any, generic_event_header: str = "X-Fleetwright-Event",
          generic_delivery_header: str = "X-Fleetwright-Delivery") -> Delivery:
    """One delivery from its (case-insensitive) headers and its decoded JSON payload."""
    if not isinstance(payload, dict):
        raise BadPayload("the body is not a JSON object")
    h = {k.lower(): v for k, v in headers.items()}
    if provider == "github":
        return _github_like("github", h.get("x-github-event", ""), h.get("x-github-delivery", ""), payload)
    if provider == "gitea":
        event = h.get("x-gitea-event") or h.get("x-forgejo-event") or h.get("x-gogs-event") or ""
        delivery = h.get("x-gitea-delivery") or h.get("x-forgejo-delivery") or h.get("x-gogs-delivery") or ""
        return _github_like("gitea", event, delivery, payload)
    if provider == "generic":
        return _github_like("generic", h.get(generic_event_header.lower(), "push"),
                            h.get(generic_delivery_header.lower(), ""), payload)
    if provider == "gitlab":
        delivery = h.get("idempotency-key") or h.get("x-gitlab-event-uuid") or ""
        kind = _s(payload.get("object_kind")) or h.get("x-gitlab-event", "").lower().replace(" hook", "").replace(" ", "_")
        project = payload.get("project") or {}
        urls = _urls(_get(project, "git_http_url"), _get(project, "git_ssh_url"), _get(project, "web_url"),
                     _get(payload, "repository", "git_http_url"), _get(payload, "repository", "git_ssh_url"))
        if kind == "push":
            return Delivery("gitlab", "push", delivery, urls, _s(payload.get("ref")), _s(payload.get("before")),
                            _s(payload.get("after")) or _s(payload.get("checkout_sha")),
                            _s(payload.get("user_username")) or _s(payload.get("user_name")))
        if kind == "merge_request":
            attrs = payload.get("object_attributes") or {}
            target = _s(attrs.get("target_branch"))
            iid = attrs.get("iid")
            return Delivery("gitlab", "pull_request", delivery, urls, f"refs/heads/{target}" if target else "",
                            "", _s(_get(attrs, "last_commit", "id")),
                            _s(_get(payload, "user", "username")), iid if isinstance(iid, int) else None,
                            _s(attrs.get("action")))
        return Delivery("gitlab", kind or "unknown", delivery, urls)
    raise ValueError(f"unknown provider {provider!r}")
