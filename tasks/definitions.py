"""Tasks that read and record definitions: a directory, a local clone, or a remote Git repository.

A run reads ONE revision: the first ``load_definitions`` of a flow run fetches the worker's cache
clone and resolves the source's ref to a commit SHA (the run's **pin**); every later load in that
run with the same source reads the same SHA, whatever was pushed meanwhile. :func:`revision`
names what the run read, and every artifact carries it (``tasks.report.publish``). Child runs
started by ``sync-from-git`` get the SHA itself as their ref.

Write-back (:func:`write_back_component_set`): a flow that changes the definitions commits and
pushes FIRST (mode ``push``), or pushes a review branch and stops (``branch``), and then works
from the commit it pushed; ``off`` records nothing and is allowed only for a directory source.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import yaml
from prefect import task
from prefect.cache_policies import NONE as NO_CACHE
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from backends.definitions import read_git, read_tree, resolve_ref, write_definition
from backends.git import RemoteRepo, is_remote, redact
from models.errors import PermanentError
from models.load import Definitions, load

ROOT = Path(__file__).resolve().parents[1]
WriteBack = Literal["push", "branch", "off"]


class DefinitionsSource(BaseModel):
    """Where the definitions come from: a directory, or a Git repository (URL or local clone) at a ref."""

    path: Optional[str] = Field(None, description="A definitions directory (default: $FLEETWRIGHT_DEFINITIONS or the example fleet)")
    repo: Optional[str] = Field(None, description="A Git URL (https://, ssh://, git@host:path, file://) or a local clone's path")
    ref: str = Field("HEAD", description="The branch, tag or commit to read (HEAD: the remote's default branch)")
    subdir: str = Field("", description="The definitions' folder inside the repository")
    base_ref: Optional[str] = Field(None, description="The ref last applied; the change since it is judged by policy")
    credentials_block: Optional[str] = Field(None, description="Name of the Git credentials block "
                                             "(default: fleetwright-git if it exists); never the secret itself")
    branch: Optional[str] = Field(None, description="The branch a pinned commit was read from (set when pinning; "
                                  "write-back pushes to it)")

    @property
    def remote(self) -> bool:
        return bool(self.repo) and is_remote(self.repo)


def default_source() -> DefinitionsSource:
    """From the worker's environment: ``FLEETWRIGHT_DEFINITIONS_REPO`` (URL or clone) + ``_REF`` + ``_SUBDIR``,
    else ``FLEETWRIGHT_DEFINITIONS`` (a directory), else the example fleet."""
    if os.environ.get("FLEETWRIGHT_DEFINITIONS_REPO"):
        return DefinitionsSource(repo=os.environ["FLEETWRIGHT_DEFINITIONS_REPO"],
                                 ref=os.environ.get("FLEETWRIGHT_DEFINITIONS_REF", "HEAD"),
                                 subdir=os.environ.get("FLEETWRIGHT_DEFINITIONS_SUBDIR", ""))
    return DefinitionsSource(path=os.environ.get("FLEETWRIGHT_DEFINITIONS", str(ROOT / "examples" / "fleet")))


@dataclass(frozen=True)
class Revision:
    """What a run read: the repository (or directory), the ref asked for and the commit it named."""

    source: str
    ref: str
    sha: str  # a commit SHA; for a directory, "dir:" + a hash of the files' contents

    def __str__(self) -> str:
        return f"{self.source} @ {self.sha}" + (f" ({self.ref})" if self.ref and self.ref != self.sha else "")


_PINS: dict[tuple, Revision] = {}  # (flow run id, repo, ref) -> the run's revision
_LAST: dict[str, Revision] = {}  # flow run id -> the revision it read last (named by its artifacts)
_LOCK = threading.Lock()


def _run_id() -> str:
    try:
        return str(flow_run.get_id() or "")
    except Exception:  # noqa: BLE001 - outside a run
        return ""


def revision() -> Optional[Revision]:
    """The definitions revision this flow run read (last loaded), for artifacts."""
    with _LOCK:
        return _LAST.get(_run_id())


def _remember(rid: str, key: tuple, rev: Revision) -> None:
    with _LOCK:
        if len(_PINS) > 2000:  # a long-lived process running many flows: keep the map bounded
            _PINS.clear()
            _LAST.clear()
        if rid:
            _PINS[key] = rev
        _LAST[rid] = rev


def remote_repo(source: DefinitionsSource) -> RemoteRepo:
    from .blocks import git_credentials

    return RemoteRepo(source.repo, git_credentials(source.credentials_block))


def pin(source: DefinitionsSource) -> tuple[DefinitionsSource, Revision]:
    """The source pinned to one commit (fetching the cache clone first, once per run and source)."""
    rid = _run_id()
    key = (rid, source.repo or source.path, source.ref, source.subdir)
    with _LOCK:
        pinned = _PINS.get(key) if rid else None
    if pinned is None:
        if source.remote:
            repo = remote_repo(source)
            repo.fetch()
            sha = repo.resolve(source.ref)
            pinned = Revision(redact(source.repo), source.ref, sha)
        elif source.repo:
            pinned = Revision(source.repo, source.ref, resolve_ref(source.repo, source.ref))
        else:  # a directory cannot be pinned: its digest as this run read it (read again only if it did not)
            with _LOCK:
                known = _PINS.get(("dir", str(source.path or default_source().path), rid)) if rid else None
            return source, known or _dir_revision(source)
    _remember(rid, key, pinned)
    branch = source.branch or (None if re.match(r"^[0-9a-f]{40}$", source.ref) else source.ref)
    return source.model_copy(update={"ref": pinned.sha, "branch": branch}), pinned


def _dir_revision(source: DefinitionsSource, files: Optional[dict[str, str]] = None) -> Revision:
    path = source.path or default_source().path
    files = read_tree(path) if files is None else files
    digest = hashlib.sha256("\0".join(f"{k}\0{v}" for k, v in sorted(files.items())).encode()).hexdigest()[:16]
    rev = Revision(str(path), "", f"dir:{digest}")
    _remember(_run_id(), ("dir", str(path), _run_id()), rev)
    return rev


def read_files(source: DefinitionsSource, ref: str) -> dict[str, str]:
    """The definitions' files at ``ref`` (of a git source; pinned sources pass their SHA)."""
    if source.remote:
        repo = remote_repo(source)
        return repo.read(repo.resolve(ref), source.subdir)
    return read_git(source.repo, ref, source.subdir)


