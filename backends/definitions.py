"""Where definitions come from: a directory tree, or a git repository at a ref.

Reads ``*.yaml`` / ``*.yml`` files, and ``*.ics`` calendars (blackouts a maintenance block
names), and hands their text to ``models.load``.
Git access uses the real ``git`` command (``ls-tree`` and ``cat-file
--batch``), never hand-rolled object parsing.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

from models.errors import PermanentError, Problem, SpecInvalid
from models.load import Definitions, load

_SUFFIXES = (".yaml", ".yml", ".ics")


def read_tree(root: str | Path) -> dict[str, str]:
    """``{path relative to root's parent-facing display: text}`` for every YAML and .ics file under ``root``."""
    root = Path(root)
    if root.is_file():
        return {str(root): root.read_text(encoding="utf-8")}
    if not root.is_dir():
        raise SpecInvalid([Problem(str(root), 0, "", "no such file or directory")])
    out = {}
    for p in sorted(root.rglob("*")):
        if p.suffix in _SUFFIXES and p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts):
            try:
                out[str(p)] = p.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise SpecInvalid([Problem(str(p), 0, "", f"not UTF-8 text: {e.reason}")]) from None
    return out


def _git(repo: str | Path, *args: str, input: bytes | None = None) -> bytes:
    try:
        r = subprocess.run(["git", "-C", str(repo), *args], input=input, capture_output=True, check=False)
    except FileNotFoundError:
        raise PermanentError("git is not installed") from None
    if r.returncode != 0:
        raise PermanentError(f"git {' '.join(args)} in {repo}: {r.stderr.decode(errors='replace').strip()}")
    return r.stdout


def resolve_ref(repo: str | Path, ref: str) -> str:
    """The commit SHA that ``ref`` names in ``repo``."""
    return _git(repo, "rev-parse", "--verify", f"{ref}^{{commit}}").decode().strip()


def read_git(repo: str | Path, ref: str, subdir: str = "") -> dict[str, str]:
    """YAML and .ics files of ``repo`` at ``ref`` (optionally under ``subdir``), keyed ``ref:path``-free relative paths."""
    sha = resolve_ref(repo, ref)
    listing = _git(repo, "ls-tree", "-r", "-z", sha, "--", subdir or ".").split(b"\0")
    blobs = []
    for entry in listing:
        if not entry:
            continue
        meta, path = entry.split(b"\t", 1)
        _, kind, obj = meta.split()
        name = path.decode()
        if kind == b"blob" and name.endswith(_SUFFIXES):
            blobs.append((name, obj.decode()))
    if not blobs:
        return {}
    out = _git(repo, "cat-file", "--batch", input="".join(f"{o}\n" for _, o in blobs).encode())
    files, pos = {}, 0
    for name, _ in blobs:
        header_end = out.index(b"\n", pos)
        size = int(out[pos:header_end].split()[2])
        body = out[header_end + 1: header_end + 1 + size]
        pos = header_end + 1 + size + 1
        files[name] = body.decode("utf-8", errors="replace")
    return files


def load_path(path: str | Path) -> Definitions:
    return load(read_tree(path))


def load_git(repo: str | Path, ref: str, subdir: str = "") -> Definitions:
    return load(read_git(repo, ref, subdir))


def write_definition(root: str | Path, relpath: str, text: str, *, message: str, author: str,
                     git_repo: bool = False) -> str | None:
    """Write a definitions file (refusing to overwrite a different one) and, in a git repository, commit it.

    Returns the new commit's SHA, or None for a plain directory. Writing the same text again is a no-op.
    """
    root = Path(root)
    target = (root / relpath).resolve()
    if root.resolve() not in target.parents:
        raise PermanentError(f"{relpath}: outside the definitions tree")
    if target.exists() and target.read_text(encoding="utf-8") == text:
        return resolve_ref(root, "HEAD") if git_repo else None
    if target.exists():
        raise PermanentError(f"{relpath}: already exists with other content; change it through Git")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    if not git_repo:
        return None
    top = _git(root, "rev-parse", "--show-toplevel").decode().strip()
    rel = str(target.relative_to(Path(top).resolve()))
    _git(top, "add", "--", rel)
    email = f"{author}@fleetwright.invalid"
    _git(top, "-c", f"user.name={author}", "-c", f"user.email={email}", "commit", "-q", "-m", message, "--", rel)
    return resolve_ref(top, "HEAD")
