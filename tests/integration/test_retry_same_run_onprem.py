"""The UI's Retry on a crashed run, on bare metal and on vSphere: the SAME flow run runs again on a worker.

The product's create-cluster deployment runs on a real process worker. While its control-plane
playbook runs (an ``ansible-playbook`` of the flow-run process with an SSH connection open), the
flow-run process alone is killed, as the OOM killer would take it. Then:

* nothing of the killed run is left running: no process carries its flow-run id any more (its
  ansible-playbook and ssh children were stopped by the product's watchdog);
* the worker reports it Crashed; the test does what the UI's Retry button does (the run's state set
  to Scheduled "AwaitingRetry", forced) and the worker runs the same flow run id again;
* the steps the dead attempt finished come from their cached results (no second clone, no second
  prepare), the rest completes;
* one of everything: the cluster's VMs counted by custom attribute, the control-plane processes on
  the host, and no key file or scratch directory left behind.
"""
from __future__ import annotations

import os
import signal

import pytest

from ..conftest import leftovers
from .test_crash_onprem import cmdline, host_sessions, onprem_fleet, vm_names
from .workers import (assert_not_redone, crashed, deployed_worker, finished_steps, flow_run_engine,
                      flow_run_processes, read_run, retry_like_the_ui, wait_until)

pytestmark = pytest.mark.timeout(1500)
CLUSTERS = ("edge-lab-01", "dc1-web-dev")  # metal, vSphere


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, testenv_config, vsphere_env, ssh_hosts, kube_cluster, prefect_api):
    """The example fleet with hosts for both clusters, connections with host-key checking on, and a worker."""
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    # the product's default lease (60 s): a 30 s one was lost in a load spike of the full check (LockLost)
    with onprem_fleet(tmp_path_factory.mktemp("retry") / "defs", testenv_config, CLUSTERS, {}) as fleet, \
            deployed_worker(prefect_api, ["create-cluster"], log) as proc:
        yield fleet | {"worker": proc, "log": log}


def in_playbook(run_id, playbook: str) -> bool:
    """An ansible-playbook of this flow run runs ``playbook`` with an ssh connection open."""
    cmds = [cmdline(p) for p in flow_run_processes(run_id)]
    return (any("ansible-playbook" in c and f"playbooks/{playbook}" in c for c in cmds)
            and any(c.startswith("ssh") for c in cmds))


@pytest.mark.parametrize("cluster", CLUSTERS)
@pytest.mark.heavy  # 3-4 min per cluster: on the on-prem session's critical path (make test-heavy runs it)
def test_retry_of_a_run_killed_in_its_playbook_resumes_the_same_run(fleet, cluster):
    from prefect.deployments import run_deployment

    from testenv import hosts

    left_before = leftovers(legacy=True)  # we hold the on-prem lock: no other Ansible runs
    params = {"cluster": cluster, "actor": "alice", "source": {"path": str(fleet["root"])}}
    fr = run_deployment(name="create-cluster/create-cluster", parameters=params, timeout=0)
    wait_until(lambda: in_playbook(fr.id, "control_plane.yml") or (read_run(fr.id).state.is_final()), 600,
               f"{cluster}: the control-plane playbook to run ({fleet['log'].read_text()[-2000:]})", interval=0.1)
    assert not read_run(fr.id).state.is_final(), read_run(fr.id).state
    engine = wait_until(lambda: flow_run_engine(fr.id), 30, "the flow run's own process")
    os.kill(engine, signal.SIGKILL)  # the flow-run process only; the worker and the hosts live on
    # nothing of the killed run keeps running: its ansible-playbook, forks and ssh masters are stopped
    wait_until(lambda: not flow_run_processes(fr.id), 60,
               f"the killed run's processes to end: {[cmdline(p) for p in flow_run_processes(fr.id)]}")
    wait_until(lambda: not host_sessions(fleet["cfg"], fleet["addresses"][cluster]), 120,
               f"Ansible sessions on the hosts to end: {host_sessions(fleet['cfg'], fleet['addresses'][cluster])}")
    crashed(fr.id)
    first, done_before = finished_steps(fr.id)
    assert any(n.startswith("infrastructure.ensure") for n in done_before), sorted(first)
    retry_like_the_ui(fr.id, fleet["log"])
    assert_not_redone(fr.id, first, done_before)

    # one of everything, counted where duplicates can exist
    section = fleet["env"]["hosts"]
    if cluster == "dc1-web-dev":
        names = vm_names(fleet["env"]["vsphere"], cluster)
        assert names == ["dc1-web-dev-cp-0", "dc1-web-dev-general-0"], names
    cp = fleet["addresses"][cluster][0]
    procs = hosts.ssh(section, cp, f"{section['supervisor']} list").stdout.splitlines()
    assert sorted(ln.split()[0] for ln in procs) == ["fw-apiserver", "fw-etcd", "fw-kcm", "fw-node-agent"], procs
    assert all(ln.split()[1] == "running" for ln in procs), procs
    wait_until(lambda: not flow_run_processes(fr.id), 120, "the retried run's process to exit", interval=1)
    assert leftovers(legacy=True) - left_before == set()

    # and it goes away again: decommission through the flow, its errors not swallowed
    from flows.lifecycle import decommission_cluster
    from tasks.definitions import DefinitionsSource

    out = decommission_cluster(cluster=cluster, confirm=cluster, source=DefinitionsSource(path=str(fleet["root"])),
                               actor="alice")
    assert out["clusters"][0]["status"] == "converged", out
    if cluster == "dc1-web-dev":
        assert vm_names(fleet["env"]["vsphere"], cluster) == []
