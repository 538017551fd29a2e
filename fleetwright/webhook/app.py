"""The HTTP side: ``POST /hooks/{github,gitlab,gitea,generic}``, ``GET /healthz``, ``/readyz``, ``/metrics``.

Order of checks, before any work: provider enabled (404) -> body cap, from ``Content-Length`` and
again while reading a streamed body (413) -> signature or token on the raw bytes, against every
active secret (401) -> JSON (400) -> event type (ping answered 200; others not allow-listed 202
"ignored") -> repository (403) -> branch (202 "ignored") -> a flow run in Prefect (202 with its id;
503 when Prefect cannot take it, so the Git host retries). Every delivery that starts nothing is
logged with its reason and counted; no secret, token or signature is ever logged.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from contextlib import asynccontextmanager
from typing import Optional
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from . import verify
from .config import WebhookConfig, load_config
from .dispatch import Dispatcher, run_request
from .metrics import Metrics
from .providers import PR_ACTIONS, ZERO_SHA, BadPayload, Delivery, parse
from .secrets import SecretStore, SecretsUnavailable

log = logging.getLogger("fleetwright.webhook")
SHA = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")


class Rejected(Exception):
    def __init__(self, status: int, reason: str, detail: str = ""):
        super().__init__(reason)
        self.status, self.reason, self.detail = status, reason, detail


def _clean(v: str, n: int = 80) -> str:
    """A client-supplied value made safe for a log line."""
    return re.sub(r"[^A-Za-z0-9._:/@+-]", "?", v or "")[:n] or "-"


async def read_capped(request: Request, cap: int) -> bytes:
    """The raw body, refusing before reading when Content-Length says too much, and while reading
    when a chunked or lying body passes the cap (nothing beyond cap + one chunk is ever held)."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise Rejected(400, "bad_content_length", "Content-Length is not a number")
        if int(length) > cap:
            raise Rejected(413, "body_too_large", f"body of {int(length)} bytes is over the {cap}-byte cap")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise Rejected(413, "body_too_large", f"body passed the {cap}-byte cap")
        chunks.append(chunk)
    return b"".join(chunks)


def _signature_check(provider: str, cfg: WebhookConfig, request: Request, body: bytes, secrets: list[bytes]):
    h = request.headers
    if provider == "github":
        return "X-Hub-Signature-256", verify.hmac_prefixed(h.get("x-hub-signature-256"), body, secrets)
    if provider == "gitlab":
        return "X-Gitlab-Token", verify.gitlab_token(h.get("x-gitlab-token"), secrets)
    if provider == "gitea":
        for name in ("x-gitea-signature", "x-forgejo-signature", "x-gogs-signature"):
            if h.get(name):
                return name, verify.gitea_signature(h.get(name), body, secrets)
        return "X-Gitea-Signature", verify.hmac_prefixed(h.get("x-hub-signature-256"), body, secrets)
    g = cfg.generic
    return g.signature_header, verify.hmac_prefixed(h.get(g.signature_header.lower()), body, secrets, g.prefix)


def _payload(request: Request, body: bytes):
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if ctype == "application/x-www-form-urlencoded":  # GitHub's other content type: payload=<json>
            return json.loads(parse_qs(body.decode("utf-8")).get("payload", [""])[0])
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise Rejected(400, "bad_payload", "the body is not JSON") from None


