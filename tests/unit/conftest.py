"""Helpers for the core's unit tests: the example fleet as text, and small edits of it."""
from __future__ import annotations

from pathlib import Path

import pytest

from backends.definitions import read_tree
from models.load import load

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "fleet"


@pytest.fixture(scope="session")
def example_files() -> dict[str, str]:
    files = read_tree(EXAMPLES)
    root = str(EXAMPLES) + "/"
    return {k.replace(root, ""): v for k, v in files.items()}


@pytest.fixture(scope="session")
def example_defs(example_files):
    return load(example_files)


def edit(files: dict[str, str], name: str, old: str, new: str) -> dict[str, str]:
    assert old in files[name], f"{old!r} not in {name}"
    out = dict(files)
    out[name] = files[name].replace(old, new, 1)
    return out


# Hypothesis: a fixed seed and a modest count by default (CI), many more examples on demand:
#   HYPOTHESIS_PROFILE=deep make unit
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=60, derandomize=True, deadline=None)
settings.register_profile("deep", max_examples=2000, derandomize=False, deadline=None)
settings.load_profile(__import__("os").environ.get("HYPOTHESIS_PROFILE", "ci"))
