"""How a fleet sweep is cut into shards, and what share of each API limit every shard holds.

Pure arithmetic, kept here so it can be tested without Prefect. A sweep is bound by the
fleet-wide API limits (``tasks.locks``): each shard holds a fixed number of an API's slots for
its whole run. Two things make a sweep slower than the limits allow, and this plan avoids both:

* shares lost to rounding: 5 AWS slots over 3 shards as ``5 // 3`` is 1 each, 3 of 5 slots used.
  Here the remainder goes round the shards (2, 2, 1), rotating from one API to the next so no
  shard gets every extra slot, and the shares of an API always add up to its limit, never more;
* a shard with more work than slots: the sweep lasts as long as its slowest shard. Here a
  shard's clusters of each API are in proportion to its slots of that API (a shard without
  slots for an API gets none of its clusters), so every shard needs about the same time.

``plan_shards`` takes ``(cluster, api)`` pairs (the API its infrastructure is observed through);
every cluster also uses ``common`` (the in-cluster Kubernetes API). ``interleave`` orders a run's
clusters so that every API has work from the first cluster to the last: a run that took them
API by API would keep one API's slots busy while the others' stood idle.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Shard:
    clusters: list[str] = field(default_factory=list)
    shares: dict[str, int] = field(default_factory=dict)


def split_slots(limit: int, n: int, start: int = 0) -> list[int]:
    """``limit`` slots over ``n`` holders: ``limit // n`` each, the remainder one each from ``start`` round."""
    base, extra = divmod(limit, n)
    return [base + (1 if (i - start) % n < extra else 0) for i in range(n)]


def _apportion(total: int, weights: list[int]) -> list[int]:
    """``total`` items in proportion to ``weights`` (largest remainder; zero weight, zero items)."""
    s = sum(weights)
    exact = [total * w / s for w in weights]
    out = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[:total - sum(out)]:
        out[i] += 1
    return out


def plan_shards(clusters: list[tuple[str, str]], shards: int, limits: dict[str, int],
                common: str = "kubernetes") -> list[Shard]:
    """At most ``shards`` shards of ``clusters``, each with its ``shares`` of the APIs it uses.

    ``limits``: the fleet-wide concurrency of each API (an API missing here counts as 1). At most
    ``limits[common]`` shards (each needs one slot of it); empty shards are dropped.
    """
    if not clusters:
        return []
    k = max(1, min(shards, limits.get(common, 1), len(clusters)))
    by_api: dict[str, list[str]] = {}
    for name, api in clusters:
        by_api.setdefault(api, []).append(name)
    plan = [Shard() for _ in range(k)]
    start = 0
    for api in sorted(by_api):  # rotate the remainders from one API to the next
        limit = max(1, limits.get(api, 1))
        slots = split_slots(limit, k, start)
        start = (start + limit % k) % k
        names = sorted(by_api[api])
        at = 0
        for shard, count, n_slots in zip(plan, _apportion(len(names), slots), slots):
            if count:
                shard.clusters += names[at:at + count]
                if api != common:
                    shard.shares[api] = n_slots
                at += count
    plan = [s for s in plan if s.clusters]
    # every shard uses the common API: one slot each, the rest in proportion to its clusters
    rest = _apportion(max(1, limits.get(common, 1)) - len(plan), [len(s.clusters) for s in plan])
    for s, n_slots in zip(plan, rest):
        s.shares[common] = 1 + n_slots
    return plan


def interleave(clusters: list[tuple[str, str]]) -> list[str]:
    """The cluster names with each API's clusters spread evenly over the list, in name order within an API.

    The i-th of an API's n clusters sits at fraction ``(i + 0.5) / n`` of the list, so each API's
    share of the work is the same all along the run (ties: by API, then name).
    """
    by_api: dict[str, list[str]] = {}
    for name, api in clusters:
        by_api.setdefault(api, []).append(name)
    keyed = [((i + 0.5) / len(names), api, name) for api, names in by_api.items()
             for i, name in enumerate(sorted(names))]
    return [name for _, _, name in sorted(keyed)]
