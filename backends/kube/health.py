"""What the Kubernetes API of a cluster shows about its health: nodes, system Pods, workloads, versions.

The health gates and the verify phase of every flow (``tasks.cluster``) must judge a cluster by
what runs in it, not by what a state file or a cloud API says was installed. This mixin of
:class:`backends.kube.KubeBackend` reads, through the cluster's API only:

* **nodes**: every Node is ``Ready``; every Node the infrastructure backend made (by name) is
  registered, and its kubelet (``status.nodeInfo.kubeletVersion``) is at the expected minor version;
* **kube-system Pods**: Running with every container ready (or Succeeded);
* **component workloads**: each Deployment, DaemonSet and StatefulSet a component installs is
  available at its desired size and generation; if not, the first Pod that explains why
  (a container waiting in ``ImagePullBackOff``, a Pod not scheduled) is named;
* **the control plane's version**: the control-plane Pods' images (static Pods labelled
  ``tier=control-plane``, where the cluster runs its control plane as Pods, as kubeadm does; a
  managed control plane such as EKS's is judged by its provider's API in the observation).

:meth:`Health.health` returns a list of :class:`~backends.base.HealthProblem` (empty: healthy) and
never waits or retries: the caller decides how long a "not yet" may last (a timeout per component)
and stops at once on a problem marked ``final`` (nothing will change it by waiting).
"""
from __future__ import annotations

import re

from models.desired import DesiredCluster

from ..base import HealthExpectation, HealthProblem

WORKLOADS = ("Deployment", "DaemonSet", "StatefulSet")
# container waiting reasons that waiting cannot cure (the spec itself is wrong)
FINAL_REASONS = {"InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError"}


def _minor(version: str | None) -> tuple[int, int] | None:
    m = re.match(r"v?(\d+)\.(\d+)", version or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def _cond(obj: dict, kind: str) -> dict:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("type") == kind), {})


