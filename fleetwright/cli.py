"""The `fleetwright` command line. Exit codes: 0 ok, 1 invalid or denied, 2 usage."""
from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)


def _mount_testenv() -> None:
    from testenv.cli import app as testenv_app

    app.add_typer(testenv_app, name="testenv", help="Build, start and stop the real test counterparts.")


_mount_testenv()


def main() -> None:
    app()
