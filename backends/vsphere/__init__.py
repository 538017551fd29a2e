"""vSphere backend (pyvmomi): VMs cloned from a template, Kubernetes on them with the playbooks.

VMs
---
* One VM per ``Machine`` of the desired cluster (name = ``Machine.name``), cloned from
  ``backend.template`` into ``backend.cluster``'s resource pool and ``backend.datastore``, in the
  folder ``<backend.folder>/<cluster name>`` (both folders made if missing and marked with the
  custom attributes below). Cloning into the cluster's own marked folder makes a crash between
  "clone finished" and "attributes set" harmless: an unmarked VM inside our marked folder was
  made by us and is marked on the next run, never cloned twice.
* **Stable addresses** (:mod:`.addresses`): a VM's address is allocated once, the lowest address
  of ``backend.ipPool`` that no VM of the cluster records, and recorded on the VM (custom
  attribute ``fleetwright.io/address`` next to the ownership marks, and ``guestinfo``); it is
  never reassigned, so changing replicas or a pool's ``maxSize`` moves no VM. Too few free
  addresses is an error before anything is cloned.
* After the clone (vcsim ignores a ConfigSpec inside a CloneSpec) the VM is reconfigured: vCPU and
  memory from the Machine, static IP through ``guestinfo.*`` extraConfig (cloud-init's VMware
  datasource reads ``guestinfo.metadata``; vcsim has no guest, so ``guestinfo.fleetwright.address``
  is also the address the backend reads back), then powered on. A VM just powered on is waited
  for until its SSH port answers (``VsphereConnection.boot_timeout_seconds``): PowerOnVM_Task ends
  when the VM runs, not when its guest has booted, and the playbooks need the guest.
* Custom attributes ``fleetwright.io/owned-by=fleetwright``, ``fleetwright.io/cluster=<name>``,
  ``fleetwright.io/pool=<pool>``, ``fleetwright.io/address`` (field definitions made if missing).
* VMs are found by name plus attribute inside fleetwright's folder before anything is cloned
  (vcsim accepts duplicate names). A VM there with a wanted name but without our attributes
  raises ``OwnershipConflict``. Clones of one VM never overlap: the cluster's lease (held by tasks), an
  in-worker per-VM guard (``InFlight`` when busy) and a check of the template's running ``CloneVM_Task``s.
* **Shrinking drains first**: a VM leaving a pool is cordoned and drained through the Kubernetes
  API (evictions, so PodDisruptionBudgets hold: :mod:`backends.kube.drain`), then Kubernetes is
  stopped on it, the VM powered off and destroyed, and only then its Node deleted. A drain that
  a budget blocks is an error and removes nothing.

Sessions and batching
---------------------
One vCenter session per worker process (:mod:`.session`), re-logged-in after
``NotAuthenticated`` and logged out at exit. :meth:`VsphereBackend.observe_many` reads the VMs of
many clusters with one PropertyCollector query over fleetwright's folders (:mod:`.vms`).

Kubernetes
----------
The SAME playbooks as the metal backend run over SSH to the VMs' static IPs (``HostsCluster``).
In the test environment those addresses are either fast SSH hosts (``testenv.hosts.ensure_host``,
the test-only supervisor path) or real machines that boot when vcsim powers the VM on and stop when
it powers it off (``testenv/vsphere_machines.py``, the kubeadm path).

Errors from vSphere are mapped in ONE function, :func:`vsphere_error` (:mod:`.errors`).
"""
from __future__ import annotations

import base64
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

from models.desired import DesiredCluster, Machine, ObservedCluster
from models.errors import FleetwrightError, InFlight, OwnershipConflict, PermanentError, TransientError
from models.plan import Step

from .. import ansible
from ..base import CLUSTER_KEY, OWNER_KEY, OWNER_VALUE, KubeAccess, StepResult
from ..connections import Connections
from ..metal import HostsCluster
from .addresses import AddressesExhausted, allocate, pool_addresses
from .errors import vsphere_error
from .session import Session, session as vcenter_session
from .vms import (ADDRESS_KEY, GI, POOL_KEY, Inventory, Listing, Vm, cluster_inventory, ensure_folder, field_keys,
                  find_dc, list_scopes, moid, scope_path, vm_lock, vm_locked)

__all__ = ["VsphereBackend", "vsphere_error", "vm_lock", "POOL_KEY", "ADDRESS_KEY", "GI", "AddressesExhausted",
           "pool_addresses"]

_vm_locked = vm_locked  # the old private name, kept for callers of the in-flight lock


