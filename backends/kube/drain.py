"""Cordon and drain a node through the Kubernetes API, honouring PodDisruptionBudgets; delete Nodes.

Before a VM or a host leaves a cluster (a pool shrinks or is deleted), the node is cordoned
(``spec.unschedulable``) and every Pod on it is *evicted* (``pods/eviction``), as ``kubectl
drain`` does: the API server refuses an eviction that would break a PodDisruptionBudget with
429, which is retried until ``timeout``; then the drain fails with an error naming the Pod and
the budget, and the caller removes nothing. DaemonSet Pods (their controller would put them back)
and mirror Pods (static Pods of the kubelet) are skipped. After the evictions the drain waits
until the evicted Pods are gone (their UID no longer exists). Nodes are deleted only by name and
only after their machine is gone (:meth:`Drainer.delete_node`).

A mixin of :class:`backends.kube.KubeBackend`, so any infrastructure backend (vSphere, metal)
can drain through ``registry.in_cluster(access)``.
"""
from __future__ import annotations

import logging
import time

from models.errors import PermanentError, TransientError

from .errors import map_error

log = logging.getLogger("backends.kube")

MIRROR_ANNOTATION = "kubernetes.io/config.mirror"


def _ref(pod: dict) -> str:
    m = pod.get("metadata") or {}
    return f"{m.get('namespace')}/{m.get('name')}"


def _skip_reason(pod: dict) -> str | None:
    m = pod.get("metadata") or {}
    if MIRROR_ANNOTATION in (m.get("annotations") or {}):
        return "mirror pod"
    if any(o.get("kind") == "DaemonSet" and o.get("controller") for o in m.get("ownerReferences") or []):
        return "DaemonSet pod"
    return None


def selector_matches(selector: dict | None, labels: dict) -> bool:
    """A LabelSelector (``matchLabels`` and ``matchExpressions``) against a Pod's labels."""
    if selector is None:
        return False
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e.get("key"), e.get("operator"), e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


