"""Bare-metal backend: Kubernetes on hosts reached over SSH, made by the playbooks in ``playbooks/``.

Hosts are found by the spec (``backend.hosts``) and recognised as ours by the ownership marker
``/etc/fleetwright/cluster`` each host carries; their role and version are in
``/etc/fleetwright/state.json`` (written by the playbooks). Nothing is stored locally.

* ``observe``: the host states (one read-only playbook run). ``observe_many`` observes a shard of
  clusters with one run over all their hosts (an error is returned for its own cluster only). A host marked for another cluster
  raises ``OwnershipConflict``; an unreachable host raises ``TransientError``. ``exists`` needs
  the control-plane state AND an answer from its API server's ``/readyz``.
* ``apply``: ``infrastructure.ensure`` -> prepare; ``controlPlane.create`` -> control_plane;
  ``nodePool.create``/``scale`` -> join (scale down: reset the hosts no longer wanted);
  ``controlPlane.upgrade``/``nodePool.upgrade`` -> upgrade to ``step.params["version"]``.
* Node pools on metal have no autoscaler: min/max sizes are reported as desired (the spec's).
  A pool's size is the number of joined worker hosts. Scaling up needs spare hosts listed in
  ``backend.hosts``; scaling down resets hosts that are listed but no longer wanted. A host
  removed from the spec altogether is no longer seen (reset it before removing it).
"""
from __future__ import annotations

import base64
import hashlib
import logging
import ssl
import urllib.error
import urllib.request
from typing import Callable

from models.desired import DesiredCluster, Machine, ObservedCluster, ObservedNodePool
from models.errors import FleetwrightError, OwnershipConflict, PermanentError
from models.plan import Step

from . import ansible, private
from .base import KubeAccess, StepResult, api_call
from .connections import Connections

_logger = logging.getLogger("fleetwright.backends.metal")


def api_ready(endpoint: str, ca_pem: str | None, timeout: float = 3.0) -> bool:
    """True if ``endpoint``/readyz answers ``ok`` (TLS verified against the cluster's CA)."""
    if not ca_pem:
        return False
    try:
        ctx = ssl.create_default_context(cadata=ca_pem)
        with urllib.request.urlopen(endpoint.rstrip("/") + "/readyz", context=ctx, timeout=timeout) as r:
            return r.status == 200 and r.read().decode().strip() == "ok"
    except (OSError, urllib.error.URLError, ssl.SSLError, ValueError):
        return False


def _admin_conf_access(cluster: str, text: str) -> KubeAccess:
    """KubeAccess from a kubeadm admin.conf: the client certificate and key go to private files
    (``backends/private.py``, 0600, removed with the process), never to a log."""
    import yaml

    try:
        conf = yaml.safe_load(text)
        server = conf["clusters"][0]["cluster"]["server"]
        ca = conf["clusters"][0]["cluster"]["certificate-authority-data"]
        user = conf["users"][0]["user"]
        cert, key = base64.b64decode(user["client-certificate-data"]), base64.b64decode(user["client-key-data"])
    except (ValueError, KeyError, IndexError, TypeError, yaml.YAMLError) as e:
        raise PermanentError(f"cluster {cluster}: admin.conf of its control plane is not a kubeconfig with client "
                             f"certificate data ({type(e).__name__})") from None
    tag = hashlib.sha256(cert).hexdigest()[:12]
    cert_file = private.write_secret(f"kube-{cluster}-{tag}.crt", cert.decode())
    key_file = private.write_secret(f"kube-{cluster}-{tag}.key", key.decode())
    return KubeAccess(server=server, ca_data=ca, client_cert_file=str(cert_file), client_key_file=str(key_file))


