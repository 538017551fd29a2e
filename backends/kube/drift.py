"""Field drift and observation: what of a component or workspace exists, and which of our fields differ.

:func:`object_drift` compares only the fields fleetwright sets in the desired object with the live
one; :class:`Observer` reads a cluster's components and workspaces with it (``observe`` never writes).
"""
from __future__ import annotations

import base64
import re
from typing import Any

from kubernetes.utils.quantity import parse_quantity

from models.desired import DesiredCluster, FieldDrift, ObservedCluster, ObservedComponent, ObservedWorkspace
from models.errors import OwnershipConflict
from models.render import COMPONENT_LABEL, HASH_ANNOTATION, MANAGED_BY, MANAGER, WORKSPACE_LABEL

from .objects import (INVENTORY_LABEL, OWN_ANNOTATIONS, VERSION_ANNOTATION, Owner, group_of, ours, prepare,
                      ref_str, system_namespace)

__all__ = ["object_drift", "group_of", "ref_str", "Observer"]

_SIMPLE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_QUANTITY_PARENTS = {"hard", "limits", "requests", "default", "defaultRequest", "max", "min",
                     "maxLimitRequestRatio", "capacity"}
_MISSING = object()

def _join(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if _SIMPLE_KEY.match(str(key)):
        return f"{path}.{key}" if path else str(key)
    return f'{path}["{key}"]'


def _empty(v: Any) -> bool:
    return v is None or v is _MISSING or v == {} or v == [] or v == ""


def _same_scalar(d: Any, live: Any, quantity: bool) -> bool:
    if d == live and type(d) is type(live):
        return True
    if isinstance(d, (int, float)) and isinstance(live, (int, float)) and not isinstance(d, bool) \
            and not isinstance(live, bool):
        return d == live
    if quantity and isinstance(d, (str, int, float)) and isinstance(live, (str, int, float)):
        try:
            return parse_quantity(d) == parse_quantity(live)
        except (ValueError, TypeError, ArithmeticError):
            return False
    return False


def _compare(d: Any, live: Any, path: str, out: list, ref: str, quantities: bool, key: str = "",
             parent: str = "") -> None:
    """Compare desired ``d`` (at ``key``, inside the mapping at ``parent``) with ``live``."""
    if isinstance(d, dict):
        if not isinstance(live, dict):
            if not (d == {} and _empty(live)):
                out.append(FieldDrift(path=f"{ref}:{path}", desired=d, observed=None if live is _MISSING else live))
            return
        for k, v in d.items():
            _compare(v, live.get(k, _MISSING), _join(path, k), out, ref, quantities, str(k), key)
        return
    if isinstance(d, list):
        if not isinstance(live, list):
            if not (d == [] and _empty(live)):
                out.append(FieldDrift(path=f"{ref}:{path}", desired=d, observed=None if live is _MISSING else live))
            return
        if len(d) != len(live):
            out.append(FieldDrift(path=f"{ref}:{path}", desired=d, observed=live))
            return
        for i, (dv, lv) in enumerate(zip(d, live)):
            _compare(dv, lv, _join(path, i), out, ref, quantities, key, parent)
        return
    if d is None and _empty(live):
        return
    if live is _MISSING or not _same_scalar(d, live, quantities and parent in _QUANTITY_PARENTS):
        out.append(FieldDrift(path=f"{ref}:{path}", desired=d, observed=None if live is _MISSING else live))


REDACTED = "(redacted)"


def _decoded(value: Any) -> bytes | None:
    try:
        return base64.b64decode(value, validate=False) if isinstance(value, str) else None
    except (ValueError, TypeError):
        return None


def _secret_drift(ref: str, key: str, value: Any, live_data: Any) -> list[FieldDrift]:
    """Which keys of a Secret's ``data``/``stringData`` differ from the live ``data``; never the values.

    ``observed`` is None when the key is missing from the live Secret, else :data:`REDACTED`.
    """
    live_data = live_data if isinstance(live_data, dict) else {}
    if not isinstance(value, dict):
        return [FieldDrift(path=f"{ref}:{key}", desired=REDACTED, observed=REDACTED if live_data else None)]
    out = []
    for k, v in value.items():
        have = live_data.get(k)
        if key == "stringData":
            same = have is not None and _decoded(have) == (v if isinstance(v, str) else str(v)).encode()
        else:
            same = have is not None and (have == v or (_decoded(have) is not None and _decoded(have) == _decoded(v)))
        if not same:
            out.append(FieldDrift(path=f"{ref}:{_join(key, k)}", desired=REDACTED,
                                  observed=None if have is None else REDACTED))
    return out


def object_drift(desired: dict, live: dict | None) -> list[FieldDrift]:
    """Every field fleetwright sets in ``desired`` whose live value differs, as ``Kind/ns/name:field.path``.

    Only fields present in ``desired`` are looked at (labels and annotations key by key, except
    fleetwright's own hash/version annotations, which ``observe`` reads from the inventory);
    server-set fields and defaults are therefore ignored. Quantities under ``hard``/``limits``/
    ``requests``/``default``... compare by value (``1000m`` == ``1``); a Secret's ``stringData``
    is compared with the live base64 ``data``. A Secret's values never appear in a drift: only which
    key differs (:data:`REDACTED`). A missing object is one drift with ``observed=None``.
    """
    ref = ref_str(desired)
    if live is None:
        return [FieldDrift(path=ref, desired="present", observed=None)]
    out: list[FieldDrift] = []
    dmeta, lmeta = desired.get("metadata") or {}, live.get("metadata") or {}
    for fld in ("labels", "annotations"):
        want = {k: v for k, v in (dmeta.get(fld) or {}).items() if k not in OWN_ANNOTATIONS}
        have = lmeta.get(fld) or {}
        for k in want:
            if have.get(k) != want[k]:
                out.append(FieldDrift(path=f"{ref}:{_join('metadata.' + fld, k)}", desired=want[k], observed=have.get(k)))
    kind = desired.get("kind")
    quantities = kind not in ("ConfigMap", "Secret")
    for key, value in desired.items():
        if key in ("apiVersion", "kind", "metadata", "status"):
            continue
        if kind == "Secret" and key in ("data", "stringData"):
            out.extend(_secret_drift(ref, key, value, live.get("data")))
            continue
        _compare(value, live.get(key, _MISSING), _join("", key), out, ref, quantities, key)
    return out


class Observer:
    """``observe``: a mixin of :class:`backends.kube.KubeBackend` (uses the client and inventory services)."""

    def observe(self, desired: DesiredCluster) -> ObservedCluster:
        invs = self._inventories()
        by_owner: dict[tuple[str, str], list[dict]] = {}
        for inv in invs:
            labels = inv["metadata"].get("labels") or {}
            kind = labels.get(INVENTORY_LABEL)
            name = labels.get(COMPONENT_LABEL if kind == "component" else WORKSPACE_LABEL)
            if kind in ("component", "workspace") and name:
                by_owner.setdefault((kind, name), []).append(inv)

        components: dict[str, ObservedComponent] = {}
        for c in desired.components:
            if c.target != "kubernetes":
                continue
            owner = Owner("component", c.name)
            found = self._observe_set(owner, [prepare(o, owner.label, c.name, c.hash, c.version) for o in c.objects],
                                      by_owner.get(("component", c.name), []))
            if found is not None:
                version, spec_hash, drift = found
                components[c.name] = ObservedComponent(version=version or "unknown", hash=spec_hash, drift=drift)
        workspaces: dict[str, ObservedWorkspace] = {}
        for w in desired.workspaces:
            owner = Owner("workspace", w.team)
            found = self._observe_set(owner, [prepare(o, owner.label, w.team, w.hash, None) for o in w.objects],
                                      by_owner.get(("workspace", w.team), []), need_version=False)
            if found is not None:
                workspaces[w.team] = ObservedWorkspace(hash=found[1], drift=found[2])
        wanted_c = {c.name for c in desired.components}
        wanted_w = {w.team for w in desired.workspaces}
        for (kind, name), found_invs in sorted(by_owner.items()):
            ann = self._inventory_annotations(found_invs)
            if kind == "component" and name not in wanted_c:
                components[name] = ObservedComponent(version=ann.get(VERSION_ANNOTATION) or "unknown",
                                                     hash=ann.get(HASH_ANNOTATION))
            elif kind == "workspace" and name not in wanted_w:
                workspaces[name] = ObservedWorkspace(hash=ann.get(HASH_ANNOTATION))
        return ObservedCluster(name=desired.name, components=components, workspaces=workspaces)

    def _observe_set(self, owner: Owner, objs: list[dict], invs: list[dict], need_version: bool = True):
        """(version, hash, drift) of one component or workspace, or None when nothing of it exists."""
        crd_scopes = self._crd_kinds(objs)
        drift: list[FieldDrift] = []
        found: list[dict] = []
        for obj in objs:
            if system_namespace(obj):
                continue
            obj = self._normalise(obj, crd_scopes)
            res = self._served(obj)
            live = self._get(res, obj) if res is not None else None
            if live is not None and not ours(live):
                raise OwnershipConflict(f"{owner}: {ref_str(obj)} exists without {MANAGED_BY}={MANAGER}; "
                                        "fleetwright will not adopt, change or delete it")
            if live is not None:
                found.append(live)
            drift.extend(object_drift(obj, live))
        if not invs and not found:
            return None
        ann = self._inventory_annotations(invs)
        if not ann:  # no committed inventory: the objects' own annotations
            ann = next(((o["metadata"].get("annotations") or {}) for o in found
                        if HASH_ANNOTATION in (o["metadata"].get("annotations") or {})), {})
        if not ann or (need_version and VERSION_ANNOTATION not in ann):
            return None  # an install that never finished: planned as an install again
        return ann.get(VERSION_ANNOTATION), ann.get(HASH_ANNOTATION), drift

    # ------------------------------------------------------------------ apply
