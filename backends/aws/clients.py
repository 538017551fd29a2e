"""boto3 session and clients, one SDK call with errors mapped, and a bounded poll (the plumbing every service uses)."""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError

from models.desired import DesiredCluster
from models.errors import PermanentError, TransientError

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


class Target(str):
    """A region, plus the identity to call it as (the cluster's ``credentials`` and ``assumeRole``).

    Every service passes ``self._region(desired)`` to ``_call``; being a ``str``, it works wherever a
    region does, and the client it selects is the one for that account or role.
    """

    credentials: str | None = None
    role_arn: str | None = None
    external_id: str | None = None

    def __new__(cls, region: str, credentials: str | None = None, role_arn: str | None = None,
                external_id: str | None = None) -> "Target":
        t = super().__new__(cls, region)
        t.credentials, t.role_arn, t.external_id = credentials, role_arn, external_id
        return t

    @property
    def identity(self) -> tuple[str | None, str | None]:
        return (self.credentials, self.role_arn)


# Sessions and clients are shared by every backend instance of the process (a task builds a new backend
# per call) and per identity: (connection secrets, credentials name, role) for sessions, + service and region
# for clients. botocore clients are thread-safe; sessions are not, so they are only touched under the lock.
_LOCK = threading.RLock()
_SESSIONS: dict[tuple, Any] = {}
_CLIENTS: dict[tuple, Any] = {}


def _secret(v) -> str | None:
    return v.get_secret_value() if v is not None else None


def _conn_key(a) -> tuple:
    return (a.endpoint_url, _secret(a.access_key_id), _secret(a.secret_access_key), _secret(a.session_token),
            a.profile_name, a.max_attempts)


class Clients:
    """Mixin: the SDK sessions and clients (shared per identity), and the helpers every service uses."""

    def __init__(self, connections: Connections):
        self.connections = connections
        self.aws = connections.aws
        self._lock = _LOCK

    # -- SDK ----------------------------------------------------------------------------------
    def _connection(self, credentials: str | None):
        if credentials is None:
            return self.aws
        named = self.connections.aws_credentials.get(credentials)
        if named is None:
            raise PermanentError(f"no AWS credentials named {credentials!r} (backend.credentials); "
                                 f"known: {sorted(self.connections.aws_credentials) or 'none'}")
        return named

    def _base_session(self, a):
        import boto3

        key = ("base",) + _conn_key(a)
        with _LOCK:
            s = _SESSIONS.get(key)
            if s is None:
                kw: dict[str, Any] = {}
                if a.access_key_id is not None and a.secret_access_key is not None:
                    kw["aws_access_key_id"] = a.access_key_id.get_secret_value()
                    kw["aws_secret_access_key"] = a.secret_access_key.get_secret_value()
                    if a.session_token is not None:
                        kw["aws_session_token"] = a.session_token.get_secret_value()
                elif a.profile_name:
                    kw["profile_name"] = a.profile_name
                try:
                    s = _SESSIONS[key] = boto3.session.Session(**kw)
                except BotoCoreError as e:
                    raise map_error(e, operation="session") from None
            return s

    def _boto_session(self, target: str | None = None):
        """The boto3 session for ``target``'s identity (default: the connection's own)."""
        credentials = getattr(target, "credentials", None)
        role = getattr(target, "role_arn", None)
        a = self._connection(credentials)
        base = self._base_session(a)
        if not role:
            return base
        key = ("role", role, getattr(target, "external_id", None)) + _conn_key(a)
        with _LOCK:
            s = _SESSIONS.get(key)
            if s is None:
                s = _SESSIONS[key] = self._assumed_session(base, a, role, getattr(target, "external_id", None),
                                                           str(target))
            return s

    def _assumed_session(self, base, a, role: str, external_id: str | None, region: str):
        """A session whose credentials come from STS AssumeRole and refresh themselves before they expire."""
        import boto3
        import botocore.session
        from botocore.credentials import RefreshableCredentials

        sts = base.client("sts", region_name=region, endpoint_url=a.endpoint_url,
                          config=BotoConfig(retries={"mode": "standard", "total_max_attempts": max(1, a.max_attempts)}))

        def fetch() -> dict[str, str]:
            kw: dict[str, Any] = {"RoleArn": role, "RoleSessionName": "fleetwright", "DurationSeconds": 3600}
            if external_id:
                kw["ExternalId"] = external_id
            try:
                c = sts.assume_role(**kw)["Credentials"]
            except Exception as e:  # noqa: BLE001 - mapped in one place
                raise map_error(e, operation="sts:AssumeRole") from None
            return {"access_key": c["AccessKeyId"], "secret_key": c["SecretAccessKey"], "token": c["SessionToken"],
                    "expiry_time": c["Expiration"].isoformat()}

        creds = RefreshableCredentials.create_from_metadata(metadata=fetch(), refresh_using=fetch,
                                                            method="sts-assume-role")
        bs = botocore.session.get_session()
        bs._credentials = creds  # botocore's documented way to give a session refreshable credentials
        return boto3.session.Session(botocore_session=bs)

    def client(self, service: str, region: str):
        a = self._connection(getattr(region, "credentials", None))
        ident = getattr(region, "identity", (None, None))
        key = (service, str(region), ident, getattr(region, "external_id", None)) + _conn_key(a)
        c = _CLIENTS.get(key)
        if c is None:
            session = self._boto_session(region)
            cfg = BotoConfig(region_name=str(region), connect_timeout=10, read_timeout=60,
                             retries={"mode": "standard", "total_max_attempts": max(1, a.max_attempts)})
            with _LOCK:  # a boto3 Session is not thread-safe; its clients are
                c = _CLIENTS.get(key)
                if c is None:
                    try:
                        c = session.client(service, region_name=str(region), endpoint_url=a.endpoint_url, config=cfg)
                    except Exception as e:  # noqa: BLE001
                        raise map_error(e, operation=f"{service} client") from None
                    _guard_calls(c)
                    _CLIENTS[key] = c
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
    def _region(desired: DesiredCluster) -> Target:
        b = desired.backend
        role = getattr(b, "assume_role", None)
        return Target(b.region, getattr(b, "credentials", None), role.role_arn if role else None,
                      role.external_id if role else None)

    @staticmethod
    def role_names(desired: DesiredCluster) -> dict[str, str]:
        return {"cluster": f"fw-{desired.name}-cluster", "node": f"fw-{desired.name}-node"}

    @staticmethod
    def tags(desired: DesiredCluster, **extra: str) -> dict[str, str]:
        return {**desired.backend.tags, **extra, OWNER_KEY: OWNER_VALUE, CLUSTER_KEY: desired.name}

    def _partition(self, region: str) -> str:
        try:
            return self._boto_session().get_partition_for_region(str(region))
        except Exception:  # noqa: BLE001 - unknown region: the commercial partition
            return "aws"

    def _policy_arns(self, region: str, names: tuple[str, ...]) -> list[str]:
        p = self._partition(region)
        return [n if n.startswith("arn:") else f"arn:{p}:iam::aws:policy/{n}" for n in names]
