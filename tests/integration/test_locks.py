"""The cluster lock (a Prefect lease) against real Prefect servers: bounded waits, and a lost lease fails the step."""
from __future__ import annotations

import contextvars
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from models.errors import LockLost, LockTimeout


def in_thread(fn) -> threading.Thread:
    t = threading.Thread(target=contextvars.copy_context().run, args=(fn,), daemon=True)
    t.start()
    return t


def test_a_wait_for_a_held_lock_is_bounded_and_names_the_cluster(prefect_api):
    from tasks.locks import cluster_lock

    held, release = threading.Event(), threading.Event()

    def hold():
        with cluster_lock("lock-test-bounded"):
            held.set()
            release.wait(60)

    t = in_thread(hold)
    assert held.wait(60)
    try:
        t0 = time.monotonic()
        with pytest.raises(LockTimeout, match="cluster lock-test-bounded: waited 3s"):
            with cluster_lock("lock-test-bounded", timeout_seconds=3):
                pytest.fail("got a lock another holder has")
        assert time.monotonic() - t0 < 60
    finally:
        release.set()
        t.join(30)
    with cluster_lock("lock-test-bounded", timeout_seconds=30):  # free again once released
        pass


@pytest.fixture
def own_prefect(tmp_path):
    """A Prefect server of this test's own, so the test can kill it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(tmp_path), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING")
    env.pop("PREFECT_API_URL", None)
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except Exception:  # noqa: BLE001
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            time.sleep(0.5)
    yield url, proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    log.close()


def test_a_lost_lease_stops_the_step_with_lock_lost(own_prefect):
    """The Prefect API goes away while a step holds the lock: at the next renewal the step is stopped."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks import locks

    url, server = own_prefect
    box: dict = {}
    held = threading.Event()

    def step():
        with temporary_settings(updates={PREFECT_API_URL: url}):
            locks._known.discard(locks.lock_name("lock-test-lost"))
            try:
                with locks.cluster_lock("lock-test-lost", timeout_seconds=30):
                    held.set()
                    deadline = time.monotonic() + 150
                    while time.monotonic() < deadline:  # a long step, interruptible between instructions
                        time.sleep(0.2)
                    box["finished"] = True
            except BaseException as e:  # noqa: BLE001 - the test inspects it
                box["error"] = e

    t = in_thread(step)
    assert held.wait(60), box
    os.killpg(server.pid, signal.SIGKILL)  # the API is gone: the lease cannot be renewed
    server.wait(30)
    t.join(180)
    assert not t.is_alive(), "the step was not stopped"
    assert "finished" not in box, "the step carried on without its lease"
    assert isinstance(box.get("error"), LockLost), box
    assert "lock-test-lost" in str(box["error"]) and "lost" in str(box["error"])
