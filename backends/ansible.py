"""The shared Ansible runner of the metal and vSphere backends (ansible-runner over SSH).

``run(playbook, hosts, desired, connections, extravars, log)`` runs one of ``playbooks/*.yml``
against an inventory generated from the cluster spec: groups ``control_plane`` and ``workers``,
per-host variables (address, role, pool, node name, pool labels), SSH settings from
``connections.ssh`` and the kube binaries from ``connections.kube_binaries``. Each run gets a
private data dir in a fresh temporary directory (mode 0700, never inside the repository), removed
afterwards. Every task result is streamed to ``log`` as one line (never its data: tokens stay out
of logs).

Errors are mapped to ``models.errors`` in ONE function, :func:`_raise_for`:
unreachable host -> ``TransientError``; failed task -> ``PermanentError`` naming the task and its
message (``OwnershipConflict`` for the playbooks' ownership refusals, ``TransientError`` when the
message is a connection failure or timeout); runner timeout -> ``TransientError``.

A per-cluster lock file (``fcntl.flock``) makes sure two runs on one cluster never overlap: a
second run raises ``InFlight`` at once (CAPV's in-flight rule); :func:`in_flight` lets
``observe`` report it. Read-only runs (host states) take no lock.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from models.desired import DesiredCluster, Machine
from models.errors import InFlight, OwnershipConflict, PermanentError, TransientError

from .connections import Connections

PLAYBOOKS = Path(__file__).resolve().parent.parent / "playbooks"
VENV_BIN = str(Path(sys.executable).parent)
DEFAULT_TIMEOUT = 900  # seconds for one playbook run
SSH_TIMEOUT = os.environ.get("FLEETWRIGHT_ANSIBLE_SSH_TIMEOUT", "4")  # connect timeout: a frozen host is unreachable fast
OWNERSHIP_MARK = "OWNERSHIP CONFLICT"
_TRANSIENT_WORDS = ("timed out", "timeout", "connection refused", "connection reset", "status code was -1",
                    "status -1", "temporarily unavailable", "503", "502", "504", "unreachable")

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


# --------------------------------------------------------------------------- lock


def _lock_dir() -> Path:
    d = Path(os.environ.get("FLEETWRIGHT_LOCK_DIR") or Path(tempfile.gettempdir()) / "fleetwright-locks")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _lock_path(cluster: str) -> Path:
    return _lock_dir() / f"ansible-{cluster}.lock"


@contextlib.contextmanager
def cluster_lock(cluster: str, what: str = "ansible run") -> Iterator[None]:
    """Exclusive per-cluster lock; raises ``InFlight`` if another run holds it."""
    path = _lock_path(cluster)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(OSError):
                holder = Path(path).read_text().strip()
            raise InFlight(f"an Ansible run on cluster {cluster} is in flight ({holder or 'another process'})",
                           delay=5) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{what} pid={os.getpid()} since {time.strftime('%F %T')}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # releases the flock


def in_flight(cluster: str) -> list[str]:
    """What holds the cluster's lock right now (for ``observe``), without waiting."""
    path = _lock_path(cluster)
    if not path.exists():
        return []
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Path(path).read_text().strip() or "ansible run"
            return [f"{cluster}: {holder}"]
        fcntl.flock(fd, fcntl.LOCK_UN)
        return []
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- inventory


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
        "ansible_ssh_common_args": ssh.extra_args,
        "ansible_python_interpreter": "/usr/bin/python3",
        "fw_cluster": desired.name,
        "fw_version": desired.kubernetes_version,
        "kube_apiserver_bin": bins.get("kube-apiserver", "/usr/local/bin/kube-apiserver"),
        "kube_controller_manager_bin": bins.get("kube-controller-manager", "/usr/local/bin/kube-controller-manager"),
        "etcd_bin": bins.get("etcd", "/usr/local/bin/etcd"),
    }
    if ssh.supervisor:
        all_vars["supervisor"] = ssh.supervisor

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
        shown = "; ".join(f"{h}: {m}" for h, m in unreachable[:3])
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
        if res.get(k) and not parts[0]:
            parts.append(str(res[k])[-400:])
    if res.get("results"):  # a loop: the failed items
        parts += [_message(r) for r in res["results"] if isinstance(r, dict) and r.get("failed")]
    return " ".join(p for p in parts if p) or json.dumps({k: v for k, v in res.items() if k in ("rc", "status")})


# --------------------------------------------------------------------------- run


