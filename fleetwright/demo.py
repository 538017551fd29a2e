"""`fleetwright demo`: the whole product on one machine, end to end.

1. starts the test environment (moto, vcsim, SSH hosts, kube-apiservers);
2. pushes the example fleet to a repository on the test environment's Git server (the definitions
   repo; workers read it through its URL with the token from the ``fleetwright-git`` block);
3. starts a Prefect server on its embedded SQLite database;
4. saves the credential blocks, creates the process work pool, deploys every
   flow from prefect.yaml, creates the automations (a dead worker's runs are
   crashed, freeing their slots) and starts a worker;
5. runs the scenario through the deployments: create clusters on aws, vsphere
   and metal; onboard a team; add a component across a selector in waves;
   upgrade one cluster by a minor version (bumped in Git first); change things
   behind fleetwright's back; and let reconcile-fleet report and correct them.

It prints progress, the Prefect UI address and a summary; ``--record`` also writes
the wall time of each step and the orchestration overhead to bench/RESULTS.md.
Every run starts a fresh Prefect database (a kept demo's server and worker are
stopped first), and the 15-minute reconcile-fleet schedule stays paused while the
scenario runs. ``--keep`` leaves everything running (the schedule then resumes);
``fleetwright demo --stop`` stops a kept demo: worker, server and test environment.
Imperative runs name a person (``alice``, of the platform role): the automation
identity may only converge what is in Git.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "fleet"
AWS_CLUSTER, VSPHERE_CLUSTER, METAL_CLUSTER = "us-web-staging", "dc1-web-dev", "edge-lab-01"
ACTOR = "alice"  # the person who starts the demo's imperative runs (platform role in examples/fleet/policy.yaml)
SWEEP = "reconcile-fleet/reconcile-fleet"
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[demo {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def sh(*args: str, env: dict | None = None, cwd: Path | None = None) -> str:
    r = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"demo: {' '.join(args[:3])} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r.stdout


def _definitions_repo(env: dict) -> str:
    """A fresh repository on the test environment's Git server holding the example fleet; its clone URL.

    Workers read it through the URL (their own cache clone, the token from the ``fleetwright-git``
    block), and add-component pushes its ComponentSet to it before rolling out.
    """
    from testenv import git

    return git.create_repo(env["git"], "definitions", seed=EXAMPLES)


def _bump_version_in_git(env: dict, cluster_file: str, old: str, new: str, message: str) -> str:
    """A person's commit, pushed to the definitions repository over the network; returns the commit."""
    from testenv.git import GitServer

    return GitServer(env["git"]).commit("definitions", {cluster_file: (old, new)}, message, author="alice")


WEBHOOK_BLOCK = "fleetwright-webhook-secrets"


