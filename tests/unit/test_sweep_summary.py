"""The sweep's end state and its bounded summaries (the fleet keeps counts, not every outcome)."""
import pytest

from flows.reconcile import SweepFailed, final_state
from models.status import Status
from tasks.cluster import Outcome
from tasks.report import merge_summaries, summarise

pytestmark = pytest.mark.unit


def shard(*pairs):
    return summarise([Outcome(n, s, reason="r", drift=["d"] if s == Status.DRIFT else []) for n, s in pairs])


def test_summaries_keep_counts_and_only_clusters_not_in_sync():
    a = shard(*[(f"c{i}", Status.IN_SYNC) for i in range(500)], ("x", Status.DRIFT))
    b = shard(("y", Status.CORRECTED), ("z", Status.IN_SYNC))
    m = merge_summaries([a, b])
    assert m["total"] == 503 and m["counts"] == {"in-sync": 501, "drift": 1, "corrected": 1}
    assert sorted(c["cluster"] for c in m["clusters"]) == ["x", "y"]


def test_report_mode_drift_ends_in_a_named_completed_state():
    s = final_state("reconcile-fleet", merge_summaries([shard(("a", Status.DRIFT), ("b", Status.CORRECTED))]))
    assert s.is_completed() and s.name == "Drift" and "a" in s.message and "corrected=1" in s.message


def test_failures_end_failed_with_an_exception_not_a_dict():
    s = final_state("reconcile-fleet", merge_summaries([shard(("a", Status.DRIFT), ("b", Status.FAILED))]))
    assert s.is_failed() and s.name == "Failed" and "b" in s.message and isinstance(s.data, SweepFailed)


def test_clean_sweep_is_completed_and_says_retries():
    m = merge_summaries([shard(("a", Status.IN_SYNC))])
    m["retried_shards"] = ["2/3"]
    s = final_state("reconcile-fleet", m)
    assert s.is_completed() and s.name == "Completed" and "re-run after their worker died: 1" in s.message
