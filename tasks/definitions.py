"""Tasks that read and record definitions (a directory, or a git repository at a ref)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import yaml
from prefect import task
from prefect.cache_policies import NONE as NO_CACHE
from pydantic import BaseModel, Field

from backends.definitions import read_git, read_tree, write_definition
from models.load import Definitions, load

ROOT = Path(__file__).resolve().parents[1]


class DefinitionsSource(BaseModel):
    """Where the definitions come from: a directory, or a git repository at a ref."""

    path: Optional[str] = Field(None, description="A definitions directory (default: $FLEETWRIGHT_DEFINITIONS or the example fleet)")
    repo: Optional[str] = Field(None, description="A git repository (a local path) holding the definitions")
    ref: str = Field("HEAD", description="The git ref to load")
    subdir: str = Field("", description="The definitions' folder inside the repository")
    base_ref: Optional[str] = Field(None, description="The ref last applied; the change since it is judged by policy")


def default_source() -> DefinitionsSource:
    if os.environ.get("FLEETWRIGHT_DEFINITIONS_REPO"):
        return DefinitionsSource(repo=os.environ["FLEETWRIGHT_DEFINITIONS_REPO"],
                                 subdir=os.environ.get("FLEETWRIGHT_DEFINITIONS_SUBDIR", ""))
    return DefinitionsSource(path=os.environ.get("FLEETWRIGHT_DEFINITIONS", str(ROOT / "examples" / "fleet")))


@task(name="load-definitions", cache_policy=NO_CACHE)
def load_definitions(source: DefinitionsSource) -> tuple[Definitions, Optional[Definitions]]:
    """Strictly load the definitions (and those at ``base_ref``, for the policy check)."""
    if source.repo:
        new = load(read_git(source.repo, source.ref, source.subdir))
        old = load(read_git(source.repo, source.base_ref, source.subdir)) if source.base_ref else None
        return new, old
    return load(read_tree(source.path or default_source().path)), None


@task(name="record-component-set", cache_policy=NO_CACHE)
def record_component_set(source: DefinitionsSource, name: str, component: str, selector: dict, values: dict,
                         actor: str) -> Optional[str]:
    """Write the ComponentSet that keeps an added component in the definitions (a commit in a git repo)."""
    doc = {"apiVersion": "fleetwright.io/v1alpha1", "kind": "ComponentSet", "metadata": {"name": name},
           "spec": {"description": f"added by {actor} through add-component", "clusterSelector": {"matchLabels": selector},
                    "components": [{"name": component, **({"values": values} if values else {})}]}}
    root = source.repo or source.path or default_source().path
    rel = f"{source.subdir + '/' if source.subdir else ''}componentsets/{name}.yaml"
    return write_definition(root, rel, yaml.safe_dump(doc, sort_keys=False), message=f"add {component} to {selector}",
                            author=actor, git_repo=bool(source.repo))
