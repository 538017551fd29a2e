"""vSphere VMs that are real hosts: each vcsim VM with an address on the machines' bridge is backed by
an nspawn machine (``testenv/machines.py``) that boots when the VM is powered on and stops when it is
powered off.

Why: vcsim simulates vCenter but runs no guests. With fast SSH hosts standing in at the VMs'
addresses (``testenv/hosts.py``) a cluster never gets a kubelet, so the vSphere backend could only
be tested on the test-only supervisor path. Here a VM that fleetwright clones and powers on really
becomes a Debian host with systemd, and the production playbooks (kubeadm, containerd, kubelet)
make it a node, with the backend and the playbooks unchanged.

How: one process (``python -m testenv.vsphere_machines watch STATE CACHE``, pid file
``vsphere-machines``) holds a PropertyCollector filter over every VirtualMachine of vcsim and waits
for changes with ``WaitForUpdatesEx`` (at most 10 s, then it looks anyway). After each wake-up it
reads every VM (name, ``runtime.powerState``, ``config.extraConfig``) and acts on what changed:

* **powered on** -> the machine named after the VM boots at the VM's address
  (``machines.ensure_machine``): the first time from a fresh copy of the base rootfs (a clone has a
  fresh disk), after that with the disk it had;
* **powered off** -> the machine is stopped as a power-off stops a VM (``graceful=False``: no
  guest shutdown first); its disk stays;
* **destroyed** (or renamed / readdressed) -> the machine is removed, its disk deleted.

The address and hostname are read as cloud-init's VMware datasource reads them: ``guestinfo.metadata``
(base64 JSON with ``local-hostname`` and a netplan v2 ``network``), else ``guestinfo.fleetwright.address``.
Only VMs whose address lies in the machines' network (10.250.0.0/24, not the gateway) are backed;
the others (the loopback SSH hosts of the older tests, vcsim's own VMs) are left alone.

A VM's power state is acted on when it changes (and once at start), not forced: a machine that
crashes while its VM is powered on stays down, as a crashed guest does. What the watcher made and
did is recorded in state section ``vsphere_machines`` (``status``); the machines it made are stopped
and deleted by :func:`down` (and by ``machines.down``, which stops the watcher first).
"""
from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from testenv import machines
from testenv.common import Config, get_state, locked_state, progress, read_pid, start_process, stop_process, wait_for

NAME = "vsphere-machines"
GI_ADDRESS = "guestinfo.fleetwright.address"
WAIT_SECONDS = 10


# --------------------------------------------------------------------------- what a VM asks for


def guest_identity(vm_name: str, extra: dict[str, str]) -> tuple[str | None, str | None]:
    """(hostname, address) of a VM's guest, from its guestinfo as cloud-init's VMware datasource
    would read them; (None, None) when the VM carries no usable address."""
    hostname, address = None, None
    meta = extra.get("guestinfo.metadata")
    if meta:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            raw = base64.b64decode(meta) if extra.get("guestinfo.metadata.encoding") in ("base64", "b64") else meta
            doc = json.loads(raw)
            hostname = doc.get("local-hostname") or doc.get("hostname")
            for eth in ((doc.get("network") or {}).get("ethernets") or {}).values():
                for a in eth.get("addresses") or []:
                    address = address or str(a).split("/")[0]
    address = address or extra.get(GI_ADDRESS)
    name = hostname if hostname and re.fullmatch(r"[a-z][a-z0-9-]{0,30}", hostname) else vm_name
    return name, address


def backed(address: str | None) -> bool:
    """Is ``address`` one a machine can take (in the bridge's network, not the gateway)?"""
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    net = ipaddress.ip_network(machines.NETWORK)
    return ip in net and str(ip) != machines.GATEWAY and ip not in (net.network_address, net.broadcast_address)


# --------------------------------------------------------------------------- vcsim


def _section(cfg: Config) -> dict[str, Any]:
    from testenv import vcsim

    return vcsim._section(cfg)