@task(name="load-definitions", cache_policy=NO_CACHE)
def load_definitions(source: DefinitionsSource, checked: Optional[str] = None) -> tuple[Definitions, Optional[Definitions]]:
    """Strictly load the definitions at the run's pinned commit (and those at ``base_ref``, for the policy check).

    ``checked``: the revision (commit SHA, or a directory's digest) another run already checked in
    full; when this run reads that very revision, the fleet-wide checks are not run again."""
    if source.repo:
        pinned, rev = pin(source)
        new = load(read_files(pinned, pinned.ref), checks=checked != rev.sha)
        old = load(read_files(pinned, source.base_ref)) if source.base_ref else None
        return new, old
    files = read_tree(source.path or default_source().path)
    rev = _dir_revision(source, files)
    return load(files, checks=checked != rev.sha), None


# --------------------------------------------------------------------------- write-back


def component_set_doc(name: str, component: str, selector: dict, values: dict, actor: str) -> tuple[str, str]:
    """``(relative path, YAML text)`` of the ComponentSet that keeps an added component in the definitions."""
    doc = {"apiVersion": "fleetwright.io/v1alpha1", "kind": "ComponentSet", "metadata": {"name": name},
           "spec": {"description": f"added by {actor} through add-component", "clusterSelector": {"matchLabels": selector},
                    "components": [{"name": component, **({"values": values} if values else {})}]}}
    return f"componentsets/{name}.yaml", yaml.safe_dump(doc, sort_keys=False)


