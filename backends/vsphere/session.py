"""One vCenter session per worker process (per vCenter, user and timeout), reused and logged out.

Before, every backend object logged in on first use and never logged out, and tasks build a
backend per call: a sweep left one idle session per cluster on the vCenter until its idle
timeout. Now :func:`session` hands out the process's one :class:`Session` for a connection:

* shared by every backend object and thread of the process (pyVmomi's SOAP stub keeps a
  locked connection pool; the session cookie is the same for all of them);
* logged in lazily, again after vCenter says ``NotAuthenticated`` (session expired or
  terminated): :meth:`Session.relogin` is called by the backend, which then repeats the call;
* logged out at interpreter exit (``atexit``) and when the password of a connection changes;
* every SOAP call it makes waits for the ``vsphere`` API limit (``backends.base.api_call``);
* never inherited across ``fork``: a child process logs in on its own.
"""
from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import Any

from models.errors import PermanentError

from ..base import api_call
from ..connections import VsphereConnection

_log = logging.getLogger("backends.vsphere")


class Session:
    """A logged-in ServiceInstance for one vCenter and user; thread-safe."""

    def __init__(self, conn: VsphereConnection, timeout: float) -> None:
        self.conn = conn
        self.timeout = timeout
        self.logins = 0  # how many times this process logged in for this key (tests, metrics)
        self._lock = threading.Lock()
        self._si: Any = None
        self._content: Any = None

    def content(self) -> Any:
        """The ServiceContent of a logged-in session (logs in if needed)."""
        with self._lock:
            if self._si is None:
                self._login()
            return self._content

    def relogin(self, stale_content: Any = None) -> None:
        """Log in again after ``NotAuthenticated``; a no-op if another thread already did."""
        with self._lock:
            if stale_content is not None and self._content is not stale_content:
                return
            self._drop()
            self._login()

    def key(self) -> str | None:
        """The vCenter session key (``currentSession.key``), or None when not logged in."""
        with self._lock:
            if self._content is None:
                return None
            cur = self._content.sessionManager.currentSession
            return cur.key if cur is not None else None

    def logout(self) -> None:
        with self._lock:
            if self._si is not None:
                try:
                    self._content.sessionManager.Logout()
                except Exception as e:  # noqa: BLE001 - best effort at exit; vCenter expires it anyway
                    _log.debug("vSphere logout from %s failed: %s", self.conn.host, type(e).__name__)
            self._drop()

    def _login(self) -> None:
        from pyVim.connect import SmartConnect

        c = self.conn
        self._si = SmartConnect(host=c.host, port=c.port, user=c.user, pwd=c.password.get_secret_value(),
                                disableSslCertValidation=c.insecure, httpConnectionTimeout=self.timeout)
        stub = self._si._stub
        invoke = stub.InvokeMethod

        def guarded(*args, **kwargs):  # every SOAP call (task polls too) waits for the ``vsphere`` API limit
            with api_call("vsphere"):
                return invoke(*args, **kwargs)

        stub.InvokeMethod = guarded
        self._content = self._si.RetrieveContent()
        self.logins += 1

    def _drop(self) -> None:
        if self._si is not None:
            try:
                self._si._stub.DropConnections()
            except Exception:  # noqa: BLE001 - closing sockets only
                pass
        self._si = self._content = None


_SESSIONS: dict[tuple, Session] = {}
_LOCK = threading.Lock()
_PID = os.getpid()


def session(conn: VsphereConnection | None, timeout: float) -> Session:
    """The process's session for ``conn`` (made on first use)."""
    global _PID
    if conn is None:
        raise PermanentError("no vSphere connection configured (Connections.vsphere)")
    key = (conn.host, conn.port, conn.user, conn.insecure, float(timeout))
    with _LOCK:
        if os.getpid() != _PID:  # a forked child: the parent's sessions are not ours to use or log out
            _SESSIONS.clear()
            _PID = os.getpid()
        s = _SESSIONS.get(key)
        if s is not None and s.conn.password.get_secret_value() != conn.password.get_secret_value():
            s.logout()  # the credentials changed: log out the old session, log in with the new ones
            s = None
        if s is None:
            s = _SESSIONS[key] = Session(conn, timeout)
        return s


def sessions() -> list[Session]:
    with _LOCK:
        return list(_SESSIONS.values())


def logout_all() -> None:
    """Log out every session of this process (registered with ``atexit``)."""
    with _LOCK:
        if os.getpid() != _PID:
            return
        items = list(_SESSIONS.values())
        _SESSIONS.clear()
    for s in items:
        s.logout()


atexit.register(logout_all)