def _filter_spec(content):
    from pyVmomi import vim, vmodl

    pc = vmodl.query.PropertyCollector
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    spec = pc.FilterSpec(
        objectSet=[pc.ObjectSpec(obj=view, skip=True, selectSet=[
            pc.TraversalSpec(name="vms", path="view", skip=False, type=vim.view.ContainerView)])],
        propSet=[pc.PropertySpec(type=vim.VirtualMachine,
                                 pathSet=["name", "runtime.powerState", "config.extraConfig", "config.template"])])
    return spec


def read_vms(collector, spec) -> dict[str, dict[str, Any]]:
    """moid -> {vm, power, name (the machine's), address} of every backed VM (templates excluded)."""
    out: dict[str, dict[str, Any]] = {}
    for oc in collector.RetrieveContents([spec]) or []:
        p = {prop.name: prop.val for prop in oc.propSet}
        if p.get("config.template"):
            continue
        extra = {o.key: str(o.value) for o in (p.get("config.extraConfig") or []) if o.key.startswith("guestinfo.")}
        name, address = guest_identity(p.get("name", ""), extra)
        if not backed(address):
            continue
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,30}", name or ""):
            progress(f"VM {p.get('name')!r}: no machine name can be made from it; not backed")
            continue
        out[oc.obj._moId] = {"vm": p.get("name", ""), "power": str(p.get("runtime.powerState", "")),
                             "name": name, "address": address}
    return out


# --------------------------------------------------------------------------- acting on changes


def _record(cfg: Config) -> dict[str, dict[str, Any]]:
    return dict((get_state(cfg, "vsphere_machines") or {}).get("vms", {}))


def _save(cfg: Config, vms: dict[str, dict[str, Any]], synced: bool = False) -> None:
    with locked_state(cfg) as st:
        sec = st.setdefault("vsphere_machines", {})
        sec["vms"] = vms
        if synced:
            sec["synced_at"] = time.time()


def _remove(cfg: Config, name: str) -> None:
    """A destroyed VM's machine: the plug pulled (no guest shutdown), then its disk deleted."""
    machines.stop_machine(cfg, name, graceful=False)
    machines.remove_machine(cfg, name)


def reconcile(cfg: Config, current: dict[str, dict[str, Any]], record: dict[str, dict[str, Any]],
              seen: dict[str, tuple]) -> dict[str, dict[str, Any]]:
    """Act on every VM whose (name, address, power) changed since ``seen``; returns the new record.

    ``record`` (moid -> entry) lists the machines this watcher made; ``seen`` (moid -> what was last
    acted on) is updated only for VMs whose action succeeded, so a failed one is tried again.
    """
    record = dict(record)
    for moid in [m for m in record if m not in current]:  # destroyed
        entry = record.pop(moid)
        progress(f"VM {entry['vm']} ({moid}) is gone: removing machine {entry['name']}")
        _remove(cfg, entry["name"])
        seen.pop(moid, None)
    for moid, vm in sorted(current.items(), key=lambda kv: kv[1]["name"]):
        key = (vm["name"], vm["address"], vm["power"])
        if seen.get(moid) == key:
            continue
        entry = record.get(moid)
        try:
            if entry is not None and (entry["name"], entry["address"]) != (vm["name"], vm["address"]):
                progress(f"VM {vm['vm']} ({moid}) now wants {vm['name']} at {vm['address']}: "
                         f"removing machine {entry['name']} ({entry['address']})")
                _remove(cfg, entry["name"])
                record.pop(moid)
                entry = None
            if vm["power"] == "poweredOn":
                t0 = time.monotonic()
                machines.ensure_machine(cfg, vm["name"], vm["address"], fresh=entry is None)
                progress(f"VM {vm['vm']} powered on: machine {vm['name']} ({vm['address']}) up "
                         f"in {time.monotonic() - t0:.1f}s" + (" (fresh disk)" if entry is None else ""))
                record[moid] = {"vm": vm["vm"], "name": vm["name"], "address": vm["address"], "machine": "running"}
            elif entry is not None:
                if machines.stop_machine(cfg, vm["name"], graceful=False):
                    progress(f"VM {vm['vm']} {vm['power']}: machine {vm['name']} stopped")
                record[moid] = {**entry, "machine": "stopped"}
            seen[moid] = key
        except Exception as e:  # noqa: BLE001 - reported, tried again on the next pass
            progress(f"VM {vm['vm']} ({moid}): {type(e).__name__}: {e}")
            if entry is not None or moid in record:
                record[moid] = {**record.get(moid, entry or {}), "machine": f"error: {e}"}
    return record


