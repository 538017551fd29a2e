"""The cluster backend: components and team workspaces inside a running cluster, by server-side apply.

``KubeBackend(access)`` implements :class:`backends.base.ClusterBackend` against the Kubernetes
API named by a :class:`~backends.base.KubeAccess` (bearer token, CA file or data, client
certificates, or ``insecure``). It needs nothing but the API server.

How it works
------------
* **Generic objects.** Any ``apiVersion``/``kind`` is mapped to its REST path with discovery
  (``/api/v1``, ``/apis/<group>/<version>``), fetched lazily per group-version and cached; a
  group-version is fetched again when a kind is missing from it (new CRDs) and after this
  backend has made a CRD ``Established``. Requests go through the official client's
  ``ApiClient`` (its TLS, auth and connection pool) with connect/read timeouts.
* **Apply.** Every object of a component (``desired.component(step.object).objects``) or a
  workspace is applied with server-side apply, field manager ``fleetwright``, ``force=True``,
  annotated ``fleetwright.io/spec-hash`` (component or workspace hash) and
  ``fleetwright.io/version`` (component version). Before anything is written every object is
  read: one that exists without ``app.kubernetes.io/managed-by=fleetwright`` makes the step
  raise :class:`OwnershipConflict` naming it, and nothing at all is changed (no adoption).
  An existing object is applied with its ``metadata.resourceVersion`` as a precondition, so an
  object that changed hands between the read and the write is never taken over (the write
  fails with a conflict, is read again and re-checked, at most twice). The pre-existing system
  namespaces (``default``, ``kube-system``, ...) are never applied, changed or deleted even when
  a component lives in one. CRDs come first in the rendered order; the apply waits until each is
  ``Established`` (and discovery serves it) before the first object after them.
* **Inventory** (as ``kubectl apply --prune``'s ApplySet or Flux's inventory). The refs of
  everything applied are recorded in a ConfigMap ``fleetwright-inventory-<component>`` in the
  component namespace (``fleetwright-workspace-inventory-<team>`` in a workspace's first
  namespace), itself marked as ours plus ``fleetwright.io/inventory=component|workspace``.
  An apply first records the union of the old and the new refs (a crash mid-apply leaves no
  orphan), applies, prunes, then records only the new refs together with the new
  ``spec-hash``/``version`` annotations: the inventory's annotations are the commit point, so an
  interrupted apply is seen as "not done yet" by ``observe`` and planned again.
* **Prune / remove.** Candidates are found by label (``managed-by=fleetwright`` AND
  ``fleetwright.io/component=<name>`` or ``fleetwright.io/workspace=<team>``) for every kind in
  the desired set, in the inventory and ``Namespace``; so a kind removed from the manifests is
  still pruned. Only objects carrying our labels are deleted (with a UID precondition), in
  reverse order: custom objects and workloads, config, RBAC, CRDs, namespaces last;
  ``component.remove`` waits until the namespaces are gone, so the same component can be
  installed again at once.
* **Change detection.** ``StepResult.changed`` is True when an object was created, its
  ``resourceVersion`` moved (the API server does not write a no-op server-side apply, measured
  on 1.20), something was pruned or deleted, or the inventory moved. A second apply reports
  ``changed=False``.
* **Observe.** For each desired component (target ``kubernetes``) and workspace whose inventory
  or objects exist: version and hash from the inventory's annotations (or, without inventory,
  the objects'), and a field-by-field drift list (:func:`object_drift`) comparing only the
  fields fleetwright sets in the desired object with the live one; server-set fields, defaults,
  ``status``, ``managedFields``, ``resourceVersion`` are never looked at; a missing object is
  drift with ``observed=None``. Inventories of components and workspaces that are no longer
  desired are reported too, so the plan removes them. ``observe`` never writes.
* **Errors** are mapped in one place, :func:`map_error`.

Helm
----
Components with a ``helm`` source arrive already rendered by ``models.render`` as a Flux
``HelmRepository`` plus ``HelmRelease``; this backend applies them like any other objects. There
is no ``helm`` binary in the worker image and no chart download from the control plane: the
install is GitOps-native, the Flux helm-controller in the cluster pulls the chart and installs,
upgrades or rolls it back, and what fleetwright owns (and can diff, prune and refuse to adopt)
stays plain Kubernetes objects.

Kubernetes 1.20 quirk: server-side apply there rejects ``Service.spec.ports`` and container
``ports`` entries without ``protocol`` (part of the list key); the backend fills in the API
server's own default ``TCP`` before applying, which does not change what the object means.

Layout (one module per service, as CAPA's ``pkg/cloud/services``): :mod:`.client` (one shared
``ApiClient`` per cluster endpoint and credentials, requests, discovery), :mod:`.apply`,
:mod:`.drift` (field drift and ``observe``), :mod:`.inventory` (inventories, prune, remove,
``delete``), :mod:`.health` (nodes, system Pods, workloads and versions as the API shows them), :mod:`.drain` (cordon, drain by eviction, delete Nodes: used by the infrastructure
backends before they remove a machine), :mod:`.errors`, and :mod:`.objects` (the marks and keys
they share). ``KubeBackend`` is their composition.
"""
from __future__ import annotations

from .apply import Applier
from .client import Client, api_client, close_clients, shared_client
from .drain import Drainer
from .drift import Observer, object_drift
from .errors import StaleObject, map_error
from .health import Health
from .inventory import Inventory
from .objects import (INVENTORY_KEY, INVENTORY_LABEL, SYSTEM_NAMESPACES, VERSION_ANNOTATION, group_of, prepare,
                      ref_str)

__all__ = ["KubeBackend", "api_client", "shared_client", "close_clients", "object_drift", "map_error", "StaleObject", "prepare", "ref_str", "group_of",
           "INVENTORY_KEY", "INVENTORY_LABEL", "SYSTEM_NAMESPACES", "VERSION_ANNOTATION"]


class KubeBackend(Applier, Observer, Inventory, Drainer, Health, Client):
    """Components and workspaces in one cluster, by server-side apply (see the module docstring)."""

    kind = "kube"
