"""Small pure helpers shared by the core: canonical hashing and deep merging."""
from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_hash(data: Any) -> str:
    """A short, stable content hash of JSON-like data (key order does not matter)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()[:16]


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``; nested mappings merge, everything else replaces."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def construct(cls, **values: Any):
    """Build a pydantic model from values the core made itself, skipping validation (a hot path).

    Like ``cls.model_construct`` but without its per-call overhead: fields left out get their
    defaults. Only for data produced by this package, never for user input.
    """
    fields = _FIELDS.get(cls)
    if fields is None:
        fields = _FIELDS[cls] = [(n, f.default_factory, f.default) for n, f in cls.model_fields.items()]
    for name, factory, default in fields:
        if name not in values:
            values[name] = factory() if factory is not None else (
                default.copy() if isinstance(default, (list, dict)) else default)
    obj = cls.__new__(cls)
    object.__setattr__(obj, "__dict__", values)
    object.__setattr__(obj, "__pydantic_fields_set__", set(values))
    object.__setattr__(obj, "__pydantic_extra__", None)
    object.__setattr__(obj, "__pydantic_private__", None)
    return obj


_FIELDS: dict[type, list] = {}