def _webhook(env: dict, repo: str, penv: dict, cfg, state: Path) -> None:
    """``fleetwright webhook serve`` for the definitions repository, and the Git server's post-receive hook.

    ``git http-backend`` has no webhooks of its own, so the bare repository gets the hook a plain Git
    server uses in production: ``fleetwright webhook post-receive`` sends one signed delivery per pushed
    branch, with the authenticated pusher (``REMOTE_USER``). From here on a push starts ``sync-from-git``.
    """
    import secrets
    import socket

    from prefect.blocks.system import Secret

    from testenv import common

    secret = secrets.token_hex(24)
    Secret(value=json.dumps([secret])).save(WEBHOOK_BLOCK, overwrite=True)
    conf = state / "webhook.yaml"
    conf.write_text(f"deployment: sync-from-git/sync-from-git\nsecret_block: {WEBHOOK_BLOCK}\ndebounce_seconds: 2\n"
                    f"repositories:\n  - url: {repo}\n    branches: [main]\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cli = str(Path(sys.executable).parent / "fleetwright")
    common.start_process("webhook-receiver", [cli, "webhook", "serve", "--config", str(conf), "--port", str(port)],
                         log=cfg.log_dir / "webhook-receiver.log", env=penv, cfg=cfg)
    _wait_http(f"http://127.0.0.1:{port}/readyz", 120)
    hook = Path(env["git"]["root"]) / "definitions.git" / "hooks" / "post-receive"
    hook.write_text("#!/bin/sh\n# fleetwright: one signed delivery per pushed branch to the webhook receiver\n"
                    f"FLEETWRIGHT_WEBHOOK_SECRET={secret} exec {cli} webhook post-receive "
                    f"--url http://127.0.0.1:{port} --repo-url {repo}\n")
    hook.chmod(0o700)
    say(f"webhook receiver on http://127.0.0.1:{port}; the Git server's post-receive hook sends it every push")


def _wait_run(deployment: str, pred, timeout: float, what: str):
    """The first run of ``deployment`` that ``pred`` accepts, once it is final."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    end = time.time() + timeout
    with get_client(sync_client=True) as c:
        dep = c.read_deployment_by_name(deployment)
        while time.time() < end:
            runs = [r for r in c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                                                 limit=50) if pred(r)]
            if runs and runs[0].state and runs[0].state.is_final():
                return runs[0]
            time.sleep(2)
    raise SystemExit(f"demo: {what} did not end in {timeout:.0f}s")


def _wait_http(url: str, timeout: float) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:  # noqa: BLE001
            time.sleep(0.5)
    raise SystemExit(f"demo: {url} did not answer in {timeout:.0f}s")


def stop() -> int:
    """Stop a demo left running by ``--keep``: worker, Prefect server, test environment."""
    import testenv
    from testenv import common

    cfg = common.Config.from_env()
    for name in ("webhook-receiver", "prefect-worker", "prefect-server"):
        say(f"{name}: {'stopped' if common.stop_process(name, cfg) else 'not running'}")
    testenv.down(cfg)
    say(f"test environment in {cfg.state_dir} stopped")
    return 0


def _set_sweep_schedule(active: bool) -> None:
    """Pause (and drop already scheduled runs of) or resume the reconcile-fleet schedule."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState
    from prefect.client.schemas.filters import FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as c:
        dep = c.read_deployment_by_name(SWEEP)
        for sch in dep.schedules:
            c.update_deployment_schedule(dep.id, sch.id, active=active)
        if not active:
            waiting = c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                                       flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                                           type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))
            for fr in waiting:
                c.delete_flow_run(fr.id)


