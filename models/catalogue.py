"""The catalogue of definitions (:class:`Definitions`) and where each document and field came from.

Apart from :mod:`models.load` so that the checks and the resolver, which load itself calls, can
use it without importing ``load`` back (no import cycle, not even a hidden one).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import yaml

from .spec import Cluster, ClusterModel, Component, ComponentSet, Policy, Team

YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class DocRef:
    """Where a document came from: its file and its index among the file's documents."""

    file: str
    index: int


@dataclass
class Definitions:
    """Everything a definitions tree declares, by kind and name. Built only by :func:`models.load.load`."""

    components: dict[str, Component] = field(default_factory=dict)
    models: dict[str, dict[str, ClusterModel]] = field(default_factory=dict)
    clusters: dict[str, Cluster] = field(default_factory=dict)
    teams: dict[str, Team] = field(default_factory=dict)
    policies: dict[str, Policy] = field(default_factory=dict)
    component_sets: dict[str, ComponentSet] = field(default_factory=dict)
    refs: dict[tuple[str, ...], DocRef] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict, repr=False)
    resolved: dict = field(default_factory=dict, repr=False)  # DesiredCluster by name, filled by validation

    def model(self, ref: str) -> ClusterModel | None:
        name, _, version = ref.partition("@")
        return self.models.get(name, {}).get(version)

    def ref_of(self, kind: str, *key: str) -> DocRef | None:
        return self.refs.get((kind, *key))


class Locator:
    """Finds the line of a field path inside a document, composing YAML nodes only on demand."""

    def __init__(self, files: dict[str, str]):
        self._files = files
        self._nodes: dict[str, list[yaml.Node]] = {}

    def _docs(self, file: str) -> list[yaml.Node]:
        if file not in self._nodes:
            try:
                self._nodes[file] = list(yaml.compose_all(self._files.get(file, ""), Loader=YAML_LOADER))
            except yaml.YAMLError:
                self._nodes[file] = []
        return self._nodes[file]

    def locate(self, ref: DocRef, loc: Iterable[Any]) -> tuple[int, str]:
        """Return (line, dotted path) for ``loc``; elements that are not in the YAML (union tags) are skipped."""
        docs = self._docs(ref.file)
        if ref.index >= len(docs):
            return 0, format_path(loc)
        node = docs[ref.index]
        line = node.start_mark.line + 1
        path: list[Any] = []
        for part in loc:
            if isinstance(node, yaml.MappingNode) and isinstance(part, str):
                for k, v in node.value:
                    if isinstance(k, yaml.ScalarNode) and k.value == part:
                        line, node = k.start_mark.line + 1, v
                        path.append(part)
                        break
                else:
                    if part in _UNION_TAGS:
                        continue
                    path.append(part)  # a missing field: report it at its parent's line
                    node = None
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
                if part < len(node.value):
                    node = node.value[part]
                    line = node.start_mark.line + 1
                path.append(part)
            elif node is None:
                path.append(part)
            elif isinstance(part, str) and part in _UNION_TAGS:
                continue
            else:
                path.append(part)
        return line, format_path(path)


_UNION_TAGS = {"aws", "vsphere", "metal", "int", "str", "float", "bool", "dict", "list",
               "literal['small','medium','large','xlarge','gpu']", "constrained-str", "function-after", "none"}


def format_path(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out
