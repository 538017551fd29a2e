"""The EKS cluster: control plane create/upgrade, EKS updates, kube access and its token."""
from __future__ import annotations

import base64
from typing import Any

from models.desired import DesiredCluster
from models.errors import FleetwrightError, InFlight, OwnershipConflict, PermanentError
from models.plan import Step

from ..base import KubeAccess
from .common import CLUSTER_KEY, OWNER_KEY, TOKEN_EXPIRES, TOKEN_PREFIX, _minor, _owned
from .errors import map_error


def make_eks_token(botocore_session: Any, cluster: str, region: str, sts_endpoint: str | None = None,
                   expires: int = TOKEN_EXPIRES) -> str:
    """A bearer token as ``aws eks get-token`` makes it: a presigned STS GetCallerIdentity URL that
    carries the signed header ``x-k8s-aws-id: <cluster>``, as ``k8s-aws-v1.`` + urlsafe base64
    without padding. ``sts_endpoint`` defaults to the regional STS endpoint of ``region``."""
    from botocore.model import ServiceId
    from botocore.signers import RequestSigner

    creds = botocore_session.get_credentials()
    if creds is None:
        raise PermanentError("no AWS credentials to sign an EKS token with")
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    endpoint = (sts_endpoint or f"https://sts.{region}.{suffix}").rstrip("/")
    signer = RequestSigner(ServiceId("STS"), region, "sts", "v4", creds, botocore_session.get_component("event_emitter"))
    params = {"method": "GET", "url": f"{endpoint}/?Action=GetCallerIdentity&Version=2011-06-15",
              "body": {}, "headers": {"x-k8s-aws-id": cluster}, "context": {}}
    url = signer.generate_presigned_url(params, region_name=region, expires_in=expires, operation_name="")
    return TOKEN_PREFIX + base64.urlsafe_b64encode(url.encode()).decode().rstrip("=")



