"""EKS add-ons: the components a cluster spec carries out as ``eksAddon`` (target infrastructure)."""
from __future__ import annotations

import logging
from typing import Any

from models.desired import DesiredCluster, DesiredComponent, FieldDrift, ObservedComponent
from models.errors import OwnershipConflict, PermanentError
from models.plan import Step

from .common import (ADDON_VERSION_KEY, COMPONENT_KEY, COMPONENT_VERSION_KEY, SPEC_HASH_KEY, _addon_config, _owned,
                     _same_config)

log = logging.getLogger(__name__)


class AddonService:
    """Mixin: EKS add-ons."""

    def _addons(self, desired: DesiredCluster) -> dict[str, dict[str, Any]]:
        """Our add-ons keyed by component name. A foreign add-on that a desired component names is a conflict."""
        region = self._region(desired)
        r = self._call("eks", region, "list_addons", clusterName=desired.name)
        wanted = {c.addon["name"]: c.name for c in desired.components
                  if c.source == "eksAddon" and c.target == "infrastructure" and c.addon}
        out = {}
        for name in r.get("addons", []):
            a = self._call("eks", region, "describe_addon", missing_ok=True, clusterName=desired.name, addonName=name)
            if a is None:
                continue
            a = a["addon"]
            tags = a.get("tags") or {}
            if not _owned(tags, desired.name):
                if name in wanted:
                    raise OwnershipConflict(f"EKS add-on {name} of cluster {desired.name} is not marked as fleetwright's")
                continue
            out[tags.get(COMPONENT_KEY) or wanted.get(name) or name] = a
        return out

    def _observed_addon(self, desired: DesiredCluster, comp_name: str, a: dict[str, Any]) -> ObservedComponent:
        """The component an add-on carries, checked against the live add-on.

        When the live add-on runs exactly the add-on version the desired component pins, the
        component runs that version and its configuration is compared field by field (drift).
        Otherwise our tags say which component version and spec hash the live add-on version
        stands for; an add-on version nobody recorded (changed out of band) is reported raw.
        """
        tags = a.get("tags") or {}
        live = a.get("addonVersion")
        comp = desired.component(comp_name)
        if comp is not None and comp.addon and live == comp.addon.get("version"):
            want_cfg, have_cfg = _addon_config(comp), a.get("configurationValues")
            drift = [] if _same_config(have_cfg, want_cfg) else [
                FieldDrift(path="configurationValues", desired=want_cfg, observed=have_cfg)]
            return ObservedComponent(version=comp.version, target="infrastructure", hash=comp.hash, drift=drift)
        if tags.get(ADDON_VERSION_KEY) == live and tags.get(COMPONENT_VERSION_KEY):
            return ObservedComponent(version=tags[COMPONENT_VERSION_KEY], target="infrastructure",
                                     hash=tags.get(SPEC_HASH_KEY))
        return ObservedComponent(version=str(live), target="infrastructure", hash=None)

    # -- components (EKS add-ons)
    def _wait_addon(self, desired: DesiredCluster, addon: str, want: str | None = "ACTIVE") -> dict[str, Any] | None:
        region = self._region(desired)

        def check():
            r = self._call("eks", region, "describe_addon", missing_ok=True, clusterName=desired.name, addonName=addon)
            if want is None:
                return r is None
            if r is None:
                raise PermanentError(f"EKS add-on {addon} disappeared while waiting for {want}")
            a = r["addon"]
            if a["status"] == want:
                return a
            if a["status"] in ("CREATE_FAILED", "DELETE_FAILED", "DEGRADED", "UPDATE_FAILED"):
                issues = "; ".join(f"{i.get('code')}: {i.get('message')}" for i in (a.get("health") or {}).get("issues", []))
                raise PermanentError(f"EKS add-on {addon} is {a['status']}: {issues or 'no details'}")
            return None
        r = self._wait(f"EKS add-on {addon} {want or 'gone'}", check)
        return r if want else None

    def _addon_tags(self, desired: DesiredCluster, comp: DesiredComponent) -> dict[str, str]:
        return self.tags(desired, **{COMPONENT_KEY: comp.name, COMPONENT_VERSION_KEY: comp.version,
                                     SPEC_HASH_KEY: comp.hash, ADDON_VERSION_KEY: comp.addon["version"]})

    def _apply_component(self, desired: DesiredCluster, step: Step):
        region = self._region(desired)
        comp = desired.component(step.params.get("component") or step.object)
        if comp is None or comp.source != "eksAddon" or not comp.addon:
            raise PermanentError(f"component {step.object} is not an EKS add-on of {desired.name}")
        name, version, config = comp.addon["name"], comp.addon["version"], _addon_config(comp)
        self._active_cluster(desired, f"install add-on {name}")
        r = self._call("eks", region, "describe_addon", missing_ok=True, clusterName=desired.name, addonName=name)
        a = r["addon"] if r else None
        if a is not None and not _owned(a.get("tags"), desired.name):
            raise OwnershipConflict(f"EKS add-on {name} of cluster {desired.name} is not marked as fleetwright's")
        if a is not None and a["status"] == "DELETING":
            self._wait_addon(desired, name, None)
            a = None
        elif a is not None and a["status"] in ("CREATING", "UPDATING"):
            a = self._wait_addon(desired, name)
        want_tags = self._addon_tags(desired, comp)
        if a is None:
            kw: dict[str, Any] = dict(clusterName=desired.name, addonName=name, addonVersion=version,
                                      resolveConflicts="OVERWRITE", tags=want_tags)
            if config:
                kw["configurationValues"] = config
            self._call("eks", region, "create_addon", **kw)
            self._wait_addon(desired, name)
            return True, f"installed EKS add-on {name} {version} for component {comp.name} {comp.version}", {}
        changed, details, outputs = False, [], {}
        if a.get("addonVersion") != version or not _same_config(a.get("configurationValues"), config):
            kw = dict(clusterName=desired.name, addonName=name, addonVersion=version, resolveConflicts="OVERWRITE")
            if config or a.get("configurationValues"):
                kw["configurationValues"] = config or "{}"
            u = self._call("eks", region, "update_addon", **kw)["update"]
            outputs["statuses"] = self._wait_update(desired, u, f"update of EKS add-on {name}", addonName=name)
            a = self._wait_addon(desired, name)
            changed = True
            details.append(f"updated EKS add-on {name} to {version}")
        tags = a.get("tags") or {}
        stale = {k: v for k, v in want_tags.items() if tags.get(k) != v}
        if stale:
            # moto cannot tag add-ons (TagResource knows clusters only): a not-found answer is tolerated,
            # observe then checks the live add-on version and configuration against the component.
            if self._call("eks", region, "tag_resource", missing_ok=True, resourceArn=a["addonArn"], tags=stale) is not None:
                changed = True
                details.append(f"tagged EKS add-on {name} with component {comp.name} {comp.version}")
            else:
                log.debug("EKS add-on %s of %s could not be tagged (not found); its tags stay stale", name, desired.name)
        return changed, "; ".join(details) or f"EKS add-on {name} is at {version}", outputs

    def _apply_component_remove(self, desired: DesiredCluster, step: Step):
        comp_name = step.params.get("component") or step.object
        if self._cluster(desired) is None:
            return False, f"EKS cluster {desired.name} is gone, and its add-ons with it", {}
        found = self._addons(desired).get(comp_name)
        if found is None:
            return False, f"no EKS add-on of ours for component {comp_name}", {}
        self._delete_addon(desired, found)
        return True, f"removed EKS add-on {found['addonName']} (component {comp_name})", {}

    def _delete_addon(self, desired: DesiredCluster, a: dict[str, Any]) -> None:
        if a.get("status") != "DELETING":
            if a.get("status") in ("CREATING", "UPDATING"):
                self._wait_addon(desired, a["addonName"])
            self._call("eks", self._region(desired), "delete_addon", missing_ok=True,
                       clusterName=desired.name, addonName=a["addonName"])
        self._wait_addon(desired, a["addonName"], None)