def _ssh_answers(address: str, port: int) -> bool:
    """True when an SSH server greets on ``address:port`` (a booted guest, not just an open port)."""
    try:
        with socket.create_connection((address, port), timeout=2) as s:
            s.settimeout(3)
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False


class VsphereBackend(HostsCluster):
    kind = "vsphere"

    def __init__(self, connections: Connections, log: Callable[[str], None] | None = None,
                 soap_timeout: float = 60.0, drain_timeout: float = 300.0, drain_poll: float = 2.0,
                 observe_threads: int = 8) -> None:
        super().__init__(connections, log)
        self.soap_timeout = soap_timeout
        self.drain_timeout = drain_timeout
        self.drain_poll = drain_poll
        self.observe_threads = observe_threads
        self._extras: dict[str, list[Machine]] = {}  # cluster -> machines of VMs no longer wanted
        self._placed: dict[str, list[Machine]] = {}  # cluster -> desired machines with their addresses
        self._last: dict[str, Inventory] = {}

    # ---- session --------------------------------------------------------------------------------

    @property
    def session(self) -> Session:
        return vcenter_session(self.connections.vsphere, self.soap_timeout)

    def _content(self):
        return self.session.content()

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` with the process's session; after ``NotAuthenticated`` log in again and run it once more.

        Every caller's ``fn`` is a whole observe or an idempotent step, so running it again is safe.
        Other errors are mapped by :func:`vsphere_error`.
        """
        from pyVmomi import vim

        for attempt in (0, 1):
            stale = None
            try:
                stale = self.session.content()
                return fn()
            except FleetwrightError:
                raise
            except vim.fault.NotAuthenticated as e:
                if attempt:
                    raise vsphere_error(e, what) from e
                self.log(f"vsphere: session expired ({what}); logging in again")
                self.session.relogin(stale)
            except Exception as e:  # noqa: BLE001 - mapped in vsphere_error, the one place
                raise vsphere_error(e, what) from e

    # ---- inventory ------------------------------------------------------------------------------

    def _inventory(self, desired: DesiredCluster, create: bool = False, remember: bool = True) -> Inventory:
        """The cluster's VMs (one query over fleetwright's folder); with ``create`` its folder is made first.

        ``remember`` (the default) makes it the backend's current view of the cluster: the machines
        with their recorded addresses, and the VMs no longer wanted. A re-read in the middle of a
        step (under a VM's lock) leaves the step's allocation alone.
        """
        content = self._content()
        keys = field_keys(content, create)
        dc = find_dc(content, desired.backend.datacenter)
        made = ensure_folder(content, desired, keys, self.log) if create else None
        listing = list_scopes(content, [scope_path(desired)], keys)[scope_path(desired)]
        inv = self._sort(desired, listing, content, dc, remember)
        if create and not inv.folder_ours:
            marks = {cv.key: cv.value for cv in made.customValue or []}
            if not marks.get(keys.get((OWNER_KEY, "Folder"))) and not list(made.childEntity):
                # empty and unmarked: our own folder from a run interrupted before it was marked
                cfm = content.customFieldsManager
                cfm.SetField(entity=made, key=keys[(OWNER_KEY, "Folder")], value=OWNER_VALUE)
                cfm.SetField(entity=made, key=keys[(CLUSTER_KEY, "Folder")], value=desired.name)
                inv.folder, inv.folder_ours = made, True
            else:
                raise OwnershipConflict(f"vSphere folder {scope_path(desired)}/{desired.name} exists but is not "
                                        f"marked as cluster {desired.name}'s; fleetwright will not use it")
        return inv

    def _sort(self, desired: DesiredCluster, listing: Listing, content, dc, remember: bool = True) -> Inventory:
        inv = cluster_inventory(desired, listing, content, dc)
        if not remember:
            return inv
        self._extras[desired.name] = [m for m in (vm.machine() for vm in inv.extras) if m is not None]
        # the machines as they are placed now: recorded addresses only (allocation is for apply)
        self._placed[desired.name] = [m.model_copy(update={"address": inv.mine[m.name].address})
                                      for m in desired.machines if m.name in inv.mine and inv.mine[m.name].address]
        self._last[desired.name] = inv
        return inv

    def _allocate(self, desired: DesiredCluster, inv: Inventory) -> list[Machine]:
        """Every desired machine with its address (recorded, else newly allocated); raises before any clone."""
        placed = allocate(desired.name, desired.backend.ip_pool, desired.machines, inv.recorded())
        self._placed[desired.name] = placed
        return placed

    @staticmethod
    def _refuse_conflicts(desired: DesiredCluster, inv: Inventory) -> None:
        if inv.conflicts:
            shown = ", ".join(f"{n} ({moid(vm.ref)}, owner {vm.values.get(OWNER_KEY) or 'none'}, "
                              f"cluster {vm.values.get(CLUSTER_KEY) or 'none'})" for n, vm in sorted(inv.conflicts.items()))
            raise OwnershipConflict(f"cluster {desired.name}: VM(s) with fleetwright's names but not marked as this "
                                    f"cluster's exist: {shown}; fleetwright will not adopt, change or delete them")

    # ---- machines with their addresses (HostsCluster asks these) ---------------------------------

    def _machines(self, desired: DesiredCluster) -> list[Machine]:
        if desired.name not in self._placed:
            self._call(f"inventory {desired.name}", lambda: self._inventory(desired))
        return self._placed[desired.name]

    def hosts(self, desired: DesiredCluster) -> list[Machine]:
        return list(self._machines(desired)) + self._extras.get(desired.name, [])

    def workers(self, desired: DesiredCluster, pool: str | None = None) -> list[Machine]:
        return [m for m in self._machines(desired) if m.role == "worker" and (pool is None or m.pool == pool)]

    def control_planes(self, desired: DesiredCluster) -> list[Machine]:
        return [m for m in self._machines(desired) if m.role == "controlPlane"]

    # ---- one VM ---------------------------------------------------------------------------------

    def _guestinfo(self, desired: DesiredCluster, m: Machine) -> dict[str, str]:
        pool = desired.backend.ip_pool
        eth: dict[str, Any] = {"match": {"name": "e*"}, "addresses": [f"{m.address}/{pool.prefix}"]}
        if pool.gateway:
            eth["gateway4"] = pool.gateway
        if pool.dns:
            eth["nameservers"] = {"addresses": list(pool.dns)}
        meta = {"instance-id": m.name, "local-hostname": m.name,
                "network": {"version": 2, "ethernets": {"nic0": eth}}}
        return {GI + "address": m.address, GI + "role": m.role,
                "guestinfo.metadata": base64.b64encode(json.dumps(meta, sort_keys=True).encode()).decode(),
                "guestinfo.metadata.encoding": "base64"}

    def _wait(self, task, what: str):
        from pyVim.task import WaitForTask

        WaitForTask(task)
        return task.info.result

    def _clone_in_flight(self, template, name: str) -> bool:
        """A running CloneVM_Task of the template (vSphere's own record of an in-flight clone)."""
        for t in list(getattr(template, "recentTask", None) or []):
            try:
                info = t.info
            except TypeError:  # vcsim returns some task infos pyvmomi cannot read
                continue
            if info.descriptionId == "VirtualMachine.clone" and str(info.state) in ("queued", "running"):
                return True
        return False

    def _ensure_vm(self, desired: DesiredCluster, m: Machine, inv: Inventory,
                   booted: list[Machine] | None = None) -> bool:
        """Clone (if missing), mark, configure and power on the VM of ``m``. True if anything changed.
        A VM this call powers on is appended to ``booted`` (its guest still has to boot)."""
        from pyVmomi import vim

        content, b = inv.content, desired.backend
        keys = field_keys(content, create=True)
        changed = False
        with vm_lock(f"{desired.name}-{m.name}"):
            inv = self._inventory(desired, create=True, remember=False)  # fresh, under the lock
            self._refuse_conflicts(desired, inv)
            vm = inv.mine.get(m.name)
            if vm is not None and vm.address and vm.address != m.address:  # never reassigned
                m = m.model_copy(update={"address": vm.address})
            if vm is None:
                tpl = content.searchIndex.FindByInventoryPath(f"{b.datacenter}/vm/{b.template}")
                if tpl is None:
                    raise PermanentError(f"vSphere template {b.datacenter}/vm/{b.template} not found")
                if self._clone_in_flight(tpl, m.name):
                    raise InFlight(f"a clone from {b.template} is in flight; not starting another for {m.name}", delay=5)
                cluster = content.searchIndex.FindByInventoryPath(f"{b.datacenter}/host/{b.cluster}")
                if cluster is None:
                    raise PermanentError(f"vSphere cluster {b.datacenter}/host/{b.cluster} not found")
                ds = next((d for d in inv.dc.datastore if d.name == b.datastore), None)
                if ds is None:
                    raise PermanentError(f"vSphere datastore {b.datastore!r} not found in {b.datacenter}")
                spec = vim.vm.CloneSpec(location=vim.vm.RelocateSpec(pool=cluster.resourcePool, datastore=ds),
                                        powerOn=False, template=False)
                self.log(f"[{desired.name}] vsphere: cloning {m.name} from {b.template} (address {m.address})")
                ref = self._wait(tpl.CloneVM_Task(folder=inv.folder, name=m.name, spec=spec), f"clone {m.name}")
                changed = True
                vm = Vm(ref=ref, name=m.name, values={}, parent=inv.folder, power="poweredOff", cpu=None,
                        memory_mib=None, extra={}, template=False)
            # marks (and the address) first, so the VM is recognisably ours and keeps its address from now on
            cfm = content.customFieldsManager
            marks = [(OWNER_KEY, OWNER_VALUE), (CLUSTER_KEY, desired.name), (ADDRESS_KEY, m.address)] \
                + ([(POOL_KEY, m.pool)] if m.pool else [])
            for k, v in marks:
                if vm.values.get(k) != v:
                    cfm.SetField(entity=vm.ref, key=keys[(k, "VirtualMachine")], value=v)
                    changed = True
            want_extra = self._guestinfo(desired, m)
            extra = [vim.option.OptionValue(key=k, value=v) for k, v in want_extra.items() if vm.extra.get(k) != v]
            cpu = m.cpu if m.cpu and vm.cpu != m.cpu else None
            mem = m.memory_mib if m.memory_mib and vm.memory_mib != m.memory_mib else None
            if extra or cpu or mem:
                if (cpu or mem) and vm.power == "poweredOn":  # no hot-add: power off to resize
                    self._wait(vm.ref.PowerOffVM_Task(), f"power off {m.name}")
                    vm.power = "poweredOff"
                self.log(f"[{desired.name}] vsphere: configuring {m.name} (cpu={cpu or '-'}, "
                         f"memoryMiB={mem or '-'}, {len(extra)} guestinfo keys)")
                self._wait(vm.ref.ReconfigVM_Task(vim.vm.ConfigSpec(numCPUs=cpu, memoryMB=mem, extraConfig=extra)),
                           f"reconfigure {m.name}")
                changed = True
            if vm.power != "poweredOn":
                self._wait(vm.ref.PowerOnVM_Task(), f"power on {m.name}")
                changed = True
                if booted is not None:
                    booted.append(m)
        return changed

    def _await_boot(self, desired: DesiredCluster, booted: list[Machine]) -> None:
        """Wait until every VM just powered on answers on its SSH port (an SSH banner), all at once.

        Raises ``TransientError`` naming the VMs still silent after ``boot_timeout_seconds``.
        """
        if not booted:
            return
        port = self.connections.ssh.port if self.connections.ssh is not None else 22
        timeout = self.connections.vsphere.boot_timeout_seconds
        pending = {m.name: m.address for m in booted if m.address}
        self.log(f"[{desired.name}] vsphere: waiting for the guests of {', '.join(sorted(pending))} to boot")
        t0 = time.monotonic()
        while True:
            pending = {n: a for n, a in pending.items() if not _ssh_answers(a, port)}
            if not pending:
                self.log(f"[{desired.name}] vsphere: guests up after {time.monotonic() - t0:.1f}s")
                return
            if time.monotonic() - t0 > timeout:
                shown = ", ".join(f"{n} ({a}:{port})" for n, a in sorted(pending.items()))
                raise TransientError(f"cluster {desired.name}: VM(s) powered on but not answering on SSH after "
                                     f"{timeout:.0f}s: {shown}; is the guest booting, and is the address right?",
                                     delay=5)
            time.sleep(0.5)

    def _destroy_vm(self, desired: DesiredCluster, vm: Vm) -> None:
        with vm_lock(f"{desired.name}-{vm.name}"):
            self.log(f"[{desired.name}] vsphere: destroying {vm.name}")
            if vm.power == "poweredOn":
                self._wait(vm.ref.PowerOffVM_Task(), f"power off {vm.name}")
            self._wait(vm.ref.Destroy_Task(), f"destroy {vm.name}")

    # ---- shrink: drain, stop, destroy, delete the Node -------------------------------------------

    def _kube(self, desired: DesiredCluster):
        from ..kube import KubeBackend

        return KubeBackend(self.kube_access_hosts(desired))

    def _remove_workers(self, desired: DesiredCluster, gone: list[Vm], pool: str) -> dict:
        """Drain each leaving VM's node (PDBs honoured), stop Kubernetes on it, destroy it, then delete its Node.

        A drain that fails raises before any VM is touched. Nodes of the pool that have no VM any
        more (a run that crashed after the destroy) are deleted too.
        """
        drained: dict[str, dict] = {}
        try:
            kube = self._kube(desired)
        except FleetwrightError:
            if gone:
                raise  # no drain, no removal
            kube = None  # nothing to drain; the Node clean-up waits for a reachable API
        for vm in gone:
            self.log(f"[{desired.name}] vsphere: draining node {vm.name}")
            drained[vm.name] = kube.drain(vm.name, timeout=self.drain_timeout, poll=self.drain_poll)
            self.log(f"[{desired.name}] vsphere: drained node {vm.name}: evicted "
                     f"{', '.join(drained[vm.name]['evicted']) or 'no pods'}")
        leaving = [m for m in (vm.machine() for vm in gone if vm.power == "poweredOn") if m is not None]
        if leaving:
            self._run("reset.yml", desired, limit=leaving, fw_delete_node=False)
        for vm in gone:
            self._destroy_vm(desired, vm)
        deleted = []
        if kube is not None:
            wanted = {m.name for m in desired.machines}
            with_vm = set(self._inventory(desired).mine)
            for node in kube.nodes(f"fleetwright.io/cluster={desired.name},fleetwright.io/pool={pool}"):
                if node not in wanted and node not in with_vm and kube.delete_node(node):
                    deleted.append(node)
                    self.log(f"[{desired.name}] vsphere: deleted Node {node}")
        return {"drained": drained, "nodes_deleted": deleted}

    # ---- contract -------------------------------------------------------------------------------

    def _observe_from(self, desired: DesiredCluster, inv: Inventory) -> ObservedCluster:
        self._refuse_conflicts(desired, inv)
        with_vm = [m for m in self.hosts(desired) if m.name in inv.mine and inv.mine[m.name].power == "poweredOn"]
        obs = self.observe_hosts(desired, hosts=with_vm)
        vms_ok = all(m.name in inv.mine and inv.mine[m.name].power == "poweredOn"
                     and inv.mine[m.name].values.get(OWNER_KEY) == OWNER_VALUE for m in desired.machines)
        in_flight = list(obs.in_flight) + [f"{desired.name}: operation on VM {n}" for n in inv.mine
                                           if vm_locked(f"{desired.name}-{n}")]
        return obs.model_copy(update={"infrastructure": obs.infrastructure and vms_ok, "in_flight": in_flight})

    def observe(self, desired: DesiredCluster) -> ObservedCluster:
        inv = self._call(f"observe {desired.name}", lambda: self._inventory(desired))
        return self._observe_from(desired, inv)

    def observe_many(self, desireds: Iterable[DesiredCluster]) -> dict[str, ObservedCluster | FleetwrightError]:
        """Observe many clusters: ONE PropertyCollector query for all their VMs, then each cluster's hosts.

        The same result per cluster as :meth:`observe`. An error of one cluster (an ownership
        conflict, an unreachable host) is its value in the result; an error of the shared vSphere
        query is raised.
        """
        desireds = list(desireds)
        if not desireds:
            return {}

        def listing():
            content = self._content()
            keys = field_keys(content, False)
            dcs = {d.backend.datacenter: find_dc(content, d.backend.datacenter) for d in desireds}
            scopes = list_scopes(content, [scope_path(d) for d in desireds], keys)
            return content, dcs, scopes

        content, dcs, scopes = self._call(f"observe {len(desireds)} clusters", listing)
        out: dict[str, ObservedCluster | FleetwrightError] = {}
        invs = {}
        for d in desireds:
            try:
                invs[d.name] = self._sort(d, scopes[scope_path(d)], content, dcs[d.backend.datacenter])
            except FleetwrightError as e:
                out[d.name] = e

        def one(d: DesiredCluster):
            try:
                return self._observe_from(d, invs[d.name])
            except FleetwrightError as e:
                return e

        todo = [d for d in desireds if d.name in invs]
        with ThreadPoolExecutor(max_workers=max(1, min(self.observe_threads, len(todo) or 1))) as pool:
            for d, r in zip(todo, pool.map(one, todo)):
                out[d.name] = r
        return out

    def pool_machine(self, desired: DesiredCluster, pool: str, members) -> dict:
        inv = self._last.get(desired.name)
        if inv is None:
            return {}
        want = next((p.machine for p in desired.node_pools if p.name == pool), {})
        seen = []
        for s in sorted(members, key=lambda s: s.machine.name):
            vm = inv.mine.get(s.machine.name)
            if vm is not None:
                seen.append({"cpu": vm.cpu, "memoryMiB": vm.memory_mib})
        if not seen:
            return {}
        return next((x for x in seen if x != {k: want.get(k) for k in ("cpu", "memoryMiB")}), seen[0])

    def apply(self, desired: DesiredCluster, step: Step) -> StepResult:
        with ansible.guard(desired.name, f"{step.action} {step.object}"):
            return self._call(f"{step.action} {step.object}", lambda: self._apply(desired, step))

    def _apply(self, desired: DesiredCluster, step: Step) -> StepResult:
        a = step.action
        create = a in ("infrastructure.ensure", "nodePool.create", "nodePool.scale", "nodePool.update")
        inv = self._inventory(desired, create=create)
        self._refuse_conflicts(desired, inv)
        if create:
            self._allocate(desired, inv)  # every address known (or AddressesExhausted) before anything is cloned
        if a == "infrastructure.ensure":
            booted: list[Machine] = []
            changed = [m.name for m in self._machines(desired) if self._ensure_vm(desired, m, inv, booted)]
            self._await_boot(desired, booted)
            r = self._run("prepare.yml", desired, limit=list(self._machines(desired)))
            return StepResult(step.id, changed=bool(changed) or r.changed,
                              detail=f"VMs changed: {', '.join(changed) or 'none'}; hosts prepared"
                                     + (" (changes)" if r.changed else " (no changes)"))
        if a in ("nodePool.create", "nodePool.scale", "nodePool.update"):
            pool = step.object
            want = self.workers(desired, pool)
            booted = []
            changed = [m.name for m in want if self._ensure_vm(desired, m, inv, booted)]
            self._await_boot(desired, booted)
            if a == "nodePool.update":
                return StepResult(step.id, changed=bool(changed), detail=f"reconfigured: {', '.join(changed) or 'none'}")
            r = self._run("join.yml", desired, limit=want, fw_version=desired.kubernetes_version)
            gone = [vm for vm in self._inventory(desired).extras if vm.values.get(POOL_KEY) == pool]
            removed = self._remove_workers(desired, gone, pool) if a == "nodePool.scale" else {"nodes_deleted": []}
            return StepResult(step.id, changed=bool(changed or gone or removed["nodes_deleted"]) or r.changed,
                              detail=f"{a} {pool}: " + (f"{len(r.changed_tasks)} changes" if r.changed else "no changes")
                                     + f"; VMs made/changed: {', '.join(changed) or 'none'}; "
                                     f"VMs removed: {', '.join(v.name for v in gone) or 'none'}",
                              outputs={"drained": removed.get("drained", {}), "nodes_deleted": removed["nodes_deleted"]})
        if a == "nodePool.delete":
            gone = [vm for vm in inv.extras if vm.values.get(POOL_KEY) == step.object]
            removed = self._remove_workers(desired, gone, step.object)
            return StepResult(step.id, changed=bool(gone or removed["nodes_deleted"]),
                              detail=f"removed {len(gone)} VMs", outputs=removed)
        return self.apply_hosts(desired, step)

    def delete(self, desired: DesiredCluster) -> StepResult:
        with ansible.guard(desired.name, "delete"):
            def run():
                inv = self._inventory(desired)
                running = [vm.machine() for vm in inv.mine.values() if vm.power == "poweredOn"]
                hosts = [m for m in running if m is not None]
                r = self.reset_all(desired, hosts)  # stop Kubernetes on the hosts (their disks go with the VMs)
                for vm in sorted(inv.mine.values(), key=lambda v: v.name):
                    self._destroy_vm(desired, vm)
                folder_gone = False
                if inv.folder is not None and inv.folder_ours and not list(inv.folder.childEntity):
                    self._wait(inv.folder.Destroy_Task(), f"destroy folder of {desired.name}")
                    folder_gone = True
                self._extras.pop(desired.name, None)
                self._placed.pop(desired.name, None)
                return inv, r, folder_gone

            inv, r, folder_gone = self._call(f"delete {desired.name}", run)
        n = len(inv.mine)
        return StepResult(f"{desired.name}/delete", changed=bool(n) or r.changed or folder_gone,
                          detail=f"destroyed {n} VMs" + (" and the cluster's folder" if folder_gone else ""))

    def kube_access(self, desired: DesiredCluster) -> KubeAccess:
        return self.kube_access_hosts(desired)