class EksService:
    """Mixin: the EKS cluster and its updates."""

    def _cluster(self, desired: DesiredCluster) -> dict[str, Any] | None:
        r = self._call("eks", self._region(desired), "describe_cluster", missing_ok=True, name=desired.name)
        if r is None:
            return None
        c = r["cluster"]
        if not _owned(c.get("tags"), desired.name):
            raise OwnershipConflict(f"EKS cluster {desired.name} is not marked as fleetwright's "
                                    f"(tags {OWNER_KEY}, {CLUSTER_KEY}); refusing to adopt, change or delete it")
        return c

    # -- control plane
    def _wait_cluster(self, desired: DesiredCluster, want: str = "ACTIVE") -> dict[str, Any]:
        def check():
            c = self._cluster(desired)
            if c is None:
                raise PermanentError(f"EKS cluster {desired.name} disappeared while waiting for {want}")
            if c["status"] == want:
                return c
            if c["status"] == "FAILED":
                raise PermanentError(f"EKS cluster {desired.name} is FAILED")
            return None
        return self._wait(f"EKS cluster {desired.name} {want}", check)

    def _active_cluster(self, desired: DesiredCluster, doing: str) -> dict[str, Any]:
        """The cluster once it is ACTIVE (waits while it is CREATING or UPDATING), for ``doing``."""
        c = self._cluster(desired)
        if c is None:
            raise PermanentError(f"EKS cluster {desired.name} does not exist; cannot {doing}")
        if c["status"] == "DELETING":
            raise InFlight(f"EKS cluster {desired.name} is being deleted; cannot {doing}")
        if c["status"] != "ACTIVE":
            c = self._wait_cluster(desired)
        return c

    def _apply_cp_create(self, desired: DesiredCluster, step: Step):
        region = self._region(desired)
        c = self._cluster(desired)
        if c is not None:
            if c["status"] == "DELETING":
                raise InFlight(f"EKS cluster {desired.name} is being deleted")
            if c["status"] == "FAILED":
                raise PermanentError(f"EKS cluster {desired.name} is FAILED; delete it to create it again")
            if c["status"] != "ACTIVE":
                c = self._wait_cluster(desired)
                self._ensure_access(desired, c)  # a crash after CreateCluster: finish the access entries too
                return True, f"waited for EKS cluster {desired.name} to become ACTIVE", {"arn": c.get("arn")}
            changed = self._ensure_access(desired, c)
            return changed, f"EKS cluster {desired.name} exists", {"arn": c.get("arn")}
        _vpc, subnets, ready = self._network(desired)
        role = self._role(desired, self.role_names(desired)["cluster"])
        if not ready or not subnets or role is None:
            raise PermanentError(f"infrastructure of {desired.name} is not ready (run infrastructure.ensure first)")
        public = bool(desired.backend.endpoint_public_access)
        self._call("eks", region, "create_cluster", name=desired.name,
                   version=step.params.get("version") or desired.kubernetes_version, roleArn=role["Arn"],
                   resourcesVpcConfig={"subnetIds": subnets, "endpointPublicAccess": public,
                                       "endpointPrivateAccess": True},
                   accessConfig={"authenticationMode": desired.backend.access.authentication_mode,
                                 "bootstrapClusterCreatorAdminPermissions": False},  # our own, tagged entry instead
                   tags=self.tags(desired))
        c = self._wait_cluster(desired)
        self._ensure_access(desired, c)
        return True, f"created EKS cluster {desired.name} {c.get('version')}", {"arn": c.get("arn")}

    def _in_progress(self, desired: DesiredCluster, **kw: Any) -> list[dict[str, Any]]:
        region = self._region(desired)
        r = self._call("eks", region, "list_updates", name=desired.name, **kw)
        out = []
        for uid in r.get("updateIds", []):
            u = self._call("eks", region, "describe_update", missing_ok=True, name=desired.name, updateId=uid, **kw)
            if u and u["update"]["status"] == "InProgress":
                out.append(u["update"])
        return out

    def _wait_update(self, desired: DesiredCluster, update: dict[str, Any], what: str, **kw: Any) -> list[str]:
        region, seen = self._region(desired), [update.get("status", "InProgress")]

        def check():
            u = self._call("eks", region, "describe_update", name=desired.name, updateId=update["id"], **kw)["update"]
            seen.append(u["status"])
            if u["status"] == "Successful":
                return True
            if u["status"] in ("Failed", "Cancelled"):
                errs = "; ".join(f"{e.get('errorCode')}: {e.get('errorMessage')}" for e in u.get("errors") or [])
                raise PermanentError(f"{what}: update {update['id']} {u['status']}: {errs or 'no details'}")
            return None
        self._wait(f"{what} (update {update['id']})", check)
        return list(dict.fromkeys(seen))

    @staticmethod
    def _param(update: dict[str, Any], kind: str) -> str | None:
        return next((p.get("value") for p in update.get("params") or [] if p.get("type") == kind), None)

    def _apply_cp_upgrade(self, desired: DesiredCluster, step: Step):
        region, target = self._region(desired), str(step.params["version"])
        c = self._cluster(desired)
        if c is None:
            raise PermanentError(f"EKS cluster {desired.name} does not exist; cannot upgrade it")
        running = self._in_progress(desired) if c["status"] == "UPDATING" else []
        for u in running:
            if u.get("type") == "VersionUpdate" and self._param(u, "Version") == target:
                seen = self._wait_update(desired, u, f"upgrade of EKS cluster {desired.name} to {target}")
                self._wait_cluster(desired)
                return True, f"waited for the running upgrade to {target}", {"updateId": u["id"], "statuses": seen}
        if running or c["status"] != "ACTIVE":
            raise InFlight(f"EKS cluster {desired.name} is {c['status']} with another update running")
        have = c.get("version")
        if _minor(have) >= _minor(target):
            return False, f"EKS cluster {desired.name} already runs {have}", {}
        if _minor(target) != (_minor(have)[0], _minor(have)[1] + 1):
            raise PermanentError(f"EKS upgrades go one minor version at a time: {have} -> {target} is not one step")
        u = self._call("eks", region, "update_cluster_version", name=desired.name, version=target)["update"]
        seen = self._wait_update(desired, u, f"upgrade of EKS cluster {desired.name} to {target}")
        self._wait_cluster(desired)
        return True, f"upgraded EKS cluster {desired.name} {have} -> {target}", {"updateId": u["id"], "statuses": seen}

    def _apply_cp_scale(self, desired: DesiredCluster, step: Step):
        return False, "EKS manages the control plane's replicas", {}

    # ========================================================================= kube access
    def kube_access(self, desired: DesiredCluster) -> KubeAccess:
        mapped = self.connections.testenv_eks_endpoints.get(desired.name)
        if mapped is not None:  # test environment only
            return KubeAccess(server=mapped.server, token=mapped.token.get_secret_value() if mapped.token else None,
                              ca_file=mapped.ca_file, insecure=mapped.insecure)
        c = self._cluster(desired)
        if c is None:
            raise PermanentError(f"EKS cluster {desired.name} does not exist")
        if c.get("status") != "ACTIVE" or not c.get("endpoint"):
            raise InFlight(f"EKS cluster {desired.name} is {c.get('status')}; its API is not ready")
        return KubeAccess(server=c["endpoint"], token=self.token(desired),
                          ca_data=(c.get("certificateAuthority") or {}).get("data"))

    def token(self, desired: DesiredCluster) -> str:
        """An ``aws eks get-token`` style bearer token for the cluster. A secret: never log it."""
        region = self._region(desired)
        try:
            return make_eks_token(self._boto_session(region)._session, desired.name, str(region),
                                  self._connection(region.credentials).endpoint_url)
        except FleetwrightError:
            raise
        except Exception as e:  # noqa: BLE001
            raise map_error(e, operation="sts:presign GetCallerIdentity") from None
