"""The `fleetwright` command line.

Exit codes: 0 ok, 1 invalid definitions or a denied change, 2 usage.
Problems go to stderr as ``FILE:LINE: FIELD: message``.
"""
from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
import yaml

from models.errors import FleetwrightError, PermanentError, SpecInvalid

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__, pretty_exceptions_enable=False)


class Format(str, Enum):
    yaml = "yaml"
    json = "json"
    text = "text"


def _fail(err: FleetwrightError) -> None:
    if isinstance(err, SpecInvalid):
        for p in err.problems:
            typer.echo(str(p), err=True)
        typer.echo(f"{len(err.problems)} problem(s) found", err=True)
    else:
        typer.echo(f"error: {err}", err=True)
    raise typer.Exit(1)


def _emit(data, fmt: Format) -> None:
    if fmt == Format.json:
        typer.echo(json.dumps(data, indent=2, sort_keys=False))
    else:
        typer.echo(yaml.safe_dump(data, sort_keys=False, width=120).rstrip())


def _load(path: Path):
    from backends.definitions import load_path

    return load_path(path)


def _resolved(path: Path, cluster: str):
    """Load PATH and resolve one cluster; an unknown cluster is a usage error (exit 2)."""
    from models.resolve import resolve

    defs = _load(path)
    if cluster not in defs.clusters:
        typer.echo(f"error: no Cluster {cluster!r}; known: {', '.join(sorted(defs.clusters))}", err=True)
        raise typer.Exit(2)
    return resolve(defs, cluster)


@app.command()
def validate(path: Path = typer.Argument(..., help="A definitions directory or file")) -> None:
    """Check every definition under PATH, and that every cluster resolves."""
    try:
        defs = _load(path)
    except FleetwrightError as e:
        _fail(e)
    n_models = sum(len(v) for v in defs.models.values())
    typer.echo(f"ok: {len(defs.clusters)} clusters, {n_models} models, {len(defs.components)} components, "
               f"{len(defs.teams)} teams, {len(defs.policies)} policies")


@app.command()
def render(path: Path, cluster: str = typer.Option(..., "--cluster", "-c"),
           format: Format = typer.Option(Format.yaml, "--format", "-f")) -> None:
    """Print the fully resolved desired state of one cluster."""
    try:
        desired = _resolved(path, cluster)
    except FleetwrightError as e:
        _fail(e)
    _emit(desired.model_dump(mode="json", by_alias=True), format)


@app.command()
def plan(path: Path, cluster: str = typer.Option(..., "--cluster", "-c"),
         observed: Optional[Path] = typer.Option(None, "--observed", help="An ObservedCluster as YAML or JSON; "
                                                 "without it, the cluster is taken to not exist yet"),
         format: Format = typer.Option(Format.text, "--format", "-f")) -> None:
    """Show the steps that take the observed cluster to its desired state."""
    from models.desired import ObservedCluster
    from models.load import parse_one
    from models.plan import plan as make_plan

    try:
        desired = _resolved(path, cluster)
        if observed is None:
            obs = ObservedCluster(name=cluster)
        else:
            if not observed.is_file():
                typer.echo(f"error: {observed}: no such file", err=True)
                raise typer.Exit(2)
            obs = parse_one(ObservedCluster, str(observed), observed.read_text(encoding="utf-8"))
    except FleetwrightError as e:
        _fail(e)
    p = make_plan(desired, obs)
    if format == Format.text:
        if p.refused:
            for r in p.refused:
                typer.echo(f"REFUSED: {r}")
        if not p.steps and not p.refused:
            typer.echo(f"{cluster}: no changes (desired {p.desired_hash})")
        for i, s in enumerate(p.steps, 1):
            typer.echo(f"{i:3}. {s.action:22} {s.object:28} {s.reason}")
    else:
        _emit(p.model_dump(mode="json"), format)
    if p.refused:
        raise typer.Exit(1)


@app.command()
def diff(repo: Path, from_ref: str = typer.Option(..., "--from"), to_ref: str = typer.Option(..., "--to"),
         subdir: str = typer.Option("", "--path", help="The definitions' folder inside the repository"),
         actor: Optional[str] = typer.Option(None, "--actor", help="Judge the change for this person"),
         groups: list[str] = typer.Option([], "--group", help="The actor's groups (repeatable)"),
         format: Format = typer.Option(Format.text, "--format", "-f")) -> None:
    """Which clusters a change between two git refs affects, how, and the policy verdict."""
    from backends.definitions import read_git
    from models.diff import diff_fleet
    from models.load import load
    from models.policy import actor_from, evaluate
    from models.resolve import resolve_all

    try:
        old_files, new_files = read_git(repo, from_ref, subdir), read_git(repo, to_ref, subdir)
        old = load(old_files) if old_files else None
        new = load(new_files)
        old_d = resolve_all(old) if old else {}
        new_d = resolve_all(new)
    except FleetwrightError as e:
        _fail(e)
    changes = diff_fleet(old_d, new_d)
    verdict = None
    if actor:
        who = actor_from(old or new, actor, tuple(groups))  # roles as they were before the change
        verdict = evaluate(old, new, who, old_d, new_d)
    if format == Format.text:
        if not changes:
            typer.echo("no cluster changes")
        for c in changes:
            typer.echo(f"{c['cluster']}: {c['change']}")
            for f in c["fields"][:20]:
                typer.echo(f"    {f['path']}: {json.dumps(f['old'])} -> {json.dumps(f['new'])}")
            if len(c["fields"]) > 20:
                typer.echo(f"    ... and {len(c['fields']) - 20} more")
        if verdict:
            typer.echo(f"policy for {actor}: {'ALLOWED' if verdict.allowed else 'DENIED'} ({verdict.rule})")
            for d in verdict.denials:
                typer.echo(f"    {d}")
    else:
        _emit({"from": from_ref, "to": to_ref, "clusters": changes,
               "policy": verdict.to_dict() if verdict else None}, format)
    if verdict is not None and not verdict.allowed:
        raise typer.Exit(1)


