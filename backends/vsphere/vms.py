"""Finding fleetwright's VMs: one PropertyCollector query over fleetwright's folders, marks, locks.

``list_scopes`` reads every VM and folder under one or more *scopes* (a datacenter's
``vm/<backend.folder>`` folder, where all of fleetwright's cluster folders live) with ONE
``RetrieveContents`` call: one ContainerView per scope, all in one filter. That is the batched
observation of a shard (#13): before, each cluster's observation walked every VM of the
datacenter. ``cluster_inventory`` then sorts one cluster's VMs out of a scope's listing by the
ownership marks (custom attributes) and the cluster's own folder.

Names are looked for inside fleetwright's folder tree only: VM names are unique per folder in
vCenter, fleetwright clones only into ``<folder>/<cluster>``, so a same-named VM elsewhere in the
datacenter never collides with ours (and is never touched).
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

from models.desired import DesiredCluster, Machine
from models.errors import InFlight, PermanentError

from ..base import CLUSTER_KEY, OWNER_KEY, OWNER_VALUE

POOL_KEY = "fleetwright.io/pool"
ADDRESS_KEY = "fleetwright.io/address"  # the VM's address, allocated once (see addresses.py)
GI = "guestinfo.fleetwright."
VM_FIELDS = (OWNER_KEY, CLUSTER_KEY, POOL_KEY, ADDRESS_KEY)
FOLDER_FIELDS = (OWNER_KEY, CLUSTER_KEY)
_VM_PROPS = ["name", "customValue", "parent", "runtime.powerState", "config.hardware.numCPU",
             "config.hardware.memoryMB", "config.extraConfig", "config.template"]
_FOLDER_PROPS = ["name", "customValue", "parent"]


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

    @property
    def address(self) -> str | None:
        """The address recorded on the VM (attribute; guestinfo for VMs made before the attribute)."""
        return self.values.get(ADDRESS_KEY) or self.extra.get(GI + "address") or None

    def machine(self) -> Machine | None:
        role = self.extra.get(GI + "role")
        if not self.address or role not in ("controlPlane", "worker"):
            return None
        return Machine(name=self.name, role=role, pool=self.values.get(POOL_KEY) or None, address=self.address,
                       cpu=self.cpu, memory_mib=self.memory_mib)


@dataclass
class FolderInfo:
    ref: Any
    name: str
    parent: str | None  # moid
    values: dict[str, str]


@dataclass
class Listing:
    """Every VM and folder under one scope folder (None: the scope folder does not exist)."""

    root: Any | None
    vms: list[Vm] = field(default_factory=list)
    folders: dict[str, FolderInfo] = field(default_factory=dict)  # moid -> folder


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

    def recorded(self) -> dict[str, str]:
        """VM name -> the address it records, for every VM of the cluster (wanted or not)."""
        return {n: vm.address for n, vm in self.mine.items() if vm.address}


def mo_type(t: Any) -> str:
    """``VirtualMachine`` for ``vim.VirtualMachine`` (the managed-object type of a field definition)."""
    return t.__name__.rsplit(".", 1)[-1] if t is not None else ""


def moid(obj: Any) -> str | None:
    return getattr(obj, "_moId", None)


# --------------------------------------------------------------------------- in-flight locks


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


def vm_locked(key: str) -> bool:
    with _vm_guard_lock:
        return key in _vm_busy


# --------------------------------------------------------------------------- custom attributes, folders


def field_keys(content, create: bool) -> dict[tuple[str, str], int]:
    """(attribute name, managed-object type) -> field key; our definitions made if ``create``."""
    from pyVmomi import vim

    cfm = content.customFieldsManager
    keys = {(f.name, mo_type(f.managedObjectType)): f.key for f in cfm.field or []}
    if create:
        for mo, names in ((vim.VirtualMachine, VM_FIELDS), (vim.Folder, FOLDER_FIELDS)):
            for n in names:
                if (n, mo_type(mo)) not in keys:
                    try:
                        keys[(n, mo_type(mo))] = cfm.AddCustomFieldDef(name=n, moType=mo).key
                    except vim.fault.DuplicateName:  # made meanwhile by someone else
                        keys = {(f.name, mo_type(f.managedObjectType)): f.key for f in cfm.field or []}
    return keys


def find_dc(content, datacenter: str):
    dc = content.searchIndex.FindByInventoryPath(datacenter)
    if dc is None:
        raise PermanentError(f"vSphere datacenter {datacenter!r} not found")
    return dc


def scope_path(desired: DesiredCluster) -> str:
    """The inventory path of fleetwright's folder for this cluster's datacenter: ``<dc>/vm/<folder>``."""
    b = desired.backend
    return "/".join([b.datacenter, "vm"] + [p for p in b.folder.split("/") if p])


def folder_parts(desired: DesiredCluster) -> list[str]:
    return [p for p in desired.backend.folder.split("/") if p] + [desired.name]


def ensure_folder(content, desired: DesiredCluster, keys, log) -> Any:
    """The cluster's folder ``<folder>/<cluster>``, made and marked where missing."""
    from pyVmomi import vim

    b = desired.backend
    parent = find_dc(content, b.datacenter).vmFolder
    path = f"{b.datacenter}/vm"
    parts = folder_parts(desired)
    cfm = content.customFieldsManager
    for i, part in enumerate(parts):
        path += "/" + part
        f = content.searchIndex.FindByInventoryPath(path)
        if f is None:
            try:
                f = parent.CreateFolder(part)
            except vim.fault.DuplicateName:
                f = content.searchIndex.FindByInventoryPath(path)
            cfm.SetField(entity=f, key=keys[(OWNER_KEY, "Folder")], value=OWNER_VALUE)
            if i == len(parts) - 1:
                cfm.SetField(entity=f, key=keys[(CLUSTER_KEY, "Folder")], value=desired.name)
            log(f"[{desired.name}] vsphere: made folder {path}")
        parent = f
    return parent


