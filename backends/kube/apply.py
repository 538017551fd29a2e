"""Server-side apply of a component's or a workspace's objects, with pre-flight ownership checks.

``apply`` carries out one in-cluster step; see the package docstring for the order of writes.
"""
from __future__ import annotations

import logging
import time

from models.desired import DesiredCluster
from models.errors import OwnershipConflict, PermanentError, TransientError
from models.plan import Step
from models.render import HASH_ANNOTATION, MANAGED_BY, MANAGER

from ..base import FIELD_MANAGER, StepResult
from .errors import StaleObject
from .objects import (APPLY_PATCH, CRD, CRD_API, OWN_ANNOTATIONS, VERSION_ANNOTATION, Key, Owner, Res, inventory_refs,
                      key_of, ours, prepare, ref_str, system_namespace)

log = logging.getLogger("backends.kube")


class Applier:
    """``apply``: a mixin of :class:`backends.kube.KubeBackend` (uses the client and inventory services)."""

    def apply(self, desired: DesiredCluster, step: Step) -> StepResult:
        action = step.action
        if action in ("component.install", "component.upgrade", "component.configure"):
            comp = desired.component(step.object)
            if comp is None:
                raise PermanentError(f"{step.id}: component {step.object} is not in the desired state of {desired.name}")
            if comp.target != "kubernetes":
                raise PermanentError(f"{step.id}: component {comp.name} is carried out by the infrastructure backend")
            changed, detail, outputs = self._apply_set(Owner("component", comp.name), comp.objects, comp.namespace,
                                                       comp.hash, comp.version)
        elif action == "component.remove":
            comp = desired.component(step.object)
            changed, detail, outputs = self._remove_set(Owner("component", step.object), comp.objects if comp else [])
        elif action in ("workspace.create", "workspace.update"):
            ws = next((w for w in desired.workspaces if w.team == step.object), None)
            if ws is None:
                raise PermanentError(f"{step.id}: team {step.object} has no workspace on {desired.name}")
            changed, detail, outputs = self._apply_set(Owner("workspace", ws.team), ws.objects, ws.namespaces[0],
                                                       ws.hash, None)
        elif action == "workspace.remove":
            ws = next((w for w in desired.workspaces if w.team == step.object), None)
            changed, detail, outputs = self._remove_set(Owner("workspace", step.object), ws.objects if ws else [])
        else:
            raise PermanentError(f"{step.id}: {action} is not an in-cluster step")
        log.info("%s: %s", step.id, detail)
        return StepResult(step_id=step.id, changed=changed, detail=detail, outputs=outputs)

    def _apply_set(self, owner: Owner, objects: list[dict], inv_ns: str, spec_hash: str,
                   version: str | None) -> tuple[bool, str, dict]:
        prepared = [prepare(o, owner.label, owner.name, spec_hash, version) for o in objects]
        crd_scopes = self._crd_kinds(prepared)
        objs = [o for o in (self._normalise(o, crd_scopes) for o in prepared) if not system_namespace(o)]
        invs = self._inventories(owner)
        old_refs = [r for inv in invs for r in inventory_refs(inv)]
        old_ann = {k: v for k, v in self._inventory_annotations(invs).items() if k in OWN_ANNOTATIONS}

        # pre-flight: every object read, every conflict found, before anything is written
        lives: dict[Key, dict | None] = {}
        conflicts, unserved = [], []
        for o in objs:
            m = o["metadata"]
            res = self._served(o)
            if res is None and (o["apiVersion"], o["kind"]) not in crd_scopes:
                unserved.append(f"{o['kind']} ({o['apiVersion']})")
                continue
            live = self._get(res, o) if res is not None else None
            if live is not None and not ours(live):
                conflicts.append(ref_str(o))
            lives[key_of(o["apiVersion"], o["kind"], m.get("namespace"), m["name"])] = live
        if conflicts:
            raise OwnershipConflict(f"{owner}: {', '.join(conflicts)} exist(s) without {MANAGED_BY}={MANAGER}; "
                                    "fleetwright will not adopt, change or delete them")
        if unserved:
            raise TransientError(f"{owner}: the API server does not serve {', '.join(sorted(set(unserved)))}; "
                                 "is the component providing its CRD installed?")

        new_refs = [[o["apiVersion"], o["kind"], o["metadata"].get("namespace") or "", o["metadata"]["name"]] for o in objs]
        union = new_refs + [r for r in old_refs if key_of(*r) not in {key_of(*n) for n in new_refs}]
        changed_refs: list[str] = []
        inventory_moved = False
        inv_written = False
        pending_crds: list[str] = []
        for o in objs:
            if not inv_written and o["kind"] != "Namespace":
                inventory_moved |= self._write_inventory(owner, inv_ns, union, old_ann)
                inv_written = True
            if pending_crds and o["kind"] != CRD:
                self._wait_established(pending_crds)
                pending_crds = []
            m = o["metadata"]
            key = key_of(o["apiVersion"], o["kind"], m.get("namespace"), m["name"])
            res = self._served(o, wait=self._crd_timeout if (o["apiVersion"], o["kind"]) in crd_scopes else 0.0)
            if res is None:
                raise TransientError(f"{owner}: {o['kind']} ({o['apiVersion']}) is not served yet")
            if self._apply_object(owner, res, o, lives.get(key)):
                changed_refs.append(ref_str(o))
            if o["kind"] == CRD:
                pending_crds.append(m["name"])
        if pending_crds:
            self._wait_established(pending_crds)
        if not inv_written:
            inventory_moved |= self._write_inventory(owner, inv_ns, union, old_ann)

        kinds = {(r[0], r[1]) for r in new_refs + old_refs}
        keep = {key_of(*r) for r in new_refs}
        pruned, _ = self._delete_owned(owner, kinds, keep)

        final_ann = {HASH_ANNOTATION: spec_hash, **({VERSION_ANNOTATION: version} if version else {})}
        inventory_moved |= self._write_inventory(owner, inv_ns, new_refs, final_ann)
        for inv in invs:  # inventories left at an old place (namespace changed)
            m = inv["metadata"]
            if (m.get("namespace"), m.get("name")) != (inv_ns, owner.inventory_name):
                self._delete_item(self._resource("v1", "ConfigMap"), inv)
                inventory_moved = True
        changed = bool(changed_refs or pruned or inventory_moved)
        detail = (f"{owner}: {len(objs)} objects applied, {len(changed_refs)} changed, {len(pruned)} pruned"
                  if changed else f"{owner}: {len(objs)} objects already as desired")
        return changed, detail, {"changed": changed_refs, "pruned": pruned}

    def _apply_object(self, owner: Owner, res: Res, obj: dict, live: dict | None) -> bool:
        """Server-side apply one object; True when the API server wrote something."""
        m = obj["metadata"]
        path = res.item(m.get("namespace"), m["name"])
        query = [("fieldManager", FIELD_MANAGER), ("force", "true")]
        for attempt in range(3):
            body = obj
            if live is not None:  # precondition: the object we checked is the object we write
                body = {**obj, "metadata": {**m, "resourceVersion": live["metadata"]["resourceVersion"]}}
            try:
                out = self._request("PATCH", path, body=body, query=query, content_type=APPLY_PATCH, what=ref_str(obj))
            except StaleObject:
                if attempt == 2:
                    raise
                live = self._get(res, obj)
                if live is not None and not ours(live):
                    raise OwnershipConflict(f"{owner}: {ref_str(obj)} was taken by someone else "
                                            f"(no {MANAGED_BY}={MANAGER}); fleetwright will not adopt it") from None
                continue
            return live is None or (out or {}).get("metadata", {}).get("resourceVersion") != live["metadata"]["resourceVersion"]
        return True  # pragma: no cover

    def _wait_established(self, names: list[str]) -> None:
        res = self._resource(CRD_API, CRD)
        deadline = time.monotonic() + self._crd_timeout
        groups = set()
        for name in names:
            while True:
                crd = self._request("GET", res.item(None, name), what=f"{CRD}/{name}") or {}
                conds = {c.get("type"): c.get("status") for c in (crd.get("status") or {}).get("conditions") or []}
                if conds.get("Established") == "True":
                    spec = crd.get("spec") or {}
                    groups |= {f"{spec.get('group')}/{v.get('name')}" for v in spec.get("versions") or []}
                    break
                if time.monotonic() >= deadline:
                    raise TransientError(f"{CRD}/{name} is not Established after {self._crd_timeout:.0f}s")
                time.sleep(self._poll)
        for gv in groups:
            self._disc.pop(gv, None)
