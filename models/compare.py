"""Structural differences between two JSON-like values, as field paths."""
from __future__ import annotations

from typing import Any, Iterator


def changes(old: Any, new: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """Yield ``(path, old, new)`` for every leaf that differs; a missing side is None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            p = f"{path}.{k}" if path else str(k)
            if k not in old:
                yield p, None, new[k]
            elif k not in new:
                yield p, old[k], None
            else:
                yield from changes(old[k], new[k], p)
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            yield from changes(a, b, f"{path}[{i}]")
    elif old != new:
        yield path, old, new