@app.command()
def windows(path: Path, cluster: Optional[str] = typer.Option(None, "--cluster", "-c"),
            from_: Optional[str] = typer.Option(None, "--from", help="A date or ISO time (default: now; naive = UTC)"),
            days: int = typer.Option(14, "--days", min=1, max=400),
            format: Format = typer.Option(Format.text, "--format", "-f")) -> None:
    """The next maintenance windows and blackouts of each cluster, in its local time and in UTC."""
    from datetime import datetime, timezone

    from models.maintenance import schedule_of
    from models.resolve import Resolver
    from models.windows import upcoming

    try:
        start = datetime.fromisoformat(from_) if from_ else datetime.now(timezone.utc)
    except ValueError:
        typer.echo(f"error: --from {from_!r} is not a date or ISO time", err=True)
        raise typer.Exit(2)
    start = start if start.tzinfo else start.replace(tzinfo=timezone.utc)
    try:
        defs = _load(path)
        names = [cluster] if cluster else sorted(defs.clusters)
        if cluster and cluster not in defs.clusters:
            _resolved(path, cluster)  # exits 2 with the known names
        r = Resolver(defs)
        since = start.timestamp()
        out = {}
        for n in names:
            d = r.resolve(n)
            s = schedule_of(d, defs.files)
            m = d.maintenance
            out[n] = {"timezone": m.timezone if m else None, "windowsFrom": m.windows_from if m else None,
                      "alwaysOpen": s.always_open, "upcoming": upcoming(s, since, since + days * 86400)}
    except FleetwrightError as e:
        _fail(e)
    if format != Format.text:
        return _emit({n: {**v, "upcoming": [{k: x for k, x in row.items() if k != "start"} for row in v["upcoming"]]}
                      for n, v in out.items()}, format)
    for n, v in out.items():
        where = f"windows from {v['windowsFrom']}" if v["windowsFrom"] else "no window: may change at any time"
        typer.echo(f"{n}  ({v['timezone'] + '; ' if v['timezone'] else ''}{where})")
        for row in v["upcoming"]:
            typer.echo(f"  {row['kind']:8} {row['local']:44} {row['utc']:34} {row['note']}".rstrip())
        if not v["upcoming"] and not v["alwaysOpen"]:
            typer.echo(f"  no window in the next {days} days")


@app.command()
def schema(output: Optional[Path] = typer.Option(None, "--output", "-o")) -> None:
    """Write the JSON Schema of the definitions, for editors to complete and check files."""
    from models.schema import json_schema

    text = json.dumps(json_schema(), indent=2)
    if output:
        output.write_text(text + "\n", encoding="utf-8")
        typer.echo(f"wrote {output}", err=True)
    else:
        typer.echo(text)


@app.command()
def demo(keep: bool = typer.Option(False, "--keep", help="Leave the test environment, Prefect server and worker running"),
         stop: bool = typer.Option(False, "--stop", help="Stop a demo left running by --keep (worker, server, test environment)"),
         port: int = typer.Option(4200, "--port", help="The Prefect server's port"),
         record: bool = typer.Option(False, "--record/--no-record", help="Write step timings to bench/RESULTS.md")) -> None:
    """Run the example fleet end to end on this machine: test environment, Prefect server, worker, flows."""
    from fleetwright import demo as d

    if stop and keep:
        typer.echo("error: --stop and --keep exclude each other", err=True)
        raise typer.Exit(2)
    raise typer.Exit(d.stop() if stop else d.run(keep=keep, port=port, record=record))


