"""AWS infrastructure backend (one module per service, as CAPA's ``pkg/cloud/services/``): VPC + subnets, IAM roles, EKS cluster, managed node groups, EKS add-ons.

Blocking boto3 calls only (no Prefect here). Every resource this backend creates carries the
ownership tags ``fleetwright.io/owned-by=fleetwright`` and ``fleetwright.io/cluster=<name>``
plus the cluster spec's ``backend.tags``. Resources are found by recorded ID (a VPC id in the
spec), else by deterministic name plus those tags; a same-named resource without them raises
``OwnershipConflict`` and is never adopted, changed or deleted.

Deterministic names (per cluster ``<c>``):

* VPC: tag ``Name=fw-<c>``; subnets: tag ``Name=fw-<c>-<az>`` in that VPC;
* IAM roles ``fw-<c>-cluster`` (trusts eks.amazonaws.com) and ``fw-<c>-node`` (ec2);
* EKS cluster ``<c>``; node group ``<pool>``; add-on ``<addon name>`` tagged with the component.

All provider errors are mapped to ``models.errors`` by :func:`map_error` (the one place).
"""
from __future__ import annotations

from .backend import AwsBackend
from .common import (ADDON_VERSION_KEY, CLUSTER_POLICIES, COMPONENT_KEY, COMPONENT_VERSION_KEY, NODE_POLICIES,
                     NODE_POOL_KEY, SPEC_HASH_KEY, eks_taint)
from .eks import make_eks_token
from .errors import map_error

__all__ = ["AwsBackend", "map_error", "eks_taint", "make_eks_token", "ADDON_VERSION_KEY", "CLUSTER_POLICIES",
           "COMPONENT_KEY", "COMPONENT_VERSION_KEY", "NODE_POLICIES", "NODE_POOL_KEY", "SPEC_HASH_KEY"]