def watch(cfg: Config) -> None:
    """The watcher's loop (runs until killed). Reconnects when vcsim goes away and comes back."""
    from pyVim.connect import Disconnect
    from pyVmomi import vmodl

    seen: dict[str, tuple] = {}
    progress(f"watching vcsim's VMs; backing those at {machines.NETWORK} with machines")
    while True:
        si = None
        try:
            from testenv import vcsim

            si = vcsim.connect(_section(cfg))
            content = si.RetrieveContent()
            collector = content.propertyCollector.CreatePropertyCollector()
            spec = _filter_spec(content)
            collector.CreateFilter(spec, partialUpdates=False)
            version = ""
            options = vmodl.query.PropertyCollector.WaitOptions(maxWaitSeconds=WAIT_SECONDS)
            while True:
                current = read_vms(collector, spec)
                record = reconcile(cfg, current, _record(cfg), seen)
                _save(cfg, record, synced=True)
                update = collector.WaitForUpdatesEx(version, options)
                if update is not None:
                    version = update.version
        except Exception as e:  # noqa: BLE001 - vcsim down or restarting: try again
            progress(f"vcsim connection: {type(e).__name__}: {e}; retrying")
            time.sleep(2)
        finally:
            if si is not None:
                with contextlib.suppress(Exception):
                    Disconnect(si)


# --------------------------------------------------------------------------- API


def up(cfg: Config, timeout: float = 60) -> dict[str, Any]:
    """Start the watcher (vcsim must be up; the machines part provides bridge, keys and base rootfs)
    and wait for its first pass over the VMs. Idempotent."""
    _section(cfg)  # vcsim is up, else a clear error
    machines.base_rootfs(cfg)
    machines.ensure_bridge()
    started = time.time()
    was = read_pid(NAME, cfg)
    pid = start_process(NAME, [sys.executable, "-m", "testenv.vsphere_machines", "watch", str(cfg.state_dir),
                               str(cfg.cache_dir)], log=cfg.log(NAME), cfg=cfg)
    if was is None:
        wait_for(lambda: (read_pid(NAME, cfg) is not None
                          and ((get_state(cfg, "vsphere_machines") or {}).get("synced_at") or 0) >= started),
                 timeout, "the vSphere machines watcher's first pass")
    return status(cfg) | {"pid": pid}


def status(cfg: Config) -> dict[str, Any]:
    sec = get_state(cfg, "vsphere_machines") or {}
    return {"running": read_pid(NAME, cfg) is not None, "network": machines.NETWORK, "log": str(cfg.log(NAME)),
            "synced_at": sec.get("synced_at"), "vms": sec.get("vms", {})}


def down(cfg: Config) -> None:
    """Stop the watcher, then stop and delete every machine it made (no orphans)."""
    stop_process(NAME, cfg)
    for entry in _record(cfg).values():
        _remove(cfg, entry["name"])
    with locked_state(cfg) as st:
        st.pop("vsphere_machines", None)


def machine_of(cfg: Config, vm_name: str) -> dict[str, Any] | None:
    """The record entry of the machine backing VM ``vm_name`` (None: none)."""
    return next((e for e in _record(cfg).values() if e["vm"] == vm_name), None)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "watch":
        watch(Config(state_dir=Path(sys.argv[2]), cache_dir=Path(sys.argv[3])))
    else:
        print("usage: python -m testenv.vsphere_machines watch STATE_DIR CACHE_DIR", file=sys.stderr)
        sys.exit(2)
