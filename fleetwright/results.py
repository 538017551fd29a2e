"""bench/RESULTS.md is written section by section: each benchmark replaces only its own section."""
from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "RESULTS.md"


def write_section(heading: str, lines: list[str], path: Path = RESULTS) -> None:
    """Replace the section that starts with ``## {heading}`` (or append it), keeping the others."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    start = old.find(f"## {heading}")
    if start >= 0:
        end = old.find("\n## ", start + 3)
        old = old[:start] + (old[end + 1:] if end >= 0 else "")
    path.write_text(old.rstrip() + "\n\n" + "\n".join([f"## {heading}", "", *lines]).rstrip() + "\n")
