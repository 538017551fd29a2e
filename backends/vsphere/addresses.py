"""Stable VM addresses: each VM's address is allocated once from the cluster's ipPool and never moves.

Addresses used to be positional (the n-th machine got the n-th address), so changing the
control-plane replicas or a pool's ``maxSize`` shifted them onto other VMs. Now an address is
recorded on the VM (custom attribute ``fleetwright.io/address``, next to the ownership marks,
and in ``guestinfo``) and a VM keeps whatever it has. A machine without a VM yet gets the lowest
address of the pool that no VM of the cluster (found by its ownership marks) records. Running
out is an :class:`AddressesExhausted` error raised before anything is cloned.

Pure functions: the caller passes the addresses its VMs record.
"""
from __future__ import annotations

import ipaddress
from typing import Iterable, Mapping

from models.desired import Machine
from models.errors import PermanentError
from models.spec import IpPool


class AddressesExhausted(PermanentError):
    """The cluster's ipPool has fewer free addresses than new VMs need."""


def pool_addresses(pool: IpPool) -> list[str]:
    """Every address of the pool, in order (the range is inclusive)."""
    start, end = int(ipaddress.IPv4Address(pool.start)), int(ipaddress.IPv4Address(pool.end))
    return [str(ipaddress.IPv4Address(n)) for n in range(start, end + 1)]


def allocate(cluster: str, pool: IpPool, machines: Iterable[Machine], recorded: Mapping[str, str]) -> list[Machine]:
    """``machines`` with their address: the one their VM records, else the lowest free one of ``pool``.

    ``recorded`` maps the name of every VM of the cluster (wanted or not, e.g. still to be removed)
    to the address it records; none of those addresses is given to another machine.
    """
    machines = list(machines)
    taken = set(recorded.values())
    free = [a for a in pool_addresses(pool) if a not in taken]
    new = [m for m in machines if not recorded.get(m.name)]
    if len(new) > len(free):
        held = ", ".join(f"{n}={a}" for n, a in sorted(recorded.items(), key=lambda x: ipaddress.IPv4Address(x[1])))
        raise AddressesExhausted(
            f"cluster {cluster}: ipPool {pool.start}-{pool.end} has {len(free)} free address(es), but "
            f"{len(new)} new VM(s) need one ({', '.join(m.name for m in new)}); addresses held by the "
            f"cluster's VMs: {held or 'none'}. Widen spec.backend.ipPool, or remove VMs first "
            "(scale a pool down in its own change); nothing was cloned")
    out, it = [], iter(free)
    for m in machines:
        addr = recorded.get(m.name) or next(it)
        out.append(m if m.address == addr else m.model_copy(update={"address": addr}))
    return out


def fresh_addresses(desired, spare: int = 0) -> list[str]:
    """The addresses a new cluster's VMs get (the pool's first ones), plus ``spare`` for scaling up.

    For preparing what sits at those addresses (DHCP exclusions, firewall rules; in the test
    environment the SSH hosts that stand in for the VMs).
    """
    return pool_addresses(desired.backend.ip_pool)[: len(desired.machines) + spare]