def _env(cp_dir: str) -> dict[str, str]:
    return {
        "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
        "ANSIBLE_HOST_KEY_CHECKING": "False",
        "ANSIBLE_PIPELINING": "True",
        "ANSIBLE_TIMEOUT": str(SSH_TIMEOUT),
        "ANSIBLE_SSH_ARGS": "-C -o ControlMaster=auto -o ControlPersist=30s",
        "ANSIBLE_SSH_CONTROL_PATH_DIR": cp_dir,
        "ANSIBLE_ROLES_PATH": str(PLAYBOOKS / "roles"),
        "ANSIBLE_LIBRARY": str(PLAYBOOKS / "library"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_LOCAL_TEMP": str(Path(cp_dir) / "tmp"),
        "ANSIBLE_DEPRECATION_WARNINGS": "False",
        "ANSIBLE_SYSTEM_WARNINGS": "False",
    }


def _cp_dir() -> str:
    """A short, private directory for SSH control sockets (108-character socket path limit)."""
    d = Path(tempfile.gettempdir()) / f"fw-cp-{os.getuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    return str(d)


def run(playbook: str, hosts: list[Machine], desired: DesiredCluster, connections: Connections,
        extravars: dict[str, Any] | None = None, log: Log | None = None, *, limit: list[str] | None = None,
        lock: bool = True, timeout: float = DEFAULT_TIMEOUT, fetch: bool = False) -> AnsibleResult:
    """Run ``playbooks/<playbook>`` on ``hosts`` (all of them in the inventory; ``limit`` narrows).

    Raises ``InFlight`` if another run on the cluster holds the lock (``lock=True``), and the
    mapped error of :func:`_raise_for` if the run fails. With ``fetch=True`` the extra variable
    ``fw_fetch_dir`` names a private directory whose files are returned in
    ``result.outputs["__fetched__"]`` (name -> text) and then deleted.
    """
    import ansible_runner

    log = log or (lambda line: None)
    if not hosts:
        return AnsibleResult(changed=False, ok=[], failed=[], unreachable=[], stats={})
    ctx = cluster_lock(desired.name, f"{playbook}") if lock else contextlib.nullcontext()
    with ctx:
        tmp = tempfile.mkdtemp(prefix=f"fw-ansible-{desired.name}-")
        os.chmod(tmp, 0o700)
        try:
            return _run(ansible_runner, playbook, hosts, desired, connections, dict(extravars or {}), log,
                        limit, timeout, fetch, Path(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _run(ansible_runner, playbook, hosts, desired, connections, extravars, log, limit, timeout, fetch,
         tmp: Path) -> AnsibleResult:
    pdd = tmp / "pdd"
    (pdd / "inventory").mkdir(parents=True)
    (pdd / "env").mkdir()
    (pdd / "inventory" / "hosts.json").write_text(json.dumps(inventory(hosts, desired, connections)))
    cp_dir = _cp_dir()
    (Path(cp_dir) / "tmp").mkdir(exist_ok=True)
    if fetch:
        (tmp / "fetched").mkdir(mode=0o700)
        extravars["fw_fetch_dir"] = str(tmp / "fetched")
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
            log(f"[{desired.name}] {playbook} {host}: {task}: {word}")
        elif kind == "runner_on_failed":
            if d.get("ignore_errors"):
                log(f"[{desired.name}] {playbook} {host}: {task}: failed (ignored)")
            else:
                msg = _message(res)
                failures.append((host, task, msg))
                log(f"[{desired.name}] {playbook} {host}: {task}: FAILED: {' '.join(msg.split())[:300]}")
        elif kind == "runner_on_unreachable":
            msg = _message(res)
            unreachable.append((host, msg))
            log(f"[{desired.name}] {playbook} {host}: {task}: UNREACHABLE: {' '.join(msg.split())[:200]}")
        elif kind == "runner_on_skipped":
            pass
        elif kind == "runner_retry":
            log(f"[{desired.name}] {playbook} {host}: {task}: retrying ({d.get('retries_left', '?')} left)")
        # keep only the stats event (Runner.stats reads it); task results never reach the disk
        return kind == "playbook_on_stats"

    t0 = time.monotonic()
    r = ansible_runner.run(
        private_data_dir=str(pdd), project_dir=str(PLAYBOOKS), playbook=playbook,
        inventory=str(pdd / "inventory" / "hosts.json"), envvars=_env(cp_dir), extravars=extravars,
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
    _raise_for(playbook, desired.name, r.status, r.rc, failures, unreachable, timeout)
    changed_hosts = sorted((stats.get("changed") or {}).keys())
    result = AnsibleResult(
        changed=bool(changed_hosts), ok=sorted((stats.get("ok") or {}).keys()),
        failed=sorted(h for h, _, _ in failures), unreachable=sorted(h for h, _ in unreachable),
        stats={k: dict(v) for k, v in stats.items() if isinstance(v, dict)}, outputs=outputs,
        seconds=seconds, changed_tasks=changed_tasks)
    if fetch:
        result.outputs["__fetched__"] = fetched  # type: ignore[assignment]
    log(f"[{desired.name}] {playbook}: {'changed' if result.changed else 'no changes'} "
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
        doc = json.loads(res["stdout"])
        state: dict[str, Any] = {}
        if doc.get("state"):
            try:
                state = json.loads(doc["state"])
            except ValueError:
                raise PermanentError(f"host {m.name} ({m.address}): /etc/fleetwright/state.json is not JSON") from None
        marker = (doc.get("marker") or "").strip() or None
        out[m.name] = HostState(machine=m, marker=marker, state=state, ca=doc.get("ca"),
                                processes=doc.get("processes") or {})
    return out


def fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]
