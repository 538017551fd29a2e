"""The real per-cluster observation cost of each backend against the test environment.

bench/sweep.py sweeps simulated clusters whose observation is a fixed number of API calls of a
fixed latency (bench/simbackend.py: 3 infrastructure + 3 in-cluster calls of 50 ms). This bench
measures what the real backends cost per cluster against the test environment's counterparts,
so the simulated figures can be read against real ones: wall time per cluster and API calls per
cluster (counted by a guard on ``backends.base.api_call``, the hook every backend call passes),
one ``observe`` per cluster (a new backend per call, as the tasks make them) and, where the
backend has it, one ``observe_many`` for all of them. Best of 3 runs.

* ``aws``: moto's server (``testenv.aws``), N EKS clusters made through the backend's own
  infrastructure steps (VPC, roles, cluster, node group, add-ons);
* ``kube``: one real kube-apiserver, the in-cluster part (components and workspaces) of the
  example cluster ``dc1-web-dev`` installed, observed N times with its reused client;
* ``metal``: N clusters of 2 SSH hosts each (bare hosts: the cost is the read-only Ansible run);
* ``vsphere``: vcsim, N clusters of 2 powered-off VMs (as bench/vsphere_observe.py).

Every part runs in a private state dir. metal and vsphere bind fixed loopback addresses: run them
under ``flock /tmp/fw-onprem.lock``; a measurement for bench/RESULTS.md under ``flock /tmp/fw-heavy.lock``.

    python bench/observe.py [--backends aws,kube,metal,vsphere] [--clusters 10] [--metal-clusters 5] [--record]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backends.base import KubeAccess, merge_observations, set_api_guard  # noqa: E402
from backends.definitions import read_tree  # noqa: E402
from models.desired import observed_from  # noqa: E402
from models.load import load  # noqa: E402
from models.plan import plan  # noqa: E402
from models.resolve import resolve, resolve_all  # noqa: E402
from tasks.locks import ApiLimiter  # noqa: E402
from testenv.common import Config  # noqa: E402

EXAMPLES = ROOT / "examples" / "fleet"
HEADING = "Real observation cost per cluster"
AWS_DOC = """apiVersion: fleetwright.io/v1alpha1
kind: Cluster
metadata: {{name: obs-{i:03d}, labels: {{env: dev}}}}
spec:
  model: edge-small@1.0.0
  driftMode: report
  owner: payments
  variables: {{environment: dev}}
  backend: {{type: aws, region: eu-west-1, vpc: {{cidr: 10.{i}.0.0/16}}}}
"""
METAL_DOC = """apiVersion: fleetwright.io/v1alpha1
kind: Cluster
metadata: {{name: obs-{i:03d}, labels: {{env: dev}}}}
spec:
  model: edge-small@1.0.0
  driftMode: report
  variables: {{environment: dev}}
  backend:
    type: metal
    hosts:
      - {{name: obs{i:03d}-a, address: 127.0.1.{a}, role: controlPlane}}
      - {{name: obs{i:03d}-b, address: 127.0.1.{b}, role: worker}}
