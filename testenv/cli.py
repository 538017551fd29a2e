"""`fleetwright testenv up|down|status`: build, start and stop the real test counterparts.

stdout carries exactly one JSON document; progress goes to stderr.
"""
from __future__ import annotations

import json
import sys
from typing import Any, Optional

import typer

import testenv
from testenv.common import Config

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)


def _emit(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    sys.stdout.flush()


def _fail(e: BaseException) -> None:
    typer.echo(f"testenv: {type(e).__name__}: {e}", err=True)
    raise typer.Exit(1)


@app.command()
def build() -> None:
    """Install and build (cached) what every part needs, before any test runs; start nothing."""
    try:
        doc = testenv.build_all(Config())
    except Exception as e:  # noqa: BLE001
        _fail(e)
    _emit(doc)


@app.command()
def up(
    kube_clusters: int = typer.Option(1, "--kube-clusters", min=0, help="control planes to start (mgmt, workload-1, ...)"),
    hosts: int = typer.Option(2, "--hosts", min=0, help="SSH hosts to start"),
    only: Optional[str] = typer.Option(None, "--only",
                                       help="comma-separated parts: kube,vsphere,aws,hosts,postgres,git,machines"),
    machines: Optional[int] = typer.Option(None, "--machines", min=0,
                                           help="boot machines m1..mN (10.250.0.11...); implies the machines part"),
    vsphere_method_delay: Optional[str] = typer.Option(
        None, "--vsphere-method-delay", help="vcsim start-up delays, e.g. CloneVM_Task:500,PowerOnVM_Task:200"),
) -> None:
    """Install what is missing, build (cached), start the parts; print the environment as JSON."""
    try:
        parts = testenv.parse_only(only)
        options: dict[str, Any] = {}
        if machines is not None:
            options["machines"] = {"count": machines}
            if "machines" not in parts:
                parts = (*parts, "machines")
        if vsphere_method_delay:
            options["vsphere"] = {"method_delay": vsphere_method_delay}
        cfg = Config(kube_clusters=kube_clusters or 1, hosts=hosts, only=parts, options=options)
        if kube_clusters == 0 and "kube" in parts and only is None:
            parts = tuple(p for p in parts if p != "kube")
            cfg.only = parts
        doc = testenv.up(cfg)
    except typer.Exit:
        raise
    except Exception as e:  # noqa: BLE001
        _fail(e)
    _emit(doc)


@app.command()
def down(
    only: Optional[str] = typer.Option(None, "--only", help="comma-separated parts (default: all)"),
) -> None:
    """Stop every part (by PID) and undo what `up` did; build caches are kept."""
    try:
        doc = testenv.down(Config(), testenv.parse_only(only) if only else None)
    except Exception as e:  # noqa: BLE001
        _fail(e)
    _emit(doc)
    if doc.get("errors"):
        raise typer.Exit(1)


@app.command()
def status(
    only: Optional[str] = typer.Option(None, "--only", help="comma-separated parts (default: all)"),
) -> None:
    """Print what is running as JSON (starts nothing)."""
    try:
        doc = testenv.status(Config(), testenv.parse_only(only) if only else None)
    except Exception as e:  # noqa: BLE001
        _fail(e)
    _emit(doc)
