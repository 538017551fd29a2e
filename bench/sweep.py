"""Benchmark of the fleet sweep on the production topology, against its lower bound.

For each fleet size (200, 2,000 and 10,000 generated clusters by default; 5 % drift; every
cluster in ``correct`` mode) it starts a Prefect server on PostgreSQL (the test environment's
``postgres`` part) with 3 process workers, deploys every flow from prefect.yaml, and runs the
real ``reconcile-fleet`` deployment, which shards the fleet over ``reconcile-shard`` runs.
The clusters' backends are the simulated one (``bench/simbackend.py``, a backend plugin:
50 ms per API call, 3 infrastructure + 3 in-cluster calls per observation, through the real
API limits).

Lower bound = max over APIs of (calls to that API x latency / the API's allowed concurrency):
no sweep that honours the limits can be faster. Recorded: wall time (submission to final
state) against the bound, Prefect flow and task run counts, peak RSS of each worker (with the
flow-run processes it started) and of the server, and how long the server takes after the run
ends until its event count stops growing (the drain), plus events lost (task runs completed
without a ``prefect.task-run.Completed`` event).

Writes the "Sweep" section of bench/RESULTS.md; the last lines printed are
``sweep: clusters=N seconds=S bound=B ratio=R worker_rss_mb=M``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the fleet's API limits in the benchmark: concurrency per API (rates high enough not to bind)
LIMITS = {"aws": 5, "vsphere": 5, "metal": 5, "kubernetes": 15}


def generate_fleet(n: int, out: Path) -> None:
    from bench.core import generate

    shutil.rmtree(out, ignore_errors=True)
    generate(n, out)
    for f in (out / "clusters").glob("*.yaml"):  # correct mode everywhere: drift is repaired
        f.write_text(f.read_text().replace("driftMode: report", "driftMode: correct"))


def _post(api: str, path: str, body: dict) -> dict | int:
    req = urllib.request.Request(f"{api}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


def event_count(api: str, since: str) -> int:
    r = _post(api, "/events/count-by/event", {"filter": {"occurred": {"since": since}}})
    return sum(x["count"] for x in r)


def event_counts(api: str, since: str) -> dict[str, int]:
    r = _post(api, "/events/count-by/event", {"filter": {"occurred": {"since": since}}})
    return {x["value"]: x["count"] for x in r}


def _wait_final(run_id, timeout: float):
    """Poll the run until it is final; a busy server's 5xx answers are waited out, not fatal."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as c:
        while time.monotonic() < deadline:
            try:
                fr = c.read_flow_run(run_id)
                if fr.state and fr.state.is_final():
                    return fr
            except Exception as e:  # noqa: BLE001
                print(f"  (server busy: {type(e).__name__}; polling again)", flush=True)
            time.sleep(1.0)
    raise TimeoutError(f"flow run {run_id} not final after {timeout:.0f}s")


def cpu_seconds(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        f = stat[stat.rfind(")") + 2:].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def load_average() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def run_timeline(fleet, shards: list) -> dict:
    """Seconds from the fleet run's creation: when it started, when its shards were created, started, ended."""
    t0 = fleet.created

    def rel(t):
        return round((t - t0).total_seconds(), 1) if t else None

    return {"fleet_start": rel(fleet.start_time), "fleet_end": rel(fleet.end_time),
            "shards": [{"created": rel(s.created), "start": rel(s.start_time), "end": rel(s.end_time),
                        "state": s.state.name if s.state else None} for s in sorted(shards, key=lambda s: s.created)]}


def read_shards(parent_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as c:
        return c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["reconcile-shard"])),
                                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(
                                    any_=[parent_id])))


