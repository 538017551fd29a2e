"""``AwsBackend``: the services put together behind the backend contract (observe, apply, delete)."""
from __future__ import annotations

from models.desired import DesiredCluster, ObservedCluster, ObservedNodePool
from models.errors import OwnershipConflict, PermanentError
from models.plan import Step

from ..base import StepResult
from .access import AccessService
from .addons import AddonService
from .cleanup import CleanupService
from .clients import Clients
from .common import CLUSTER_POLICIES, NODE_POLICIES, TRANSITIONAL
from .eks import EksService
from .iam import IamService
from .listing import ListingService
from .network import NetworkService
from .nodegroups import NodegroupService


class AwsBackend(Clients, ListingService, NetworkService, IamService, EksService, NodegroupService, AddonService,
                 CleanupService, AccessService):
    """``InfrastructureBackend`` for AWS EKS (see backends/CONTRACT.md); a ``BatchObserver`` (listing.py)."""

    kind = "aws"
    cluster_policies: tuple[str, ...] = CLUSTER_POLICIES
    node_policies: tuple[str, ...] = NODE_POLICIES

    # ========================================================================= observe
    def observe(self, desired: DesiredCluster) -> ObservedCluster:
        _vpc, _subnets, net_ready = self._network(desired)
        infra = net_ready and self._roles_ready(desired)
        c = self._cluster(desired)
        if c is None:
            return ObservedCluster(name=desired.name, infrastructure=infra, exists=False)
        if infra and c.get("status") == "ACTIVE" and self._access_drift(desired, c):
            infra = False  # access entries or the authentication mode differ: infrastructure.ensure sets them
        in_flight: list[str] = []
        if c.get("status") in TRANSITIONAL:
            in_flight.append(f"EKS cluster {desired.name} {c['status']}")
        pools: dict[str, ObservedNodePool] = {}
        shapes = {p.name: set(p.machine) for p in desired.node_pools}
        for pool, groups in self._pool_nodegroups(desired).items():
            ng = groups[0]  # the oldest: while a replacement runs, the plan sees the old machine and finishes it
            if len(groups) > 1:
                in_flight.append(f"EKS node group replacement of pool {pool}: "
                                 + ", ".join(f"{g['nodegroupName']} {g.get('status')}" for g in groups))
            sc = ng.get("scalingConfig") or {}
            machine = {"instanceTypes": list(ng.get("instanceTypes") or []), "diskSizeGiB": ng.get("diskSize"),
                       "capacityType": ng.get("capacityType")}
            if shapes.get(pool):
                machine = {k: machine.get(k) for k in shapes[pool]}
            pools[pool] = ObservedNodePool(replicas=sc.get("desiredSize", 0), min_size=sc.get("minSize", 0),
                                           max_size=sc.get("maxSize", 0), version=ng.get("version"),
                                           machine=machine, status=ng.get("status", "ACTIVE"))
            if ng.get("status") in TRANSITIONAL:
                in_flight.append(f"EKS node group {pool} {ng['status']}")
        components = {}
        if c.get("status") != "DELETING":
            for comp, a in self._addons(desired).items():
                components[comp] = self._observed_addon(desired, comp, a)
                if a.get("status") in TRANSITIONAL:
                    in_flight.append(f"EKS add-on {a['addonName']} {a['status']}")
        return ObservedCluster(name=desired.name, infrastructure=infra, exists=True,
                               kubernetes_version=c.get("version"), control_plane_replicas=None,
                               endpoint=c.get("endpoint"), node_pools=pools, components=components,
                               in_flight=in_flight)

    # ========================================================================= apply
    def apply(self, desired: DesiredCluster, step: Step) -> StepResult:
        if step.target != "infrastructure":
            raise PermanentError(f"step {step.id} targets {step.target}; the AWS backend carries out infrastructure steps")
        handlers = {
            "infrastructure.ensure": self._apply_infrastructure,
            "controlPlane.create": self._apply_cp_create,
            "controlPlane.upgrade": self._apply_cp_upgrade,
            "controlPlane.scale": self._apply_cp_scale,
            "nodePool.create": self._apply_pool_create,
            "nodePool.scale": self._apply_pool_scale,
            "nodePool.update": self._apply_pool_update,
            "nodePool.upgrade": self._apply_pool_upgrade,
            "nodePool.delete": self._apply_pool_delete,
            "component.install": self._apply_component,
            "component.upgrade": self._apply_component,
            "component.configure": self._apply_component,
            "component.remove": self._apply_component_remove,
        }
        h = handlers.get(step.action)
        if h is None:
            raise PermanentError(f"the AWS backend cannot carry out {step.action}")
        changed, detail, outputs = h(desired, step)
        return StepResult(step_id=step.id, changed=changed, detail=detail, outputs=outputs)

    # -- infrastructure
    def _apply_infrastructure(self, desired: DesiredCluster, step: Step):
        subnets, net_changed = self._ensure_network(desired)
        arns, roles_changed = self._ensure_roles(desired)
        changed = net_changed or roles_changed
        try:
            c = self._cluster(desired)
        except OwnershipConflict:
            c = None  # not ours: controlPlane.create refuses it; the network and roles are still ours
        if c is not None and c.get("status") == "ACTIVE":
            changed = self._ensure_access(desired, c) or changed
        return changed, ("created or completed" if changed else "already in place") + \
            " network (VPC, subnets, gateways, routes), IAM roles and EKS access entries", \
            {"subnetIds": subnets, "roleArns": arns}

    # ========================================================================= delete
    def delete(self, desired: DesiredCluster) -> StepResult:
        region, done, skipped = self._region(desired), [], []
        try:
            c = self._cluster(desired)
        except OwnershipConflict as e:
            c = None
            skipped.append(str(e))
        if c is not None:
            if c["status"] in ("CREATING", "UPDATING"):
                c = self._wait_cluster(desired)
            if c["status"] != "DELETING":
                for comp, a in self._addons(desired).items():
                    self._delete_addon(desired, a)
                    done.append(f"add-on {a['addonName']}")
                for n in self._nodegroup_names(desired):
                    if self._nodegroup(desired, n, strict=False) is None:
                        skipped.append(f"EKS node group {n} is not fleetwright's")
                        continue
                    if self._delete_nodegroup(desired, n):
                        done.append(f"node group {n}")
                if skipped and any("node group" in s for s in skipped):
                    raise OwnershipConflict(f"EKS cluster {desired.name} has node groups that are not fleetwright's: "
                                            + "; ".join(skipped) + "; not deleting the cluster")
                self._call("eks", region, "delete_cluster", missing_ok=True, name=desired.name)
            self._wait(f"EKS cluster {desired.name} gone",
                       lambda: self._call("eks", region, "describe_cluster", missing_ok=True, name=desired.name) is None)
            done.append(f"EKS cluster {desired.name}")
        try:
            vpc = self._find_vpc(desired)
        except OwnershipConflict:
            vpc = None  # reported by _delete_network
        if vpc is not None:  # what controllers made in the VPC (load balancers, ENIs, security groups)
            self._delete_controller_leftovers(desired, vpc["VpcId"], done)
        self._delete_roles(desired, done, skipped)
        self._delete_network(desired, done, skipped)
        detail = ("deleted " + ", ".join(done)) if done else "nothing of ours was left"
        if skipped:
            detail += "; left alone (not fleetwright's): " + "; ".join(skipped)
        return StepResult(step_id=f"{desired.name}/delete", changed=bool(done), detail=detail,
                          outputs={"deleted": done, "skipped": skipped})
