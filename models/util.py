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
