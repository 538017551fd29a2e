"""Strict loading of definitions from YAML text, with every error located.

``load(files)`` takes ``{relative path: text}`` (reading files or a git tree is
the job of ``backends.definitions``) and returns a :class:`Definitions`
catalogue, or raises :class:`SpecInvalid` listing every problem as
``FILE:LINE: FIELD: message``. YAML is parsed with libyaml when available; line
numbers are worked out only for documents that have an error, so the happy
path costs little more than the parse.
"""
from __future__ import annotations

from typing import Any

import yaml
from pydantic import ValidationError

from .catalogue import YAML_LOADER as _Loader
from .catalogue import Definitions, DocRef, Locator
from .checks import check
from .errors import Problem, SpecInvalid
from .spec import API_VERSION, KINDS, ClusterModel

YAML_SUFFIXES = (".yaml", ".yml")


def _message(err: dict) -> str:
    kind, inp = err.get("type"), err.get("input")
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required field is missing"
    if kind == "string_type" and isinstance(inp, float):
        return f"must be a string: quote it (YAML reads {inp!r} as a number)"
    if kind == "string_pattern_mismatch":
        pat = (err.get("ctx") or {}).get("pattern", "")
        return f"{inp!r} does not match the required pattern {pat}"
    if kind == "value_error":
        return str((err.get("ctx") or {}).get("error") or err.get("msg", "invalid"))
    if kind == "union_tag_invalid":
        ctx = err.get("ctx") or {}
        return f"unknown {ctx.get('discriminator', 'type').strip(chr(39))} {ctx.get('tag')!r}: expected one of {ctx.get('expected_tags')}"
    return err.get("msg", "invalid")


def load(files: dict[str, str], checks: bool = True) -> Definitions:
    """Parse and check every document in ``files``; raise SpecInvalid with all problems found.

    ``checks=False`` skips the fleet-wide checks (every cluster resolved), for a caller that knows
    these very files passed them (a sweep's shard reading the commit its fleet run checked); each
    document is still parsed and validated."""
    defs = Definitions(files=files)
    problems: list[Problem] = []
    loc = Locator(files)
    for file in sorted(files):
        if not file.endswith(YAML_SUFFIXES):  # calendars (.ics) are read where a maintenance block names them
            continue
        try:
            raw_docs = list(yaml.load_all(files[file], Loader=_Loader))
        except yaml.YAMLError as e:
            problems.append(_yaml_problem(file, files[file], e))
            continue
        for index, raw in enumerate(raw_docs):
            if raw is None:
                continue
            ref = DocRef(file, index)
            obj = _validate(raw, ref, loc, problems)
            if obj is not None:
                _register(defs, obj, ref, loc, problems)
    if not problems and checks:
        problems.extend(check(defs, loc))
    if problems:
        raise SpecInvalid(problems)
    return defs


def _yaml_problem(file: str, text: str, e: yaml.YAMLError) -> Problem:
    """A YAML error located at its line; a reader error (a character YAML forbids) has only an offset."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    if mark is not None:
        return Problem(file, mark.line + 1, "", f"YAML syntax: {getattr(e, 'problem', None) or e}")
    if isinstance(e, yaml.reader.ReaderError):
        line = text.count("\n", 0, max(e.position, 0)) + 1
        return Problem(file, line, "", f"YAML syntax: character {e.character!r} is not allowed here ({e.reason})")
    return Problem(file, 1, "", f"YAML syntax: {e}")


def _validate(raw: Any, ref: DocRef, loc: Locator, problems: list[Problem]):
    if not isinstance(raw, dict):
        line, _ = loc.locate(ref, ())
        problems.append(Problem(ref.file, line, "", f"a document must be a mapping, not {type(raw).__name__}"))
        return None
    if raw.get("apiVersion") != API_VERSION:
        line, path = loc.locate(ref, ("apiVersion",))
        problems.append(Problem(ref.file, line, "apiVersion", f"must be {API_VERSION!r}, got {raw.get('apiVersion')!r}"))
        return None
    cls = KINDS.get(raw.get("kind")) if isinstance(raw.get("kind"), str) else None
    if cls is None:
        line, _ = loc.locate(ref, ("kind",))
        problems.append(Problem(ref.file, line, "kind", f"must be one of {sorted(KINDS)}, got {raw.get('kind')!r}"))
        return None
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        seen: dict[tuple[int, str], list[str]] = {}
        for err in e.errors():
            line, path = loc.locate(ref, err["loc"])
            msgs = seen.setdefault((line, path), [])
            m = _message(err)
            if m not in msgs:
                msgs.append(m)
        for (line, path), msgs in seen.items():
            problems.append(Problem(ref.file, line, path, " or ".join(msgs)))
        return None


def _register(defs: Definitions, obj, ref: DocRef, loc: Locator, problems: list[Problem]) -> None:
    name = obj.metadata.name
    if isinstance(obj, ClusterModel):
        key = ("ClusterModel", name, obj.metadata.version)
        table = defs.models.setdefault(name, {})
        slot = obj.metadata.version
    else:
        key = (obj.kind, name)
        table = {"Component": defs.components, "Cluster": defs.clusters, "Team": defs.teams,
                 "Policy": defs.policies, "ComponentSet": defs.component_sets}[obj.kind]
        slot = name
    if key in defs.refs:
        first = defs.refs[key]
        line, _ = loc.locate(ref, ("metadata", "name"))
        first_line, _ = loc.locate(first, ("metadata", "name"))
        problems.append(Problem(ref.file, line, "metadata.name",
                                f"duplicate {obj.kind} {'@'.join(key[1:])!r}: first defined at {first.file}:{first_line}"))
        return
    defs.refs[key] = ref
    table[slot] = obj


def parse_one(cls, file: str, text: str):
    """Parse one YAML/JSON document of pydantic type ``cls`` with located errors (used for observed-state files)."""
    problems: list[Problem] = []
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise SpecInvalid([Problem(file, mark.line + 1 if mark else 0, "", f"YAML syntax: {getattr(e, 'problem', None) or e}")]) from None
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        loc = Locator({file: text})
        for err in e.errors():
            line, path = loc.locate(DocRef(file, 0), err["loc"])
            problems.append(Problem(file, line, path, _message(err)))
        raise SpecInvalid(problems) from None