"""
METAL_FIRST = 200  # 127.0.1.200 .. : clear of the test suite's hosts (11.., 101.., 111..)


def files_with(name: str, text: str) -> dict[str, str]:
    files = {k.replace(str(EXAMPLES) + "/", ""): v for k, v in read_tree(EXAMPLES).items()}
    files[f"clusters/{name}.yaml"] = text
    return files


def fleet(doc: str, n: int, **fmt) -> list:
    files = files_with("obs", "---\n".join(doc.format(i=i, **{k: f(i) for k, f in fmt.items()}) for i in range(n)))
    return [d for name, d in sorted(resolve_all(load(files)).items()) if name.startswith("obs-")]


@contextmanager
def counted():
    """Count every backend API call (no limit): ``limiter.calls`` by API."""
    limiter = ApiLimiter({api: (100000, 1e9) for api in ("aws", "vsphere", "metal", "kubernetes")})
    set_api_guard(limiter)
    try:
        yield limiter
    finally:
        set_api_guard(None)


def measure(fn, runs: int = 3) -> tuple[float, dict[str, int]]:
    """Best wall time of ``runs`` calls of ``fn`` and the API calls of one call."""
    times, calls = [], {}
    for _ in range(runs):
        with counted() as c:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        calls = dict(c.calls)
    return min(times), calls


def row(backend: str, way: str, n: int, seconds: float, calls: dict[str, int]) -> dict:
    return {"backend": backend, "way": way, "n": n, "ms": seconds / n * 1000,
            "calls": {k: v / n for k, v in sorted(calls.items())}}


# --------------------------------------------------------------------------- the backends

def bench_aws(tmp: Path, n: int) -> list[dict]:
    from backends.aws import AwsBackend
    from backends.connections import AwsConnection, Connections
    from testenv import aws

    cfg = Config(state_dir=tmp / "aws")
    sec = aws.up(cfg)
    try:
        conn = Connections(aws=AwsConnection(endpoint_url=sec["endpoint_url"], access_key_id=sec["access_key_id"],
                                             secret_access_key=sec["secret_access_key"], wait_seconds=0.1,
                                             timeout_seconds=60))
        ds = fleet(AWS_DOC, n)
        for d in ds:
            b = AwsBackend(conn)
            for _ in range(3):
                steps = [s for s in plan(d, b.observe(d)).steps if s.target == "infrastructure"]
                if not steps:
                    break
                for s in steps:
                    b.apply(d, s)
        assert all(AwsBackend(conn).observe(d).infrastructure for d in ds)
        each = measure(lambda: [AwsBackend(conn).observe(d) for d in ds])
        many = measure(lambda: AwsBackend(conn).observe_many(ds))
        return [row("aws", "observe per cluster", n, *each), row("aws", "observe_many", n, *many)]
    finally:
        aws.down(cfg)


def bench_kube(tmp: Path, n: int) -> list[dict]:
    from backends.kube import KubeBackend
    from testenv import kube

    cfg = Config(state_dir=tmp / "kube")
    try:
        cp = kube.ensure_control_plane(cfg, "obs")
        d = resolve(load(files_with("none", "")), "dc1-web-dev")
        b = KubeBackend(KubeAccess(server=cp["server"], token=cp["token"], ca_file=cp["ca_file"]))
        infra = observed_from(d)
        infra = infra.model_copy(update={"components": {k: v for k, v in infra.components.items()
                                                        if v.target == "infrastructure"}, "workspaces": {}})
        for _ in range(3):
            steps = plan(d, merge_observations(infra, b.observe(d))).steps
            if not steps:
                break
            for s in steps:
                b.apply(d, s)
        assert not plan(d, merge_observations(infra, b.observe(d))).steps
        each = measure(lambda: [b.observe(d) for _ in range(n)])
        b.close()
        return [row("kube", "observe (in-cluster, client reused)", n, *each)]
    finally:
        kube.down(cfg)


def bench_metal(tmp: Path, n: int) -> list[dict]:
    from backends.connections import Connections, SshConnection
    from backends.metal import MetalBackend
    from testenv import hosts, kube

    cfg = Config(state_dir=tmp / "metal")
    section = hosts.up(cfg, n=0)
    try:
        ds = fleet(METAL_DOC, n, a=lambda i: METAL_FIRST + 2 * i, b=lambda i: METAL_FIRST + 2 * i + 1)
        for d in ds:
            for h in d.backend.hosts:
                hosts.ensure_host(cfg, h.address)
        conn = Connections(ssh=SshConnection(user=section["user"], private_key_file=section["private_key"],
                                             known_hosts_file=section["known_hosts"], supervisor=section["supervisor"]),
                           kube_binaries=kube.binaries(cfg))
        MetalBackend(conn).observe(ds[0])
        each = measure(lambda: [MetalBackend(conn).observe(d) for d in ds])
        many = measure(lambda: MetalBackend(conn).observe_many(ds))
        return [row("metal", "observe per cluster", n, *each), row("metal", "observe_many", n, *many)]
    finally:
        hosts.down(cfg)


def bench_vsphere(tmp: Path, n: int) -> list[dict]:
    from backends.connections import Connections, VsphereConnection
    from backends.vsphere import VsphereBackend
    from bench.vsphere_observe import desireds, make_vms
    from testenv import vcsim

    cfg = Config(state_dir=tmp / "vsphere")
    section = vcsim.up(cfg)
    try:
        ds = desireds(n)
        make_vms(section, ds)
        conn = Connections(vsphere=VsphereConnection(host=section["host"], port=section["port"], user=section["user"],
                                                     password=section["password"], insecure=True))
        VsphereBackend(conn).observe(ds[0])  # log in once (one session per process)
        each = measure(lambda: [VsphereBackend(conn).observe(d) for d in ds])
        many = measure(lambda: VsphereBackend(conn).observe_many(ds))
        return [row("vsphere", "observe per cluster", n, *each), row("vsphere", "observe_many", n, *many)]
    finally:
        vcsim.down(cfg)


BENCHES = {"aws": bench_aws, "kube": bench_kube, "metal": bench_metal, "vsphere": bench_vsphere}


def write_in_place(heading: str, lines: list[str]) -> None:
    """Replace the section in bench/RESULTS.md where it is, else put it before "## Sweep" (whose lines end the file)."""
    path = ROOT / "bench" / "RESULTS.md"
    old = path.read_text()
    block = "\n".join([f"## {heading}", "", *lines]).rstrip() + "\n"
    start = old.find(f"## {heading}")
    if start >= 0:
        end = old.find("\n## ", start + 3)
        new = old[:start] + block + (old[end:] if end >= 0 else "")
    elif (at := old.find("\n## Sweep")) >= 0:
        new = old[:at + 1] + block + "\n" + old[at + 1:]
    else:
        new = old.rstrip() + "\n\n" + block
    path.write_text(new)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="aws,kube,metal,vsphere")
    ap.add_argument("--clusters", type=int, default=10)
    ap.add_argument("--metal-clusters", type=int, default=0, help="metal's own count (each observe is an Ansible run)")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    rows: list[dict] = []
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fw-bench-observe-") as tmp:
        for name in args.backends.split(","):
            t = time.perf_counter()
            try:
                got = BENCHES[name](Path(tmp), args.metal_clusters if name == "metal" and args.metal_clusters
                                    else args.clusters)
            except Exception as e:  # noqa: BLE001 - the other backends are still measured; this one says why not
                print(f"observe: backend={name} failed: {type(e).__name__}: {e}", flush=True)
                got = [{"backend": name, "way": f"not measured: {type(e).__name__}: {str(e)[:120]}", "n": 0,
                        "ms": float("nan"), "calls": {}}]
            rows += got
            for r in got:
                print(f"observe: backend={r['backend']} way={r['way']!r} ms_per_cluster={r['ms']:.1f} "
                      f"calls_per_cluster={r['calls']} (set-up and runs {time.perf_counter() - t:.0f}s)", flush=True)
    load1 = os.getloadavg()
    how = f"--backends {args.backends} --clusters {args.clusters}" + (
        f" --metal-clusters {args.metal_clusters}" if args.metal_clusters else "")
    lines = [f"Measured by `python bench/observe.py {how}` on 2 cores "
             f"({time.strftime('%Y-%m-%d %H:%M')} UTC), best of 3, load average {load0[0]:.1f} at the start and "
             f"{load1[0]:.1f} at the end. Real backends against the test environment (moto's server, a real "
             "kube-apiserver, SSH hosts with Ansible, vcsim): all local, so an API call costs the server's work "
             "only, without a network's latency. API calls are counted where every backend call passes "
             "(`backends.base.api_call`); the sweep benchmark's simulated backend makes 3 + 3 calls of 50 ms.", "",
             "| backend | way | ms per cluster | API calls per cluster |", "|---|---|---:|---|"]
    lines += [f"| {r['backend']} | {r['way']} | {r['ms']:.1f} | "
              f"{', '.join(f'{k} {v:.1f}' for k, v in r['calls'].items()) or '-'} |" for r in rows]
    lines.append("")
    print("\n".join(lines))
    if args.record:
        write_in_place(HEADING, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
