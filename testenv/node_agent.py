#!/usr/bin/python3
"""fw-node-agent: a STAND-IN for kubelets and the scheduler on the test environment's bare API servers.

The test environment's control planes (``testenv/kube.py``: the clusters EKS is mapped to, the kube
tests' clusters) and the SSH-host clusters of the test-only supervisor path run kube-apiserver +
etcd + kube-controller-manager, but no kubelet, scheduler or container runtime: a Node is an
object registered through the API and no Pod ever runs. fleetwright's health gates judge a cluster
by what its API shows (Nodes Ready at a kubelet version, workloads available), so without a
stand-in every gate would fail there. This agent makes the API show what kubelets would report,
so the product runs unchanged:

* **Nodes**: every Node gets ``Ready=True`` (heartbeat every ~10 s, so the node lifecycle
  controller never marks it Unknown) and ``status.nodeInfo.kubeletVersion`` = the version the
  playbook installed on that host (label ``fleetwright.io/kubernetes-version``, e.g. ``1.21`` ->
  ``v1.21.0``; else the API server's own version). A Node annotated
  ``testenv.fleetwright.io/not-ready: <message>`` is reported ``Ready=False`` (reason
  ``KubeletNotReady``): the way a test stops "its kubelet".
* **Pods**: every Pending Pod is reported Running with all containers ready (the controller
  manager then makes Deployments, ReplicaSets and DaemonSets available as with real kubelets).
  Pods are never bound to a node, so deletion stays immediate without a kubelet.

It is never used against machines (``testenv/machines.py``): there real kubelets and containerd
run, and the health gates are proven against them. Standard library only (it also runs under an
SSH host's ``/usr/bin/python3``). Survives API server restarts (it retries every poll).

    fw-node-agent --server https://HOST:PORT --token-file F --ca-file F [--interval 1]
"""
from __future__ import annotations

import argparse
import datetime
import json
import ssl
import sys
import time
import urllib.error
import urllib.request

NOT_READY = "testenv.fleetwright.io/not-ready"
VERSION_LABEL = "fleetwright.io/kubernetes-version"
HEARTBEAT = 10.0


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Api:
    def __init__(self, server: str, token_file: str, ca_file: str):
        self.server = server.rstrip("/")
        self.token_file = token_file
        self.ctx = ssl.create_default_context(cafile=ca_file)

    def call(self, method: str, path: str, body=None, ctype: str = "application/json"):
        token = open(self.token_file).read().strip()
        req = urllib.request.Request(self.server + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": "Bearer " + token, "Content-Type": ctype,
                                              "Accept": "application/json"})
        with urllib.request.urlopen(req, context=self.ctx, timeout=10) as r:
            return json.loads(r.read() or b"{}")


def kubelet_version(node: dict, server_version: str) -> str:
    v = ((node.get("metadata") or {}).get("labels") or {}).get(VERSION_LABEL)
    if not v:
        return server_version
    v = v if v.startswith("v") else "v" + v
    return v if v.count(".") >= 2 else v + ".0"


def node_status(node: dict, server_version: str, old: dict) -> dict:
    ann = (node.get("metadata") or {}).get("annotations") or {}
    ready = NOT_READY not in ann
    cond = {"type": "Ready", "status": "True" if ready else "False",
            "reason": "KubeletReady" if ready else "KubeletNotReady",
            "message": "testenv node agent (stand-in kubelet) is posting ready status" if ready
            else f"testenv: {ann.get(NOT_READY) or 'kubelet stopped'}",
            "lastHeartbeatTime": _now()}
    prev = next((c for c in old.get("conditions") or [] if c.get("type") == "Ready"), {})
    cond["lastTransitionTime"] = prev.get("lastTransitionTime") if prev.get("status") == cond["status"] else _now()
    ver = kubelet_version(node, server_version)
    return {"conditions": [cond],
            "nodeInfo": {"kubeletVersion": ver, "kubeProxyVersion": ver, "containerRuntimeVersion": "testenv://stand-in",
                         "operatingSystem": "linux", "architecture": "amd64", "osImage": "testenv stand-in",
                         "kernelVersion": "", "machineID": "", "systemUUID": "", "bootID": ""},
            "capacity": {"cpu": "4", "memory": "8Gi", "pods": "110"},
            "allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"}}


def sync_nodes(api: Api, server_version: str, beats: dict) -> None:
    for node in api.call("GET", "/api/v1/nodes").get("items") or []:
        name = node["metadata"]["name"]
        st = node.get("status") or {}
        want = node_status(node, server_version, st)
        have_ready = next((c for c in st.get("conditions") or [] if c.get("type") == "Ready"), {})
        same = (have_ready.get("status") == want["conditions"][0]["status"]
                and have_ready.get("message") == want["conditions"][0]["message"]
                and (st.get("nodeInfo") or {}).get("kubeletVersion") == want["nodeInfo"]["kubeletVersion"])
        if same and time.monotonic() - beats.get(name, 0) < HEARTBEAT:
            continue
        api.call("PATCH", f"/api/v1/nodes/{name}/status", {"status": want}, "application/merge-patch+json")
        beats[name] = time.monotonic()


def running_status(pod: dict) -> dict:
    now = _now()
    spec = pod.get("spec") or {}
    cs = [{"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": True, "started": True,
           "restartCount": 0, "state": {"running": {"startedAt": now}}} for c in spec.get("containers") or []]
    ics = [{"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": True, "restartCount": 0,
            "state": {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": now, "finishedAt": now}}}
           for c in spec.get("initContainers") or []]
    conds = [{"type": t, "status": "True", "lastTransitionTime": now}
             for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")]
    out = {"phase": "Running", "conditions": conds, "containerStatuses": cs, "startTime": now,
           "hostIP": "127.0.0.1", "podIP": "10.244.0.1", "podIPs": [{"ip": "10.244.0.1"}]}
    if ics:
        out["initContainerStatuses"] = ics
    return out


def sync_pods(api: Api) -> None:
    for pod in api.call("GET", "/api/v1/pods?fieldSelector=status.phase%3DPending").get("items") or []:
        m = pod["metadata"]
        if m.get("deletionTimestamp"):
            continue
        try:
            api.call("PATCH", f"/api/v1/namespaces/{m['namespace']}/pods/{m['name']}/status",
                     {"status": running_status(pod)}, "application/merge-patch+json")
        except urllib.error.HTTPError as e:
            if e.code not in (404, 409):
                raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fw-node-agent")
    ap.add_argument("--server", required=True)
    ap.add_argument("--token-file", required=True)
    ap.add_argument("--ca-file", required=True)
    ap.add_argument("--interval", type=float, default=1.0)
    a = ap.parse_args(argv)
    api = Api(a.server, a.token_file, a.ca_file)
    beats: dict[str, float] = {}
    server_version = ""
    last_error = ""
    while True:
        try:
            if not server_version:
                server_version = api.call("GET", "/version").get("gitVersion") or "v0.0.0"
            sync_nodes(api, server_version, beats)
            sync_pods(api)
            last_error = ""
        except (OSError, ValueError, urllib.error.URLError) as e:  # API server restarting, not up yet
            msg = f"{type(e).__name__}: {e}"
            if msg != last_error:
                print(f"{_now()} fw-node-agent: {msg}", file=sys.stderr, flush=True)
                last_error = msg
            server_version = ""
        time.sleep(a.interval)


if __name__ == "__main__":
    sys.exit(main())
