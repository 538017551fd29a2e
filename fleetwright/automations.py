"""Creates fleetwright's Prefect automations from ``automations/*.yaml`` (idempotent: replaced by name).

* ``crash-zombie-runs``: a sweep run whose worker died (no heartbeat for 120 s) is marked Crashed;
* ``crash-unstarted-runs``: a run still Pending/Submitting 300 s after submission is marked Crashed;
* ``notify-cluster-problems``: a notification per drifted/failed cluster event (needs a notification
  block: ``--notify-block <block-type-slug>/<name>``; skipped without one).

Usage: ``python -m fleetwright.automations [--notify-block custom-webhook/ops]`` with ``PREFECT_API_URL`` set.
Windows: ``--set ZOMBIE_SECONDS=120 --set UNSTARTED_SECONDS=300`` (the defaults).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

DIR = Path(__file__).resolve().parents[1] / "automations"


def load(path: Path, substitutions: dict[str, str]) -> dict:
    """The automation in ``path`` with ``${NAME}`` / ``${NAME:-default}`` filled from ``substitutions``."""
    def fill(m: re.Match) -> str:
        name, default = m.group(1), m.group(3)
        return str(substitutions[name]) if name in substitutions else default if default is not None else m.group(0)

    text = re.sub(r"\$\{([A-Z_]+)(:-([^}]*))?\}", fill, path.read_text())
    if "${" in text:
        raise ValueError(f"{path}: unresolved placeholder {text[text.index('${'):].split('}')[0]}}}")
    return yaml.safe_load(text)


def ensure(substitutions: dict[str, str] | None = None, directory: Path = DIR) -> list[str]:
    """Create (or replace, by name) every automation whose placeholders can be filled; their names."""
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client

    subs = substitutions or {}
    made = []
    for path in sorted(directory.glob("*.yaml")):
        try:
            spec = load(path, subs)
        except ValueError as e:
            print(f"skipping {path.name}: {e}", file=sys.stderr)
            continue
        auto = Automation.model_validate(spec)
        with get_client(sync_client=True) as c:
            for old in c.read_automations_by_name(auto.name):
                c.delete_automation(old.id)
        auto.create()
        made.append(auto.name)
    return made


def block_id(slug_and_name: str) -> str:
    """The id of a saved block, ``<block-type-slug>/<block-name>``."""
    from prefect.client.orchestration import get_client

    slug, _, name = slug_and_name.partition("/")
    with get_client(sync_client=True) as c:
        return str(c.read_block_document_by_name(name=name, block_type_slug=slug).id)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fleetwright.automations", description=__doc__.splitlines()[0])
    ap.add_argument("--notify-block", help="notification block, <block-type-slug>/<name>, for notify-cluster-problems")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a placeholder's value")
    a = ap.parse_args(argv)
    subs = dict(kv.split("=", 1) for kv in a.set)
    if a.notify_block:
        subs["NOTIFY_BLOCK_ID"] = block_id(a.notify_block)
    for n in ensure(subs):
        print(f"automation: {n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
