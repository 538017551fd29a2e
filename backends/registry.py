"""Picks the backend for a cluster from the type of its backend spec: the one place that knows the names."""
from __future__ import annotations

from importlib import import_module

from models.desired import DesiredCluster

from .base import ClusterBackend, InfrastructureBackend, KubeAccess
from .connections import Connections

_INFRA = {"aws": "backends.aws:AwsBackend", "vsphere": "backends.vsphere:VsphereBackend",
          "metal": "backends.metal:MetalBackend"}


def infrastructure(desired: DesiredCluster, connections: Connections) -> InfrastructureBackend:
    module, _, cls = _INFRA[desired.backend.type].partition(":")
    return getattr(import_module(module), cls)(connections)


def in_cluster(access: KubeAccess) -> ClusterBackend:
    from .kube import KubeBackend

    return KubeBackend(access)