def pod_problem(pod: dict) -> tuple[str, bool] | None:
    """Why a Pod is not running and ready (and whether waiting can cure it); None when it is."""
    st = pod.get("status") or {}
    phase = st.get("phase") or "Pending"
    if phase == "Succeeded":
        return None
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return "terminating", False
    for cs in (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or []):
        waiting = (cs.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason") not in (None, "ContainerCreating", "PodInitializing"):
            why = f"container {cs.get('name')} waiting: {waiting.get('reason')}"
            if waiting.get("message"):
                why += f" ({waiting['message'][:200]})"
            return why, waiting.get("reason") in FINAL_REASONS
        term = (cs.get("state") or {}).get("terminated")
        if term and phase != "Succeeded" and not cs.get("ready"):
            return f"container {cs.get('name')} terminated: {term.get('reason') or term.get('exitCode')}", False
    if phase == "Failed":
        return f"Failed: {st.get('reason') or ''} {st.get('message') or ''}".strip(), False
    sched = _cond(pod, "PodScheduled")
    if sched.get("status") == "False":
        return f"not scheduled: {sched.get('reason')}: {sched.get('message') or ''}".strip(), False
    if phase != "Running":
        return f"{phase}", False
    if _cond(pod, "Ready").get("status") != "True":
        return "Running but not Ready", False
    return None


class Health:
    """``health``: a mixin of :class:`backends.kube.KubeBackend` (uses the client's requests)."""

    def health(self, desired: DesiredCluster, expect: HealthExpectation) -> list[HealthProblem]:
        problems: list[HealthProblem] = []
        if expect.nodes is not None:
            problems += self._node_health(expect)
        if expect.system_pods:
            problems += self._system_pod_health()
        if expect.control_plane_version:
            problems += self._control_plane_health(expect.control_plane_version)
        for name in expect.components:
            comp = desired.component(name)
            if comp is not None and comp.target == "kubernetes":
                problems += self._component_health(comp)
        return problems

    # ---------------------------------------------------------------- nodes

    def _node_health(self, expect: HealthExpectation) -> list[HealthProblem]:
        doc = self._request("GET", "/api/v1/nodes", what="nodes") or {}
        live = {(n.get("metadata") or {}).get("name"): n for n in doc.get("items") or []}
        out = []
        for name, node in sorted(live.items()):
            ready = _cond(node, "Ready")
            if ready.get("status") != "True":
                why = f"not Ready ({ready.get('reason') or 'no Ready condition'}"
                why += f": {ready['message'][:200]})" if ready.get("message") else ")"
                out.append(HealthProblem("nodes", f"Node/{name}", why))
        for name, want in sorted(expect.nodes.items()):
            node = live.get(name)
            if node is None:
                out.append(HealthProblem("nodes", f"Node/{name}", "not registered with the API server"))
                continue
            have = ((node.get("status") or {}).get("nodeInfo") or {}).get("kubeletVersion")
            if want and _minor(have) != _minor(want):
                out.append(HealthProblem("nodes", f"Node/{name}", f"kubelet reports {have or 'no version'}, expected {want}"))
        for name, want in sorted(expect.node_versions.items()):
            have = (((live.get(name) or {}).get("status") or {}).get("nodeInfo") or {}).get("kubeletVersion")
            if name in live and want and _minor(have) != _minor(want):
                out.append(HealthProblem("nodes", f"Node/{name}", f"kubelet reports {have or 'no version'}, expected {want}"))
        return out

    # ---------------------------------------------------------------- kube-system

    def _system_pod_health(self) -> list[HealthProblem]:
        doc = self._request("GET", "/api/v1/namespaces/kube-system/pods", what="Pods in kube-system") or {}
        out = []
        for pod in doc.get("items") or []:
            got = pod_problem(pod)
            if got:
                out.append(HealthProblem("kube-system", f"Pod/kube-system/{pod['metadata']['name']}", got[0], final=got[1]))
        return out

    # ---------------------------------------------------------------- control plane

    def _control_plane_health(self, want: str) -> list[HealthProblem]:
        out = []
        doc = self._request("GET", "/api/v1/namespaces/kube-system/pods", query=[("labelSelector", "tier=control-plane")],
                            what="control-plane Pods") or {}
        for pod in doc.get("items") or []:
            name = pod["metadata"]["name"]
            for c in (pod.get("spec") or {}).get("containers") or []:
                tag = (c.get("image") or "").rpartition(":")[2]
                comp = (pod["metadata"].get("labels") or {}).get("component", "")
                if comp in ("kube-apiserver", "kube-controller-manager", "kube-scheduler") and _minor(tag) != _minor(want):
                    out.append(HealthProblem("control-plane", f"Pod/kube-system/{name}",
                                             f"runs image {c.get('image')}, expected {want}"))
        return out

    # ---------------------------------------------------------------- workloads

    def _component_health(self, comp) -> list[HealthProblem]:
        out = []
        group = f"component:{comp.name}"
        for obj in comp.objects:
            if obj.get("kind") not in WORKLOADS or not str(obj.get("apiVersion", "")).startswith("apps/"):
                continue
            ns = (obj.get("metadata") or {}).get("namespace") or comp.namespace
            name = obj["metadata"]["name"]
            ref = f"{obj['kind']}/{ns}/{name}"
            plural = obj["kind"].lower() + "s"
            live = self._request("GET", f"/apis/apps/v1/namespaces/{ns}/{plural}/{name}", what=ref)
            if live is None:
                out.append(HealthProblem(group, ref, "does not exist"))
                continue
            why, final = self._workload_gap(live)
            if why:
                pod_why = self._first_pod_problem(live, ns)
                if pod_why:
                    why, final = f"{why}; {pod_why[0]}", final or pod_why[1]
                out.append(HealthProblem(group, ref, why, final=final))
        return out

    @staticmethod
    def _workload_gap(live: dict) -> tuple[str | None, bool]:
        spec, st, meta = live.get("spec") or {}, live.get("status") or {}, live.get("metadata") or {}
        if (st.get("observedGeneration") or 0) < (meta.get("generation") or 0):
            return "its controller has not seen the latest generation yet", False
        kind = live.get("kind")
        if kind == "Deployment":
            want = spec.get("replicas", 1)
            prog = _cond(live, "Progressing")
            if prog.get("reason") == "ProgressDeadlineExceeded":
                return f"rollout failed: {prog.get('message') or 'progress deadline exceeded'}", True
            avail, updated = st.get("availableReplicas") or 0, st.get("updatedReplicas") or 0
            if avail < want or updated < want:
                return f"{avail} of {want} replicas available ({updated} updated)", False
        elif kind == "DaemonSet":
            want = st.get("desiredNumberScheduled") or 0
            avail, updated = st.get("numberAvailable") or 0, st.get("updatedNumberScheduled") or 0
            if avail < want or updated < want:
                return f"{avail} of {want} scheduled Pods available ({updated} updated)", False
        elif kind == "StatefulSet":
            want = spec.get("replicas", 1)
            ready = st.get("readyReplicas") or 0
            if ready < want:
                return f"{ready} of {want} replicas ready", False
        return None, False

    def _first_pod_problem(self, live: dict, ns: str) -> tuple[str, bool] | None:
        labels = ((live.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        if not labels:
            return None
        sel = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        doc = self._request("GET", f"/api/v1/namespaces/{ns}/pods", query=[("labelSelector", sel)],
                            what=f"Pods of {live.get('kind')}/{ns}/{live['metadata']['name']}") or {}
        for pod in doc.get("items") or []:
            got = pod_problem(pod)
            if got:
                return f"Pod/{ns}/{pod['metadata']['name']} {got[0]}", got[1]
        return None