class HostsCluster:
    """What the metal and vSphere backends share: a cluster made by the playbooks on SSH hosts."""

    kind = "hosts"

    def __init__(self, connections: Connections, log: Callable[[str], None] | None = None) -> None:
        self.connections = connections
        self.log = log or _logger.info

    # ---- which hosts --------------------------------------------------------------------------

    def hosts(self, desired: DesiredCluster) -> list[Machine]:
        """Every host this cluster may use (desired machines first)."""
        return list(desired.machines)

    # ---- observe ------------------------------------------------------------------------------

    def _states(self, desired: DesiredCluster, hosts: list[Machine] | None = None) -> dict[str, ansible.HostState]:
        hosts = self.hosts(desired) if hosts is None else hosts
        if not hosts:  # nothing to reach (a vSphere cluster whose VMs are off): no Ansible run, no API slot
            return {}
        with api_call("metal"):  # one Ansible run: one call against the fleet's metal API limit
            states = ansible.host_states(hosts, desired, self.connections, log=self.log)
        return self._refuse_foreign(desired, states)

    def _refuse_foreign(self, desired: DesiredCluster, states: dict[str, ansible.HostState]) -> dict[str, ansible.HostState]:
        for s in states.values():
            if s.marker and s.marker != desired.name:
                raise OwnershipConflict(
                    f"host {s.machine.name} ({s.machine.address}) is marked for cluster {s.marker!r} "
                    f"(/etc/fleetwright/cluster), not {desired.name!r}; fleetwright will not adopt it")
        return states

    def observe_hosts(self, desired: DesiredCluster, hosts: list[Machine] | None = None,
                      states: dict[str, ansible.HostState] | None = None) -> ObservedCluster:
        states = self._states(desired, hosts) if states is None else self._refuse_foreign(desired, states)
        name = desired.name
        ours = {n: s for n, s in states.items() if s.marker == name}
        infrastructure = bool(desired.machines) and all(m.name in ours for m in desired.machines)
        order = {m.name: i for i, m in enumerate(self.hosts(desired))}
        cps = sorted((s for s in ours.values() if s.state.get("role") == "controlPlane"),
                     key=lambda s: order.get(s.machine.name, 1 << 30))
        exists, version, endpoint, replicas = False, None, None, None
        if cps:
            first = cps[0]
            endpoint = first.state.get("endpoint")
            version = first.state.get("version")
            exists = bool(endpoint) and api_ready(endpoint, first.ca)
            replicas = len(cps) if exists else None
        pools: dict[str, ObservedNodePool] = {}
        desired_pools = {p.name: p for p in desired.node_pools}
        joined: dict[str, list[ansible.HostState]] = {}
        for s in ours.values():
            if s.state.get("role") == "worker":
                joined.setdefault(s.state.get("pool") or "", []).append(s)
        for pool, members in sorted(joined.items()):
            dp = desired_pools.get(pool)
            versions = sorted({m.state.get("version") for m in members if m.state.get("version")},
                              key=lambda v: tuple(int(x) for x in v.split(".")[:2]))
            pools[pool] = ObservedNodePool(
                replicas=len(members), min_size=dp.min_size if dp else 0, max_size=dp.max_size if dp else len(members),
                version=versions[0] if versions else None, machine=self.pool_machine(desired, pool, members))
        return ObservedCluster(name=name, infrastructure=infrastructure, exists=exists, kubernetes_version=version,
                               control_plane_replicas=replicas, endpoint=endpoint, node_pools=pools if exists else {},
                               in_flight=ansible.in_flight(name))

    def pool_machine(self, desired: DesiredCluster, pool: str, members) -> dict:
        return {}  # metal: the machine is whatever the host is

    # ---- apply --------------------------------------------------------------------------------

    def _run(self, playbook: str, desired: DesiredCluster, limit: list[Machine] | None = None,
             **extravars) -> ansible.AnsibleResult:
        hosts = self.hosts(desired)
        if limit is not None and not limit:
            return ansible.AnsibleResult(changed=False, ok=[], failed=[], unreachable=[], stats={})
        with api_call("metal"):
            return ansible.run(playbook, hosts, desired, self.connections, extravars, log=self.log,
                               limit=[m.name for m in limit] if limit is not None else None, lock=False)

    def workers(self, desired: DesiredCluster, pool: str | None = None) -> list[Machine]:
        return [m for m in desired.machines if m.role == "worker" and (pool is None or m.pool == pool)]

    def control_planes(self, desired: DesiredCluster) -> list[Machine]:
        return [m for m in desired.machines if m.role == "controlPlane"]

    def apply_hosts(self, desired: DesiredCluster, step: Step) -> StepResult:
        """Carry out a step with the playbooks. The caller holds the cluster lock."""
        a = step.action
        if a == "infrastructure.ensure":
            r = self._run("prepare.yml", desired, limit=list(desired.machines))
        elif a == "controlPlane.create":
            r = self._run("control_plane.yml", desired, limit=self.control_planes(desired),
                          fw_version=step.params.get("version", desired.kubernetes_version))
        elif a in ("nodePool.create", "nodePool.scale"):
            r = self._scale_pool(desired, step)
        elif a == "nodePool.delete":
            states = self._states(desired, self.all_known(desired))
            gone = [s.machine for s in states.values()
                    if s.marker == desired.name and s.state.get("role") == "worker" and s.state.get("pool") == step.object]
            r = self._run("reset.yml", desired, limit=gone, fw_delete_node=True)
        elif a in ("controlPlane.upgrade", "nodePool.upgrade"):
            # only members (hosts with our state): a worker still to join joins at the new version.
            # The control-plane step has every worker in its run too: they get the new version's images
            # first (upgrade.yml), since `kubeadm upgrade apply` moves kube-proxy on every node at once.
            states = self._states(desired, self.all_known(desired))
            ours = [s for s in states.values() if s.marker == desired.name]
            if a == "controlPlane.upgrade":
                members = [s.machine for s in ours if s.state.get("role") in ("controlPlane", "worker")]
                group = "control_plane"
            else:
                members = [s.machine for s in ours if s.state.get("role") == "worker" and s.state.get("pool") == step.object]
                group = "workers"
            r = self._run("upgrade.yml", desired, limit=members, fw_version=step.params["version"],
                          fw_upgrade_group=group)
        elif a == "nodePool.update":
            return StepResult(step.id, changed=False, detail=f"{self.kind}: machine settings of pool {step.object} "
                                                            "are not managed by the playbooks")
        elif a == "controlPlane.scale":
            raise PermanentError(f"cluster {desired.name}: changing the number of control-plane hosts of a running "
                                 f"cluster is not supported by the {self.kind} backend (etcd membership changes)")
        else:
            raise PermanentError(f"{self.kind} backend cannot carry out {a} ({step.target})")
        return StepResult(step.id, changed=r.changed, detail=f"{a} {step.object}: "
                          + (f"{len(r.changed_tasks)} changes" if r.changed else "no changes"),
                          outputs={"seconds": round(r.seconds, 1), "changed_tasks": r.changed_tasks})

    def all_known(self, desired: DesiredCluster) -> list[Machine]:
        return self.hosts(desired)

    def _scale_pool(self, desired: DesiredCluster, step: Step) -> ansible.AnsibleResult:
        pool = step.object
        want = self.workers(desired, pool)
        r = self._run("join.yml", desired, limit=want, fw_version=desired.kubernetes_version)
        if step.action == "nodePool.scale":
            states = self._states(desired, self.all_known(desired))
            wanted = {m.name for m in want}
            extra = [s.machine for s in states.values() if s.marker == desired.name and s.state.get("role") == "worker"
                     and s.state.get("pool") == pool and s.machine.name not in wanted]
            if extra:
                r2 = self._run("reset.yml", desired, limit=extra, fw_delete_node=True)
                r = ansible.AnsibleResult(changed=r.changed or r2.changed, ok=r.ok + r2.ok, failed=[], unreachable=[],
                                          stats=r.stats, seconds=r.seconds + r2.seconds,
                                          changed_tasks=r.changed_tasks + r2.changed_tasks)
        return r

    def kube_access_hosts(self, desired: DesiredCluster) -> KubeAccess:
        cps = self.control_planes(desired)
        if not cps:
            raise PermanentError(f"cluster {desired.name} has no control-plane host")
        r = ansible.run("access.yml", self.hosts(desired), desired, self.connections, log=self.log, lock=False,
                        fetch=True, timeout=120)
        files = r.outputs.get("__fetched__") or {}
        if "admin.conf" in files:  # the kubeadm path
            return _admin_conf_access(desired.name, files["admin.conf"])
        if "admin.token" not in files or "ca.crt" not in files:
            raise PermanentError(f"cluster {desired.name}: no credentials on {cps[0].name}; is the control plane made?")
        return KubeAccess(server=f"https://{cps[0].address}:6443", token=files["admin.token"].strip(),
                          ca_data=base64.b64encode(files["ca.crt"].encode()).decode())

    def reset_all(self, desired: DesiredCluster, hosts: list[Machine]) -> ansible.AnsibleResult:
        if not hosts:
            return ansible.AnsibleResult(changed=False, ok=[], failed=[], unreachable=[], stats={})
        return ansible.run("reset.yml", hosts, desired, self.connections, {"fw_delete_node": False},
                           log=self.log, lock=False)