@app.command()
def kubeconfig(cluster: str = typer.Argument(..., help="The Cluster's name"),
               definitions: Optional[Path] = typer.Option(None, "--definitions", "-d", help="The definitions directory "
                                                          "(default: as the flows: $FLEETWRIGHT_DEFINITIONS_REPO, "
                                                          "$FLEETWRIGHT_DEFINITIONS, else examples/fleet)"),
               output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write to this file (mode 0600) "
                                                     "instead of stdout")) -> None:
    """Print a kubeconfig for CLUSTER, with credentials from its backend (as `clusterctl get kubeconfig`).

    The credentials come from the same blocks (or connections file) the flows use. An EKS token
    lasts 15 minutes, as one from `aws eks get-token`. The kubeconfig holds a secret: it is written
    only to stdout or to FILE, never logged.
    """
    from fleetwright.kubeconfig import kubeconfig_for, write_private
    from models.resolve import resolve
    from tasks.definitions import DefinitionsSource, default_source, load_definitions

    try:
        src = DefinitionsSource(path=str(definitions)) if definitions else default_source()
        defs, _ = load_definitions.fn(src)
        if cluster not in defs.clusters:
            typer.echo(f"error: no Cluster {cluster!r}; known: {', '.join(sorted(defs.clusters))}", err=True)
            raise typer.Exit(2)
        text = kubeconfig_for(resolve(defs, cluster))
    except FleetwrightError as e:
        _fail(e)
    if output is None:
        typer.echo(text, nl=False)
    else:
        write_private(output, text)
        typer.echo(f"wrote {output} (mode 0600)", err=True)


webhook_app = typer.Typer(no_args_is_help=True, help="The Git webhook receiver: a push starts sync-from-git.")
app.add_typer(webhook_app, name="webhook")


@webhook_app.command("serve")
def webhook_serve(host: str = typer.Option("127.0.0.1", "--host"), port: int = typer.Option(8080, "--port"),
                  config: Optional[Path] = typer.Option(None, "--config", help="YAML/JSON receiver settings "
                                                        "(repositories, branches, providers, limits)"),
                  config_block: Optional[str] = typer.Option(None, "--config-block",
                                                             help="Or: a Prefect JSON block holding them"),
                  workers: int = typer.Option(1, "--workers", help="Processes on this host"),
                  ssl_certfile: Optional[Path] = typer.Option(None, "--ssl-certfile"),
                  ssl_keyfile: Optional[Path] = typer.Option(None, "--ssl-keyfile"),
                  forwarded_allow_ips: str = typer.Option("127.0.0.1", "--forwarded-allow-ips",
                                                          help="Proxies whose X-Forwarded-For is trusted"),
                  log_level: str = typer.Option("info", "--log-level")) -> None:
    """Receive GitHub, GitLab, Gitea and generic HMAC webhooks; hand each accepted push to Prefect."""
    import copy
    import os

    import uvicorn
    import uvicorn.config

    from fleetwright.webhook.config import load_config

    try:  # check the settings before listening: a bad file stops here, naming file, line and field
        cfg = load_config(config, config_block)
    except FleetwrightError as e:
        _fail(e)
    if not cfg.repositories:
        typer.echo("warning: no repository is allow-listed: every delivery will be refused", err=True)
    if config:
        os.environ["FLEETWRIGHT_WEBHOOK_CONFIG"] = str(config.resolve())
    if config_block:
        os.environ["FLEETWRIGHT_WEBHOOK_CONFIG_BLOCK"] = config_block
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"]["fleetwright.webhook"] = {"handlers": ["default"], "level": log_level.upper(),
                                                    "propagate": False}
    uvicorn.run("fleetwright.webhook.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
                ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None, proxy_headers=True,
                forwarded_allow_ips=forwarded_allow_ips, log_level=log_level, log_config=log_config,
                server_header=False)


@webhook_app.command("post-receive")
def webhook_post_receive(url: str = typer.Option(..., "--url", help="The receiver, e.g. https://hooks.example.com"),
                         repo_url: str = typer.Option(..., "--repo-url", help="This repository's clone URL"),
                         secret_env: str = typer.Option("FLEETWRIGHT_WEBHOOK_SECRET", "--secret-env",
                                                        help="The environment variable holding the secret"),
                         pusher: str = typer.Option("", "--pusher", help="Who pushed (default: $REMOTE_USER, set by "
                                                    "git http-backend for an authenticated push; gitolite: $GL_USER)")
                         ) -> None:
    """A git post-receive hook for a plain Git server: one signed delivery per updated branch (stdin)."""
    import os

    from fleetwright.webhook.sender import post_receive

    pusher = pusher or os.environ.get("REMOTE_USER", "") or os.environ.get("GL_USER", "")

    secret = os.environ.get(secret_env, "")
    if not secret:
        typer.echo(f"error: ${secret_env} is empty", err=True)
        raise typer.Exit(2)
    failed = 0
    for ref, status in post_receive(url, secret, repo_url, sys.stdin, pusher=pusher):
        typer.echo(f"webhook: {ref}: HTTP {status}", err=True)
        failed += status >= 300 and status != 202
    raise typer.Exit(1 if failed else 0)


def _mount_testenv() -> None:
    try:
        from testenv.cli import app as testenv_app
    except ImportError:  # the test environment is a development tool; the CLI works without it
        return
    app.add_typer(testenv_app, name="testenv", help="Build, start and stop the real test counterparts.")


_mount_testenv()


def main() -> None:
    try:
        app()
    except PermanentError as e:  # anything not handled above: clear message, no traceback
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
