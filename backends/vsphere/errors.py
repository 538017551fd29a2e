"""The one place where pyVmomi and network errors become ``models.errors`` (:func:`vsphere_error`)."""
from __future__ import annotations

import http.client
import socket
import ssl

from models.errors import FleetwrightError, InFlight, PermanentError, TransientError


def vsphere_error(e: BaseException, what: str = "vSphere") -> FleetwrightError:
    """Map a pyvmomi / network error to ``models.errors``."""
    from pyVmomi import vim, vmodl

    if isinstance(e, FleetwrightError):
        return e
    name = type(e).__name__
    if isinstance(e, vmodl.MethodFault):  # str() of a fault is a multi-line dump: keep what matters
        details = [getattr(e, "msg", None) or ""] + [f"{k}={getattr(e, k)}" for k in ("name", "invalidProperty")
                                                     if getattr(e, k, None)]
        msg = " ".join(d for d in details if d)
    else:
        msg = str(e)
    text = f"{what}: {name}" + (f": {msg}" if msg else "")
    if isinstance(e, (vim.fault.InvalidLogin, vim.fault.NoPermission, vim.fault.NotAuthenticated)):
        if isinstance(e, vim.fault.NotAuthenticated):
            return TransientError(text + " (session expired; reconnecting)")
        return PermanentError(text)
    if isinstance(e, vim.fault.TaskInProgress):
        return InFlight(text, delay=5)
    if isinstance(e, (vim.fault.DuplicateName, vim.fault.InvalidName, vim.fault.InsufficientResourcesFault,
                      vim.fault.OutOfBounds, vim.fault.NotFound, vmodl.fault.InvalidArgument,
                      vmodl.fault.NotSupported, vmodl.fault.InvalidRequest, vim.fault.InvalidDatastore,
                      vim.fault.FileFault, vim.fault.VmConfigFault)):
        return PermanentError(text)
    if isinstance(e, (vim.fault.InvalidState, vmodl.fault.HostCommunication, vmodl.fault.SystemError,
                      vim.fault.Timedout, vmodl.fault.RequestCanceled)):
        return TransientError(text, delay=5)
    if isinstance(e, (socket.timeout, TimeoutError, ConnectionError, ssl.SSLError, http.client.HTTPException,
                      OSError)):
        return TransientError(f"{what}: cannot reach vCenter: {name}: {e}", delay=5)
    if isinstance(e, vmodl.RuntimeFault):
        return TransientError(text, delay=5)
    if isinstance(e, vmodl.MethodFault):
        return PermanentError(text)
    return PermanentError(text)