class Sampler(threading.Thread):
    """Samples RSS every second: each worker with the flow-run processes it started; the server."""

    def __init__(self, stack):
        super().__init__(daemon=True)
        self.stack, self.stop_flag = stack, threading.Event()
        self.peak: dict[str, float] = {}
        self.peak_run = 0.0
        self.cpu: dict[int, float] = {}  # last CPU seconds seen of every flow-run process

    def run(self) -> None:
        from testenv.common import read_pid
        from testenv.prefect_stack import _children, rss_mb

        while not self.stop_flag.is_set():
            spid = read_pid(self.stack.server_name, self.stack.cfg)
            if spid:
                v = rss_mb(spid) + sum(rss_mb(c) for c in _children(spid))
                self.peak["server"] = max(self.peak.get("server", 0.0), v)
            for i, wpid in self.stack.worker_pids().items():
                kids = _children(wpid)
                runs = [rss_mb(c) for c in kids]
                for c in kids:
                    self.cpu[c] = max(self.cpu.get(c, 0.0), cpu_seconds(c))
                total = rss_mb(wpid) + sum(runs)
                self.peak[f"worker-{i}"] = max(self.peak.get(f"worker-{i}", 0.0), total)
                self.peak_run = max([self.peak_run, *runs])
            self.stop_flag.wait(1.0)


