"""The active webhook secrets, read from a Prefect Secret block and re-read now and then.

The block holds a JSON list of secrets, newest first: ``["new", "old"]``. During a rotation both
are accepted; removing the old one from the list stops it within ``secret_refresh_seconds``
(every replica re-reads the block). A per-provider form is accepted too:
``{"github": ["..."], "gitlab": ["..."], "*": ["..."]}``. Secret values are never logged or returned
by any route.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Callable, Optional

log = logging.getLogger("fleetwright.webhook")


class SecretsUnavailable(Exception):
    """The Secret block cannot be read (or holds no secret): the receiver answers 503, starts nothing."""


def parse_secrets(value: Any) -> dict[str, list[bytes]]:
    """The block's value as ``{provider or '*': [secret bytes, ...]}``; raises ValueError on a bad shape."""
    if isinstance(value, (bytes, bytearray)):
        value = value.decode()
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(("[", "{")):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"the secret looks like JSON but does not parse (line {e.lineno})") from None
        else:
            value = [text]
    if isinstance(value, list):
        value = {"*": value}
    if not isinstance(value, dict):
        raise ValueError("expected a JSON list of secrets, or an object of lists per provider")
    out: dict[str, list[bytes]] = {}
    for provider, items in value.items():
        if isinstance(items, str):
            items = [items]
        if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
            raise ValueError(f"{provider}: expected a list of non-empty strings")
        out[str(provider)] = [s.encode() for s in items]
    if not any(out.values()):
        raise ValueError("no secret in the block")
    return out


async def _load_block(name: str) -> Any:
    from prefect.blocks.system import Secret

    block = await Secret.aload(name)
    return block.get()


class SecretStore:
    """Caches the parsed secrets for ``refresh_seconds``; a failed signature may force an early re-read
    (at most every ``min_refresh_seconds``), so a secret added during a rotation works at once."""

    def __init__(self, block: str, refresh_seconds: float = 30.0, min_refresh_seconds: float = 2.0,
                 loader: Optional[Callable[[str], Any]] = None):
        self.block = block
        self.refresh_seconds = refresh_seconds
        self.min_refresh_seconds = min_refresh_seconds
        self._loader = loader or _load_block
        self._value: Optional[dict[str, list[bytes]]] = None
        self._loaded_at = 0.0
        self._lock = asyncio.Lock()

    async def _refresh(self) -> None:
        try:
            raw = self._loader(self.block)
            if asyncio.iscoroutine(raw):
                raw = await raw
            self._value = parse_secrets(raw)
        except ValueError as e:
            # a block that exists but is malformed, or a missing block (Prefect raises ValueError)
            log.error("webhook secrets: block %r unusable: %s", self.block, e)
            self._value = None
            raise SecretsUnavailable(f"secret block {self.block!r} unusable: {e}") from None
        except Exception as e:  # noqa: BLE001 - the API is down: keep the last good secrets if any
            log.error("webhook secrets: cannot read block %r: %s", self.block, type(e).__name__)
            if self._value is None:
                raise SecretsUnavailable(f"cannot read secret block {self.block!r}: {type(e).__name__}") from None
        self._loaded_at = time.monotonic()

    async def get(self, provider: str, force: bool = False) -> list[bytes]:
        age = time.monotonic() - self._loaded_at
        if self._value is None or age >= self.refresh_seconds or (force and age >= self.min_refresh_seconds):
            async with self._lock:
                age = time.monotonic() - self._loaded_at
                if self._value is None or age >= self.refresh_seconds or (force and age >= self.min_refresh_seconds):
                    await self._refresh()
        assert self._value is not None
        return self._value.get(provider) or self._value.get("*") or []

    async def count(self) -> int:
        """How many secrets are active (for /readyz: a rotation shows as 2, then 1). Never the values."""
        await self.get("*")
        return sum(len(v) for v in (self._value or {}).values())

    def __repr__(self) -> str:  # never show the values
        n = sum(len(v) for v in (self._value or {}).values())
        return f"SecretStore(block={self.block!r}, secrets={n})"
