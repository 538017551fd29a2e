"""What the receiver accepts: providers, event types, repositories and their branches, limits.

Read from a YAML/JSON file (``--config``) or a Prefect JSON block, so every replica runs with the
same settings. Bad input stops the receiver before it listens, naming file, line and field.
"""
from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Literal, Optional
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.errors import Problem, SpecInvalid

PROVIDERS = ("github", "gitlab", "gitea", "generic")
DEFAULT_BLOCK = "fleetwright-webhook-secrets"
DEFAULT_DEPLOYMENT = "sync-from-git/sync-from-git"


class Repository(BaseModel):
    """One definitions repository that may start syncs, and the branches that count."""

    model_config = ConfigDict(extra="forbid")
    url: str = Field(description="The repository as the Git host reports it (clone URL, SSH URL or web URL)")
    branches: list[str] = Field(default_factory=lambda: ["main"], description="Branch names or fnmatch patterns")
    subdir: str = Field("", description="The definitions' folder inside the repository (passed to the sync)")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not normalize_url(v):
            raise ValueError(f"not a repository URL: {v!r}")
        return v

    @field_validator("branches")
    @classmethod
    def _branches(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("list at least one branch (or '*')")
        return v

    def allows_branch(self, branch: str) -> bool:
        return any(fnmatch.fnmatchcase(branch, pat) for pat in self.branches)


class Generic(BaseModel):
    """The generic provider: any sender that signs the raw body with HMAC-SHA256 in one header."""

    model_config = ConfigDict(extra="forbid")
    signature_header: str = "X-Fleetwright-Signature"
    prefix: str = Field("sha256=", description="Text before the hex digest in the header ('' for a bare digest)")
    event_header: str = "X-Fleetwright-Event"
    delivery_header: str = "X-Fleetwright-Delivery"


class WebhookConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    deployment: str = Field(DEFAULT_DEPLOYMENT, description="The deployment a push starts")
    secret_block: str = Field(DEFAULT_BLOCK, description="Prefect Secret block: a JSON list of active secrets")
    providers: list[Literal["github", "gitlab", "gitea", "generic"]] = Field(default_factory=lambda: list(PROVIDERS))
    events: list[Literal["push", "pull_request"]] = Field(
        default_factory=lambda: ["push", "pull_request"],
        description="Event types that start work (ping is always answered; GitLab merge_request is pull_request)")
    repositories: list[Repository] = Field(default_factory=list)
    max_body_bytes: int = Field(1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    debounce_seconds: float = Field(5.0, ge=0, le=3600,
                                    description="A sync waits this long; a newer push in that time supersedes it")
    answer_within_seconds: float = Field(0.9, gt=0, le=10)
    secret_refresh_seconds: float = Field(30.0, ge=0, le=3600, description="How often the Secret block is re-read")
    generic: Generic = Field(default_factory=Generic)

    @field_validator("deployment")
    @classmethod
    def _deployment(cls, v: str) -> str:
        if not re.fullmatch(r"[^/]+/[^/]+", v):
            raise ValueError("must be 'flow-name/deployment-name'")
        return v

    def repository(self, urls: list[str]) -> Optional[tuple[Repository, str]]:
        """The configured repository one of the reported URLs names, and that URL."""
        for url in urls:
            n = normalize_url(url)
            for repo in self.repositories:
                if n and normalize_url(repo.url) == n:
                    return repo, url
        return None


def normalize_url(url: str) -> str:
    """``host/path`` in lower case, without scheme, credentials, port, ``.git`` or trailing slash.

    ``https://git.example.com/Platform/Fleet.git``, ``ssh://git@git.example.com:22/platform/fleet``
    and ``git@git.example.com:platform/fleet.git`` all name ``git.example.com/platform/fleet``.
    """
    url = (url or "").strip()
    if not url:
        return ""
    m = re.fullmatch(r"[\w.-]+@([\w.-]+):(?!//)(.+)", url)  # scp-like: git@host:path
    if m:
        host, path = m.group(1), m.group(2)
    else:
        parts = urlsplit(url)
        if not parts.scheme or not (parts.hostname or parts.scheme == "file"):
            return ""
        host, path = parts.hostname or "", parts.path
    path = path.strip("/")
    if path.endswith(".git"):
        path = path[:-4]
    return f"{host.lower()}/{path.lower()}".rstrip("/")


def load_config(path: Optional[Path] = None, block: Optional[str] = None) -> WebhookConfig:
    """From a file, or a Prefect JSON block, or the defaults (no repository allowed: nothing starts)."""
    from models.load import parse_one

    if path is not None:
        if not path.is_file():
            raise SpecInvalid([Problem(str(path), 0, "", "no such file")])
        return parse_one(WebhookConfig, str(path), path.read_text(encoding="utf-8"))
    if block:
        from prefect.blocks.system import JSON

        try:
            data = JSON.load(block).value
        except ValueError as e:
            raise SpecInvalid([Problem(f"block {block}", 0, "", f"cannot load the JSON block: {e}")]) from None
        import json

        return parse_one(WebhookConfig, f"block {block}", json.dumps(data, indent=1))
    return WebhookConfig()