def run_size(n: int, args, cfg) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from testenv.prefect_stack import Stack

    work = cfg.state_dir / f"sweep-{n}"
    defs, sim = work / "defs", work / "sim"
    shutil.rmtree(work, ignore_errors=True)
    generate_fleet(n, defs)
    sim.mkdir(parents=True)
    limits = ",".join(f"{k}={v}:10000" for k, v in LIMITS.items())
    env = {"FLEETWRIGHT_BACKEND_PLUGINS": "bench.simbackend", "FLEETWRIGHT_SIM_STATE": str(sim),
           "FLEETWRIGHT_SIM_LATENCY_MS": str(args.latency_ms), "FLEETWRIGHT_SIM_DRIFT": str(args.drift),
           "FLEETWRIGHT_SIM_INFRA_CALLS": "3", "FLEETWRIGHT_SIM_KUBE_CALLS": "3",
           "FLEETWRIGHT_DEFINITIONS": str(defs), "FLEETWRIGHT_USE_BLOCKS": "0", "FLEETWRIGHT_API_LIMITS": limits,
           "FLEETWRIGHT_RETRY_BASE_SECONDS": "0.5"}
    stack = Stack(cfg, f"bench{n}", workers=args.workers, worker_limit=args.worker_limit, env=env)
    print(f"[sweep {n}] starting Prefect on PostgreSQL with {args.workers} workers", flush=True)
    stack.start()
    os.environ["PREFECT_API_URL"] = stack.api
    sampler = Sampler(stack)
    try:
        with temporary_settings(updates={PREFECT_API_URL: stack.api}):
            params = {k: v for k, v in (("shard_size", args.shard_size), ("parallel_shards", args.parallel),
                                        ("batch_size", args.batch_size), ("max_workers", args.threads))
                      if v is not None}  # otherwise the deployment's defaults: what a scheduled sweep does
            time.sleep(5)  # let every worker poll once
            load_before = load_average()
            since = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - 5))
            sampler.start()
            t0 = time.monotonic()
            fr = run_deployment("reconcile-fleet/reconcile-fleet", timeout=0, parameters=params)
            fr = _wait_final(fr.id, 7200)
            seconds = time.monotonic() - t0
            ended = time.monotonic()
            load_after = load_average()
            print(f"[sweep {n}] {fr.state.type.value}/{fr.state.name} in {seconds:.1f}s: {fr.state.message}", flush=True)
            # drain: until the server's event count stops growing (3 equal reads 1 s apart)
            last, same = -1, 0
            while same < 3 and time.monotonic() - ended < 600:
                c = event_count(stack.api, since)
                same = same + 1 if c == last else 0
                last = c
                time.sleep(1.0)
            drain = max(0.0, time.monotonic() - ended - 3.0)
            sampler.stop_flag.set()
            with get_client(sync_client=True) as c:
                final = c.read_flow_run(fr.id)
            shards = read_shards(fr.id)
            timeline = run_timeline(final, shards)
            flow_runs = _post(stack.api, "/flow_runs/count", {})
            task_runs = _post(stack.api, "/task_runs/count", {})
            completed_tasks = _post(stack.api, "/task_runs/count",
                                    {"task_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}})
            counts = event_counts(stack.api, since)
    finally:
        sampler.stop_flag.set()
        stack.stop()
    calls = sum(int(x) for f in sim.glob("calls-*") for x in f.read_text().split())
    # per API: infrastructure calls go to the cluster's backend type (a third each), in-cluster to kubernetes
    per_api = _calls_per_api(defs, sim, calls)
    bound = max([per_api[a] * args.latency_ms / 1000.0 / LIMITS[a] for a in per_api] + [0.001])
    corrected = len(list((sim / "corrected").iterdir()))
    worker_peaks = {k: v for k, v in sampler.peak.items() if k.startswith("worker")}
    out = {"clusters": n, "seconds": round(seconds, 1), "bound": round(bound, 1), "ratio": round(seconds / bound, 2),
           "state": f"{final.state.type.value}/{final.state.name}", "message": (final.state.message or "")[:200],
           "calls": calls, "calls_per_api": per_api, "corrected": corrected,
           "run_seconds": round(final.total_run_time.total_seconds(), 1) if final.total_run_time else None,
           "flow_runs": flow_runs, "task_runs": task_runs, "shards": len(shards),
           "load": f"{load_before} -> {load_after}", "timeline": timeline,
           "run_cpu_seconds": round(sum(sampler.cpu.values()), 1), "worker_rss_mb": round(max(worker_peaks.values() or [0])),
           "worker_peaks_mb": {k: round(v) for k, v in worker_peaks.items()}, "largest_run_mb": round(sampler.peak_run),
           "server_rss_mb": round(sampler.peak.get("server", 0)), "drain_seconds": round(drain, 1),
           "events": sum(counts.values()),
           "task_completed_events": counts.get("prefect.task-run.Completed", 0), "tasks_completed": completed_tasks}
    print(f"[sweep {n}] {json.dumps(out)}", flush=True)
    return out


def _calls_per_api(defs: Path, sim: Path, total: int) -> dict[str, int]:
    """Split the measured calls by API the way the simulated backend charges them (3 infra : 3 in-cluster)."""
    import collections

    types = collections.Counter()
    for f in (defs / "clusters").glob("*.yaml"):
        t = f.read_text()
        types["aws" if "type: aws" in t else "vsphere" if "type: vsphere" in t else "metal"] += 1
    n = sum(types.values())
    infra = total / 2
    out = {k: round(infra * v / n) for k, v in types.items()}
    out["kubernetes"] = round(total / 2)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="200,2000,10000")
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--drift", type=float, default=0.05)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--worker-limit", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=None, help="default: the deployment's")
    ap.add_argument("--threads", type=int, default=None, help="max_workers; default: the deployment's")
    ap.add_argument("--shard-size", type=int, default=None, help="default: the deployment's (auto)")
    ap.add_argument("--parallel", type=int, default=None, help="parallel_shards; default: the deployment's (auto)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    from testenv.common import Config

    # the project's own modules as an installed worker has them, compiled (as `make setup` compiles the venv's):
    # Python writes them on first import, except under PYTHONDONTWRITEBYTECODE, which a shell may set
    import compileall

    for pkg in ("flows", "tasks", "models", "backends", "fleetwright", "bench", "testenv"):
        compileall.compile_dir(str(ROOT / pkg), quiet=1)
    cfg = Config(state_dir=Path(os.environ.get("FLEETWRIGHT_TESTENV_DIR", "/tmp/fleetwright-bench-sweep")))
    results = []
    for s in args.sizes.split(","):
        results.append(run_size(int(s), args, cfg))
        if not args.no_record:  # after every size: a later one that fails keeps the earlier figures
            record(results, args)
    from testenv import postgres

    postgres.down(cfg)
    for r in results:
        print(f"sweep: clusters={r['clusters']} seconds={r['seconds']} bound={r['bound']} ratio={r['ratio']} "
              f"worker_rss_mb={r['worker_rss_mb']}")
    return 0


def _params(args) -> str:
    p = {"shard_size": args.shard_size, "parallel_shards": args.parallel, "batch_size": args.batch_size,
         "max_workers": args.threads}
    return ", ".join(f"`{k}={v}`" for k, v in p.items() if v is not None)


def _span(xs: list) -> list:
    xs = [x for x in xs if x is not None]
    return sorted({min(xs), max(xs)}) if xs else []


def record(results: list[dict], args) -> None:
    from fleetwright.results import write_section

    lines = [f"Measured by `python bench/sweep.py` on {os.cpu_count()} cores (shared with other work), "
             f"{time.strftime('%Y-%m-%d')}: Prefect server on PostgreSQL (testenv `postgres`), {args.workers} process "
             f"workers (`--limit {args.worker_limit}`), the real `reconcile-fleet` deployment with "
             f"{_params(args) or 'the parameters a scheduled sweep uses (its defaults)'}, sharded over "
             f"`reconcile-shard` runs as it decides; simulated backend (bench/simbackend.py) at {args.latency_ms:.0f} ms per API call, "
             f"3 infrastructure + 3 in-cluster calls per observation, {args.drift:.0%} drift, correct mode. "
             f"API concurrency allowed: {', '.join(f'{k} {v}' for k, v in LIMITS.items())}. "
             "Bound = max over APIs of calls x latency / allowed concurrency. Wall = submission to final state. "
             "RSS: peak of each worker plus the flow-run processes it started; server with its children. "
             "Drain: from the end of the run until the server's event count stops growing. "
             "Timeline columns: seconds from the fleet run's creation (first-last shard). Flow-run CPU: "
             "user+system seconds of every flow-run process (fleet run and shards). Load: the 1/5/15-minute "
             "load average just before submission and at the end.", "",
             "| clusters | load before -> after | state | wall s | bound s | ratio | API calls | corrected | shards | "
             "fleet run started s | shards started s | shards ended s | flow-run CPU s | flow runs | task runs | "
             "worker peak RSS MB | largest run MB | server RSS MB | drain s | events | task Completed events / tasks |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        tl = r["timeline"]
        starts = "-".join(f"{x}" for x in _span([s["start"] for s in tl["shards"]])) or "-"
        ends = "-".join(f"{x}" for x in _span([s["end"] for s in tl["shards"]])) or "-"
        lines.append(f"| {r['clusters']} | {r['load']} | {r['state']} | {r['seconds']} | {r['bound']} | {r['ratio']} | "
                     f"{r['calls']} | {r['corrected']} | {r['shards']} | {tl['fleet_start']} | {starts} | {ends} | "
                     f"{r['run_cpu_seconds']} | {r['flow_runs']} | {r['task_runs']} | {r['worker_rss_mb']} | "
                     f"{r['largest_run_mb']} | {r['server_rss_mb']} | {r['drain_seconds']} | {r['events']} | "
                     f"{r['task_completed_events']} / {r['tasks_completed']} |")
    lines += ["", "Goals: ratio <= 1.5 at 2,000 and <= 2.0 at 10,000; worker RSS <= 1 GB; drain <= 60 s.", ""]
    lines += [f"sweep: clusters={r['clusters']} seconds={r['seconds']} bound={r['bound']} ratio={r['ratio']} "
              f"worker_rss_mb={r['worker_rss_mb']}" for r in results if r["clusters"] in (2000, 10000)]
    write_section("Sweep: reconcile-fleet on PostgreSQL with 3 workers", lines)


if __name__ == "__main__":
    raise SystemExit(main())