class Drainer:
    """``cordon``, ``drain`` and ``delete_node``: a mixin of :class:`backends.kube.KubeBackend`."""

    def _eviction_version(self) -> str:
        """``policy/v1`` where the API server serves it for ``pods/eviction`` (1.22+), else ``policy/v1beta1``."""
        if getattr(self, "_eviction_gv", None) is None:
            doc = self._request("GET", "/api/v1", what="discovery v1") or {}
            sub = next((r for r in doc.get("resources") or [] if r.get("name") == "pods/eviction"), {})
            group, version = sub.get("group") or "policy", sub.get("version") or "v1beta1"
            self._eviction_gv = f"{group}/{version}"
        return self._eviction_gv

    def cordon(self, node: str) -> bool:
        """Mark the node unschedulable; True if it was not already. A missing node is not an error."""
        live = self._request("GET", f"/api/v1/nodes/{node}", what=f"Node/{node}")
        if live is None:
            return False
        if (live.get("spec") or {}).get("unschedulable"):
            return False
        self._request("PATCH", f"/api/v1/nodes/{node}", body={"spec": {"unschedulable": True}},
                      content_type="application/merge-patch+json", what=f"Node/{node}")
        return True

    def pods_on(self, node: str) -> list[dict]:
        doc = self._request("GET", "/api/v1/pods", query=[("fieldSelector", f"spec.nodeName={node}")],
                            what=f"pods on node {node}") or {}
        return doc.get("items") or []

    def _budgets_for(self, pod: dict) -> list[str]:
        """The PodDisruptionBudgets (``namespace/name``) whose selector matches the Pod."""
        m = pod.get("metadata") or {}
        ns, labels = m.get("namespace"), m.get("labels") or {}
        for gv in ("policy/v1", "policy/v1beta1"):
            res = self._resource(gv, "PodDisruptionBudget")
            if res is None:
                continue
            doc = self._request("GET", res.collection(ns), what=f"PodDisruptionBudgets in {ns}") or {}
            return [f"{ns}/{(b.get('metadata') or {}).get('name')}" for b in doc.get("items") or []
                    if selector_matches((b.get("spec") or {}).get("selector"), labels)]
        return []

    def drain(self, node: str, *, timeout: float = 300.0, poll: float = 2.0) -> dict:
        """Cordon ``node`` and evict its Pods; ``{"evicted": [...], "skipped": [...]}``.

        Raises ``TransientError`` naming the Pod and its PodDisruptionBudget when evictions are still
        refused after ``timeout`` seconds (the caller must then leave the machine alone), and when
        evicted Pods are not gone by then.
        """
        deadline = time.monotonic() + timeout
        self.cordon(node)
        gv = self._eviction_version()
        todo, skipped, waiting, evicted = [], [], [], []
        for pod in self.pods_on(node):
            why = _skip_reason(pod)
            if why:
                skipped.append(f"{_ref(pod)} ({why})")
            elif (pod.get("metadata") or {}).get("deletionTimestamp"):
                waiting.append(pod)  # already terminating: only wait for it
            else:
                todo.append(pod)
        refusals: dict[str, str] = {}
        while todo:
            for pod in list(todo):
                m = pod["metadata"]
                body = {"apiVersion": gv, "kind": "Eviction", "metadata": {"name": m["name"], "namespace": m["namespace"]}}
                status, doc, exc = self._exchange("POST", f"/api/v1/namespaces/{m['namespace']}/pods/{m['name']}/eviction",
                                                  body=body, what=f"eviction of Pod/{_ref(pod)}")
                if exc is None:
                    evicted.append(_ref(pod))
                    waiting.append(pod)
                    todo.remove(pod)
                elif status == 404:  # gone meanwhile
                    todo.remove(pod)
                elif status == 429:  # a PodDisruptionBudget does not allow it now: retry until the deadline
                    causes = [c.get("message") for c in ((doc.get("details") or {}).get("causes") or []) if c.get("message")]
                    refusals[_ref(pod)] = "; ".join([doc.get("message") or "Too Many Requests"] + causes)
                else:
                    err = map_error(exc, "POST", f"eviction of Pod/{_ref(pod)} from node {node}")
                    if status == 500 and "more than one PodDisruptionBudget" in (doc.get("message") or ""):
                        err = PermanentError(f"drain of node {node}: Pod/{_ref(pod)} is covered by more than one "
                                             f"PodDisruptionBudget ({', '.join(self._budgets_for(pod))}); the API "
                                             "server cannot evict it. Fix the budgets; nothing was removed")
                    raise err from exc
            if not todo:
                break
            if time.monotonic() >= deadline:
                pod = todo[0]
                budgets = self._budgets_for(pod)
                raise TransientError(
                    f"drain of node {node}: eviction of Pod/{_ref(pod)} is still refused after {timeout:.0f}s by "
                    f"PodDisruptionBudget {', '.join(budgets) or '(none found)'}: {refusals.get(_ref(pod), '')}"
                    + (f" ({len(todo) - 1} more Pods blocked)" if len(todo) > 1 else "")
                    + "; the node stays cordoned and its machine is not removed", delay=30)
            time.sleep(poll)
        for pod in waiting:
            m = pod["metadata"]
            while True:
                live = self._request("GET", f"/api/v1/namespaces/{m['namespace']}/pods/{m['name']}",
                                     what=f"Pod/{_ref(pod)}")
                if live is None or (live.get("metadata") or {}).get("uid") != m.get("uid"):
                    break
                if time.monotonic() >= deadline:
                    raise TransientError(f"drain of node {node}: evicted Pod/{_ref(pod)} is still terminating after "
                                         f"{timeout:.0f}s; the machine is not removed", delay=30)
                time.sleep(poll)
        log.info("drained node %s: %d pods evicted, %d skipped", node, len(evicted), len(skipped))
        return {"evicted": evicted, "skipped": skipped}

    def delete_node(self, node: str) -> bool:
        """Delete the Node object; True if it existed."""
        return self._request("DELETE", f"/api/v1/nodes/{node}", what=f"Node/{node}") is not None

    def nodes(self, selector: str) -> list[str]:
        doc = self._request("GET", "/api/v1/nodes", query=[("labelSelector", selector)], what="nodes") or {}
        return sorted((n.get("metadata") or {}).get("name") for n in doc.get("items") or [])