class Receiver:
    """The app's state: configuration, secrets, the Prefect dispatcher and the counters."""

    def __init__(self, config: WebhookConfig, secrets: Optional[SecretStore] = None,
                 dispatcher: Optional[Dispatcher] = None):
        self.config = config
        self.secrets = secrets or SecretStore(config.secret_block, config.secret_refresh_seconds)
        self.dispatcher = dispatcher or Dispatcher(config.deployment, config.debounce_seconds)
        self.metrics = Metrics()
        if hasattr(self.dispatcher, "on_superseded"):
            self.dispatcher.on_superseded = lambda n: self.metrics.inc("fleetwright_webhook_runs_superseded_total", n)
        if hasattr(self.dispatcher, "on_retry"):
            self.dispatcher.on_retry = lambda: self.metrics.inc("fleetwright_webhook_bulk_retries_total")
        self._background: set[asyncio.Task] = set()
        self.verifying = 0  # deliveries read and not yet queued or answered: the dispatcher waits for them
        if hasattr(self.dispatcher, "incoming"):
            self.dispatcher.incoming = lambda: self.verifying

    def reject(self, provider: str, delivery: str, remote: str, r: Rejected) -> JSONResponse:
        self.metrics.inc("fleetwright_webhook_rejected_total", provider=provider, reason=r.reason)
        self.metrics.inc("fleetwright_webhook_deliveries_total", provider=provider, outcome=str(r.status))
        log.warning("webhook %s delivery %s from %s rejected (%d %s): %s", provider, _clean(delivery), remote,
                    r.status, r.reason, r.detail)
        status = "ignored" if r.status < 300 else "rejected"
        return JSONResponse({"status": status, "reason": r.reason, "detail": r.detail}, status_code=r.status)

    async def handle(self, provider: str, request: Request) -> JSONResponse:
        self.verifying += 1
        verified = [False]
        try:
            return await self._handle(provider, request, verified)
        finally:
            if not verified[0]:
                self.verifying -= 1

    async def _handle(self, provider: str, request: Request, verified: list) -> JSONResponse:
        t0 = time.monotonic()
        cfg = self.config
        remote = request.client.host if request.client else "-"
        delivery_hint = (request.headers.get("x-github-delivery") or request.headers.get("x-gitea-delivery")
                         or request.headers.get("idempotency-key") or request.headers.get("x-gitlab-event-uuid")
                         or request.headers.get(cfg.generic.delivery_header.lower()) or "")
        try:
            if provider not in cfg.providers:
                raise Rejected(404, "provider_not_enabled", f"provider {_clean(provider)} is not enabled")
            body = await read_capped(request, cfg.max_body_bytes)
            try:
                secrets = await self.secrets.get(provider)
                header, matched = _signature_check(provider, cfg, request, body, secrets)
                if matched is None:  # maybe a secret added by a rotation this very minute
                    secrets = await self.secrets.get(provider, force=True)
                    header, matched = _signature_check(provider, cfg, request, body, secrets)
            except SecretsUnavailable as e:
                raise Rejected(503, "secrets_unavailable", str(e)) from None
            if matched is None:
                what = "token" if provider == "gitlab" else "signature"
                present = bool(request.headers.get(header.lower()))
                raise Rejected(401, f"bad_{what}" if present else f"missing_{what}",
                               f"{header} {'does not match any active secret' if present else 'is missing'}")
            try:
                d = parse(provider, request.headers, _payload(request, body), cfg.generic.event_header,
                          cfg.generic.delivery_header)
            except BadPayload as e:
                raise Rejected(400, "bad_payload", str(e)) from None
            if d.event == "ping":
                self.metrics.inc("fleetwright_webhook_deliveries_total", provider=provider, outcome="ping")
                log.info("webhook %s ping %s from %s (secret #%d)", provider, _clean(d.delivery_id), remote, matched + 1)
                return JSONResponse({"status": "pong"}, status_code=200)
            return await self._accept(provider, d, remote, t0, matched, verified)
        except Rejected as r:
            return self.reject(provider, delivery_hint, remote, r)

    def _check(self, d: Delivery):
        cfg = self.config
        if d.event not in cfg.events:
            raise Rejected(202, "event_not_allowed", f"event {_clean(d.event)} is not allow-listed")
        found = cfg.repository(d.repo_urls)
        if found is None:
            raise Rejected(403, "repository_not_allowed",
                           f"repository {_clean(d.repo_urls[0] if d.repo_urls else '', 200)} is not allow-listed")
        repo, url = found
        if d.event == "pull_request" and d.action not in PR_ACTIONS:
            raise Rejected(202, "pull_request_action_ignored", f"pull request action {_clean(d.action)}")
        if not d.branch:
            raise Rejected(202, "not_a_branch", f"ref {_clean(d.ref, 200)} is not a branch")
        if not repo.allows_branch(d.branch):
            raise Rejected(202, "branch_not_allowed", f"branch {_clean(d.branch, 200)} is not allow-listed")
        if d.after == ZERO_SHA:
            raise Rejected(202, "branch_deleted", f"branch {_clean(d.branch, 200)} was deleted")
        if not SHA.fullmatch(d.after or "") or (d.before and not SHA.fullmatch(d.before)):
            raise Rejected(400, "bad_payload", "before/after are not commit SHAs")
        return repo, url

    async def _accept(self, provider: str, d: Delivery, remote: str, t0: float, matched: int,
                      verified: list) -> JSONResponse:
        repo, url = self._check(d)
        req = run_request(d, repo, url)
        verified[0] = True  # queued next: no longer "verifying"
        self.verifying -= 1
        task = asyncio.ensure_future(self.dispatcher.dispatch(req))
        try:
            done = await asyncio.wait_for(asyncio.shield(task), self.config.answer_within_seconds)
        except asyncio.TimeoutError:
            # Prefect is slow: answer in time, finish in the background (logged and counted when it ends)
            self._background.add(task)
            task.add_done_callback(lambda t: self._finished_late(t, provider, d, remote, t0, matched))
            self.metrics.inc("fleetwright_webhook_deliveries_total", provider=provider, outcome="accepted_late")
            return JSONResponse({"status": "accepted", "flow_run_id": None, "detail": "handing to Prefect"},
                                status_code=202)
        except Exception as e:  # noqa: BLE001 - Prefect down or the deployment missing: the host retries later
            raise Rejected(503, "prefect_unavailable", f"{type(e).__name__}: {str(e)[:200]}") from None
        return self._dispatched(provider, d, remote, t0, done, matched)

    def _dispatched(self, provider, d, remote, t0, done, matched) -> JSONResponse:
        """Count, log and answer the outcome of handing one delivery to Prefect."""
        self.metrics.observe_dispatch(time.monotonic() - t0)
        if not done.created:  # a replay, a second hook, or another replica was first: nothing new starts
            self.reject(provider, d.delivery_id, remote,
                        Rejected(202, "duplicate", f"{d.event} of {d.after[:12]} already started flow run {done.name}"))
            return JSONResponse({"status": "duplicate", "flow_run_id": str(done.run_id), "flow_run_name": done.name},
                                status_code=202)
        self.metrics.inc("fleetwright_webhook_deliveries_total", provider=provider, outcome="accepted")
        self.metrics.inc("fleetwright_webhook_runs_created_total", provider=provider)
        log.info("webhook %s delivery %s: %s %s@%s by %s -> flow run %s (secret #%d)", provider,
                 _clean(d.delivery_id), d.event, _clean(d.branch, 100), d.after[:12], _clean(d.pusher), done.name,
                 matched + 1)
        return JSONResponse({"status": "accepted", "flow_run_id": str(done.run_id), "flow_run_name": done.name},
                            status_code=202)

    def _finished_late(self, task: asyncio.Task, provider, d, remote, t0, matched) -> None:
        self._background.discard(task)
        if task.cancelled() or task.exception() is not None:
            err = "cancelled" if task.cancelled() else type(task.exception()).__name__
            self.metrics.inc("fleetwright_webhook_rejected_total", provider=provider, reason="dispatch_failed")
            log.error("webhook %s delivery %s: handing to Prefect failed after the answer (%s); the fallback "
                      "poll will catch the commit", provider, _clean(d.delivery_id), err)
            return
        self._dispatched(provider, d, remote, t0, task.result(), matched)

    async def warm_up(self) -> None:
        """Look the deployment up and read the secrets before the first delivery, so it is answered fast.
        A failure here is logged, not fatal: each delivery tries again (and answers 503 meanwhile)."""
        try:
            await asyncio.wait_for(self.dispatcher.deployment_id(), 30)
            await asyncio.wait_for(self.secrets.get("*"), 30)
            log.info("webhook receiver ready: deployment %s, %d repositories", self.config.deployment,
                     len(self.config.repositories))
        except Exception as e:  # noqa: BLE001
            log.warning("webhook receiver starting without %s: %s", self.config.deployment, type(e).__name__)

    async def drain(self, timeout: float = 10.0) -> None:
        if self._background:
            await asyncio.wait(list(self._background), timeout=timeout)


