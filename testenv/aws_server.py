"""The test environment's AWS: moto's server app in its own process, plus what moto lacks.

Run as ``python -m testenv.aws_server --port P`` (``testenv.aws.up`` does that).  It serves
on 127.0.0.1 only.  This module is test-environment code: nothing here belongs in the product.

On top of moto 5.2 it adds, for EKS:

* ``UpdateClusterVersion``, ``UpdateNodegroupVersion``, ``DescribeUpdate``, ``ListUpdates``
  and ``CreateAddon``/``DescribeAddon``/``ListAddons``/``UpdateAddon``/``DeleteAddon``/
  ``DescribeAddonVersions`` (moto 5.2.5 has none of them).
* ``UpdateNodegroupConfig`` and ``UpdateClusterConfig`` are wrapped so that they return a real
  ``update`` object that ``DescribeUpdate`` knows (moto returns a throw-away update id, and
  for UpdateClusterConfig the cluster instead of an update).
* Every update passes through a transition: cluster/nodegroup/add-on status ``UPDATING`` and
  update status ``InProgress`` for ``update_seconds`` (default 1 s), then ``ACTIVE`` /
  ``Successful``.  Add-ons go ``CREATING`` -> ``ACTIVE`` and ``DELETING`` -> gone.
  Transitions are evaluated lazily on every EKS request, so they are deterministic.

Control endpoints, under ``/fleetwright-testenv/`` (JSON in and out):

* ``GET  health``                    -> ``{"ok": true, "pid": ..., "moto": "5.2.5"}``
* ``POST reset``                     -> clean account (moto reset + update/add-on tables + faults
  + call counters).  Settings and endpoint mappings are environment configuration and stay.
  moto's own ``POST /moto-api/reset`` also clears the update/add-on tables.
* ``POST faults`` with a spec (see ``FaultSpec``) -> ``{"id": ...}``; ``GET faults`` lists them
  with counters; ``DELETE faults`` removes all of them (``DELETE faults/<id>`` one).
* ``GET settings`` / ``POST settings`` ``{"update_seconds": 0.5, "addon_seconds": 0.5,
  "create_seconds": 0}``; with ``create_seconds`` > 0 new clusters and node groups are
  ``CREATING`` that long before ``ACTIVE`` (default 0: ACTIVE at once, as in plain moto).
* ``GET calls`` -> counts of calls per ``service:Action`` seen by the server; ``DELETE calls``.
* ``POST endpoints`` ``{"cluster": "c1", "endpoint": "https://127.0.0.1:16443",
  "certificate_authority": "<base64>"}`` makes DescribeCluster report that (local,
  real) Kubernetes API for an EKS cluster of that name; ``GET``/``DELETE endpoints``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import sys
import threading
import time
import uuid
from typing import Any
from urllib.parse import parse_qs

ROUTE_PREFIX = "/fleetwright-testenv/"

SETTINGS: dict[str, float] = {"update_seconds": 1.0, "addon_seconds": 1.0, "create_seconds": 0.0}
DEFAULT_SETTINGS = dict(SETTINGS)

_LOCK = threading.RLock()

# (account, region) -> update id -> record
UPDATES: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
# (account, region, cluster) -> addon name -> record
ADDONS: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
# cluster name -> {"endpoint": ..., "certificate_authority": ...}
ENDPOINTS: dict[str, dict[str, str]] = {}
FAULTS: list[dict[str, Any]] = []
# clusters / node groups in CREATING: (due, object)
PENDING: list[tuple[float, Any]] = []
CALLS: dict[str, int] = {}
# (account, region, cluster) -> principal ARN -> access entry (with "_policies": policy ARN -> association)
ACCESS: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
CONCURRENCY = {"in_flight": 0, "peak": 0}  # API calls being served at once (control endpoint "concurrency")

ADDON_CATALOG = {
    "vpc-cni": ["v1.18.1-eksbuild.1", "v1.18.3-eksbuild.2", "v1.19.0-eksbuild.1"],
    "coredns": ["v1.11.1-eksbuild.4", "v1.11.3-eksbuild.1"],
    "kube-proxy": ["v1.29.0-eksbuild.1", "v1.30.0-eksbuild.3", "v1.31.0-eksbuild.2"],
    "aws-ebs-csi-driver": ["v1.30.0-eksbuild.1", "v1.35.0-eksbuild.1"],
}


def _reset_tables() -> None:
    with _LOCK:
        UPDATES.clear()
        ADDONS.clear()
        PENDING.clear()
        ACCESS.clear()


# --------------------------------------------------------------------------- cheap resets


def _install_fast_resets() -> None:
    """Parse moto's AWS managed IAM policies once per process, not on every reset.

    moto builds its ~1,600 managed policies (a large JSON string, a JSON dump of each document
    and two ISO dates each) for every new IAM backend, so for every reset; on this machine that
    was 1-3 s per test.  The parsed, dumped data is kept here and only the policy objects (their
    attachment counts are per account) are made afresh.  The default AMIs are not loaded at all
    (``MOTO_EC2_LOAD_DEFAULT_AMIS=false``, set by ``testenv.aws.up``): nothing uses them.
    """
    from datetime import datetime

    from moto.iam import models as iam_models
    from moto.settings import load_iam_aws_managed_policies

    parsed = json.loads(iam_models.aws_managed_policies_data)
    prepared = [(name, d.get("DefaultVersionId"), d.get("Path"), json.dumps(d.get("Document")),
                 datetime.fromisoformat(d["CreateDate"]), datetime.fromisoformat(d["UpdateDate"]))
                for name, d in parsed.items()]

    def _init_aws_policies(self: Any) -> list[Any]:
        if not load_iam_aws_managed_policies():
            return []
        return [iam_models.AWSManagedPolicy(name, account_id=self.account_id, region=self.region_name,
                                            default_version_id=version, path=path, document=doc,
                                            create_date=created, update_date=updated)
                for name, version, path, doc, created, updated in prepared]

    iam_models.IAMBackend._init_aws_policies = _init_aws_policies


def _install_ec2_fixes() -> None:
    """Where moto's EC2 differs from AWS in a way fleetwright can see.

    * ``DeleteNatGateway``: AWS disassociates the gateway's Elastic IP and deletes its
      requester-managed network interface; moto keeps both, so the ENI would outlive its subnet.
    """
    from moto.ec2.models.nat_gateways import NatGatewayBackend

    orig_delete = NatGatewayBackend.delete_nat_gateway

    def delete_nat_gateway(self: Any, nat_gateway_id: str) -> Any:
        nat = orig_delete(self, nat_gateway_id)
        eni = getattr(nat, "_eni", None)
        if eni is not None:
            for eip in list(self.addresses):
                if eip.eni is eni:
                    self.disassociate_address(association_id=eip.association_id)
            self.enis.pop(eni.id, None)
        return nat

    NatGatewayBackend.delete_nat_gateway = delete_nat_gateway


# --------------------------------------------------------------------------- EKS additions


def _install_eks_additions() -> None:
    from moto.eks import urls as eks_urls
    from moto.eks.exceptions import (
        InvalidParameterException,
        InvalidRequestException,
        ResourceInUseException,
        ResourceNotFoundException,
    )
    from moto.eks.models import Cluster, Nodegroup
    from moto.eks.responses import EKSResponse

    def not_found(message: str, **kw: Any) -> Exception:
        args = {"clusterName": None, "nodegroupName": None, "fargateProfileName": None,
                "addonName": None}
        args.update(kw)
        return ResourceNotFoundException(message=message, **args)

    def in_use(message: str, **kw: Any) -> Exception:
        args = {"clusterName": None, "nodegroupName": None, "addonName": None}
        args.update(kw)
        return ResourceInUseException(message=message, **args)

    def invalid(message: str, **kw: Any) -> Exception:
        args = {"clusterName": None, "nodegroupName": None, "addonName": None}
        args.update(kw)
        return InvalidParameterException(message=message, **args)

    def invalid_request(message: str, **kw: Any) -> Exception:
        args = {"clusterName": None, "nodegroupName": None, "addonName": None}
        args.update(kw)
        return InvalidRequestException(message=message, **args)

    def key(self: Any) -> tuple[str, str]:
        return (self.current_account, self.region)

    def cluster_of(self: Any, name: str) -> Cluster:
        c = self.eks_backend.clusters.get(name)
        if c is None:
            raise not_found(f"No cluster found for name: {name}.", clusterName=name)
        return c

    def nodegroup_of(self: Any, cluster: Cluster, name: str) -> Nodegroup:
        ng = cluster.nodegroups.get(name)
        if ng is None:
            raise not_found(f"No node group found for name: {name}.",
                            clusterName=cluster.name, nodegroupName=name)
        return ng

    def body(self: Any) -> dict[str, Any]:
        try:
            return json.loads(self.body or "{}")
        except ValueError:
            return {}

    def new_update(self: Any, *, cluster: str, type_: str, params: list[dict[str, str]],
                   seconds: float, nodegroup: str | None = None, addon: str | None = None,
                   finish: Any = None) -> dict[str, Any]:
        now = time.time()
        rec = {"id": str(uuid.uuid4()), "type": type_, "params": params, "createdAt": now,
               "cluster": cluster, "nodegroup": nodegroup, "addon": addon,
               "due": now + seconds, "status": "InProgress", "finish": finish}
        UPDATES.setdefault(key(self), {})[rec["id"]] = rec
        return rec

    def update_json(rec: dict[str, Any]) -> dict[str, Any]:
        return {"id": rec["id"], "status": rec["status"], "type": rec["type"],
                "params": rec["params"], "createdAt": rec["createdAt"], "errors": []}

    def addon_json(a: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in a.items() if not k.startswith("_")}

    def ok(payload: dict[str, Any]) -> tuple[int, dict[str, str], str]:
        return 200, {"Content-Type": "application/json"}, json.dumps(payload)

    def minor(v: str) -> tuple[int, int]:
        a, b = str(v).split(".")[:2]
        return int(a), int(b)

    # -- cluster version -----------------------------------------------------------------
    def update_cluster_version(self: Any) -> Any:
        name = self._get_param("name")
        version = body(self).get("version")
        with _LOCK:
            c = cluster_of(self, name)
            if c.status != "ACTIVE":
                raise in_use(f"Cluster {name} is currently being updated or is not ACTIVE "
                             f"(status {c.status})", clusterName=name)
            try:
                cur, new = minor(c.version), minor(version)
            except (ValueError, TypeError):
                raise invalid(f"Invalid Kubernetes version {version!r}", clusterName=name)
            if new == cur:
                raise invalid(f"Cluster {name} is already at version {version}",
                              clusterName=name)
            if new[0] != cur[0] or new[1] != cur[1] + 1:
                raise invalid_request(f"Unsupported Kubernetes minor version update from "
                                      f"{c.version} to {version}", clusterName=name)
            platform = "eks.1"

            def finish(_c: Cluster = c, _v: str = version) -> None:
                _c.version, _c.platformVersion, _c.status = _v, platform, "ACTIVE"

            c.status = "UPDATING"
            rec = new_update(self, cluster=name, type_="VersionUpdate",
                             params=[{"type": "Version", "value": version},
                                     {"type": "PlatformVersion", "value": platform}],
                             seconds=SETTINGS["update_seconds"], finish=finish)
            return ok({"update": update_json(rec)})

    # -- nodegroup version ---------------------------------------------------------------
    def update_nodegroup_version(self: Any) -> Any:
        name = self._get_param("name")
        ng_name = self._get_param("nodegroupName")
        b = body(self)
        with _LOCK:
            c = cluster_of(self, name)
            ng = nodegroup_of(self, c, ng_name)
            if ng.status != "ACTIVE":
                raise in_use(f"Nodegroup {ng_name} is not ACTIVE (status {ng.status})",
                             clusterName=name, nodegroupName=ng_name)
            version = b.get("version") or c.version
            try:
                if minor(version) > minor(c.version):
                    raise invalid(f"Requested Kubernetes version {version} is newer than "
                                  f"the cluster's version {c.version}",
                                  clusterName=name, nodegroupName=ng_name)
            except (ValueError, TypeError):
                raise invalid(f"Invalid Kubernetes version {version!r}",
                              clusterName=name, nodegroupName=ng_name)
            release = b.get("releaseVersion") or f"{version}.0-20250101"
            if version == ng.version and release == ng.release_version:
                raise invalid(f"Nodegroup {ng_name} is already at version {version} "
                              f"({release})", clusterName=name, nodegroupName=ng_name)

            def finish(_ng: Nodegroup = ng, _v: str = version, _r: str = release) -> None:
                _ng.version, _ng.release_version, _ng.status = _v, _r, "ACTIVE"

            ng.status = "UPDATING"
            rec = new_update(self, cluster=name, nodegroup=ng_name, type_="VersionUpdate",
                             params=[{"type": "Version", "value": version},
                                     {"type": "ReleaseVersion", "value": release}],
                             seconds=SETTINGS["update_seconds"], finish=finish)
            return ok({"update": update_json(rec)})

    # -- nodegroup config (scaling, labels, taints): moto applies at once; we add a transition
    orig_update_nodegroup_config = EKSResponse.update_nodegroup_config

    def update_nodegroup_config(self: Any) -> Any:
        name = self._get_param("name")
        ng_name = self._get_param("nodegroupName")
        with _LOCK:
            c = cluster_of(self, name)
            ng = nodegroup_of(self, c, ng_name)
            if ng.status != "ACTIVE":
                raise in_use(f"Nodegroup {ng_name} is not ACTIVE (status {ng.status})",
                             clusterName=name, nodegroupName=ng_name)
            sc = body(self).get("scalingConfig") or {}
            merged = dict(ng.scaling_config, **sc)
            if not (merged.get("minSize", 0) <= merged.get("desiredSize", 0)
                    <= merged.get("maxSize", 0)):
                raise invalid("Requested scaling config is invalid: minSize <= desiredSize "
                              f"<= maxSize is required (got {merged})",
                              clusterName=name, nodegroupName=ng_name)
            orig_update_nodegroup_config(self)  # applies the change, raises moto's errors
            params = []
            for k, t in (("desiredSize", "DesiredSize"), ("maxSize", "MaxSize"),
                         ("minSize", "MinSize")):
                if k in sc:
                    params.append({"type": t, "value": str(sc[k])})
            b = body(self)
            if b.get("labels"):
                params.append({"type": "LabelsToAdd", "value": json.dumps(
                    b["labels"].get("addOrUpdateLabels", {}))})
            if b.get("taints"):
                params.append({"type": "TaintsToAdd", "value": json.dumps(
                    b["taints"].get("addOrUpdateTaints", []))})

            def finish(_ng: Nodegroup = ng) -> None:
                _ng.status = "ACTIVE"

            ng.status = "UPDATING"
            rec = new_update(self, cluster=name, nodegroup=ng_name, type_="ConfigUpdate",
                             params=params, seconds=SETTINGS["update_seconds"], finish=finish)
            return ok({"update": update_json(rec)})

    # -- cluster config: real EKS returns an update, moto the cluster -----------------------
    orig_update_cluster_config = EKSResponse.update_cluster_config

    def update_cluster_config(self: Any) -> Any:
        name = self._get_param("name")
        with _LOCK:
            c = cluster_of(self, name)
            if c.status != "ACTIVE":
                raise in_use(f"Cluster {name} is not ACTIVE (status {c.status})",
                             clusterName=name)
            b = body(self)
            params, type_ = [], "ConfigUpdate"
            if b.get("accessConfig"):  # moto knows no accessConfig: CONFIG_MAP -> API_AND_CONFIG_MAP -> API only
                order = ["CONFIG_MAP", "API_AND_CONFIG_MAP", "API"]
                have = (getattr(c, "access_config", None) or {}).get("authenticationMode", "CONFIG_MAP")
                want = b["accessConfig"].get("authenticationMode", have)
                if order.index(want) < order.index(have):
                    raise invalid_request(f"Unsupported authentication mode update from {have} to {want}",
                                          clusterName=name)
                c.access_config = dict(getattr(c, "access_config", None) or {}, authenticationMode=want)
                type_ = "AccessConfigUpdate"
                params.append({"type": "AuthenticationMode", "value": json.dumps(want)})
            else:
                orig_update_cluster_config(self)
            if b.get("logging"):
                type_ = "LoggingUpdate"
                params.append({"type": "ClusterLogging", "value": json.dumps(b["logging"])})
            if b.get("resourcesVpcConfig"):
                type_ = "EndpointAccessUpdate"
                for k, t in (("endpointPublicAccess", "EndpointPublicAccess"),
                             ("endpointPrivateAccess", "EndpointPrivateAccess")):
                    if k in b["resourcesVpcConfig"]:
                        params.append({"type": t,
                                       "value": str(b["resourcesVpcConfig"][k]).lower()})

            def finish(_c: Cluster = c) -> None:
                _c.status = "ACTIVE"

            c.status = "UPDATING"
            rec = new_update(self, cluster=name, type_=type_, params=params,
                             seconds=SETTINGS["update_seconds"], finish=finish)
            return ok({"update": update_json(rec)})

    # -- updates -------------------------------------------------------------------------
    def describe_update(self: Any) -> Any:
        name = self._get_param("name")
        uid = self._get_param("updateId")
        ng_name = self._get_param("nodegroupName")
        addon = self._get_param("addonName")
        with _LOCK:
            cluster_of(self, name)
            rec = UPDATES.get(key(self), {}).get(uid)
            if (rec is None or rec["cluster"] != name or rec["nodegroup"] != ng_name
                    or rec["addon"] != addon):
                raise not_found(f"No update found for ID: {uid}.", clusterName=name,
                                nodegroupName=ng_name, addonName=addon)
            return ok({"update": update_json(rec)})

    def list_updates(self: Any) -> Any:
        name = self._get_param("name")
        ng_name = self._get_param("nodegroupName")
        addon = self._get_param("addonName")
        with _LOCK:
            c = cluster_of(self, name)
            if ng_name:
                nodegroup_of(self, c, ng_name)
            ids = [r["id"] for r in sorted(UPDATES.get(key(self), {}).values(),
                                           key=lambda r: r["createdAt"])
                   if r["cluster"] == name and r["nodegroup"] == ng_name
                   and r["addon"] == addon]
            return ok({"updateIds": ids})

    # -- add-ons -------------------------------------------------------------------------
    def addons_of(self: Any, name: str) -> dict[str, dict[str, Any]]:
        return ADDONS.setdefault((self.current_account, self.region, name), {})

    def addon_of(self: Any, name: str, addon: str) -> dict[str, Any]:
        a = addons_of(self, name).get(addon)
        if a is None:
            raise not_found(f"No addon: {addon} found in cluster: {name}",
                            clusterName=name, addonName=addon)
        return a

    def default_version(addon: str) -> str:
        return ADDON_CATALOG.get(addon, ["v1.0.0-eksbuild.1"])[0]

    def create_addon(self: Any) -> Any:
        name = self._get_param("name")
        b = body(self)
        addon = b.get("addonName")
        with _LOCK:
            c = cluster_of(self, name)
            if not addon:
                raise invalid("addonName is required", clusterName=name)
            if addon in addons_of(self, name):
                raise in_use(f"Addon already exists with name: {addon}",
                             clusterName=name, addonName=addon)
            now = time.time()
            a = {
                "addonName": addon, "clusterName": name, "status": "CREATING",
                "addonVersion": b.get("addonVersion") or default_version(addon),
                "health": {"issues": []},
                "addonArn": f"{c.arn.replace(':cluster/', ':addon/')}/{addon}/"
                            f"{uuid.uuid4()}",
                "createdAt": now, "modifiedAt": now,
                "tags": b.get("tags") or {},
                "_due": now + SETTINGS["addon_seconds"], "_next": "ACTIVE",
            }
            if b.get("serviceAccountRoleArn"):
                a["serviceAccountRoleArn"] = b["serviceAccountRoleArn"]
            if b.get("configurationValues") is not None:
                a["configurationValues"] = b["configurationValues"]
            addons_of(self, name)[addon] = a
            return ok({"addon": addon_json(a)})

    def describe_addon(self: Any) -> Any:
        name = self._get_param("name")
        addon = self._get_param("addonName")
        with _LOCK:
            cluster_of(self, name)
            return ok({"addon": addon_json(addon_of(self, name, addon))})

    def list_addons(self: Any) -> Any:
        name = self._get_param("name")
        with _LOCK:
            cluster_of(self, name)
            return ok({"addons": sorted(addons_of(self, name))})

    def update_addon(self: Any) -> Any:
        name = self._get_param("name")
        addon = self._get_param("addonName")
        b = body(self)
        with _LOCK:
            cluster_of(self, name)
            a = addon_of(self, name, addon)
            if a["status"] not in ("ACTIVE", "DEGRADED", "UPDATE_FAILED"):
                raise in_use(f"Addon {addon} is not ACTIVE (status {a['status']})",
                             clusterName=name, addonName=addon)
            params = []
            changes: dict[str, Any] = {}
            for k, t in (("addonVersion", "AddonVersion"),
                         ("serviceAccountRoleArn", "ServiceAccountRoleArn"),
                         ("resolveConflicts", "ResolveConflicts"),
                         ("configurationValues", "ConfigurationValues")):
                if b.get(k) is not None:
                    params.append({"type": t, "value": str(b[k])})
                    if k != "resolveConflicts":
                        changes[k] = b[k]

            def finish(_a: dict[str, Any] = a, _ch: dict[str, Any] = changes) -> None:
                _a.update(_ch)
                _a["status"], _a["modifiedAt"] = "ACTIVE", time.time()

            a["status"] = "UPDATING"
            rec = new_update(self, cluster=name, addon=addon, type_="AddonUpdate",
                             params=params, seconds=SETTINGS["update_seconds"],
                             finish=finish)
            return ok({"update": update_json(rec)})

    def delete_addon(self: Any) -> Any:
        name = self._get_param("name")
        addon = self._get_param("addonName")
        with _LOCK:
            cluster_of(self, name)
            a = addon_of(self, name, addon)
            a["status"] = "DELETING"
            a["_due"], a["_next"] = time.time() + SETTINGS["addon_seconds"], None
            return ok({"addon": addon_json(a)})

    def describe_addon_versions(self: Any) -> Any:
        want = self._get_param("addonName")
        kver = self._get_param("kubernetesVersion")
        out = []
        for addon, versions in sorted(ADDON_CATALOG.items()):
            if want and addon != want:
                continue
            out.append({"addonName": addon, "type": "networking", "owner": "aws",
                        "publisher": "eks",
                        "addonVersions": [
                            {"addonVersion": v, "architecture": ["amd64", "arm64"],
                             "compatibilities": [{"clusterVersion": kver or "1.30",
                                                  "platformVersions": ["*"],
                                                  "defaultVersion": i == 0}],
                             "requiresConfiguration": False}
                            for i, v in enumerate(reversed(versions))]})
        return ok({"addons": out})

    # -- DescribeCluster: report a mapped local Kubernetes API ---------------------------
    orig_describe_cluster = EKSResponse.describe_cluster

    def describe_cluster(self: Any) -> Any:
        name = self._get_param("name")
        with _LOCK:
            m = ENDPOINTS.get(name)
            c = self.eks_backend.clusters.get(name)
            if c is not None:
                if not hasattr(c, "_fw_moto_endpoint"):
                    c._fw_moto_endpoint = (c.endpoint, c.certificate_authority)
                if m:
                    c.endpoint = m["endpoint"]
                    c.certificate_authority = ({"data": m["certificate_authority"]}
                                               if m.get("certificate_authority")
                                               else c._fw_moto_endpoint[1])
                else:
                    c.endpoint, c.certificate_authority = c._fw_moto_endpoint
            return orig_describe_cluster(self)

    # -- creation: optionally CREATING for create_seconds (default 0: ACTIVE at once, as moto)
    orig_create_cluster = EKSResponse.create_cluster
    orig_create_nodegroup = EKSResponse.create_nodegroup

    def create_cluster(self: Any) -> Any:
        with _LOCK:
            res = orig_create_cluster(self)
            c = self.eks_backend.clusters[self._get_param("name")]
            c.access_config = {"authenticationMode": "CONFIG_MAP", "bootstrapClusterCreatorAdminPermissions": True}
            c.access_config.update(body(self).get("accessConfig") or {})
            if SETTINGS["create_seconds"] > 0:
                c = self.eks_backend.clusters[self._get_param("name")]
                c.status = "CREATING"
                PENDING.append((time.time() + SETTINGS["create_seconds"], c))
            return res

    def create_nodegroup(self: Any) -> Any:
        with _LOCK:
            res = orig_create_nodegroup(self)
            if SETTINGS["create_seconds"] > 0:
                c = self.eks_backend.clusters[self._get_param("name")]
                ng = c.nodegroups[self._get_param("nodegroupName")]
                ng.status = "CREATING"
                PENDING.append((time.time() + SETTINGS["create_seconds"], ng))
            return res

    for fn in (create_cluster, create_nodegroup, update_cluster_version, update_nodegroup_version, update_nodegroup_config,
               update_cluster_config, describe_update, list_updates, create_addon,
               describe_addon, list_addons, update_addon, delete_addon,
               describe_addon_versions, describe_cluster):
        setattr(EKSResponse, fn.__name__, fn)

    d = eks_urls.response.dispatch
    for p in ("{0}/clusters/(?P<name>[^/]+)/updates$",
              "{0}/clusters/(?P<name>[^/]+)/updates/(?P<updateId>[^/]+)$",
              "{0}/clusters/(?P<name>[^/]+)/node-groups/(?P<nodegroupName>[^/]+)/update-version$",
              "{0}/clusters/(?P<name>[^/]+)/addons$",
              "{0}/clusters/(?P<name>[^/]+)/addons/(?P<addonName>[^/]+)$",
              "{0}/clusters/(?P<name>[^/]+)/addons/(?P<addonName>[^/]+)/update$",
              "{0}/addons/supported-versions$"):
        eks_urls.url_paths[p] = d


def advance() -> None:
    """Finish every transition whose time has come (called before each EKS request)."""
    from moto.eks.models import eks_backends

    now = time.time()
    with _LOCK:
        for item in [p for p in PENDING if now >= p[0]]:
            PENDING.remove(item)
            if item[1].status == "CREATING":
                item[1].status = "ACTIVE"
        for upd in UPDATES.values():
            for rec in upd.values():
                if rec["status"] == "InProgress" and now >= rec["due"]:
                    rec["status"] = "Successful"
                    if rec["finish"]:
                        try:
                            rec["finish"]()
                        except Exception:  # the object may be gone
                            pass
        for (acct, region, cname), addons in list(ADDONS.items()):
            try:
                exists = cname in eks_backends[acct][region].clusters
            except Exception:
                exists = False
            if not exists:  # add-ons go with their cluster
                del ADDONS[(acct, region, cname)]
                continue
            for name, a in list(addons.items()):
                if a.get("_due") and now >= a["_due"]:
                    if a["_next"] is None:
                        del addons[name]
                    else:
                        a["status"], a["_due"] = a["_next"], None


# --------------------------------------------------------------------------- EKS access entries


def _access_entries(environ: dict[str, Any], method: str) -> tuple[int, dict[str, Any]] | None:
    """CreateAccessEntry, DescribeAccessEntry, ListAccessEntries, DeleteAccessEntry, AssociateAccessPolicy,
    ListAssociatedAccessPolicies, DisassociateAccessPolicy (moto 5.2.5 has none of them).

    Served here, on the raw request URI, because the principal and policy ARNs in the path are
    percent-encoded (``/`` as ``%2F``) and a decoded path cannot be split correctly.
    None: not an access-entry request.
    """
    from urllib.parse import unquote

    raw = (environ.get("REQUEST_URI") or environ.get("RAW_URI") or environ.get("PATH_INFO", "")).split("?")[0]
    parts = raw.strip("/").split("/")
    if len(parts) < 3 or parts[0] != "clusters" or parts[2] != "access-entries":
        return None
    from moto.eks.models import eks_backends
    from moto.iam.models import get_account_id_from

    auth = environ.get("HTTP_AUTHORIZATION", "")
    try:
        scope = auth.split("Credential=", 1)[1].split(",")[0].split()[0].split("/")
        access_key, region = scope[0], scope[2]
    except IndexError:
        return 400, {"__type": "InvalidRequestException", "message": "unsigned request"}
    account = get_account_id_from(access_key)
    cluster = unquote(parts[1])
    if cluster not in eks_backends[account][region].clusters:
        return 404, {"__type": "ResourceNotFoundException", "message": f"No cluster found for name: {cluster}."}
    entries = ACCESS.setdefault((account, region, cluster), {})
    principal = unquote(parts[3]) if len(parts) > 3 else None
    sub = parts[4] if len(parts) > 4 else None
    policy = unquote("/".join(parts[5:])) if len(parts) > 5 else None
    length = int(environ.get("CONTENT_LENGTH") or 0)
    raw_body = environ["wsgi.input"].read(length) if length else b""
    environ["wsgi.input"] = io.BytesIO(raw_body)
    try:
        req = json.loads(raw_body or b"{}")
    except ValueError:
        req = {}
    arn = f"arn:aws:eks:{region}:{account}:access-entry/{cluster}"

    def entry_json(e: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in e.items() if not k.startswith("_")}

    def missing() -> tuple[int, dict[str, Any]]:
        return 404, {"__type": "ResourceNotFoundException",
                     "message": f"The specified principalArn could not be found: {principal}"}

    with _LOCK:
        if principal is None and method == "POST":
            p = req.get("principalArn") or ""
            if not p.startswith("arn:"):
                return 400, {"__type": "InvalidParameterException", "message": f"invalid principalArn {p!r}"}
            if p in entries:
                return 409, {"__type": "ResourceInUseException", "message": f"The specified access entry resource is already in use on this cluster: {p}"}
            now = time.time()
            entries[p] = {"clusterName": cluster, "principalArn": p, "kubernetesGroups": req.get("kubernetesGroups") or [],
                          "accessEntryArn": f"{arn}/{uuid.uuid4()}", "createdAt": now, "modifiedAt": now,
                          "tags": req.get("tags") or {}, "username": req.get("username") or p,
                          "type": req.get("type") or "STANDARD", "_policies": {}}
            return 200, {"accessEntry": entry_json(entries[p])}
        if principal is None and method == "GET":
            return 200, {"accessEntries": sorted(entries)}
        e = entries.get(principal)
        if e is None:
            return missing()
        if sub is None:
            if method == "GET":
                return 200, {"accessEntry": entry_json(e)}
            if method == "DELETE":
                del entries[principal]
                return 200, {}
            if method == "POST":  # UpdateAccessEntry
                if "kubernetesGroups" in req:
                    e["kubernetesGroups"] = req["kubernetesGroups"]
                e["modifiedAt"] = time.time()
                return 200, {"accessEntry": entry_json(e)}
        if sub == "access-policies":
            if policy is None and method == "POST":
                pa = req.get("policyArn") or ""
                if not pa.startswith("arn:aws:eks::aws:cluster-access-policy/"):
                    return 400, {"__type": "InvalidParameterException", "message": f"invalid policyArn {pa!r}"}
                scope_ = req.get("accessScope") or {"type": "cluster"}
                if scope_.get("type") == "namespace" and not scope_.get("namespaces"):
                    return 400, {"__type": "InvalidParameterException", "message": "a namespace scope needs namespaces"}
                now = time.time()
                a = e["_policies"].setdefault(pa, {"policyArn": pa, "associatedAt": now})
                a.update(accessScope=scope_, modifiedAt=now)
                return 200, {"clusterName": cluster, "principalArn": principal, "associatedAccessPolicy": a}
            if policy is None and method == "GET":
                return 200, {"clusterName": cluster, "principalArn": principal,
                             "associatedAccessPolicies": list(e["_policies"].values())}
            if policy is not None and method == "DELETE":
                if e["_policies"].pop(policy, None) is None:
                    return missing()
                return 200, {}
    return 404, {"__type": "ResourceNotFoundException", "message": f"no such access-entry call {method} {raw}"}


# --------------------------------------------------------------------------- fault injection

FAULT_KEYS = {"service", "action", "status", "code", "message", "rate", "count",
              "latency_ms", "method", "path"}


def _error_body(protocol: str, service: str, status: int, code: str | None,
                message: str | None) -> tuple[dict[str, str], bytes]:
    if code is None:
        if status == 429:
            code = {"ec2": "RequestLimitExceeded", "iam": "Throttling",
                    "sts": "Throttling"}.get(service, "ThrottlingException")
        elif status == 503:
            code = "ServiceUnavailable"
        elif status >= 500:
            code = "InternalError" if service == "ec2" else "InternalFailure"
        else:
            code = "InvalidRequest"
    message = message or {"ThrottlingException": "Rate exceeded", "Throttling": "Rate exceeded",
                          "RequestLimitExceeded": "Request limit exceeded."}.get(
        code, f"injected fault ({code})")
    rid = str(uuid.uuid4())
    if protocol in ("query", "ec2"):
        if protocol == "ec2":
            xml = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error>"
                   f"<Code>{code}</Code><Message>{message}</Message></Error></Errors>"
                   f"<RequestID>{rid}</RequestID></Response>")
        else:
            kind = "Sender" if status < 500 else "Receiver"
            xml = (f"<ErrorResponse><Error><Type>{kind}</Type><Code>{code}</Code>"
                   f"<Message>{message}</Message></Error><RequestId>{rid}</RequestId>"
                   f"</ErrorResponse>")
        return {"Content-Type": "text/xml", "x-amzn-RequestId": rid}, xml.encode()
    hdrs = {"Content-Type": "application/x-amz-json-1.1" if protocol == "json"
            else "application/json", "x-amzn-ErrorType": code, "x-amzn-RequestId": rid}
    return hdrs, json.dumps({"__type": code, "message": message}).encode()


def _identify(environ: dict[str, Any]) -> tuple[str, str, str]:
    """(service, action, protocol) of an AWS request; buffers the body so moto can reread it."""
    service = ""
    auth = environ.get("HTTP_AUTHORIZATION", "")
    try:
        scope = auth.split("Credential=", 1)[1].split(",")[0].split()[0]
        service = scope.split("/")[3].lower()
    except (IndexError, ValueError):
        pass
    length = int(environ.get("CONTENT_LENGTH") or 0)
    raw = environ["wsgi.input"].read(length) if length else b""
    environ["wsgi.input"] = io.BytesIO(raw)
    target = environ.get("HTTP_X_AMZ_TARGET")
    if target:
        if not service:
            service = target.split(".")[0].split("_")[0].lower()
        return service, target.rsplit(".", 1)[-1], "json"
    ctype = environ.get("CONTENT_TYPE", "")
    params = parse_qs(environ.get("QUERY_STRING", ""))
    if ctype.startswith("application/x-www-form-urlencoded") and raw:
        params.update(parse_qs(raw.decode("utf-8", "replace")))
    if "Action" in params:
        return service, params["Action"][0], ("ec2" if service == "ec2" else "query")
    action = ""
    if service:
        try:
            from moto.core.request import Request
            from moto.core.routing import get_service_router

            env2 = dict(environ)
            env2["wsgi.input"] = io.BytesIO(raw)
            op, _ = get_service_router(service).match(Request(env2))
            action = op.name
        except Exception:
            action = ""
    return service, action, "rest-json"


def _matches(f: dict[str, Any], service: str, action: str, method: str, path: str) -> bool:
    import re

    if f.get("service") not in (None, "*", service):
        return False
    if f.get("action") not in (None, "*", action):
        return False
    if f.get("method") and f["method"].upper() != method:
        return False
    if f.get("path") and not re.search(f["path"], path):
        return False
    return True


def _pick_fault(service: str, action: str, method: str, path: str) -> tuple[float, Any]:
    """Returns (latency seconds, fault dict or None for 'pass through')."""
    latency, hit = 0.0, None
    with _LOCK:
        for f in FAULTS:
            if not _matches(f, service, action, method, path):
                continue
            f["matched"] += 1
            if f["count"] is not None and f["remaining"] <= 0:
                continue
            if random.random() >= f["rate"]:
                continue
            if f["count"] is not None:
                f["remaining"] -= 1
            latency = max(latency, f["latency_ms"] / 1000.0)
            if f["status"]:
                f["injected"] += 1
                hit = hit or f
            else:
                f["delayed"] += 1
    return latency, hit


# --------------------------------------------------------------------------- WSGI front


class FrontApp:
    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import (DomainDispatcherApplication,
                                                    create_backend_app)

        self.moto = DomainDispatcherApplication(create_backend_app)

    @staticmethod
    def _json(start_response: Any, status: int, payload: Any) -> list[bytes]:
        data = json.dumps(payload, default=str).encode()
        start_response(f"{status} {'OK' if status < 400 else 'ERROR'}",
                       [("Content-Type", "application/json"),
                        ("Content-Length", str(len(data)))])
        return [data]

    def control(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        method = environ["REQUEST_METHOD"]
        what = environ.get("PATH_INFO", "")[len(ROUTE_PREFIX):].strip("/")
        length = int(environ.get("CONTENT_LENGTH") or 0)
        raw = environ["wsgi.input"].read(length) if length else b""
        try:
            req = json.loads(raw or b"{}")
        except ValueError:
            return self._json(start_response, 400, {"error": "body is not JSON"})
        import moto

        if what == "health":
            return self._json(start_response, 200, {"ok": True, "pid": os.getpid(),
                                                    "moto": moto.__version__})
        if what == "reset" and method == "POST":
            from moto.moto_api import _internal

            _internal.moto_api_backend.reset()
            with _LOCK:
                _reset_tables()
                FAULTS.clear()
                CALLS.clear()
            return self._json(start_response, 200, {"reset": True})
        if what == "settings":
            if method == "POST":
                bad = set(req) - set(SETTINGS)
                if bad:
                    return self._json(start_response, 400,
                                      {"error": f"unknown settings {sorted(bad)}"})
                with _LOCK:
                    SETTINGS.update({k: float(v) for k, v in req.items()})
            return self._json(start_response, 200, dict(SETTINGS))
        if what == "concurrency":  # GET: calls in flight now and the peak; DELETE: reset the peak
            with _LOCK:
                if environ["REQUEST_METHOD"] == "DELETE":
                    CONCURRENCY["peak"] = CONCURRENCY["in_flight"]
                return self._json(start_response, 200, dict(CONCURRENCY))
        if what == "calls":
            with _LOCK:
                if method == "DELETE":
                    CALLS.clear()
                return self._json(start_response, 200, dict(CALLS))
        if what == "endpoints":
            with _LOCK:
                if method == "POST":
                    if "cluster" not in req or "endpoint" not in req:
                        return self._json(start_response, 400,
                                          {"error": "need cluster and endpoint"})
                    ENDPOINTS[req["cluster"]] = {
                        "endpoint": req["endpoint"],
                        "certificate_authority": req.get("certificate_authority", "")}
                elif method == "DELETE":
                    ENDPOINTS.clear()
                return self._json(start_response, 200, dict(ENDPOINTS))
        if what.startswith("faults"):
            fid = what[len("faults/"):] if what.startswith("faults/") else None
            with _LOCK:
                if method == "POST":
                    bad = set(req) - FAULT_KEYS
                    if bad:
                        return self._json(start_response, 400,
                                          {"error": f"unknown fault keys {sorted(bad)}"})
                    count = req.get("count")
                    f = {"id": uuid.uuid4().hex[:12], "service": req.get("service", "*"),
                         "action": req.get("action", "*"), "method": req.get("method"),
                         "path": req.get("path"), "status": int(req.get("status", 429)),
                         "code": req.get("code"), "message": req.get("message"),
                         "rate": float(req.get("rate", 1.0)),
                         "count": int(count) if count is not None else None,
                         "remaining": int(count) if count is not None else None,
                         "latency_ms": float(req.get("latency_ms", 0)),
                         "matched": 0, "injected": 0, "delayed": 0}
                    FAULTS.append(f)
                    return self._json(start_response, 200, f)
                if method == "DELETE":
                    if fid:
                        FAULTS[:] = [f for f in FAULTS if f["id"] != fid]
                    else:
                        FAULTS.clear()
                    return self._json(start_response, 200, {"faults": list(FAULTS)})
                faults = [dict(f) for f in FAULTS]
            return self._json(start_response, 200, {
                "faults": faults, "injected": sum(f["injected"] for f in faults),
                "delayed": sum(f["delayed"] for f in faults)})
        return self._json(start_response, 404, {"error": f"no such control endpoint {what!r}"})

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if path.startswith(ROUTE_PREFIX):
            return self.control(environ, start_response)
        if path.startswith("/moto-api/reset"):
            _reset_tables()
            return self.moto(environ, start_response)
        if path.startswith("/moto-api"):
            return self.moto(environ, start_response)
        with _LOCK:
            CONCURRENCY["in_flight"] += 1
            CONCURRENCY["peak"] = max(CONCURRENCY["peak"], CONCURRENCY["in_flight"])
        try:
            return self._serve(environ, start_response, path)
        finally:
            with _LOCK:
                CONCURRENCY["in_flight"] -= 1

    def _serve(self, environ: dict[str, Any], start_response: Any, path: str) -> Any:
        service, action, protocol = _identify(environ)
        method = environ["REQUEST_METHOD"]
        with _LOCK:
            k = f"{service}:{action}"
            CALLS[k] = CALLS.get(k, 0) + 1
        latency, fault = _pick_fault(service, action, method, path)
        if latency:
            time.sleep(latency)
        if fault is not None:
            hdrs, data = _error_body(protocol, service, fault["status"], fault["code"],
                                     fault["message"])
            hdrs["Content-Length"] = str(len(data))
            start_response(f"{fault['status']} INJECTED", list(hdrs.items()))
            return [data]
        if service == "eks":
            advance()
            answer = _access_entries(environ, method)
            if answer is not None:
                status, payload = answer
                data = json.dumps(payload, default=str).encode()
                hdrs = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
                if status >= 400:
                    hdrs.append(("x-amzn-ErrorType", payload.get("__type", "")))
                start_response(f"{status} {'OK' if status < 400 else 'ERROR'}", hdrs)
                return [data]
        return self.moto(environ, start_response)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5000)
    ap.add_argument("--update-seconds", type=float, default=SETTINGS["update_seconds"])
    ap.add_argument("--addon-seconds", type=float, default=SETTINGS["addon_seconds"])
    ap.add_argument("--create-seconds", type=float, default=SETTINGS["create_seconds"])
    args = ap.parse_args(argv)
    if not args.host.startswith("127."):
        ap.error("the test environment's AWS only listens on 127.0.0.0/8")
    SETTINGS["update_seconds"] = args.update_seconds
    SETTINGS["addon_seconds"] = args.addon_seconds
    SETTINGS["create_seconds"] = args.create_seconds
    os.environ.setdefault("MOTO_PORT", str(args.port))
    _install_fast_resets()
    _install_ec2_fixes()
    _install_eks_additions()

    from werkzeug.serving import make_server
    from moto.moto_server.werkzeug_app import MotoRequestHandler

    class QuietHandler(MotoRequestHandler):
        def log_request(self, code: Any = "-", size: Any = "-") -> None:
            if os.environ.get("FLEETWRIGHT_AWS_LOG_REQUESTS"):
                super().log_request(code, size)

    server = make_server(args.host, args.port, FrontApp(), threaded=True,
                         request_handler=QuietHandler)

    def stop(*_: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"fleetwright testenv aws: serving on http://{args.host}:{args.port} "
          f"(pid {os.getpid()})", flush=True)
    server.serve_forever()
    sys.exit(0)


if __name__ == "__main__":
    main()
