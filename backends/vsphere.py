"""vSphere backend (pyvmomi): VMs cloned from a template, Kubernetes on them with the playbooks.

VMs
---
* One VM per ``Machine`` of the desired cluster (name = ``Machine.name``), cloned from
  ``backend.template`` into ``backend.cluster``'s resource pool and ``backend.datastore``, in the
  folder ``<backend.folder>/<cluster name>`` (both folders made if missing and marked with the
  custom attributes below). Cloning into the cluster's own marked folder makes a crash between
  "clone finished" and "attributes set" harmless: an unmarked VM inside our marked folder was
  made by us and is marked on the next run, never cloned twice.
* After the clone (vcsim ignores a ConfigSpec inside a CloneSpec) the VM is reconfigured: vCPU and
  memory from the Machine, static IP through ``guestinfo.*`` extraConfig (cloud-init's VMware
  datasource reads ``guestinfo.metadata``; vcsim has no guest, so ``guestinfo.fleetwright.address``
  is also the address the backend reads back), then powered on.
* Custom attributes ``fleetwright.io/owned-by=fleetwright``, ``fleetwright.io/cluster=<name>``,
  ``fleetwright.io/pool=<pool>`` (field definitions made if missing, per managed-object type).
* VMs are found by name plus attribute before anything is cloned (vcsim accepts duplicate names).
  A VM with a wanted name but without our attributes (outside our folder) raises
  ``OwnershipConflict``. Clones of one VM never overlap: the cluster's lease (held by tasks), an
  in-worker per-VM guard (``InFlight`` when busy) and a check of the template's running ``CloneVM_Task``s.
* Scaling adds or removes VMs; removal (power off + destroy) only ever touches VMs of ours.

Kubernetes
----------
The SAME playbooks as the metal backend run over SSH to the VMs' static IPs (``HostsCluster``).
In the test environment those addresses are real SSH hosts (``testenv.hosts.ensure_host``).

Errors from vSphere are mapped in ONE function, :func:`vsphere_error`.
"""
from __future__ import annotations

import base64
import contextlib
import http.client
import json
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from models.desired import DesiredCluster, Machine, ObservedCluster, ObservedNodePool
from models.errors import FleetwrightError, InFlight, OwnershipConflict, PermanentError, TransientError
from models.plan import Step

from . import ansible
from .base import CLUSTER_KEY, OWNER_KEY, OWNER_VALUE, KubeAccess, StepResult
from .connections import Connections
from .metal import HostsCluster

POOL_KEY = "fleetwright.io/pool"
GI = "guestinfo.fleetwright."
_VM_PROPS = ["name", "customValue", "parent", "runtime.powerState", "config.hardware.numCPU",
             "config.hardware.memoryMB", "config.extraConfig", "config.template"]


# --------------------------------------------------------------------------- errors (the one place)


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


# --------------------------------------------------------------------------- helpers


@dataclass
class Vm:
    ref: Any
    name: str
    values: dict[str, str]  # custom attribute name -> value (VM attributes of ours only)
    parent: Any
    power: str
    cpu: int | None
    memory_mib: int | None
    extra: dict[str, str]  # guestinfo.* extraConfig
    template: bool

    def machine(self) -> Machine | None:
        addr = self.extra.get(GI + "address")
        role = self.extra.get(GI + "role")
        if not addr or role not in ("controlPlane", "worker"):
            return None
        return Machine(name=self.name, role=role, pool=self.values.get(POOL_KEY) or None, address=addr,
                       cpu=self.cpu, memory_mib=self.memory_mib)


@dataclass
class Inventory:
    content: Any
    dc: Any
    folder: Any | None  # the cluster's folder (None if not made yet)
    vms: list[Vm]
    folder_ours: bool = False  # it carries our owner and cluster attributes
    mine: dict[str, Vm] = field(default_factory=dict)  # name -> our VM
    conflicts: dict[str, Vm] = field(default_factory=dict)  # wanted name -> a VM that is not ours
    extras: list[Vm] = field(default_factory=list)  # our VMs no longer wanted