# --------------------------------------------------------------------------- the batched listing


def list_scopes(content, paths: list[str], keys: dict[tuple[str, str], int]) -> dict[str, Listing]:
    """Every VM and folder under each scope folder (inventory path), in ONE PropertyCollector call."""
    from pyVmomi import vim, vmodl

    vm_names = {k: n for (n, mo), k in keys.items() if mo == "VirtualMachine"}
    folder_names = {k: n for (n, mo), k in keys.items() if mo == "Folder"}
    out: dict[str, Listing] = {}
    roots: dict[str, str] = {}  # root moid -> path
    for path in dict.fromkeys(paths):
        root = content.searchIndex.FindByInventoryPath(path)
        out[path] = Listing(root=root)
        if root is not None:
            roots[moid(root)] = path
    if not roots:
        return out
    pc = vmodl.query.PropertyCollector
    views = [content.viewManager.CreateContainerView(out[p].root, [vim.VirtualMachine, vim.Folder], True)
             for p in roots.values()]
    try:
        spec = pc.FilterSpec(
            objectSet=[pc.ObjectSpec(obj=v, skip=True, selectSet=[
                pc.TraversalSpec(name=f"v{i}", path="view", skip=False, type=vim.view.ContainerView)])
                for i, v in enumerate(views)],
            propSet=[pc.PropertySpec(type=vim.VirtualMachine, pathSet=_VM_PROPS),
                     pc.PropertySpec(type=vim.Folder, pathSet=_FOLDER_PROPS)])
        result = content.propertyCollector.RetrieveContents([spec]) or []
    finally:
        for v in views:
            v.Destroy()
    folders: dict[str, FolderInfo] = {}
    vms: list[Vm] = []
    for oc in result:
        p = {prop.name: prop.val for prop in oc.propSet}
        if isinstance(oc.obj, vim.Folder):
            folders[moid(oc.obj)] = FolderInfo(
                ref=oc.obj, name=p.get("name", ""), parent=moid(p.get("parent")),
                values={folder_names[cv.key]: cv.value for cv in (p.get("customValue") or []) if cv.key in folder_names})
            continue
        values = {vm_names[cv.key]: cv.value for cv in (p.get("customValue") or []) if cv.key in vm_names}
        extra = {o.key: str(o.value) for o in (p.get("config.extraConfig") or []) if o.key.startswith("guestinfo.")}
        vms.append(Vm(ref=oc.obj, name=p.get("name", ""), values=values, parent=p.get("parent"),
                      power=str(p.get("runtime.powerState", "")), cpu=p.get("config.hardware.numCPU"),
                      memory_mib=p.get("config.hardware.memoryMB"), extra=extra,
                      template=bool(p.get("config.template"))))

    def scope_of(folder_id: str | None) -> str | None:
        seen = set()
        while folder_id is not None and folder_id not in seen:
            if folder_id in roots:
                return roots[folder_id]
            seen.add(folder_id)
            f = folders.get(folder_id)
            folder_id = f.parent if f is not None else None
        return None

    for fid, f in folders.items():
        s = scope_of(f.parent)
        if s is not None:
            out[s].folders[fid] = f
    for vm in vms:
        s = scope_of(moid(vm.parent))
        if s is not None:
            out[s].vms.append(vm)
    return out


def cluster_inventory(desired: DesiredCluster, listing: Listing, content, dc) -> Inventory:
    """One cluster's VMs out of its scope's listing: ours (marked, or unmarked in our marked folder), conflicts, extras."""
    folder = next((f for f in listing.folders.values()
                   if f.name == desired.name and f.parent == moid(listing.root)), None)
    inv = Inventory(content=content, dc=dc, folder=folder.ref if folder else None, vms=listing.vms)
    if folder is not None:
        inv.folder_ours = folder.values.get(OWNER_KEY) == OWNER_VALUE and folder.values.get(CLUSTER_KEY) == desired.name
    fid = moid(inv.folder) if inv.folder is not None and inv.folder_ours else None
    for vm in listing.vms:
        marked = vm.values.get(OWNER_KEY) == OWNER_VALUE and vm.values.get(CLUSTER_KEY) == desired.name
        # an unmarked VM inside our marked folder: our clone, interrupted before it was marked
        adopted = fid is not None and moid(vm.parent) == fid and not vm.values.get(OWNER_KEY) and not vm.template
        if marked or adopted:
            if vm.name in inv.mine:
                raise PermanentError(f"two VMs of cluster {desired.name} are named {vm.name!r}; "
                                     f"remove one by hand ({moid(vm.ref)}, {moid(inv.mine[vm.name].ref)})")
            inv.mine[vm.name] = vm
    wanted = {m.name for m in desired.machines}
    for vm in listing.vms:
        if vm.name in wanted and vm.name not in inv.mine:
            inv.conflicts.setdefault(vm.name, vm)
    inv.extras = [vm for n, vm in sorted(inv.mine.items()) if n not in wanted]
    return inv
