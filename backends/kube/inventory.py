"""The inventory ConfigMaps (what was applied, the commit point of an apply), pruning and removal.

As ``kubectl apply --prune``'s ApplySet or Flux's inventory: see the package docstring.
"""
from __future__ import annotations

import json
import time

from models.desired import DesiredCluster
from models.errors import OwnershipConflict, TransientError
from models.render import COMPONENT_LABEL, MANAGED_BY, MANAGER, WORKSPACE_LABEL

from ..base import StepResult
from .objects import (DELETE_RANK, INVENTORY_KEY, INVENTORY_LABEL, HASH_ANNOTATION, Key, Owner, Res, inventory_refs,
                      is_inventory, key_of, ours, ref_str, system_namespace, group_of)


class Inventory:
    """Inventories, prune and remove: a mixin of :class:`backends.kube.KubeBackend`."""

    def _inventories(self, owner: Owner | None = None) -> list[dict]:
        res = self._resource("v1", "ConfigMap")
        selector = f"{MANAGED_BY}={MANAGER},{INVENTORY_LABEL}"
        if owner is not None:
            selector = f"{MANAGED_BY}={MANAGER},{INVENTORY_LABEL}={owner.kind},{owner.label}={owner.name}"
        return self._list(res, selector)

    @staticmethod
    def _inventory_annotations(invs: list[dict]) -> dict[str, str]:
        for inv in invs:
            ann = inv["metadata"].get("annotations") or {}
            if HASH_ANNOTATION in ann:
                return ann
        return {}

    def _write_inventory(self, owner: Owner, namespace: str, refs: list[list[str]], annotations: dict) -> bool:
        res = self._resource("v1", "ConfigMap")
        obj = {"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": owner.inventory_name, "namespace": namespace,
                            "labels": {MANAGED_BY: MANAGER, owner.label: owner.name, INVENTORY_LABEL: owner.kind},
                            "annotations": dict(annotations)},
               "data": {INVENTORY_KEY: json.dumps(refs)}}
        live = self._get(res, obj)
        if live is not None and not ours(live):
            raise OwnershipConflict(f"{owner}: ConfigMap/{namespace}/{owner.inventory_name} exists without "
                                    f"{MANAGED_BY}={MANAGER}; fleetwright will not adopt it")
        return self._apply_object(owner, res, obj, live)

    # ------------------------------------------------------------------ prune, remove, delete

    def _find_owned(self, owner: Owner, kinds: set[tuple[str, str]]) -> list[tuple[Res, dict]]:
        """Every object with ``owner``'s labels of the given kinds (one version per group/kind), inventories excluded."""
        out, seen = [], set()
        for api_version, kind in sorted(kinds | {("v1", "Namespace")}):
            gk = (group_of(api_version), kind)
            if gk in seen:
                continue
            res = self._resource(api_version, kind)
            if res is None:
                continue
            seen.add(gk)
            out.extend((res, it) for it in self._list(res, owner.selector) if not is_inventory(it))
        return out

    def _delete_owned(self, owner: Owner, kinds: set[tuple[str, str]], keep: set[Key]
                      ) -> tuple[list[str], list[tuple[Res, dict]]]:
        """Delete ``owner``'s objects of ``kinds`` not in ``keep``, reverse order; (deleted, namespaces deleted)."""
        victims = []
        for res, it in self._find_owned(owner, kinds):
            m = it["metadata"]
            if key_of(it["apiVersion"], it["kind"], m.get("namespace") if res.namespaced else None, m["name"]) in keep:
                continue
            if system_namespace(it):
                continue
            victims.append((res, it))
        victims.sort(key=lambda v: -DELETE_RANK.get(v[1]["kind"], 9))
        deleted = []
        for res, it in victims:
            if self._delete_item(res, it):
                deleted.append(ref_str(it))
        return deleted, [(res, it) for res, it in victims if it["kind"] == "Namespace"]

    def _delete_item(self, res: Res, item: dict) -> bool:
        m = item["metadata"]
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        if m.get("uid"):
            body["preconditions"] = {"uid": m["uid"]}
        out = self._request("DELETE", res.item(m.get("namespace"), m["name"]), body=body, what=ref_str(item))
        return out is not None

    def _wait_gone(self, items: list[tuple[Res, dict]]) -> None:
        deadline = time.monotonic() + self._ns_timeout
        for res, it in items:
            while self._get(res, it) is not None:
                if time.monotonic() >= deadline:
                    raise TransientError(f"{ref_str(it)} is still terminating after {self._ns_timeout:.0f}s")
                time.sleep(self._poll * 2)

    def _remove_set(self, owner: Owner, desired_objects: list[dict], wait: bool = True) -> tuple[bool, str, dict]:
        """Delete everything of ``owner``; with ``wait``, until its namespaces are gone (else in ``outputs``)."""
        invs = self._inventories(owner)
        kinds = {(o["apiVersion"], o["kind"]) for o in desired_objects}
        kinds |= {(r[0], r[1]) for inv in invs for r in inventory_refs(inv)}
        deleted, namespaces = self._delete_owned(owner, kinds, set())
        if wait:
            self._wait_gone(namespaces)
        cm = self._resource("v1", "ConfigMap")
        for inv in invs:  # inventories outside the deleted namespaces
            if self._delete_item(cm, inv):
                deleted.append(ref_str(inv))
        changed = bool(deleted or invs)
        detail = f"{owner}: {len(deleted)} objects deleted" if changed else f"{owner}: nothing of it exists"
        return changed, detail, {"deleted": deleted, "namespaces": [] if wait else namespaces}

    def delete(self, desired: DesiredCluster) -> StepResult:
        """Remove every workspace and in-cluster component of ours (desired or found by inventory).

        Workspaces first, then components in reverse dependency order; all namespaces are
        deleted before waiting for them once, at the end.
        """
        found = []
        for inv in self._inventories():
            labels = inv["metadata"].get("labels") or {}
            found.append((labels.get(INVENTORY_LABEL), labels.get(COMPONENT_LABEL) or labels.get(WORKSPACE_LABEL)))
        teams = list(dict.fromkeys([w.team for w in desired.workspaces] + [n for k, n in found if k == "workspace" and n]))
        known = [c.name for c in desired.components if c.target == "kubernetes"]
        comps = list(dict.fromkeys([n for k, n in found if k == "component" and n and n not in known]
                                   + list(reversed(known))))
        objects = {("component", c.name): c.objects for c in desired.components}
        objects.update({("workspace", w.team): w.objects for w in desired.workspaces})
        changed, deleted, namespaces = False, [], []
        for owner in [Owner("workspace", t) for t in teams] + [Owner("component", c) for c in comps]:
            ch, _, out = self._remove_set(owner, objects.get((owner.kind, owner.name), []), wait=False)
            changed |= ch
            deleted += out["deleted"]
            namespaces += out["namespaces"]
        self._wait_gone(namespaces)
        detail = f"{len(deleted)} objects of fleetwright deleted" if changed else "nothing of fleetwright's was left"
        return StepResult(step_id=f"{desired.name}/delete/kubernetes", changed=changed, detail=detail,
                          outputs={"deleted": deleted})
