"""The cluster lock (a Prefect lease) against real Prefect servers: bounded waits, and a lost lease fails the step."""
from __future__ import annotations

import contextlib
import contextvars
import socket
import threading
import time

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


class Proxy:
    """A TCP proxy to the Prefect server that can be cut: the API becomes unreachable for its clients."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream, self.socks, self.cut_ = upstream, [], False
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.cut_:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            u = socket.create_connection(self.upstream)
            self.socks += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for x in (a, b):
                with contextlib.suppress(OSError):
                    x.close()

    def cut(self):
        self.cut_ = True
        self.listener.close()
        for x in self.socks:
            with contextlib.suppress(OSError):
                x.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                x.close()


def test_a_lost_lease_stops_the_step_with_lock_lost(prefect_api):
    """The Prefect API becomes unreachable while a step holds the lock: at the next renewal the step stops."""
    from urllib.parse import urlparse

    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    from tasks import locks

    up = urlparse(prefect_api)
    proxy = Proxy((up.hostname, up.port))
    url = f"http://127.0.0.1:{proxy.port}{up.path}"
    box: dict = {}
    held = threading.Event()

    def step():
        # no client-level retries, so the loss shows at the first renewal (45 s) rather than minutes later
        with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_CLIENT_MAX_RETRIES: 0}):
            try:
                with locks.cluster_lock("lock-test-lost", timeout_seconds=60):
                    held.set()
                    deadline = time.monotonic() + 150
                    while time.monotonic() < deadline:  # a long step, interruptible between instructions
                        time.sleep(0.2)
                    box["finished"] = True
            except BaseException as e:  # noqa: BLE001 - the test inspects it
                box["error"] = e

    t = in_thread(step)
    assert held.wait(120), box
    proxy.cut()  # this worker loses the API: the lease cannot be renewed (first renewal after 45 s)
    t.join(180)
    assert not t.is_alive(), "the step was not stopped"
    assert "finished" not in box, "the step carried on without its lease"
    assert isinstance(box.get("error"), LockLost), box
    assert "lock-test-lost" in str(box["error"]) and "lost" in str(box["error"])
