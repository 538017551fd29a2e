"""The API limiter bounds concurrent backend calls per API (the guard backends call through api_call)."""
import threading

import pytest

from backends.base import api_call, set_api_guard
from tasks.locks import ApiLimiter, api_limits

pytestmark = pytest.mark.unit


def test_concurrency_bound_holds_for_many_threads():
    limiter = ApiLimiter({"aws": (3, 10_000.0)})
    set_api_guard(limiter)
    in_flight, peak, lock = [0], [0], threading.Lock()
    release = threading.Event()

    def call():
        with api_call("aws"):
            with lock:
                in_flight[0] += 1
                peak[0] = max(peak[0], in_flight[0])
            release.wait(30)
            with lock:
                in_flight[0] -= 1

    try:
        threads = [threading.Thread(target=call) for _ in range(12)]
        for t in threads:
            t.start()
        # wait on the condition itself: 3 calls are in flight and the other 9 wait
        for _ in range(3000):
            if limiter.peak.get("aws") == 3:
                break
            threading.Event().wait(0.01)
        assert in_flight[0] == 3
        release.set()
        for t in threads:
            t.join(30)
        assert peak[0] == 3 and limiter.calls["aws"] == 12 and limiter.peak["aws"] == 3
    finally:
        set_api_guard(None)


def test_no_guard_means_no_wait_and_bad_settings_are_named(monkeypatch):
    with api_call("kubernetes"):
        pass
    monkeypatch.setenv("FLEETWRIGHT_API_LIMITS", "aws=5:2, kubernetes=7")
    assert api_limits()["aws"] == (5, 2.0) and api_limits()["kubernetes"] == (7, 7.0)
    monkeypatch.setenv("FLEETWRIGHT_API_LIMITS", "aws=fast")
    with pytest.raises(ValueError, match="FLEETWRIGHT_API_LIMITS: 'aws=fast'"):
        api_limits()
