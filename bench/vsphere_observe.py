"""vSphere observation cost against vcsim: one ``observe`` per cluster vs one ``observe_many`` for the shard.

Starts a private vcsim (no fixed addresses, no SSH hosts), makes N clusters of 2 VMs each in
fleetwright's folder (marked as the backend marks them, powered off so no Ansible runs: this is
the vSphere part of an observation only), then measures, best of 3:

* ``observe`` of every cluster, a new backend per call as the tasks make them (one shared session);
* ``observe_many`` of all of them (one PropertyCollector query);
* a vCenter login (what every call cost before sessions were shared).

Writes the "vSphere observation" section of bench/RESULTS.md with ``--record``.

    python bench/vsphere_observe.py [--clusters 100] [--record]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backends.base import CLUSTER_KEY, OWNER_KEY, OWNER_VALUE  # noqa: E402
from backends.connections import Connections, VsphereConnection  # noqa: E402
from backends.definitions import read_tree  # noqa: E402
from backends.vsphere import POOL_KEY, VsphereBackend  # noqa: E402
from backends.vsphere.vms import field_keys  # noqa: E402
from models.load import load  # noqa: E402
from models.resolve import resolve_all  # noqa: E402
from testenv import vcsim  # noqa: E402
from testenv.common import Config  # noqa: E402

EXAMPLES = ROOT / "examples" / "fleet"
CLUSTER_DOC = """apiVersion: fleetwright.io/v1alpha1
kind: Cluster
metadata: {{name: bench-{i:04d}, labels: {{env: dev}}}}
spec:
  model: edge-small@1.0.0
  driftMode: report
  owner: payments
  variables: {{environment: dev}}
  backend:
    type: vsphere
    datacenter: DC0
    cluster: DC0_C0
    datastore: LocalDS_0
    template: fw-ubuntu-template
    network: VM Network
    ipPool: {{start: 10.{a}.{b}.10, end: 10.{a}.{b}.20}}
"""


def desireds(n: int):
    files = {k.replace(str(EXAMPLES) + "/", ""): v for k, v in read_tree(EXAMPLES).items()}
    files["clusters/bench.yaml"] = "---\n".join(CLUSTER_DOC.format(i=i, a=i // 250, b=i % 250) for i in range(n))
    return [d for name, d in sorted(resolve_all(load(files)).items()) if name.startswith("bench-")]


def make_vms(section, ds) -> None:
    from pyVim.connect import Disconnect
    from pyVim.task import WaitForTask
    from pyVmomi import vim

    si = vcsim.connect(section)
    try:
        c = si.RetrieveContent()
        keys = field_keys(c, create=True)
        cfm = c.customFieldsManager
        top = c.searchIndex.FindByInventoryPath(f"{section['datacenter']}/vm/{section['folder']}")
        tpl = c.searchIndex.FindByInventoryPath(section["template_path"])
        cl = c.searchIndex.FindByInventoryPath(f"{section['datacenter']}/host/{section['cluster']}")
        store = next(x for x in cl.datastore if x.name == section["datastore"])
        for d in ds:
            f = top.CreateFolder(d.name)
            cfm.SetField(entity=f, key=keys[(OWNER_KEY, "Folder")], value=OWNER_VALUE)
            cfm.SetField(entity=f, key=keys[(CLUSTER_KEY, "Folder")], value=d.name)
            for m in d.machines:
                task = tpl.CloneVM_Task(folder=f, name=m.name, spec=vim.vm.CloneSpec(
                    location=vim.vm.RelocateSpec(pool=cl.resourcePool, datastore=store), powerOn=False))
                WaitForTask(task)
                vm = task.info.result
                for k, v in ((OWNER_KEY, OWNER_VALUE), (CLUSTER_KEY, d.name)) + (((POOL_KEY, m.pool),) if m.pool else ()):
                    cfm.SetField(entity=vm, key=keys[(k, "VirtualMachine")], value=v)
    finally:
        Disconnect(si)


def best(fn, runs: int = 3) -> float:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clusters", type=int, default=100)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fw-bench-vsphere-") as tmp:
        cfg = Config(state_dir=Path(tmp) / "state")
        section = vcsim.up(cfg)
        try:
            ds = desireds(args.clusters)
            t = time.perf_counter()
            make_vms(section, ds)
            made = time.perf_counter() - t
            conn = Connections(vsphere=VsphereConnection(host=section["host"], port=section["port"],
                                                         user=section["user"], password=section["password"],
                                                         insecure=True))
            VsphereBackend(conn).observe(ds[0])  # log in once
            each = best(lambda: [VsphereBackend(conn).observe(d) for d in ds])
            many = best(lambda: VsphereBackend(conn).observe_many(ds))
            one = VsphereBackend(conn).observe_many(ds)
            assert all(not isinstance(o, Exception) and not o.infrastructure for o in one.values()), one
            from pyVim.connect import Disconnect

            login = best(lambda: Disconnect(vcsim.connect(section)))
        finally:
            vcsim.down(cfg)
    n, vms = len(ds), sum(len(d.machines) for d in ds)
    lines = [f"Measured by `python bench/vsphere_observe.py --clusters {n}` on 2 cores against vcsim 0.24 "
             f"({time.strftime('%Y-%m-%d')}), best of 3: the vSphere part of an observation ({vms} powered-off VMs "
             "in fleetwright's folder, no Ansible).", "",
             "| way | seconds | per cluster ms |", "|---|---:|---:|",
             f"| `observe` per cluster (a backend per call, shared session) | {each:.2f} | {each / n * 1000:.1f} |",
             f"| `observe_many` for all (one PropertyCollector query) | {many:.2f} | {many / n * 1000:.1f} |",
             f"| one vCenter login + logout (paid per call before sessions were shared) | {login:.3f} | - |", "",
             f"observe_many is {each / many:.1f}x faster than one observe per cluster at {n} clusters "
             f"(making the {vms} VMs took {made:.0f} s).", ""]
    print("\n".join(lines))
    if args.record:
        from fleetwright.results import write_section

        write_section("vSphere observation", lines)
    print(f"vsphere_observe: clusters={n} each={each:.2f} many={many:.2f} ratio={each / many:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