def create_app(config: WebhookConfig, receiver: Optional[Receiver] = None) -> FastAPI:
    rx = receiver or Receiver(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await rx.dispatcher.start()
        await rx.warm_up()
        try:
            yield
        finally:
            await rx.drain()
            await rx.dispatcher.close()

    app = FastAPI(title="fleetwright webhook receiver", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.receiver = rx

    @app.post("/hooks/{provider}")
    async def hook(provider: str, request: Request):
        return await rx.handle(provider, request)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        problems = {}
        err = await rx.dispatcher.healthy()
        if err:
            problems["prefect"] = err
        else:
            try:
                await rx.dispatcher.deployment_id()
            except Exception as e:  # noqa: BLE001
                problems["deployment"] = f"{rx.config.deployment}: {type(e).__name__}"
        count = 0
        try:
            count = await rx.secrets.count()
        except SecretsUnavailable as e:
            problems["secrets_error"] = str(e)
        return JSONResponse({"status": "ready" if not problems else "not ready", "secrets": count, **problems},
                            status_code=200 if not problems else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(rx.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def app_from_env() -> FastAPI:
    """The factory uvicorn's workers call: configuration from FLEETWRIGHT_WEBHOOK_CONFIG (a file) or
    FLEETWRIGHT_WEBHOOK_CONFIG_BLOCK (a Prefect JSON block)."""
    from pathlib import Path

    path = os.environ.get("FLEETWRIGHT_WEBHOOK_CONFIG")
    return create_app(load_config(Path(path) if path else None, os.environ.get("FLEETWRIGHT_WEBHOOK_CONFIG_BLOCK")))
