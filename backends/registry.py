"""Picks the backend for a cluster from the type of its backend spec: the one place that knows the names.

Plugins may register other implementations: a module named in ``FLEETWRIGHT_BACKEND_PLUGINS``
(comma-separated) or in the ``fleetwright.backends`` entry-point group is imported once and its
``register(registry)`` called, which may call :func:`register_infrastructure` (an implementation
for a backend type) and :func:`register_in_cluster` (the cluster backend for Kubernetes API
addresses with a given URL scheme). The sweep benchmark's simulated backend is such a plugin.
"""
from __future__ import annotations

import os
import threading
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any, Callable

from models.desired import DesiredCluster

from .base import ClusterBackend, InfrastructureBackend, KubeAccess
from .connections import Connections

_INFRA: dict[str, Any] = {"aws": "backends.aws:AwsBackend", "vsphere": "backends.vsphere:VsphereBackend",
                          "metal": "backends.metal:MetalBackend"}
_IN_CLUSTER: dict[str, Callable[[KubeAccess], ClusterBackend]] = {}
_plugins_loaded = False
_lock = threading.Lock()


def register_infrastructure(kind: str, factory: str | Callable[[Connections], InfrastructureBackend]) -> None:
    """Use ``factory(connections)`` (or ``"module:Class"``) for clusters whose backend type is ``kind``."""
    _INFRA[kind] = factory


def register_in_cluster(scheme: str, factory: Callable[[KubeAccess], ClusterBackend]) -> None:
    """Use ``factory(access)`` for Kubernetes APIs whose address starts with ``<scheme>://``."""
    _IN_CLUSTER[scheme] = factory


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    with _lock:
        if _plugins_loaded:
            return
        import sys

        names = [n.strip() for n in os.environ.get("FLEETWRIGHT_BACKEND_PLUGINS", "").split(",") if n.strip()]
        for name in names:
            import_module(name).register(sys.modules[__name__])
        for ep in entry_points(group="fleetwright.backends"):
            ep.load()(sys.modules[__name__])
        _plugins_loaded = True


def infrastructure(desired: DesiredCluster, connections: Connections) -> InfrastructureBackend:
    _load_plugins()
    factory = _INFRA[desired.backend.type]
    if isinstance(factory, str):
        module, _, cls = factory.partition(":")
        factory = getattr(import_module(module), cls)
    return factory(connections)


def in_cluster(access: KubeAccess) -> ClusterBackend:
    _load_plugins()
    scheme = access.server.partition("://")[0]
    if scheme in _IN_CLUSTER:
        return _IN_CLUSTER[scheme](access)
    from .kube import KubeBackend

    return KubeBackend(access)
