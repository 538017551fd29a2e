"""Benchmark of the pure core: load + resolve + plan over whole generated fleets.

Generates fleets of 2,000 and 10,000 clusters (one file per cluster, plus the
example catalogue of components, models, teams and policy), and times, each
in a fresh process so memory is measured cleanly:

- ``yaml``: a plain libyaml parse of the same files (the floor);
- ``core``: strict load (with every semantic check) + resolve of every
  cluster + a plan per cluster against "nothing exists yet" (the longest
  plan). That every converged cluster plans nothing is checked after the clock.

Writes bench/RESULTS.md (the core section) and prints, last, the line
``core: clusters=2000 seconds=S yaml_seconds=Y ratio=R``.
"""
from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EXAMPLES = ROOT / "examples" / "fleet"

CLUSTER = """apiVersion: fleetwright.io/v1alpha1
kind: Cluster
metadata:
  name: {name}
  labels: {{env: {env}, tier: {tier}, region: {region}}}
spec:
  model: {model}
  driftMode: {drift}
  variables: {variables}
  backend:
{backend}
"""


def generate(n: int, out: Path) -> None:
    rnd = random.Random(n)
    for sub in ("components", "models", "teams"):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for f in (EXAMPLES / sub).glob("*.yaml"):
            (out / sub / f.name).write_text(f.read_text())
    (out / "policy.yaml").write_text((EXAMPLES / "policy.yaml").read_text())
    teams = (out / "teams" / "teams.yaml")
    teams.write_text(teams.read_text().replace("clusters: [ml-train-dev]", "clusters: [c00001]"))
    (out / "clusters").mkdir(exist_ok=True)
    for i in range(n):
        env = rnd.choice(["dev", "staging", "prod"])
        kind = i % 3
        if i == 1:
            model, tier, variables = "ml-gpu@1.0.0", "ml", f"{{environment: {env}, gpuNodes: 2}}"
        elif kind == 2:
            model, tier, variables = "edge-small@1.0.0", "edge", f"{{environment: {env}}}"
        else:
            model = rnd.choice(["web-standard@1.0.0", "web-standard@2.0.0"])
            tier, variables = "web", f"{{environment: {env}, workers: {rnd.randint(1, 10)}}}"
        if kind == 0 or i == 1:
            backend = f"    type: aws\n    region: eu-west-1\n    vpc: {{cidr: 10.{i % 250}.0.0/16}}"
        elif kind == 1:
            base = 10 + (i % 200)
            backend = ("    type: vsphere\n    datacenter: DC0\n    cluster: DC0_C0\n    datastore: LocalDS_0\n"
                       "    template: fw-ubuntu-template\n    network: VM Network\n"
                       f"    ipPool: {{start: 10.{base}.{i % 250}.10, end: 10.{base}.{i % 250}.60}}")
        else:
            a, b = divmod(i, 250)
            backend = ("    type: metal\n    hosts:\n"
                       f"      - {{name: h{i}a, address: 172.16.{a % 250}.{b}, role: controlPlane}}\n"
                       f"      - {{name: h{i}b, address: 172.17.{a % 250}.{b}, role: worker}}")
        text = CLUSTER.format(name=f"c{i:05d}", env=env, tier=tier, region=rnd.choice(["eu", "us", "ap"]),
                              model=model, drift=rnd.choice(["report", "correct"]), variables=variables, backend=backend)
        (out / "clusters" / f"c{i:05d}.yaml").write_text(text)


def measure(mode: str, path: str) -> dict:
    """Runs in a child process: one measurement, printed as JSON."""
    from backends.definitions import read_tree

    files = read_tree(path)  # file reading is excluded from both timings
    t0 = time.perf_counter()
    if mode == "yaml":
        import yaml

        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        n = sum(1 for text in files.values() for _ in yaml.load_all(text, Loader=loader))
        extra = {"documents": n}
    else:
        from models.desired import ObservedCluster, observed_from
        from models.load import load
        from models.plan import plan
        from models.resolve import Resolver

        defs = load(files)
        r = Resolver(defs)
        desired = [r.resolve(name) for name in defs.clusters]
        steps = sum(len(plan(d, ObservedCluster(name=d.name)).steps) for d in desired)
        seconds = time.perf_counter() - t0
        assert all(plan(d, observed_from(d)).empty for d in desired)  # checked, not timed
        extra = {"clusters": len(desired), "create_steps": steps}
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"seconds": seconds, "max_rss_mib": rss, **extra}
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "max_rss_mib": rss, **extra}


def run(mode: str, path: Path, repeat: int = 3) -> dict:
    best = None
    for _ in range(repeat):
        out = subprocess.run([sys.executable, __file__, "--child", mode, str(path)], capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        if best is None or res["seconds"] < best["seconds"]:
            best = res
    return best


def baseline_rss() -> float:
    out = subprocess.run([sys.executable, "-c", "import resource, models.load, models.resolve, models.plan, backends.definitions;"
                          "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return float(out.stdout.strip())


def main() -> None:
    rows = []
    base = baseline_rss()
    with tempfile.TemporaryDirectory() as tmp:
        for n in (2000, 10000):
            path = Path(tmp) / f"fleet-{n}"
            generate(n, path)
            y = run("yaml", path)
            c = run("core", path)
            rows.append((n, c, y))
            print(f"clusters={n} core={c['seconds']:.3f}s yaml={y['seconds']:.3f}s ratio={c['seconds'] / y['seconds']:.2f} "
                  f"rss={c['max_rss_mib']:.0f}MiB", flush=True)
    lines = [
             f"Measured by `python bench/core.py` on {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
             f"{time.strftime('%Y-%m-%d')}. Best of 3 runs, each in a fresh process; file reading excluded.", "",
             "| clusters | core seconds | plain YAML seconds | ratio | max RSS MiB | RSS above import MiB | per cluster KiB |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for n, c, y in rows:
        above = c["max_rss_mib"] - base
        lines.append(f"| {n} | {c['seconds']:.3f} | {y['seconds']:.3f} | {c['seconds'] / y['seconds']:.2f} | "
                     f"{c['max_rss_mib']:.0f} | {above:.0f} | {above * 1024 / n:.1f} |")
    (n1, c1, _), (n2, c2, _) = rows
    growth = (c2["max_rss_mib"] - base) / max(c1["max_rss_mib"] - base, 1e-9)
    lines += ["", f"Memory above the import baseline ({base:.0f} MiB) grows {growth:.2f}x for {n2 / n1:.0f}x the clusters "
              f"(linear would be {n2 / n1:.0f}x). Goal: 2,000 clusters in at most 2 s, ratio at most 3.", ""]
    from fleetwright.results import write_section

    write_section("Core: load + resolve + plan", lines)
    n, c, y = rows[0]
    print(f"core: clusters={n} seconds={c['seconds']:.3f} yaml_seconds={y['seconds']:.3f} ratio={c['seconds'] / y['seconds']:.2f}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(measure(sys.argv[2], sys.argv[3])))
    else:
        main()
