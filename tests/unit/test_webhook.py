"""The webhook receiver's checks, in process: signatures, payloads, allow-lists, body cap, secrets, config.

The Prefect side is a recording stand-in here; the proofs against a real Prefect server and real
HTTP are in tests/integration/test_webhook.py.
"""
from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import httpx
import pytest

from fleetwright.webhook import verify
from fleetwright.webhook.app import Receiver, create_app
from fleetwright.webhook.config import Repository, WebhookConfig, load_config, normalize_url
from fleetwright.webhook.dispatch import Dispatched, run_request
from fleetwright.webhook.providers import Delivery, parse
from fleetwright.webhook.secrets import SecretStore, SecretsUnavailable, parse_secrets
from fleetwright.webhook.sender import gitlab_push_payload, push_payload, signed
from models.errors import SpecInvalid

REPO = "https://git.example.com/platform/fleet.git"
A, B = "a" * 40, "b" * 40


def test_github_signature_known_vector():
    # the example from GitHub's "Validating webhook deliveries" page
    body, secret = b"Hello, World!", b"It's a Secret to Everybody"
    header = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    assert verify.hmac_prefixed(header, body, [secret]) == 0
    assert verify.hmac_prefixed(header, body + b" ", [secret]) is None
    assert verify.hmac_prefixed(header.replace("sha256=", ""), body, [secret]) is None  # the prefix is required
    assert verify.hmac_prefixed(header, body, [b"old", secret]) == 1  # rotation: the second secret matched
    assert verify.hmac_prefixed(None, body, [secret]) is None
    assert verify.hmac_prefixed(header, body, []) is None


def test_gitea_and_gitlab_checks():
    body = b'{"ref":"refs/heads/main"}'
    assert verify.gitea_signature(verify.hmac_hex(b"s3", body), body, [b"s3"]) == 0
    assert verify.gitea_signature("sha256=" + verify.hmac_hex(b"s3", body), body, [b"s3"]) is None
    assert verify.gitlab_token("tok", [b"other", b"tok"]) == 1
    assert verify.gitlab_token("to", [b"tok"]) is None
    assert verify.gitlab_token("", [b"tok"]) is None
    assert verify.gitlab_token("t\u20acok", [b"tok"]) is None  # not latin-1: cannot be what was sent


@pytest.mark.parametrize("url", ["https://git.example.com/Platform/fleet.git", "http://user:pw@git.example.com/platform/fleet/",
                                 "ssh://git@git.example.com:2222/platform/fleet.git", "git@git.example.com:platform/fleet.git"])
def test_normalize_url(url):
    assert normalize_url(url) == "git.example.com/platform/fleet"


def test_normalize_url_rejects_non_urls():
    assert normalize_url("fleet") == "" and normalize_url("") == ""
    assert normalize_url("file:///srv/git/fleet.git") == "/srv/git/fleet"


def test_parse_each_provider():
    gh = parse("github", {"X-GitHub-Event": "push", "X-GitHub-Delivery": "d1"}, push_payload(REPO, "refs/heads/main", A, B, "ann"))
    assert (gh.event, gh.delivery_id, gh.branch, gh.before, gh.after, gh.pusher) == ("push", "d1", "main", A, B, "ann")
    assert REPO in gh.repo_urls
    gl = parse("gitlab", {"X-Gitlab-Event": "Push Hook", "Idempotency-Key": "k1", "X-Gitlab-Event-UUID": "u1"},
               gitlab_push_payload(REPO, "refs/heads/main", A, B, "bob"))
    assert (gl.event, gl.delivery_id, gl.after, gl.pusher, gl.repo_urls[0]) == ("push", "k1", B, "bob", REPO)
    gl_old = parse("gitlab", {"X-Gitlab-Event-UUID": "u1"}, gitlab_push_payload(REPO, "refs/heads/main", A, B))
    assert gl_old.delivery_id == "u1"  # GitLab before 17.4 sends no Idempotency-Key
    mr = parse("gitlab", {"X-Gitlab-Event": "Merge Request Hook"},
               {"object_kind": "merge_request", "user": {"username": "eve"}, "project": {"git_http_url": REPO},
                "object_attributes": {"action": "update", "iid": 7, "target_branch": "main", "last_commit": {"id": B}}})
    assert (mr.event, mr.pr_number, mr.ref, mr.after, mr.pusher, mr.action) == ("pull_request", 7, "refs/heads/main", B, "eve", "update")
    ge = parse("gitea", {"X-Gitea-Event": "push", "X-Gitea-Delivery": "g1"},
               {**push_payload(REPO, "refs/heads/main", A, B), "pusher": {"login": "gitea-user", "username": "gitea-user"}})
    assert (ge.delivery_id, ge.pusher) == ("g1", "gitea-user")
    pr = parse("github", {"X-GitHub-Event": "pull_request"},
               {"action": "synchronize", "number": 3, "repository": {"clone_url": REPO},
                "pull_request": {"number": 3, "user": {"login": "dev"}, "base": {"ref": "main", "sha": A}, "head": {"sha": B}}})
    assert (pr.event, pr.pr_number, pr.before, pr.after, pr.ref, pr.pusher) == ("pull_request", 3, A, B, "refs/heads/main", "dev")


