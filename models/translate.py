"""Per-backend translation: one declaration, the right implementation on each backend.

A model asks for capabilities (ingress, storage, load balancing, ...). Each
Component says which capabilities it provides, on which backends, with which
source and values; this module answers those questions for one backend, and
maps abstract machine sizes to each backend's machines.
"""
from __future__ import annotations

from typing import Any

from .spec import Component, Source
from .util import deep_merge

SIZES = {
    # size: (aws instance type, vCPU, memory MiB)
    "small": ("t3.medium", 2, 4096),
    "medium": ("m5.large", 2, 8192),
    "large": ("m5.xlarge", 4, 16384),
    "xlarge": ("m5.2xlarge", 8, 32768),
    "gpu": ("g5.xlarge", 4, 16384),
}


def provides(comp: Component, backend: str) -> set[str]:
    impl = comp.spec.backends.get(backend)
    if impl is not None and not impl.available:
        return set()
    if impl is not None and impl.provides is not None:
        return set(impl.provides)
    return set(comp.spec.provides)


def available(comp: Component, backend: str) -> bool:
    impl = comp.spec.backends.get(backend)
    return impl is None or impl.available


def source_of(comp: Component, backend: str) -> Source:
    impl = comp.spec.backends.get(backend)
    return impl.source if impl is not None and impl.source is not None else comp.spec.source


def values(comp: Component, backend: str) -> dict[str, Any]:
    impl = comp.spec.backends.get(backend)
    return deep_merge(comp.spec.values, impl.values) if impl is not None else dict(comp.spec.values)


def machine(backend: str, size: str, pool: str | None, settings) -> dict[str, Any]:
    """What a machine of ``size`` is on ``backend``: an instance type, or vCPU and memory."""
    if size not in SIZES:
        return {}
    itype, cpu, mem = SIZES[size]
    if backend == "aws":
        custom = settings.node_pools.get(pool) if pool else None
        if custom is not None:
            return {"instanceTypes": list(custom.instance_types), "diskSizeGiB": custom.disk_size_gib,
                    "capacityType": custom.capacity_type}
        return {"instanceTypes": [itype], "diskSizeGiB": 50, "capacityType": "ON_DEMAND"}
    if backend == "vsphere":
        return {"cpu": cpu, "memoryMiB": mem}
    return {}