def run(keep: bool = False, port: int = 4200, record: bool = False) -> int:
    import testenv
    from testenv import common, hosts, kube
    from testenv.connections import write_connections

    cfg = common.Config.from_env()
    state = cfg.state_dir / "demo"
    state.mkdir(parents=True, exist_ok=True)
    timings: list[tuple[str, float, dict]] = []

    # 1. the test environment
    t = time.monotonic()
    say("starting the test environment (moto, vcsim, SSH hosts, kube-apiservers); a cold cache builds Kubernetes first")
    env = testenv.up(cfg)
    from backends.definitions import load_path
    from models.resolve import resolve

    defs = load_path(EXAMPLES)
    # A VM's static IP and a bare-metal host are real SSH hosts here: start them for the clusters the
    # demo creates (one spare VM address for scaling) and for every metal host, so the sweep can see
    # that the other metal clusters are simply not created yet.
    from backends.vsphere.addresses import fresh_addresses

    addrs = fresh_addresses(resolve(defs, VSPHERE_CLUSTER), spare=1)
    addrs += [h.address for c in defs.clusters.values() if c.spec.backend.type == "metal" for h in c.spec.backend.hosts]
    for a in addrs:
        hosts.ensure_host(cfg, a)
    eks = {AWS_CLUSTER: kube.ensure_control_plane(cfg, f"eks-{AWS_CLUSTER}")}
    env = testenv.read_env(cfg)
    conns = write_connections(state / "connections.json", env, eks)
    timings.append(("test environment up", time.monotonic() - t, {}))

    # 2. definitions in git
    repo = _definitions_repo(env)
    say(f"definitions repository: {repo} (the test environment's Git server; workers read it through the URL)")

    # 3. Prefect server on SQLite
    t = time.monotonic()
    api = f"http://127.0.0.1:{port}/api"
    penv = dict(os.environ, PREFECT_HOME=str(state / "prefect"), PREFECT_API_URL=api,
                PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING",
                PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(state / "results"),
                FLEETWRIGHT_HOME=str(ROOT), FLEETWRIGHT_CONNECTIONS=str(conns),
                FLEETWRIGHT_DEFINITIONS_REPO=repo, FLEETWRIGHT_GIT_CACHE=str(state / "git-cache"),
                FLEETWRIGHT_RETRY_BASE_SECONDS="0.5",
                PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    prefect = str(Path(sys.executable).parent / "prefect")
    for name in ("webhook-receiver", "prefect-worker", "prefect-server"):  # a kept demo's: this run starts clean
        if common.stop_process(name, cfg):
            say(f"stopped the {name} of an earlier demo")
    shutil.rmtree(state / "prefect", ignore_errors=True)  # a fresh database: no old runs, no active schedule
    shutil.rmtree(state / "results", ignore_errors=True)
    say(f"starting the Prefect server on 127.0.0.1:{port} (SQLite in {state / 'prefect'})")
    common.start_process("prefect-server", [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                         log=cfg.log_dir / "prefect-server.log", env=penv, cfg=cfg)
    _wait_http(f"{api}/health", 90)
    timings.append(("Prefect server ready", time.monotonic() - t, {}))

    # 4. blocks, work pool, deployments, worker
    t = time.monotonic()
    os.environ.update({k: penv[k] for k in ("PREFECT_API_URL", "PREFECT_HOME")})
    _save_blocks(env)
    sh(prefect, "work-pool", "create", "fleetwright", "--type", "process", "--overwrite", env=penv)
    say("deploying every flow from prefect.yaml")
    sh(prefect, "--no-prompt", "deploy", "--all", env=penv, cwd=ROOT)
    sh(sys.executable, "-m", "fleetwright.automations", env=penv, cwd=ROOT)  # a dead worker's runs are crashed
    say("automations: a sweep run whose worker died, or a run no worker started, is marked Crashed (automations/)")
    _pause("sync-from-git-poll/sync-from-git-poll")  # the demo pushes on purpose; the lost-webhook poll stays out of it
    _set_sweep_schedule(active=False)  # no scheduled sweep in the middle of the scenario
    say("reconcile-fleet's 15-minute schedule is paused while the demo runs")
    common.start_process("prefect-worker", [prefect, "worker", "start", "--pool", "fleetwright", "--limit", "8"],
                         log=cfg.log_dir / "prefect-worker.log", env=penv, cfg=cfg, cwd=ROOT)
    timings.append(("blocks, pool, deployments, worker", time.monotonic() - t, {}))
    say(f"Prefect UI: http://127.0.0.1:{port}")

    # 5. the scenario
    results: list[dict] = []

    def deploy(name: str, actor: str | None = ACTOR, **params) -> dict:
        from prefect.deployments import run_deployment

        t1 = time.monotonic()
        fr = run_deployment(name=f"{name}/{name}", parameters=params | ({"actor": actor} if actor else {}),
                            timeout=1800, poll_interval=2)
        return report(name, fr, params, time.monotonic() - t1, f" started by {actor}" if actor else " (automation)")

    def report(name: str, fr, params: dict, seconds: float, how: str) -> dict:
        row = {"flow": name, "params": params, "state": fr.state.name if fr.state else "?", "seconds": round(seconds, 1),
               "run": str(fr.id), **_overhead(fr.id)}
        results.append(row)
        say(f"{name} {json.dumps(params)}: {row['state']} in {seconds:.1f}s "
            f"(backends {row['backend_seconds']:.1f}s, orchestration {row['overhead_seconds']:.1f}s){how}")
        for line in _cluster_table(name, fr.id):
            print(f"          {line}", flush=True)
        return row

    def follow_push(sha: str) -> None:
        """The sync a push started through the webhook, then the rollout the sync started."""
        t1 = time.monotonic()
        sync = _wait_run("sync-from-git/sync-from-git", lambda r: r.parameters.get("after") == sha, 900,
                         f"the sync-from-git of {sha[:12]}")
        report("sync-from-git", sync, {"after": sha[:12]}, time.monotonic() - t1, " by the webhook")
        roll = _wait_run("rollout-fleet/rollout-fleet", lambda r: r.idempotency_key == f"{sha}:rollout-fleet", 1200,
                         f"the rollout-fleet of {sha[:12]}")
        report("rollout-fleet", roll, {"clusters": roll.parameters.get("clusters")}, time.monotonic() - t1,
               " by sync-from-git")

    def step(title: str, fn):
        say(title)
        t1 = time.monotonic()
        out = fn()
        timings.append((title, time.monotonic() - t1, {}))
        return out

    step("create clusters on aws, vsphere and metal (three runs at once)", lambda: list(ThreadPoolExecutor(3).map(
        lambda c: deploy("create-cluster", cluster=c), [AWS_CLUSTER, VSPHERE_CLUSTER, METAL_CLUSTER])))
    step("onboard team payments", lambda: deploy("onboard-team", team="payments"))
    step("add external-dns to every dev cluster, in waves", lambda: deploy(
        "add-component", component="external-dns", selector={"env": "dev"}, values={"domain": "dev.corp.example.com"}))
    step("start the webhook receiver and the Git server's post-receive hook",
         lambda: _webhook(env, repo, penv, cfg, state))
    sha = _bump_version_in_git(env, "clusters/aws.yaml", "variables: {environment: staging, workers: 2, workerSize: medium}",
                               'variables: {environment: staging, workers: 2, workerSize: medium, kubernetesVersion: "1.21"}',
                               f"{AWS_CLUSTER}: Kubernetes 1.21")
    step(f"push {AWS_CLUSTER} 1.20 -> 1.21 to Git ({sha[:12]}): the webhook starts sync-from-git, which rolls it out",
         lambda: follow_push(sha))
    step("change things behind fleetwright's back", lambda: _out_of_band(conns))
    step("reconcile-fleet: report and correct", lambda: deploy("reconcile-fleet", actor=None, selector={}))
    step("reconcile-fleet again: nothing left to correct",
         lambda: deploy("reconcile-fleet", actor=None, selector={"tier": "web", "env": "dev"}))

    # summary
    print("\nSummary")
    for r in results:
        print(f"  {r['flow']:18} {r['state']:10} {r['seconds']:7.1f}s  {json.dumps(r['params'])}")
    print(f"\nPrefect UI: http://127.0.0.1:{port}   (definitions repo: {repo})")
    if record:
        _record(timings, results)
    if keep:
        _set_sweep_schedule(active=True)
        say("kept running; reconcile-fleet runs every 15 minutes again. Stop it all with: fleetwright demo --stop")
    else:
        say("stopping (use --keep to explore)")
        for name in ("webhook-receiver", "prefect-worker", "prefect-server"):
            common.stop_process(name, cfg)
        testenv.down(cfg)
    bad = [r for r in results if r["state"] not in ("Completed",) and r["flow"] != "reconcile-fleet"]
    return 1 if bad else 0


def _pause(deployment: str) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as c:
        try:
            c.pause_deployment(c.read_deployment_by_name(deployment).id)
        except Exception as e:  # noqa: BLE001 - not deployed: nothing to pause
            say(f"could not pause {deployment}: {e}")


def _save_blocks(env: dict) -> None:
    from prefect_aws import AwsCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    from tasks.blocks import AWS_BLOCK, SSH_BLOCK, VSPHERE_BLOCK, SshKey, VsphereCredentials

    aws, vs, hosts = env["aws"], env["vsphere"], env["hosts"]
    AwsCredentials(aws_access_key_id=aws["access_key_id"], aws_secret_access_key=aws["secret_access_key"],
                   region_name=aws["region"],
                   aws_client_parameters=AwsClientParameters(endpoint_url=aws["endpoint_url"])).save(AWS_BLOCK, overwrite=True)
    VsphereCredentials(host=vs["host"], port=vs["port"], user=vs["user"], password=vs["password"],
                       insecure=True).save(VSPHERE_BLOCK, overwrite=True)
    # host keys are checked: the hosts' certificates are signed by the test CA its known_hosts line trusts
    SshKey(user=hosts.get("user", "root"), private_key=Path(hosts["private_key"]).read_text(),
           known_hosts=Path(hosts["known_hosts"]).read_text()).save(SSH_BLOCK, overwrite=True)
    from pydantic import SecretStr

    from tasks.blocks import GIT_BLOCK, GitCredentialsBlock

    GitCredentialsBlock(username=env["git"]["user"], token=SecretStr(env["git"]["token"])).save(GIT_BLOCK, overwrite=True)


def _out_of_band(conns: Path) -> None:
    import boto3
    from kubernetes import client as k8s

    from backends import registry
    from backends.connections import load_connections
    from backends.definitions import load_path
    from backends.kube import api_client
    from models.resolve import resolve

    c = load_connections(conns)
    d = resolve(load_path(EXAMPLES), VSPHERE_CLUSTER)
    api = api_client(registry.infrastructure(d, c).kube_access(d))
    k8s.CoreV1Api(api).patch_namespaced_config_map("ingress-nginx-controller", "ingress-nginx",
                                                   {"data": {"proxy-body-size": "1g"}})
    say(f"{VSPHERE_CLUSTER}: edited ConfigMap ingress-nginx/ingress-nginx-controller by hand (proxy-body-size=1g)")
    a = c.aws
    eks = boto3.client("eks", endpoint_url=a.endpoint_url, region_name="us-east-1",
                       aws_access_key_id=a.access_key_id.get_secret_value(),
                       aws_secret_access_key=a.secret_access_key.get_secret_value())
    # scaled below its definition (2): restoring capacity is a repair the sweep makes by itself (a scale-down
    # would be destructive and wait for a person's approval)
    eks.update_nodegroup_config(clusterName=AWS_CLUSTER, nodegroupName="general",
                                scalingConfig={"minSize": 1, "maxSize": 20, "desiredSize": 1})
    say(f"{AWS_CLUSTER}: scaled node group general down to 1 in the AWS API")
    m = resolve(load_path(EXAMPLES), METAL_CLUSTER)
    mapi = api_client(registry.infrastructure(m, c).kube_access(m))
    k8s.CoreV1Api(mapi).patch_namespaced_config_map("prometheus-settings", "monitoring", {"data": {"retention": "1h"}})
    say(f"{METAL_CLUSTER}: edited ConfigMap monitoring/prometheus-settings by hand (retention=1h; its drift mode is report)")


def _cluster_table(flow: str, flow_run_id) -> list[str]:
    """The run's cluster-by-status artifact, as lines (what each cluster did and why)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as c:
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"{flow}-clusters"]),
                                                               flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    if not arts:
        return []
    rows = arts[0].data if isinstance(arts[0].data, list) else json.loads(arts[0].data)
    return [f"{r['cluster']:16} {r['status']:10} {r['reason'][:110]}" for r in rows]


def _overhead(flow_run_id) -> dict:
    """Backend time = the sum of the run's task runs that call backends; the rest is orchestration."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as c:
        fr = c.read_flow_run(flow_run_id)
        tasks = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), limit=200)
        backend = sum((t.total_run_time.total_seconds() if t.total_run_time else 0.0) for t in tasks
                      if t.name.split("-")[0] in ("observe", "apply", "health", "decommission")
                      or t.task_key.split("-")[0] in ("observe_cluster", "apply_step", "health_gate"))
        total = fr.total_run_time.total_seconds() if fr.total_run_time else 0.0
    return {"backend_seconds": round(backend, 1), "overhead_seconds": round(max(total - backend, 0.0), 1),
            "run_seconds": round(total, 1), "task_runs": len(tasks)}


def _record(timings, results) -> None:
    lines = [
             f"Measured by `make demo` on {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}. "
             "Backend time is the summed run time of the flow's task runs that call backends "
             "(observe, apply, health gates; concurrent clusters add up); orchestration is the flow run's "
             "time less that, floored at 0.", "",
             "| step | wall seconds |", "|---|---:|"]
    lines += [f"| {title} | {secs:.1f} |" for title, secs, _ in timings]
    lines += ["", "| flow run | state | wall s | run s | backend s | orchestration s | task runs |",
              "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['flow']} {json.dumps(r['params'])} | {r['state']} | {r['seconds']:.1f} | {r['run_seconds']:.1f} | "
              f"{r['backend_seconds']:.1f} | {r['overhead_seconds']:.1f} | {r['task_runs']} |" for r in results]
    from fleetwright.results import write_section

    write_section("Demo: wall time per step and orchestration overhead", lines)