def test_run_request_keys():
    repo = Repository(url=REPO, branches=["main"], subdir="fleet")
    d = Delivery("github", "push", "d1", [REPO], "refs/heads/main", A, B, "ann")
    r1 = run_request(d, repo, REPO)
    r2 = run_request(Delivery("gitea", "push", "other-delivery", [REPO], "refs/heads/main", A, B, "ann"), repo, REPO)
    assert r1.idempotency_key == r2.idempotency_key  # same commit, second hook: one key
    assert r1.parameters == {"repo": REPO, "after": B, "before": A, "ref": "refs/heads/main", "pusher": "ann",
                             "event": "push", "delivery": "d1", "subdir": "fleet", "dry_run": False}
    r3 = run_request(Delivery("github", "push", "d3", [REPO], "refs/heads/main", B, A), repo, REPO)
    assert r3.idempotency_key != r1.idempotency_key and r3.group_tag == r1.group_tag
    pr = run_request(Delivery("github", "pull_request", "d4", [REPO], "refs/heads/main", A, B, pr_number=3), repo, REPO)
    assert pr.parameters["dry_run"] is True and pr.group_tag != r1.group_tag


def test_parse_secrets_shapes():
    assert parse_secrets('["new", "old"]') == {"*": [b"new", b"old"]}
    assert parse_secrets("just-one") == {"*": [b"just-one"]}
    assert parse_secrets(["a"]) == {"*": [b"a"]}
    assert parse_secrets({"github": ["g"], "*": "x"}) == {"github": [b"g"], "*": [b"x"]}
    for bad in ('["a", ', [], [""], {"github": [1]}, 5):
        with pytest.raises(ValueError):
            parse_secrets(bad)
    with pytest.raises(ValueError) as e:  # the message never echoes a value
        parse_secrets('["sekrit", ')
    assert "sekrit" not in str(e.value)


def test_secret_store_rotation_and_refresh():
    value = {"v": ["old"]}
    store = SecretStore("blk", refresh_seconds=3600, min_refresh_seconds=0, loader=lambda name: value["v"])

    async def go():
        assert await store.get("github") == [b"old"]
        value["v"] = ["new", "old"]
        assert await store.get("github") == [b"old"]  # cached
        assert await store.get("github", force=True) == [b"new", b"old"]
        value["v"] = ["new"]
        assert await store.get("github", force=True) == [b"new"]
        assert "new" not in repr(store)

    asyncio.run(go())


def test_secret_store_missing_block():
    def loader(name):
        raise ValueError(f"Unable to find block document named {name}")

    with pytest.raises(SecretsUnavailable):
        asyncio.run(SecretStore("nope", loader=loader).get("github"))


def test_config_errors_name_file_line_field(tmp_path: Path):
    f = tmp_path / "webhook.yaml"
    f.write_text("repositories:\n  - url: https://git.example.com/p/f.git\n    branchez: [main]\nmax_body_bytes: 5\n")
    with pytest.raises(SpecInvalid) as e:
        load_config(f)
    text = str(e.value)
    assert f"{f}:3: repositories[0].branchez: unknown field" in text
    assert f"{f}:4: max_body_bytes" in text
    assert load_config(None).repositories == []


# ---- the app, with a recording stand-in for Prefect ----------------------------------------------

class RecordingDispatcher:
    def __init__(self):
        self.requests, self.keys = [], {}

    async def start(self):
        pass

    async def close(self):
        pass

    async def healthy(self):
        return None

    async def deployment_id(self):
        return uuid.uuid4()

    async def dispatch(self, req):
        self.requests.append(req)
        created = req.idempotency_key not in self.keys
        self.keys.setdefault(req.idempotency_key, uuid.uuid4())
        return Dispatched(self.keys[req.idempotency_key], created, name="run")


@pytest.fixture
def rig():
    cfg = WebhookConfig(repositories=[Repository(url=REPO, branches=["main", "release-*"])], max_body_bytes=4096,
                        providers=["github", "gitlab", "gitea", "generic"])
    secrets = {"v": ["s-new", "s-old"]}
    rx = Receiver(cfg, SecretStore("blk", refresh_seconds=0, loader=lambda n: secrets["v"]), RecordingDispatcher())
    app = create_app(cfg, rx)

    def post(provider, headers, body):
        async def go():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://rx") as c:
                return await c.post(f"/hooks/{provider}", headers=headers, content=body)
        return asyncio.run(go())

    return rx, post, secrets


