"""Wave planning: canaries first, then batches growing by ``growth`` up to ``max_batch``, dev before
staging before prod; who needs an approval; when a wave's failures halt the rollout."""
import pytest
from pydantic import ValidationError

from models.resolve import resolve
from models.waves import WavePolicy, plan_waves, wave_failed


@pytest.fixture(scope="module")
def base(example_defs):
    return resolve(example_defs, "dc1-web-dev")


def fleet(base, spec: dict[str, dict]) -> list:
    """Clusters named by ``spec`` with exactly these labels (the rest of the desired state does not matter)."""
    return [base.model_copy(update={"name": n, "labels": labels}) for n, labels in spec.items()]


def shape(waves):
    return [(w.name, w.clusters) for w in waves]


def test_canaries_first_then_dev_staging_prod(base):
    clusters = fleet(base, {"p1": {"env": "prod"}, "s1": {"env": "staging"}, "d2": {"env": "dev"},
                            "c1": {"env": "prod", "fleetwright.io/wave": "canary"}, "d1": {"env": "dev"},
                            "t1": {"env": "test"}, "x1": {}})
    waves = plan_waves(clusters, WavePolicy(first_batch=1, growth=100, max_batch=100))
    # dev and test rank first, unlabelled ranks with staging, prod last; names order within a rank
    assert shape(waves) == [("canary", ["c1"]), ("wave-1", ["d1"]), ("wave-2", ["d2", "t1", "s1", "x1", "p1"])]
    flat = [c for w in waves[1:] for c in w.clusters]
    assert flat.index("d2") < flat.index("s1") < flat.index("p1")


def test_batches_grow_by_growth_up_to_max_batch(base):
    clusters = fleet(base, {f"d{i:02}": {"env": "dev"} for i in range(20)})
    sizes = [len(w.clusters) for w in plan_waves(clusters, WavePolicy(first_batch=1, growth=2.0, max_batch=5))]
    assert sizes == [1, 2, 4, 5, 5, 3]
    sizes = [len(w.clusters) for w in plan_waves(clusters, WavePolicy(first_batch=2, growth=1.5, max_batch=50))]
    assert sizes == [2, 3, 5, 8, 2]
    sizes = [len(w.clusters) for w in plan_waves(clusters, WavePolicy(first_batch=1, growth=1.0, max_batch=50))]
    assert sizes == [1, 2, 3, 4, 5, 5]  # growth 1.0 still grows by one
    assert [w.index for w in plan_waves(clusters, WavePolicy())] == list(range(5))
    assert sum(sizes) == 20


def test_approval_is_per_wave(base):
    clusters = fleet(base, {"d1": {"env": "dev"}, "p1": {"env": "prod", "fleetwright.io/approval": "required"},
                            "p2": {"env": "prod"}, "c1": {"fleetwright.io/wave": "canary", "fleetwright.io/approval": "required"}})
    waves = plan_waves(clusters, WavePolicy(first_batch=1, growth=2.0))
    assert [(w.name, w.clusters, w.needs_approval) for w in waves] == [
        ("canary", ["c1"], ["c1"]), ("wave-1", ["d1"], []), ("wave-2", ["p1", "p2"], ["p1"])]


def test_a_custom_canary_label_value(base):
    clusters = fleet(base, {"a": {"fleetwright.io/wave": "early"}, "b": {"fleetwright.io/wave": "canary"}})
    assert shape(plan_waves(clusters, WavePolicy(canary_value="early"))) == [("canary", ["a"]), ("wave-1", ["b"])]


@pytest.mark.parametrize("ratio,failed,total,halts", [
    (0.0, 0, 4, False), (0.0, 1, 4, True), (0.0, 0, 0, False),
    (0.25, 1, 4, False), (0.25, 2, 4, True), (0.5, 2, 4, False), (0.5, 3, 4, True), (1.0, 4, 4, False)])
def test_failure_ratio_halts_only_above_the_threshold(ratio, failed, total, halts):
    assert wave_failed(failed, total, WavePolicy(max_failure_ratio=ratio)) is halts


def test_wave_policy_bounds():
    assert WavePolicy(bake_seconds=2.5).bake_seconds == 2.5
    for bad in ({"bake_seconds": -1}, {"max_failure_ratio": 1.5}, {"growth": 0.5}, {"first_batch": 0},
                {"max_batch": 0}, {"approval_timeout_seconds": 0}, {"bake": 1}):
        with pytest.raises(ValidationError) as e:
            WavePolicy(**bad)
        assert e.value.errors()[0]["loc"] == (next(iter(bad)),)