def _mo(t: Any) -> str:
    """``VirtualMachine`` for ``vim.VirtualMachine`` (the managed-object type of a field definition)."""
    return t.__name__.rsplit(".", 1)[-1] if t is not None else ""


def _moid(obj: Any) -> str | None:
    return getattr(obj, "_moId", None)


_vm_guard_lock = threading.Lock()
_vm_busy: set[str] = set()


@contextlib.contextmanager
def vm_lock(key: str) -> Iterator[None]:
    """One clone/configure of a VM at a time in this worker (``InFlight`` if busy). Across workers the
    cluster's Prefect lease, held by tasks around every step, keeps runs apart: no file lock, which a
    survivor could hold."""
    with _vm_guard_lock:
        if key in _vm_busy:
            raise InFlight(f"an operation on VM {key} is in flight", delay=5)
        _vm_busy.add(key)
    try:
        yield
    finally:
        with _vm_guard_lock:
            _vm_busy.discard(key)


def _vm_locked(key: str) -> bool:
    with _vm_guard_lock:
        return key in _vm_busy


# --------------------------------------------------------------------------- backend


class VsphereBackend(HostsCluster):
    kind = "vsphere"

    def __init__(self, connections: Connections, log: Callable[[str], None] | None = None,
                 soap_timeout: float = 60.0) -> None:
        super().__init__(connections, log)
        self.soap_timeout = soap_timeout
        self._si = None
        self._extras: dict[str, list[Machine]] = {}  # cluster -> machines of VMs no longer wanted
        self._last: dict[str, Inventory] = {}

    # ---- connection ---------------------------------------------------------------------------

    def _content(self):
        from pyVim.connect import SmartConnect

        c = self.connections.vsphere
        if c is None:
            raise PermanentError("no vSphere connection configured (Connections.vsphere)")
        if self._si is None:
            self._si = SmartConnect(host=c.host, port=c.port, user=c.user, pwd=c.password.get_secret_value(),
                                    disableSslCertValidation=c.insecure, httpConnectionTimeout=self.soap_timeout)
        return self._si.RetrieveContent()

    @contextlib.contextmanager
    def _mapped(self, what: str) -> Iterator[None]:
        try:
            yield
        except FleetwrightError:
            raise
        except Exception as e:  # noqa: BLE001 - mapped in vsphere_error, the one place
            err = vsphere_error(e, what)
            if isinstance(err, TransientError):
                self._si = None  # a broken or expired session: connect again next time
            raise err from e

    # ---- inventory ------------------------------------------------------------------------------

    def _field_keys(self, content, create: bool) -> dict[tuple[str, str], int]:
        from pyVmomi import vim

        cfm = content.customFieldsManager
        keys = {(f.name, _mo(f.managedObjectType)): f.key for f in cfm.field or []}
        if create:
            for mo in (vim.VirtualMachine, vim.Folder):
                for n in ((OWNER_KEY, CLUSTER_KEY, POOL_KEY) if mo is vim.VirtualMachine else (OWNER_KEY, CLUSTER_KEY)):
                    if (n, _mo(mo)) not in keys:
                        try:
                            keys[(n, _mo(mo))] = cfm.AddCustomFieldDef(name=n, moType=mo).key
                        except vim.fault.DuplicateName:  # made meanwhile by someone else
                            keys = {(f.name, _mo(f.managedObjectType)): f.key for f in cfm.field or []}
        return keys

    def _find_dc(self, content, desired: DesiredCluster):
        b = desired.backend
        dc = content.searchIndex.FindByInventoryPath(b.datacenter)
        if dc is None:
            raise PermanentError(f"vSphere datacenter {b.datacenter!r} not found")
        return dc

    def _folder_path(self, desired: DesiredCluster) -> list[str]:
        return [p for p in desired.backend.folder.split("/") if p] + [desired.name]

    def _find_folder(self, content, desired: DesiredCluster, create: bool, keys=None):
        """The cluster's folder ``<folder>/<cluster>``; made and marked if ``create``."""
        b = desired.backend
        parent = self._find_dc(content, desired).vmFolder
        path = f"{b.datacenter}/vm"
        parts = self._folder_path(desired)
        for i, part in enumerate(parts):
            path += "/" + part
            f = content.searchIndex.FindByInventoryPath(path)
            if f is None:
                if not create:
                    return None
                from pyVmomi import vim

                try:
                    f = parent.CreateFolder(part)
                except vim.fault.DuplicateName:
                    f = content.searchIndex.FindByInventoryPath(path)
                cfm = content.customFieldsManager
                cfm.SetField(entity=f, key=keys[(OWNER_KEY, "Folder")], value=OWNER_VALUE)
                if i == len(parts) - 1:
                    cfm.SetField(entity=f, key=keys[(CLUSTER_KEY, "Folder")], value=desired.name)
                self.log(f"[{desired.name}] vsphere: made folder {path}")
            parent = f
        return parent

    def _list_vms(self, content, dc, keys) -> list[Vm]:
        from pyVmomi import vim, vmodl

        names = {k: n for (n, mo), k in keys.items() if mo == "VirtualMachine"}
        view = content.viewManager.CreateContainerView(dc.vmFolder, [vim.VirtualMachine], True)
        try:
            pc = vmodl.query.PropertyCollector
            spec = pc.FilterSpec(
                objectSet=[pc.ObjectSpec(obj=view, skip=True, selectSet=[
                    pc.TraversalSpec(name="v", path="view", skip=False, type=vim.view.ContainerView)])],
                propSet=[pc.PropertySpec(type=vim.VirtualMachine, pathSet=_VM_PROPS)])
            result = content.propertyCollector.RetrieveContents([spec]) or []
        finally:
            view.Destroy()
        out = []
        for oc in result:
            p = {prop.name: prop.val for prop in oc.propSet}
            values = {names[cv.key]: cv.value for cv in (p.get("customValue") or []) if cv.key in names}
            extra = {o.key: str(o.value) for o in (p.get("config.extraConfig") or []) if o.key.startswith("guestinfo.")}
            out.append(Vm(ref=oc.obj, name=p.get("name", ""), values=values, parent=p.get("parent"),
                          power=str(p.get("runtime.powerState", "")), cpu=p.get("config.hardware.numCPU"),
                          memory_mib=p.get("config.hardware.memoryMB"), extra=extra,
                          template=bool(p.get("config.template"))))
        return out

    def _inventory(self, desired: DesiredCluster, create: bool = False) -> Inventory:
        content = self._content()
        keys = self._field_keys(content, create)
        dc = self._find_dc(content, desired)
        folder = self._find_folder(content, desired, create, keys)
        vms = self._list_vms(content, dc, keys)
        inv = Inventory(content=content, dc=dc, folder=folder, vms=vms)
        if folder is not None:
            marks = {cv.key: cv.value for cv in folder.customValue or []}
            inv.folder_ours = (marks.get(keys.get((OWNER_KEY, "Folder"))) == OWNER_VALUE
                               and marks.get(keys.get((CLUSTER_KEY, "Folder"))) == desired.name)
            if create and not inv.folder_ours and not marks.get(keys.get((OWNER_KEY, "Folder"))) \
                    and not list(folder.childEntity):
                # empty and unmarked: our own folder from a run interrupted before it was marked
                cfm = content.customFieldsManager
                cfm.SetField(entity=folder, key=keys[(OWNER_KEY, "Folder")], value=OWNER_VALUE)
                cfm.SetField(entity=folder, key=keys[(CLUSTER_KEY, "Folder")], value=desired.name)
                inv.folder_ours = True
            if create and not inv.folder_ours:
                raise OwnershipConflict(f"vSphere folder {'/'.join(self._folder_path(desired))} exists but is not "
                                        f"marked as cluster {desired.name}'s; fleetwright will not use it")
        fid = _moid(folder) if folder is not None and inv.folder_ours else None
        for vm in vms:
            marked = vm.values.get(OWNER_KEY) == OWNER_VALUE and vm.values.get(CLUSTER_KEY) == desired.name
            # an unmarked VM inside our marked folder: our clone, interrupted before it was marked
            adopted = fid is not None and _moid(vm.parent) == fid and not vm.values.get(OWNER_KEY) and not vm.template
            if marked or adopted:
                if vm.name in inv.mine:
                    raise PermanentError(f"two VMs of cluster {desired.name} are named {vm.name!r}; "
                                         f"remove one by hand ({_moid(vm.ref)}, {_moid(inv.mine[vm.name].ref)})")
                inv.mine[vm.name] = vm
        wanted = {m.name for m in desired.machines}
        for vm in vms:
            if vm.name in wanted and vm.name not in inv.mine:
                inv.conflicts.setdefault(vm.name, vm)
        inv.extras = [vm for n, vm in sorted(inv.mine.items()) if n not in wanted]
        self._extras[desired.name] = [m for m in (vm.machine() for vm in inv.extras) if m is not None]
        self._last[desired.name] = inv
        return inv

    @staticmethod
    def _refuse_conflicts(desired: DesiredCluster, inv: Inventory) -> None:
        if inv.conflicts:
            shown = ", ".join(f"{n} ({_moid(vm.ref)}, owner {vm.values.get(OWNER_KEY) or 'none'}, "
                              f"cluster {vm.values.get(CLUSTER_KEY) or 'none'})" for n, vm in sorted(inv.conflicts.items()))
            raise OwnershipConflict(f"cluster {desired.name}: VM(s) with fleetwright's names but not marked as this "
                                    f"cluster's exist: {shown}; fleetwright will not adopt, change or delete them")

    def hosts(self, desired: DesiredCluster) -> list[Machine]:
        return list(desired.machines) + self._extras.get(desired.name, [])

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

    def _ensure_vm(self, desired: DesiredCluster, m: Machine, inv: Inventory) -> bool:
        """Clone (if missing), mark, configure and power on the VM of ``m``. True if anything changed."""
        from pyVmomi import vim

        content, b = inv.content, desired.backend
        keys = self._field_keys(content, create=True)
        changed = False
        with vm_lock(f"{desired.name}-{m.name}"):
            inv = self._inventory(desired, create=True)  # fresh, under the lock
            self._refuse_conflicts(desired, inv)
            vm = inv.mine.get(m.name)
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
                self.log(f"[{desired.name}] vsphere: cloning {m.name} from {b.template}")
                ref = self._wait(tpl.CloneVM_Task(folder=inv.folder, name=m.name, spec=spec), f"clone {m.name}")
                changed = True
                vm = Vm(ref=ref, name=m.name, values={}, parent=inv.folder, power="poweredOff", cpu=None,
                        memory_mib=None, extra={}, template=False)
            # marks first, so the VM is recognisably ours from now on
            cfm = content.customFieldsManager
            marks = [(OWNER_KEY, OWNER_VALUE), (CLUSTER_KEY, desired.name)] + ([(POOL_KEY, m.pool)] if m.pool else [])
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
        return changed

    def _destroy_vm(self, desired: DesiredCluster, vm: Vm) -> None:
        with vm_lock(f"{desired.name}-{vm.name}"):
            self.log(f"[{desired.name}] vsphere: destroying {vm.name}")
            if vm.power == "poweredOn":
                self._wait(vm.ref.PowerOffVM_Task(), f"power off {vm.name}")
            self._wait(vm.ref.Destroy_Task(), f"destroy {vm.name}")

    # ---- contract -------------------------------------------------------------------------------

    def observe(self, desired: DesiredCluster) -> ObservedCluster:
        with self._mapped(f"observe {desired.name}"):
            inv = self._inventory(desired)
        self._refuse_conflicts(desired, inv)
        with_vm = [m for m in self.hosts(desired) if m.name in inv.mine and inv.mine[m.name].power == "poweredOn"]
        obs = self.observe_hosts(desired, hosts=with_vm)
        vms_ok = all(m.name in inv.mine and inv.mine[m.name].power == "poweredOn"
                     and inv.mine[m.name].values.get(OWNER_KEY) == OWNER_VALUE for m in desired.machines)
        in_flight = list(obs.in_flight) + [f"{desired.name}: operation on VM {n}" for n in inv.mine
                                           if _vm_locked(f"{desired.name}-{n}")]
        return obs.model_copy(update={"infrastructure": obs.infrastructure and vms_ok, "in_flight": in_flight})

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
            with self._mapped(f"{step.action} {step.object}"):
                return self._apply(desired, step)

    def _apply(self, desired: DesiredCluster, step: Step) -> StepResult:
        a = step.action
        inv = self._inventory(desired, create=a in ("infrastructure.ensure", "nodePool.create", "nodePool.scale",
                                                    "nodePool.update"))
        self._refuse_conflicts(desired, inv)
        if a == "infrastructure.ensure":
            changed = [m.name for m in desired.machines if self._ensure_vm(desired, m, inv)]
            r = self._run("prepare.yml", desired, limit=list(desired.machines))
            return StepResult(step.id, changed=bool(changed) or r.changed,
                              detail=f"VMs changed: {', '.join(changed) or 'none'}; hosts prepared"
                                     + (" (changes)" if r.changed else " (no changes)"))
        if a in ("nodePool.create", "nodePool.scale", "nodePool.update"):
            pool = step.object
            changed = [m.name for m in self.workers(desired, pool) if self._ensure_vm(desired, m, inv)]
            if a == "nodePool.update":
                return StepResult(step.id, changed=bool(changed), detail=f"reconfigured: {', '.join(changed) or 'none'}")
            res = self.apply_hosts(desired, step)  # join; scale down resets the hosts no longer wanted
            gone = [vm for vm in self._inventory(desired).extras if vm.values.get(POOL_KEY) == pool]
            for vm in gone:
                self._destroy_vm(desired, vm)
            return StepResult(step.id, changed=bool(changed or gone) or res.changed,
                              detail=f"{res.detail}; VMs made/changed: {', '.join(changed) or 'none'}; "
                                     f"VMs removed: {', '.join(v.name for v in gone) or 'none'}")
        if a == "nodePool.delete":
            res = self.apply_hosts(desired, step)
            gone = [vm for vm in self._inventory(desired).extras if vm.values.get(POOL_KEY) == step.object]
            for vm in gone:
                self._destroy_vm(desired, vm)
            return StepResult(step.id, changed=res.changed or bool(gone), detail=f"removed {len(gone)} VMs")
        return self.apply_hosts(desired, step)

    def delete(self, desired: DesiredCluster) -> StepResult:
        with ansible.guard(desired.name, "delete"):
            with self._mapped(f"delete {desired.name}"):
                inv = self._inventory(desired)
                running = [vm.machine() for vm in inv.mine.values() if vm.power == "poweredOn"]
                hosts = [m for m in running if m is not None]
                r = self.reset_all(desired, hosts)  # stop Kubernetes on the hosts (their disks go with the VMs)
                for vm in sorted(inv.mine.values(), key=lambda v: v.name):
                    self._destroy_vm(desired, vm)
                folder_gone = False
                if inv.folder is not None and inv.folder_ours and not list(inv.folder.childEntity):
                    from pyVim.task import WaitForTask

                    WaitForTask(inv.folder.Destroy_Task())
                    folder_gone = True
                self._extras.pop(desired.name, None)
        n = len(inv.mine)
        return StepResult(f"{desired.name}/delete", changed=bool(n) or r.changed or folder_gone,
                          detail=f"destroyed {n} VMs" + (" and the cluster's folder" if folder_gone else ""))

    def kube_access(self, desired: DesiredCluster) -> KubeAccess:
        return self.kube_access_hosts(desired)