def test_app_accepts_valid_push_once(rig):
    rx, post, _ = rig
    h, body = signed("github", "s-new", push_payload(REPO, "refs/heads/main", A, B))
    r = post("github", h, body)
    assert r.status_code == 202 and r.json()["status"] == "accepted"
    r2 = post("github", h, body)  # replay
    assert r2.status_code == 202 and r2.json()["status"] == "duplicate"
    assert len(rx.dispatcher.keys) == 1
    assert rx.metrics.value("fleetwright_webhook_rejected_total", reason="duplicate") == 1


@pytest.mark.parametrize("case, status, reason", [
    ("forged", 401, "bad_signature"), ("unsigned", 401, "missing_signature"), ("branch", 202, "branch_not_allowed"),
    ("tag", 202, "not_a_branch"), ("event", 202, "event_not_allowed"), ("repo", 403, "repository_not_allowed"),
    ("big", 413, "body_too_large"), ("json", 400, "bad_payload"), ("deleted", 202, "branch_deleted"),
    ("provider", 404, "provider_not_enabled"), ("gitlab-token", 401, "bad_token")])
def test_app_rejections_start_nothing(rig, case, status, reason):
    rx, post, _ = rig
    provider, payload, event, secret = "github", push_payload(REPO, "refs/heads/main", A, B), "push", "s-new"
    if case == "branch":
        payload["ref"] = "refs/heads/feature-x"
    elif case == "tag":
        payload["ref"] = "refs/tags/v1"
    elif case == "event":
        event = "issues"
    elif case == "repo":
        payload["repository"]["clone_url"] = "https://git.example.com/someone/else.git"
    elif case == "deleted":
        payload["after"] = "0" * 40
    elif case == "provider":
        provider = "bitbucket"
    h, body = signed("github", "forged-secret" if case == "forged" else secret, payload, event=event)
    if case == "gitlab-token":
        provider = "gitlab"
        h, body = signed("gitlab", "wrong-token", gitlab_push_payload(REPO, "refs/heads/main", A, B))
    if case == "unsigned":
        h.pop("X-Hub-Signature-256")
    if case == "big":
        body = b" " * 5000 + body
        h["X-Hub-Signature-256"] = "sha256=" + verify.hmac_hex(b"s-new", body)
    if case == "json":
        body = b"not json"
        h["X-Hub-Signature-256"] = "sha256=" + verify.hmac_hex(b"s-new", body)
    r = post(provider, h, body)
    assert (r.status_code, r.json()["reason"]) == (status, reason), r.text
    assert rx.dispatcher.requests == []
    assert rx.metrics.value("fleetwright_webhook_rejected_total", reason=reason) == 1
    assert "s-new" not in r.text and "s-old" not in r.text


def test_app_streamed_body_over_cap(rig):
    rx, post, _ = rig

    async def chunks():
        for _ in range(10):
            yield b"x" * 1000  # chunked: no Content-Length

    h, _ = signed("github", "s-new", push_payload(REPO, "refs/heads/main", A, B))
    r = post("github", h, chunks())
    assert (r.status_code, r.json()["reason"]) == (413, "body_too_large")
    assert rx.dispatcher.requests == []


def test_app_ping_rotation_and_providers(rig):
    rx, post, secrets = rig
    h, body = signed("github", "s-old", {"zen": "hi", "hook_id": 1}, event="ping")
    assert post("github", h, body).json() == {"status": "pong"}
    for provider, payload in (("gitea", push_payload(REPO, "refs/heads/release-1", A, B)),
                              ("gitlab", gitlab_push_payload(REPO, "refs/heads/main", B, A)),
                              ("generic", push_payload(REPO, "refs/heads/main", A, "c" * 40))):
        h, body = signed(provider, "s-old", payload)
        r = post(provider, h, body)
        assert r.status_code == 202 and r.json()["status"] == "accepted", (provider, r.text)
    secrets["v"] = ["s-new"]  # the old one is removed from the block (re-read: refresh_seconds=0 here)
    h, body = signed("github", "s-old", push_payload(REPO, "refs/heads/main", A, "d" * 40))
    assert post("github", h, body).status_code == 401
    h, body = signed("github", "s-new", push_payload(REPO, "refs/heads/main", A, "d" * 40))
    assert post("github", h, body).status_code == 202
    text = rx.metrics.render()
    assert 'fleetwright_webhook_runs_created_total{provider="github"} 1' in text
    assert "s-new" not in text
