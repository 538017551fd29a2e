"""Observing many AWS clusters at once: one paginated EC2 listing per kind, not one describe per cluster.

EC2 describes any number of resources in one call when asked by filter, page by page
(``get_paginator``): the VPCs by the ``tag:Name`` of every cluster of a batch, then the subnets,
NAT gateways and route tables by the ``vpc-id`` of every VPC found, the internet gateways by
``tag:Name``, and the region's zones once. ``observe_many`` takes these listings for the clusters
of a batch that share a region and an identity (a VPC built from ``vpc.cidr``), then observes each
cluster from them, exactly as ``observe`` would, in threads. What has no listing stays per cluster:

* the VPC's DNS attributes (``DescribeVpcAttribute`` takes one VPC and one attribute);
* IAM roles: ``ListRoles`` returns no tags, and a role's owner is read from its tags;
  ``GetAccountAuthorizationDetails`` would page through the whole account for every batch;
* EKS: cluster, node groups, add-ons and access entries are only described one at a time
  (its ``List*`` calls return names).

A listing lives only for one ``observe_many`` call: applying a step always reads afresh.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable

from models.desired import DesiredCluster, ObservedCluster
from models.errors import TransientError

from .common import _ec2_tags

FILTER_VALUES = 100  # values per EC2 filter in one request (EC2 allows 200)
OBSERVE_THREADS = 8  # clusters observed at once by observe_many (every call still waits for the API limit)


@dataclass
class Listing:
    """The EC2 resources of a region that a batch's clusters are looked up in (read-only once made)."""

    zones: list[dict[str, Any]] = field(default_factory=list)
    vpcs_by_name: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    igws_by_name: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    subnets: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # by VPC id
    nats: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def covers(self, vpc_id: str) -> bool:
        return vpc_id in self.subnets


def _chunks(values: list[str], n: int = FILTER_VALUES) -> Iterable[list[str]]:
    for i in range(0, len(values), n):
        yield values[i:i + n]


def _by(items: list[dict[str, Any]], key) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for it in items:
        out.setdefault(key(it), []).append(it)
    return out


def _name(it: dict[str, Any]) -> str:
    return _ec2_tags(it.get("Tags")).get("Name", "")


class ListingService:
    """Mixin: ``observe_many`` (the ``BatchObserver`` of backends/base.py) and the listings it reads from."""

    _listed: dict[str, Listing] = {}  # cluster name -> its batch's listing, only during observe_many

    def _listing(self, desired: DesiredCluster) -> Listing | None:
        return self._listed.get(desired.name) if self._listed else None

    def _paginate(self, service: str, region: str, op: str, key: str, **kw: Any) -> list[dict[str, Any]]:
        """Every item of every page of a listing (each page is one API call, under the API limit); an
        operation without pages (DescribeAvailabilityZones) is one call."""
        from .errors import map_error

        client = self.client(service, region)
        if not client.can_paginate(op):
            return self._call(service, region, op, **kw).get(key, [])
        try:
            return [it for page in client.get_paginator(op).paginate(**kw) for it in page.get(key, [])]
        except Exception as e:  # noqa: BLE001 - mapped in one place
            raise map_error(e, operation=f"{service}:{client.meta.method_to_api_mapping.get(op, op)}") from None

    def _list_region(self, region: str, desireds: list[DesiredCluster]) -> Listing:
        """One listing per kind for these clusters (all in ``region``, with VPCs built from ``cidr``)."""
        names = sorted({f"fw-{d.name}" for d in desireds})
        vpcs: list[dict[str, Any]] = []
        igws: list[dict[str, Any]] = []
        for chunk in _chunks(names):
            vpcs += self._paginate("ec2", region, "describe_vpcs", "Vpcs",
                                   Filters=[{"Name": "tag:Name", "Values": chunk}])
            igws += self._paginate("ec2", region, "describe_internet_gateways", "InternetGateways",
                                   Filters=[{"Name": "tag:Name", "Values": chunk}])
        ids = sorted({v["VpcId"] for v in vpcs})
        subnets: list[dict[str, Any]] = []
        nats: list[dict[str, Any]] = []
        tables: list[dict[str, Any]] = []
        for chunk in _chunks(ids):
            in_vpcs = [{"Name": "vpc-id", "Values": chunk}]
            subnets += self._paginate("ec2", region, "describe_subnets", "Subnets", Filters=in_vpcs)
            nats += self._paginate("ec2", region, "describe_nat_gateways", "NatGateways", Filter=in_vpcs)
            tables += self._paginate("ec2", region, "describe_route_tables", "RouteTables", Filters=in_vpcs)
        listing = Listing(vpcs_by_name=_by(vpcs, _name), igws_by_name=_by(igws, _name),
                          subnets=_by(subnets, lambda s: s["VpcId"]), nats=_by(nats, lambda n: n.get("VpcId", "")),
                          tables=_by(tables, lambda t: t.get("VpcId", "")))
        for i in ids:  # a VPC with none of a kind is still covered: its answer is "none"
            for kind in (listing.subnets, listing.nats, listing.tables):
                kind.setdefault(i, [])
        if any(d.backend.vpc.cidr for d in desireds):
            listing.zones = self._paginate("ec2", region, "describe_availability_zones", "AvailabilityZones",
                                           Filters=[{"Name": "state", "Values": ["available"]},
                                                    {"Name": "zone-type", "Values": ["availability-zone"]}])
        return listing

    def observe_many(self, desireds: Iterable[DesiredCluster]) -> dict[str, ObservedCluster | Exception]:
        """Observe many clusters: the same result per cluster as ``observe``, from shared EC2 listings.

        A cluster's own error (an ownership conflict, a permanent answer) is its value in the result;
        one whose observation met a transient error is left out, so the caller observes it again on
        its own (with its retries). An error of a shared listing is raised.
        """
        desireds = list(desireds)
        groups: dict[tuple, list[DesiredCluster]] = {}
        for d in desireds:
            if d.backend.vpc.cidr and not d.backend.vpc.id:  # a VPC of the user's is looked up by its id, as ever
                t = self._region(d)
                groups.setdefault((str(t), t.credentials, t.role_arn, t.external_id), []).append(d)
        listed: dict[str, Listing] = {}
        for ds in groups.values():
            listing = self._list_region(self._region(ds[0]), ds)
            listed.update({d.name: listing for d in ds})
        self._listed = listed

        def one(d: DesiredCluster) -> ObservedCluster | Exception | None:
            try:
                return self.observe(d)
            except TransientError:
                return None
            except Exception as e:  # noqa: BLE001 - one cluster's error is its answer
                return e

        try:
            with ThreadPoolExecutor(max_workers=max(1, min(OBSERVE_THREADS, len(desireds)))) as pool:
                answers = list(pool.map(one, desireds))
        finally:
            self._listed = {}
        return {d.name: a for d, a in zip(desireds, answers) if a is not None}
