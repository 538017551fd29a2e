"""How a sweep is cut into shards: shares add up to each API's limit, work follows the shares."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flows.reconcile import cut_shards
from models.shards import interleave, plan_shards, split_slots

pytestmark = pytest.mark.unit

LIMITS = {"aws": 5, "vsphere": 5, "metal": 5, "kubernetes": 15}


def fleet(n, types=("aws", "vsphere", "metal")):
    return [(f"c{i:05d}", types[i % len(types)]) for i in range(n)]


def test_remainders_go_round_instead_of_being_lost():
    assert split_slots(5, 3) == [2, 2, 1] and split_slots(5, 3, start=2) == [2, 1, 2]
    plan = plan_shards(fleet(2000), 3, LIMITS)
    assert [len(s.clusters) for s in plan] == [667, 667, 666]
    for api, limit in LIMITS.items():  # every slot used, none twice
        assert sum(s.shares[api] for s in plan) == limit, api
    # no shard gets every extra slot: each holds 5 infrastructure slots of the 15
    assert [sum(v for a, v in s.shares.items() if a != "kubernetes") for s in plan] == [5, 5, 5]


def test_a_shards_clusters_of_an_api_follow_its_slots_of_that_api():
    plan = plan_shards(fleet(3000), 3, LIMITS)
    for s in plan:
        for api in ("aws", "vsphere", "metal"):
            mine = sum(1 for c in s.clusters if int(c[1:]) % 3 == ("aws", "vsphere", "metal").index(api))
            assert mine == pytest.approx(1000 * s.shares[api] / 5, abs=1), (api, s.shares)


def test_no_slot_no_clusters_and_never_more_shards_than_kubernetes_slots():
    plan = plan_shards(fleet(10, ("aws",)), 3, {"aws": 2, "kubernetes": 50})
    assert len(plan) == 2 and all(s.shares["aws"] == 1 for s in plan)
    assert len(plan_shards(fleet(100), 8, {**LIMITS, "kubernetes": 3})) == 3
    assert plan_shards([], 3, LIMITS) == []


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 400), k=st.integers(1, 12), limits=st.fixed_dictionaries(
    {a: st.integers(1, 30) for a in ("aws", "vsphere", "metal", "kubernetes")}))
def test_every_cluster_once_and_shares_within_limits(n, k, limits):
    plan = plan_shards(fleet(n), k, limits)
    names = [c for s in plan for c in s.clusters]
    assert sorted(names) == sorted(c for c, _ in fleet(n))
    for api, limit in limits.items():
        assert sum(s.shares.get(api, 0) for s in plan) <= limit
    assert all(s.shares["kubernetes"] >= 1 for s in plan)
    assert all(s.shares.get(api, 0) >= 1 for s in plan for c, api in fleet(n) if c in s.clusters)


def test_small_fleets_are_swept_in_the_fleet_run():
    api_of = dict(fleet(900))
    assert cut_shards(sorted(api_of), api_of, shard_size=None, parallel=3, min_shard_size=500)[0] == [sorted(api_of)]
    chunks, shares = cut_shards(sorted(api_of), api_of, shard_size=None, parallel=3, min_shard_size=300)
    assert len(chunks) == 3 and len(shares) == 3
    chunks, _ = cut_shards(sorted(api_of), api_of, shard_size=100, parallel=3, min_shard_size=500)
    assert len(chunks) == 9  # an explicit size wins


def test_a_run_takes_every_api_all_along_not_one_after_another():
    grouped = [(f"a{i}", "aws") for i in range(30)] + [(f"m{i}", "metal") for i in range(10)]
    order = interleave(grouped)
    assert sorted(order) == sorted(n for n, _ in grouped)
    # every quarter of the run has its share of each API's clusters (3 aws : 1 metal)
    for q in range(4):
        part = order[q * 10:(q + 1) * 10]
        assert sum(n.startswith("m") for n in part) in (2, 3), (q, part)
    assert order.index("a0") < order.index("a1") < order.index("a29")  # name order within an API