@dataclass
class WriteBackResult:
    mode: str
    source: DefinitionsSource  # where the rollout reads from now (pinned to the pushed commit)
    sha: Optional[str]  # the commit the change is in (None: directory source)
    branch: Optional[str]  # the branch pushed to
    attempts: int = 1
    rebased_onto: tuple[str, ...] = ()
    unchanged: bool = False

    def to_dict(self) -> dict:
        return {"mode": self.mode, "sha": self.sha, "branch": self.branch, "attempts": self.attempts,
                "rebased_onto": list(self.rebased_onto), "unchanged": self.unchanged}


def _review_branch(name: str, run: str) -> str:
    return re.sub(r"[^A-Za-z0-9._/-]+", "-", f"fleetwright/{name}-{run[:8] or 'local'}")


@task(name="write-back", cache_policy=NO_CACHE)
def write_back(source: DefinitionsSource, files: dict[str, str], *, mode: WriteBack, message: str, actor: str,
               review_name: str = "change", attempts: int = 3) -> WriteBackResult:
    """Record ``files`` (paths relative to the definitions folder) in the definitions BEFORE any rollout.

    ``push``: commit on the run's pinned commit and push to its branch (rebased and retried when the branch
    moved, up to ``attempts``); ``branch``: push a review branch instead and stop; ``off``: nothing
    (directory sources only). Every commit is loaded strictly before it is pushed: a change that would
    make the definitions invalid is never pushed.
    """
    if mode == "off":
        if source.repo:
            raise PermanentError("write-back 'off' is allowed only for a directory source: a Git source is the "
                                 "source of truth, so the change must go through it (use 'push' or 'branch')")
        return WriteBackResult("off", source, None, None)
    prefix = f"{source.subdir.strip('/')}/" if source.subdir.strip("/") else ""
    if not source.repo:  # a plain directory: write the file first, then roll out from the directory
        if mode == "branch":
            raise PermanentError("write-back 'branch' needs a Git source")
        root = source.path or default_source().path
        for rel, text in files.items():
            write_definition(root, rel, text, message=message, author=actor, git_repo=False)
        _dir_revision(source)
        return WriteBackResult("push", source, None, None)
    pinned, rev = pin(source)
    if not source.remote:  # a local clone: commit in it (no remote to push to)
        if mode == "branch":
            raise PermanentError("write-back 'branch' needs a remote Git source")
        sha = None
        for rel, text in files.items():
            sha = write_definition(source.repo, prefix + rel, text, message=message, author=actor, git_repo=True)
        new = source.model_copy(update={"ref": sha})
        return WriteBackResult("push", new, sha, None)
    repo = remote_repo(source)
    branch = repo.branch_of(source.branch or source.ref)

    def check(sha: str) -> None:  # the commit must load: never push definitions that do not
        load(repo.read(sha, source.subdir))

    target = _review_branch(review_name, _run_id()) if mode == "branch" else None
    res = repo.write_back(rev.sha, branch, {prefix + k: v for k, v in files.items()}, message=message, author=actor,
                          target=target, attempts=attempts, check=check)
    new = source.model_copy(update={"ref": res.sha, "branch": branch})
    _remember(_run_id(), (_run_id(), source.repo, res.sha, source.subdir), Revision(redact(source.repo), res.sha, res.sha))
    return WriteBackResult(mode, new, res.sha, target or branch, res.attempts, tuple(res.rebased_onto), res.unchanged)


@task(name="record-component-set", cache_policy=NO_CACHE)
def record_component_set(source: DefinitionsSource, name: str, component: str, selector: dict, values: dict,
                         actor: str) -> Optional[str]:
    """Write the ComponentSet that keeps an added component in the definitions (a commit in a git repo)."""
    rel, text = component_set_doc(name, component, selector, values, actor)
    root = source.repo or source.path or default_source().path
    rel = f"{source.subdir + '/' if source.subdir else ''}{rel}"
    return write_definition(root, rel, text, message=f"add {component} to {selector}",
                            author=actor, git_repo=bool(source.repo))
