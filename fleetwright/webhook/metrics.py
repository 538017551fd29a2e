"""Counters for every delivery outcome, served as Prometheus text on ``GET /metrics``.

Each replica counts its own deliveries; Prometheus sums the replicas. Labels carry the provider
and the reason, never a secret or a payload value.
"""
from __future__ import annotations

import threading
from collections import defaultdict

_HELP = {
    "fleetwright_webhook_deliveries_total": ("counter", "Deliveries received, by provider and outcome"),
    "fleetwright_webhook_rejected_total": ("counter", "Deliveries that started nothing, by provider and reason"),
    "fleetwright_webhook_runs_created_total": ("counter", "Flow runs created by deliveries"),
    "fleetwright_webhook_runs_superseded_total": ("counter", "Queued flow runs cancelled by a newer push"),
    "fleetwright_webhook_bulk_retries_total": ("counter", "Bulk creates sent again because the database was busy"),
    "fleetwright_webhook_dispatch_seconds": ("summary", "Time from request to flow run created or found"),
}


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
        self._sum = 0.0
        self._count = 0

    def inc(self, name: str, value: float = 1, **labels: str) -> None:
        with self._lock:
            self._counters[(name, tuple(sorted(labels.items())))] += value

    def observe_dispatch(self, seconds: float) -> None:
        with self._lock:
            self._sum += seconds
            self._count += 1

    def value(self, name: str, **labels: str) -> float:
        """The sum over every series of ``name`` whose labels include ``labels``."""
        with self._lock:
            return sum(v for (n, ls), v in self._counters.items()
                       if n == name and all(dict(ls).get(k) == w for k, w in labels.items()))

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            items = sorted(self._counters.items())
            s, c = self._sum, self._count
        for name, (kind, text) in _HELP.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            if kind == "summary":
                lines += [f"{name}_sum {s:.6f}", f"{name}_count {c}"]
                continue
            for (n, labels), v in items:
                if n == name:
                    lab = ",".join(f'{k}="{_esc(w)}"' for k, w in labels)
                    lines.append(f"{name}{{{lab}}} {v:g}" if lab else f"{name} {v:g}")
        return "\n".join(lines) + "\n"


def _esc(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