class MetalBackend(HostsCluster):
    kind = "metal"

    def hosts(self, desired: DesiredCluster) -> list[Machine]:
        """Desired machines, then the spec's spare hosts (listed, not wanted now: scale-down candidates)."""
        machines = list(desired.machines)
        names = {m.name for m in machines}
        first = desired.node_pools[0].name if desired.node_pools else None
        for h in getattr(desired.backend, "hosts", []):
            if h.name not in names:
                machines.append(Machine(name=h.name, role=h.role, address=h.address,
                                        pool=(h.pool or first) if h.role == "worker" else None))
        return machines

    def observe(self, desired: DesiredCluster) -> ObservedCluster:
        return self.observe_hosts(desired)

    def observe_many(self, desired: list[DesiredCluster]) -> dict[str, ObservedCluster | FleetwrightError]:
        """Observe many clusters (a shard) with ONE read-only Ansible run over all their hosts (CONTRACT: SHOULD).

        Same result per cluster as :meth:`observe`, or the error it would have raised (an unreachable
        host, a host of another cluster) for that cluster alone.
        """
        groups = [(d, self.hosts(d)) for d in desired]
        with api_call("metal"):  # one Ansible run for the whole shard: one call against the metal API limit
            states = ansible.host_states_many(groups, self.connections, log=self.log,
                                              label=f"{len(desired)}-clusters")
        out: dict[str, ObservedCluster | FleetwrightError] = {}
        for d in desired:
            got = states.get(d.name, {})
            try:
                if isinstance(got, FleetwrightError):
                    raise got
                out[d.name] = self.observe_hosts(d, states=got)
            except FleetwrightError as e:
                out[d.name] = e
        return out

    def apply(self, desired: DesiredCluster, step: Step) -> StepResult:
        with ansible.guard(desired.name, f"{step.action} {step.object}"):
            return self.apply_hosts(desired, step)

    def delete(self, desired: DesiredCluster) -> StepResult:
        with ansible.guard(desired.name, "delete"):
            r = self.reset_all(desired, self.hosts(desired))
        return StepResult(f"{desired.name}/delete", changed=r.changed,
                          detail="reset every host marked for this cluster" if r.changed else "nothing of ours left")

    def kube_access(self, desired: DesiredCluster) -> KubeAccess:
        return self.kube_access_hosts(desired)
