"""The shared Ansible runner of the metal and vSphere backends (ansible-runner over SSH).

``run(playbook, hosts, desired, connections, extravars, log)`` runs one of ``playbooks/*.yml``
against an inventory generated from the cluster spec: groups ``control_plane`` and ``workers``,
per-host variables (address, role, pool, node name, pool labels), SSH settings from
``connections.ssh`` and the kube binaries from ``connections.kube_binaries``. Each run gets a
private directory inside the process's one (``backends/private.py``: 0700, never the shared temp
dir), removed afterwards, and runs under a watchdog (``backends/reaper.py``) so that neither
``ansible-playbook`` nor its ssh connections outlive the run or the process that started it.
Extra variables go in a file, module arguments over stdin (pipelining): no secret in any argv.
Host keys are checked (:func:`ssh_args`). Every task result is streamed to ``log`` as one line
(never its data: tokens stay out of logs).

Errors are mapped to ``models.errors`` in ONE function, :func:`_raise_for`:
unreachable host -> ``TransientError``, but a failed SSH authentication or host-key check ->
``PermanentError``; failed task -> ``PermanentError`` naming the task and its message
(``OwnershipConflict`` for the playbooks' ownership refusals, ``TransientError`` when the message
is a connection failure or timeout); runner timeout -> ``TransientError``.

Runs on one cluster in different workers are kept apart by the cluster's Prefect lease, held by
``tasks`` (there is no file lock); :func:`guard` refuses a second step on a cluster within one
process (``InFlight``, CAPV's rule) and :func:`in_flight` lets ``observe`` report it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from models.desired import DesiredCluster, Machine
from models.errors import FleetwrightError, InFlight, OwnershipConflict, PermanentError, TransientError

from . import private
from .connections import Connections

PLAYBOOKS = Path(__file__).resolve().parent.parent / "playbooks"
VENV_BIN = str(Path(sys.executable).parent)
REAPER = Path(__file__).resolve().parent / "reaper.py"
DEFAULT_TIMEOUT = 900  # seconds for one playbook run
SSH_TIMEOUT = os.environ.get("FLEETWRIGHT_ANSIBLE_SSH_TIMEOUT", "4")  # connect timeout: a frozen host is unreachable fast
OWNERSHIP_MARK = "OWNERSHIP CONFLICT"
_TRANSIENT_WORDS = ("timed out", "timeout", "connection refused", "connection reset", "status code was -1",
                    "status -1", "temporarily unavailable", "503", "502", "504", "unreachable")

# an unreachable host whose message says this failed authentication or the host key: permanent
_AUTH_WORDS = ("permission denied", "authentication failed", "host key verification failed",
               "remote host identification has changed", "no matching host key", "too many authentication failures")

Log = Callable[[str], None]


@dataclass
class AnsibleResult:
    changed: bool
    ok: list[str]
    failed: list[str]
    unreachable: list[str]
    stats: dict[str, Any]
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # task name -> host -> result
    seconds: float = 0.0
    changed_tasks: list[str] = field(default_factory=list)  # "host: task" of every change
    problems: dict[str, tuple[str, str]] = field(default_factory=dict)  # per-host runs: host -> (kind, message)


# --------------------------------------------------------------------------- in-process guard


_guard_lock = threading.Lock()
_guards: dict[str, str] = {}  # cluster -> what runs on it in THIS process


@contextlib.contextmanager
def guard(cluster: str, what: str = "ansible run") -> Iterator[None]:
    """One step at a time per cluster inside this process; a second one raises ``InFlight`` at once.

    This is not the lock that keeps two runs apart: that is the cluster's Prefect lease, which
    ``tasks`` hold around every step and which only a live process can hold (a dead one's lease
    expires, and its Ansible processes die with it, see ``backends/reaper.py``). The guard catches a
    second step started in the same worker while one runs (CAPV's in-flight rule) and lets
    :func:`in_flight` report it. There is no file lock: a file lock can be held by a survivor.
    """
    with _guard_lock:
        if cluster in _guards:
            raise InFlight(f"an Ansible run on cluster {cluster} is in flight in this worker ({_guards[cluster]})",
                           delay=5)
        _guards[cluster] = f"{what} pid={os.getpid()} since {time.strftime('%F %T')}"
    try:
        yield
    finally:
        with _guard_lock:
            _guards.pop(cluster, None)


def in_flight(cluster: str) -> list[str]:
    """What runs on the cluster in this process right now (for ``observe``)."""
    with _guard_lock:
        held = _guards.get(cluster)
    return [f"{cluster}: {held}"] if held else []


# --------------------------------------------------------------------------- inventory


def ssh_args(ssh) -> str:
    """ssh options of every connection: host keys checked unless the connection explicitly says not to."""
    if ssh.host_key_checking:
        if "stricthostkeychecking" in ssh.extra_args.lower() or "userknownhostsfile" in ssh.extra_args.lower():
            raise PermanentError("SSH connection: extra_args must not set StrictHostKeyChecking/UserKnownHostsFile; "
                                 "give known_hosts (or set host_key_checking: false, for test machines only)")
        known = f" -o UserKnownHostsFile={ssh.known_hosts_file}" if ssh.known_hosts_file else ""
        return f"-o StrictHostKeyChecking=yes{known} {ssh.extra_args}".strip()
    # only when the SshKey block / connection says host_key_checking: false (documented in tasks/blocks.py)
    return f"-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null {ssh.extra_args}".strip()


def inventory(hosts: list[Machine], desired: DesiredCluster, connections: Connections) -> dict[str, Any]:
    """The Ansible inventory (YAML/JSON shape) for ``hosts`` of ``desired``."""
    ssh = connections.ssh
    if ssh is None:
        raise PermanentError(f"cluster {desired.name}: no SSH connection configured (Connections.ssh)")
    labels = {p.name: dict(p.labels) for p in desired.node_pools}
    bins = connections.kube_binaries
    all_vars: dict[str, Any] = {
        "ansible_user": getattr(desired.backend, "ssh_user", None) or ssh.user,
        "ansible_port": ssh.port,
        "ansible_ssh_private_key_file": ssh.private_key_file,
        "ansible_ssh_common_args": ssh_args(ssh),
        "ansible_python_interpreter": "/usr/bin/python3",
        "fw_cluster": desired.name,
        "fw_version": desired.kubernetes_version,
        "kube_apiserver_bin": bins.get("kube-apiserver", "/usr/local/bin/kube-apiserver"),
        "kube_controller_manager_bin": bins.get("kube-controller-manager", "/usr/local/bin/kube-controller-manager"),
        "etcd_bin": bins.get("etcd", "/usr/local/bin/etcd"),
    }
    if ssh.supervisor:  # the test-only fork (playbooks/group_vars/all.yml fw_mode); else the kubeadm path
        all_vars["supervisor"] = ssh.supervisor
    else:
        all_vars["fw_kube"] = connections.kubernetes.model_dump()

    def host_vars(m: Machine) -> dict[str, Any]:
        return {"ansible_host": m.address, "fw_role": m.role, "fw_node_name": m.name, "fw_pool": m.pool or "",
                "fw_labels": labels.get(m.pool or "", {})}

    cps = {m.name: host_vars(m) for m in hosts if m.role == "controlPlane"}
    workers = {m.name: host_vars(m) for m in hosts if m.role == "worker"}
    return {"all": {"vars": all_vars, "children": {"control_plane": {"hosts": cps}, "workers": {"hosts": workers}}}}


# --------------------------------------------------------------------------- errors (the one place)


def _raise_for(playbook: str, cluster: str, status: str, rc: int, failures: list[tuple[str, str, str]],
               unreachable: list[tuple[str, str]], timeout: float) -> None:
    """Map a finished run to ``models.errors``. Does nothing for a successful run."""
    if status == "successful" and rc == 0 and not failures and not unreachable:
        return
    if status == "timeout":
        raise TransientError(f"{playbook} on cluster {cluster} timed out after {timeout:.0f}s")
    if unreachable:
        shown = "; ".join(f"{h}: {' '.join(m.split())[:300]}" for h, m in unreachable[:3])
        if any(w in m.lower() for _, m in unreachable for w in _AUTH_WORDS):
            raise PermanentError(f"{playbook} on cluster {cluster}: SSH authentication or host-key check failed "
                                 f"(not retried; check the SshKey block's key, user and known_hosts): {shown}")
        raise TransientError(f"{playbook} on cluster {cluster}: unreachable host(s): {shown}", delay=5)
    if failures:
        for host, task, msg in failures:
            if OWNERSHIP_MARK in msg:
                raise OwnershipConflict(f"{playbook} on cluster {cluster}: {host}: {' '.join(msg.split())}")
        host, task, msg = failures[0]
        text = f"{playbook} on cluster {cluster}: task {task!r} failed on {host}: {' '.join(msg.split())[:600]}"
        if any(w in msg.lower() for w in _TRANSIENT_WORDS):
            raise TransientError(text, delay=5)
        raise PermanentError(text)
    if status == "canceled":
        raise TransientError(f"{playbook} on cluster {cluster} was canceled")
    raise PermanentError(f"{playbook} on cluster {cluster} failed (status {status}, rc {rc}) before any task ran; "
                         f"syntax or inventory error?")


def _message(res: dict[str, Any]) -> str:
    if res.get("censored"):
        return "(output hidden: no_log)"
    parts = [str(res.get("msg") or "")]
    for k in ("stderr", "stdout"):
        if res.get(k) and (not parts[0] or parts[0] == "non-zero return code"):
            parts.append(str(res[k])[-400:])
    if res.get("results"):  # a loop: the failed items
        parts += [_message(r) for r in res["results"] if isinstance(r, dict) and r.get("failed")]
    return " ".join(p for p in parts if p) or json.dumps({k: v for k, v in res.items() if k in ("rc", "status")})


# --------------------------------------------------------------------------- run


def _env(tmp: Path, host_key_checking: bool) -> dict[str, str]:
    return {
        "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
        "ANSIBLE_HOST_KEY_CHECKING": str(bool(host_key_checking)),
        "ANSIBLE_PIPELINING": "True",  # module arguments go over stdin, never into a process's argv
        "ANSIBLE_TIMEOUT": str(SSH_TIMEOUT),
        "ANSIBLE_SSH_ARGS": "-C -o ControlMaster=auto -o ControlPersist=30s",
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(tmp / "cp"),  # per run: the reaper ends its masters with the run
        "ANSIBLE_ROLES_PATH": str(PLAYBOOKS / "roles"),
        "ANSIBLE_LIBRARY": str(PLAYBOOKS / "library"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_LOCAL_TEMP": str(tmp / "tmp"),
        "ANSIBLE_DEPRECATION_WARNINGS": "False",
        "ANSIBLE_SYSTEM_WARNINGS": "False",
        # the watchdog (backends/reaper.py): what to watch and what to remove if its parent dies
        "FW_REAPER_PARENT": str(os.getpid()),
        "FW_REAPER_RUN_DIR": str(tmp),
        "FW_REAPER_PROCESS_DIR": str(tmp.parent),
        "FW_REAPER_EXEC": str(Path(VENV_BIN) / "ansible-playbook"),
    }


def _reaper_shim() -> str:
    """The executable ansible-runner starts instead of ansible-playbook: the watchdog, same pid (exec)."""
    text = f"#!/bin/sh\nexec '{sys.executable}' -I '{REAPER}' \"$@\"\n"
    path = private.write_secret("fw-reaper", text)
    path.chmod(0o700)
    return str(path)


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (a run's private directory)."""
    out, needle = [], text.encode()
    for p in os.listdir("/proc"):
        if p.isdigit() and int(p) != os.getpid():
            try:
                if needle in Path(f"/proc/{p}/cmdline").read_bytes():
                    out.append(int(p))
            except OSError:
                pass
    return out


def _end_run_processes(tmp: Path) -> None:
    """After a run, however it ended: stop its watchdog (which kills its tree) and anything naming its dir."""
    with contextlib.suppress(OSError, ValueError):
        pid = int((tmp / "reaper.pid").read_text())
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and private._start_time(pid) is not None:
            time.sleep(0.05)
    for pid in _processes_mentioning(str(tmp)):  # ssh masters of a watchdog killed with SIGKILL (runner timeout)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def run(playbook: str, hosts: list[Machine], desired: DesiredCluster, connections: Connections,
        extravars: dict[str, Any] | None = None, log: Log | None = None, *, limit: list[str] | None = None,
        lock: bool = True, timeout: float = DEFAULT_TIMEOUT, fetch: bool = False) -> AnsibleResult:
    """Run ``playbooks/<playbook>`` on ``hosts`` (all of them in the inventory; ``limit`` narrows).

    Raises ``InFlight`` if another step on the cluster runs in this process (``lock=True``, see
    :func:`guard`), and the mapped error of :func:`_raise_for` if the run fails. With ``fetch=True``
    the extra variable ``fw_fetch_dir`` names a private directory whose files are returned in
    ``result.outputs["__fetched__"]`` (name -> text) and then deleted. The run's data lives in a
    private directory (``backends/private.py``), removed when the run ends; its processes never
    outlive it (``backends/reaper.py``).
    """
    import ansible_runner

    log = log or (lambda line: None)
    if not hosts:
        return AnsibleResult(changed=False, ok=[], failed=[], unreachable=[], stats={})
    ctx = guard(desired.name, f"{playbook}") if lock else contextlib.nullcontext()
    with ctx, private.run_dir(f"ansible-{desired.name}"[:40]) as tmp:
        try:
            return _run(ansible_runner, playbook, desired.name, inventory(hosts, desired, connections), connections,
                        dict(extravars or {}), log, limit, timeout, fetch, tmp)
        finally:
            _end_run_processes(tmp)


