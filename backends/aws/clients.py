"""boto3 session and clients, one SDK call with errors mapped, and a bounded poll (the plumbing every service uses)."""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError

from models.desired import DesiredCluster
from models.errors import TransientError

from ..base import api_call
from ..connections import Connections
from .common import CLUSTER_KEY, OWNER_KEY, OWNER_VALUE
from .errors import map_error


_held = threading.local()


def _guard_calls(client) -> None:
    """Every API call of this client waits for the ``aws`` API limit (botocore before-call/after-call events)."""

    def before(**_):
        guard = api_call("aws")
        guard.__enter__()
        _held.__dict__.setdefault("stack", []).append(guard)

    def after(**_):
        stack = _held.__dict__.get("stack")
        if stack:
            stack.pop().__exit__(None, None, None)

    events = client.meta.events
    events.register("before-call.*.*", before, unique_id="fleetwright-api-before")
    events.register("after-call.*.*", after, unique_id="fleetwright-api-after")
    events.register("after-call-error.*.*", after, unique_id="fleetwright-api-error")


class Clients:
    """Mixin: the SDK session and clients of one backend instance, and the helpers every service uses."""

    def __init__(self, connections: Connections):
        self.connections = connections
        self.aws = connections.aws
        self._lock = threading.Lock()
        self._session = None
        self._clients: dict[tuple[str, str], Any] = {}
        self._cache: dict[Any, Any] = {}  # answers that do not change for this backend's life (caller identity)

    # -- SDK ----------------------------------------------------------------------------------
    def _boto_session(self):
        import boto3

        with self._lock:
            if self._session is None:
                a = self.aws
                kw: dict[str, Any] = {}
                if a.access_key_id is not None and a.secret_access_key is not None:
                    kw["aws_access_key_id"] = a.access_key_id.get_secret_value()
                    kw["aws_secret_access_key"] = a.secret_access_key.get_secret_value()
                    if a.session_token is not None:
                        kw["aws_session_token"] = a.session_token.get_secret_value()
                elif a.profile_name:
                    kw["profile_name"] = a.profile_name
                try:
                    self._session = boto3.session.Session(**kw)
                except BotoCoreError as e:
                    raise map_error(e, operation="session") from None
            return self._session

    def client(self, service: str, region: str):
        key = (service, region)
        c = self._clients.get(key)
        if c is None:
            session = self._boto_session()
            cfg = BotoConfig(region_name=region, connect_timeout=10, read_timeout=60,
                             retries={"mode": "standard", "total_max_attempts": max(1, self.aws.max_attempts)})
            with self._lock:  # a boto3 Session is not thread-safe; its clients are
                c = self._clients.get(key)
                if c is None:
                    try:
                        c = session.client(service, region_name=region, endpoint_url=self.aws.endpoint_url, config=cfg)
                    except Exception as e:  # noqa: BLE001
                        raise map_error(e, operation=f"{service} client") from None
                    _guard_calls(c)
                    self._clients[key] = c
        return c

    def _call(self, service: str, region: str, op: str, *, missing_ok: bool = False, **kw: Any) -> Any:
        """One SDK call; errors mapped. With ``missing_ok`` a not-found answer returns ``None``."""
        client = self.client(service, region)
        try:
            return getattr(client, op)(**kw)
        except Exception as e:  # noqa: BLE001 - mapped in one place
            api = client.meta.method_to_api_mapping.get(op, op)
            mapped = map_error(e, operation=f"{service}:{api}", missing_ok=missing_ok)
            if mapped is None:
                return None
            raise mapped from None

    def _wait(self, what: str, check: Callable[[], Any]) -> Any:
        """Poll ``check`` every ``wait_seconds`` until it returns something truthy; TransientError on timeout."""
        deadline = time.monotonic() + self.aws.timeout_seconds
        while True:
            result = check()
            if result:
                return result
            if time.monotonic() >= deadline:
                raise TransientError(f"timed out after {self.aws.timeout_seconds:g}s waiting for {what}")
            time.sleep(self.aws.wait_seconds)

    # -- names and tags -----------------------------------------------------------------------
    @staticmethod
    def _region(desired: DesiredCluster) -> str:
        return desired.backend.region

    @staticmethod
    def role_names(desired: DesiredCluster) -> dict[str, str]:
        return {"cluster": f"fw-{desired.name}-cluster", "node": f"fw-{desired.name}-node"}

    @staticmethod
    def tags(desired: DesiredCluster, **extra: str) -> dict[str, str]:
        return {**desired.backend.tags, **extra, OWNER_KEY: OWNER_VALUE, CLUSTER_KEY: desired.name}

    def _partition(self, region: str) -> str:
        try:
            return self._boto_session().get_partition_for_region(region)
        except Exception:  # noqa: BLE001 - unknown region: the commercial partition
            return "aws"

    def _policy_arns(self, region: str, names: tuple[str, ...]) -> list[str]:
        p = self._partition(region)
        return [n if n.startswith("arn:") else f"arn:{p}:iam::aws:policy/{n}" for n in names]