def _run(ansible_runner, playbook: str, label: str, inv: dict, connections, extravars, log, limit, timeout, fetch,
         tmp: Path, per_host: bool = False) -> AnsibleResult:
    """One ansible-runner run. ``per_host``: host failures are returned in ``problems``, not raised."""
    pdd = tmp / "pdd"
    (pdd / "inventory").mkdir(parents=True)
    (pdd / "env").mkdir()
    (pdd / "inventory" / "hosts.json").write_text(json.dumps(inv))
    (tmp / "tmp").mkdir(mode=0o700)
    (tmp / "cp").mkdir(mode=0o700)
    if fetch:
        (tmp / "fetched").mkdir(mode=0o700)
        extravars["fw_fetch_dir"] = str(tmp / "fetched")
    # extra variables go in a file (ansible-runner passes a dict on the command line, readable in /proc)
    fd = os.open(pdd / "env" / "extravars", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(extravars, f)
    outputs: dict[str, dict[str, Any]] = {}
    failures: list[tuple[str, str, str]] = []
    unreachable: list[tuple[str, str]] = []
    changed_tasks: list[str] = []

    def on_event(ev: dict[str, Any]) -> bool:
        kind = ev.get("event", "")
        d = ev.get("event_data") or {}
        host, task, res = d.get("host", ""), d.get("task", ""), d.get("res") or {}
        if kind == "runner_on_ok":
            outputs.setdefault(task, {})[host] = res
            word = "done (output hidden)" if res.get("censored") else "changed" if res.get("changed") else "ok"
            if res.get("changed"):
                changed_tasks.append(f"{host}: {task}")
            log(f"[{label}] {playbook} {host}: {task}: {word}")
        elif kind == "runner_on_failed":
            if d.get("ignore_errors"):
                log(f"[{label}] {playbook} {host}: {task}: failed (ignored)")
            else:
                msg = _message(res)
                failures.append((host, task, msg))
                log(f"[{label}] {playbook} {host}: {task}: FAILED: {' '.join(msg.split())[:300]}")
        elif kind == "runner_on_unreachable":
            msg = _message(res)
            unreachable.append((host, msg))
            log(f"[{label}] {playbook} {host}: {task}: UNREACHABLE: {' '.join(msg.split())[:200]}")
        elif kind == "runner_on_skipped":
            pass
        elif kind == "runner_retry":
            log(f"[{label}] {playbook} {host}: {task}: retrying ({d.get('retries_left', '?')} left)")
        # keep only the stats event (Runner.stats reads it); task results never reach the disk
        return kind == "playbook_on_stats"

    t0 = time.monotonic()
    r = ansible_runner.run(
        private_data_dir=str(pdd), project_dir=str(PLAYBOOKS), playbook=playbook,
        inventory=str(pdd / "inventory" / "hosts.json"), envvars=_env(tmp, connections.ssh.host_key_checking),
        binary=_reaper_shim(), cmdline=shlex.quote(str(PLAYBOOKS / playbook)),  # a "binary" gets no playbook
        limit=",".join(limit) if limit else None, event_handler=on_event, quiet=True, timeout=int(timeout),
        settings={"suppress_ansible_output": True}, suppress_env_files=True,
    )
    seconds = time.monotonic() - t0
    stats = r.stats or {}
    fetched: dict[str, str] = {}
    if fetch:
        for f in (tmp / "fetched").iterdir():
            fetched[f.name] = f.read_text()
    if r.status != "successful" and not failures and not unreachable:
        tail = ""
        with contextlib.suppress(Exception):
            tail = r.stdout.read()[-800:]
        if tail:
            failures_text = " ".join(tail.split())
            if r.status not in ("timeout", "canceled"):
                failures.append(("controller", "ansible-playbook", failures_text))
    if per_host and r.status not in ("timeout", "canceled") and (failures or unreachable) and \
            all(h != "controller" for h, _, _ in failures):
        problems = {h: ("failed", f"{t}: {m}") for h, t, m in failures} | {h: ("unreachable", m) for h, m in unreachable}
    else:
        _raise_for(playbook, label, r.status, r.rc, failures, unreachable, timeout)
        problems = {}
    changed_hosts = sorted((stats.get("changed") or {}).keys())
    result = AnsibleResult(
        changed=bool(changed_hosts), ok=sorted((stats.get("ok") or {}).keys()),
        failed=sorted(h for h, _, _ in failures), unreachable=sorted(h for h, _ in unreachable),
        stats={k: dict(v) for k, v in stats.items() if isinstance(v, dict)}, outputs=outputs,
        seconds=seconds, changed_tasks=changed_tasks, problems=problems)
    if fetch:
        result.outputs["__fetched__"] = fetched  # type: ignore[assignment]
    log(f"[{label}] {playbook}: {'changed' if result.changed else 'no changes'} "
        f"({len(changed_tasks)} changed tasks, {seconds:.1f}s)")
    return result


# --------------------------------------------------------------------------- host states


@dataclass
class HostState:
    """What one host says about itself (``playbooks/state.yml``)."""

    machine: Machine
    marker: str | None  # cluster named in /etc/fleetwright/cluster
    state: dict[str, Any]  # /etc/fleetwright/state.json ({} if none)
    ca: str | None  # the cluster CA (PEM) on control-plane hosts
    processes: dict[str, bool]  # supervised process -> running


def _parse_state(m: Machine, res: dict[str, Any]) -> HostState:
    doc = json.loads(res["stdout"])
    state: dict[str, Any] = {}
    if doc.get("state"):
        try:
            state = json.loads(doc["state"])
        except ValueError:
            raise PermanentError(f"host {m.name} ({m.address}): /etc/fleetwright/state.json is not JSON") from None
    marker = (doc.get("marker") or "").strip() or None
    return HostState(machine=m, marker=marker, state=state, ca=doc.get("ca"), processes=doc.get("processes") or {})


def host_states(hosts: list[Machine], desired: DesiredCluster, connections: Connections,
                log: Log | None = None) -> dict[str, HostState]:
    """Read /etc/fleetwright/{cluster,state.json} of each host (no lock: read-only, for observe).

    An unreachable host raises ``TransientError`` (via :func:`_raise_for`).
    """
    r = run("state.yml", hosts, desired, connections, log=log, lock=False, timeout=120)
    raw = r.outputs.get("fleetwright host state", {})
    out: dict[str, HostState] = {}
    for m in hosts:
        res = raw.get(m.name)
        if res is None:
            raise TransientError(f"cluster {desired.name}: host {m.name} ({m.address}) reported no state")
        out[m.name] = _parse_state(m, res)
    return out


def host_states_many(groups: list[tuple[DesiredCluster, list[Machine]]], connections: Connections,
                     log: Log | None = None, label: str = "shard",
                     timeout: float = 300) -> dict[str, dict[str, HostState] | FleetwrightError]:
    """The host states of many clusters with ONE read-only run of ``state.yml`` over all their hosts.

    Returns, per cluster, its hosts' states, or the error that cluster's hosts gave (an unreachable host
    fails only its own cluster: ``TransientError``, or ``PermanentError`` for a failed authentication).
    A failure of the run itself (timeout, no SSH connection) raises for all.
    """
    import ansible_runner

    ssh = connections.ssh
    if ssh is None:
        raise PermanentError("no SSH connection configured (Connections.ssh)")
    log = log or (lambda line: None)
    hostvars: dict[str, dict[str, Any]] = {}
    where: dict[str, tuple[str, Machine]] = {}
    for d, machines in groups:
        user = getattr(d.backend, "ssh_user", None) or ssh.user
        for m in machines:
            name = f"{d.name}--{m.name}"
            hostvars[name] = {"ansible_host": m.address, "ansible_user": user, "fw_cluster": d.name,
                              "fw_node_name": m.name}
            where[name] = (d.name, m)
    out: dict[str, dict[str, HostState] | FleetwrightError] = {d.name: {} for d, _ in groups}
    if not hostvars:
        return out
    all_vars: dict[str, Any] = {"ansible_port": ssh.port, "ansible_ssh_private_key_file": ssh.private_key_file,
                                "ansible_ssh_common_args": ssh_args(ssh), "ansible_python_interpreter": "/usr/bin/python3"}
    if ssh.supervisor:
        all_vars["supervisor"] = ssh.supervisor
    inv = {"all": {"vars": all_vars, "hosts": hostvars}}
    with private.run_dir(f"ansible-{label}"[:40]) as tmp:
        try:
            r = _run(ansible_runner, "state.yml", label, inv, connections, {}, log, None, timeout, False, tmp,
                     per_host=True)
        finally:
            _end_run_processes(tmp)
    raw = r.outputs.get("fleetwright host state", {})
    for name, (cluster, m) in where.items():
        if isinstance(out[cluster], FleetwrightError):
            continue
        try:
            if name in r.problems:
                kind, msg = r.problems[name]
                _raise_for("state.yml", cluster, "failed", 2, [(m.name, "fleetwright host state", msg)]
                           if kind == "failed" else [], [(m.name, msg)] if kind == "unreachable" else [], timeout)
            res = raw.get(name)
            if res is None:
                raise TransientError(f"cluster {cluster}: host {m.name} ({m.address}) reported no state")
            out[cluster][m.name] = _parse_state(m, res)  # type: ignore[index]
        except FleetwrightError as e:
            out[cluster] = e
    return out


def fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]
