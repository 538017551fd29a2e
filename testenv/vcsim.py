"""vSphere counterpart: govmomi's ``vcsim`` vCenter simulator (govmomi 0.24, Debian).

Built once from Debian's ``golang-github-vmware-govmomi-dev`` with ``testenv/vcsim-main.go``
(offline: ``GOPATH=<dir>:/usr/share/gocode GO111MODULE=off GOPROXY=off``), cached under
``<cache>/vcsim-<deb version>-<main.go hash>/vcsim``. Runs on 127.0.0.1 (a free port, kept
across restarts) with TLS (self-signed: ``insecure: true``). After start the inventory is
prepared with pyvmomi: folder ``fleetwright`` and template ``fw-ubuntu-template``.

Fault injection: :func:`set_delay` changes the simulator's SOAP delays at runtime through
``PUT /fleetwright/delay`` (an endpoint of our entry point), so no restart (which would
lose the in-memory inventory) is needed. ``cfg.options["vsphere"]["method_delay"]``
(``"CloneVM_Task:500,PowerOnVM_Task:200"``) sets the start-up value (``-method-delay``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Mapping

from testenv.common import (
    Config,
    apt_install,
    file_lock,
    free_port,
    get_state,
    is_running,
    port_open,
    progress,
    read_pid,
    run,
    start_process,
    stop_process,
    tail,
    update_state,
    wait_for,
)

NAME = "vcsim"
APT = ["golang-go", "golang-github-vmware-govmomi-dev"]
MAIN_GO = Path(__file__).with_name("vcsim-main.go")
USER, PASSWORD = "user", "pass"
DATACENTER, CLUSTER, DATASTORE, NETWORK = "DC0", "DC0_C0", "LocalDS_0", "VM Network"
FOLDER, TEMPLATE = "fleetwright", "fw-ubuntu-template"
SOURCE_VM = "DC0_C0_RP0_VM0"


def _deb_version() -> str:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "golang-github-vmware-govmomi-dev"],
                       capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def _build_dir(cfg: Config) -> Path:
    h = hashlib.sha256(MAIN_GO.read_bytes()).hexdigest()[:10]
    return cfg.cache_dir / f"vcsim-{_deb_version()}-{h}"


def binary(cfg: Config) -> Path:
    return _build_dir(cfg) / "vcsim"


def build(cfg: Config) -> Path:
    """Build vcsim once (about 20 s); cached, with a lock against concurrent builds."""
    apt_install(APT)
    b = binary(cfg)
    if os.access(b, os.X_OK):
        return b
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(cfg.cache_dir / "vcsim.build.lock", "vcsim build"):
        if os.access(b, os.X_OK):
            return b
        t0 = time.monotonic()
        d = b.parent
        gopath = d / "gopath"
        src = gopath / "src" / "vcsim"
        src.mkdir(parents=True, exist_ok=True)
        shutil.copy2(MAIN_GO, src / "main.go")
        log = d / "build.log"
        progress(f"building vcsim from Debian's govmomi {_deb_version()} (first time only, ~20 s)")
        env = dict(os.environ, GOPATH=f"{gopath}:/usr/share/gocode", GO111MODULE="off", GOPROXY="off",
                   CGO_ENABLED="0", GOFLAGS="", GOCACHE=str(d / "gocache"), HOME=str(d))
        run(["go", "build", "-o", str(b) + ".tmp", "vcsim"], log=log, env=env, cwd=src)
        os.replace(str(b) + ".tmp", b)
        shutil.rmtree(d / "gocache", ignore_errors=True)
        progress(f"built vcsim in {time.monotonic() - t0:.0f}s -> {b}")
    return b


# --------------------------------------------------------------------------- pyvmomi helpers


def connect(section: Mapping[str, Any]):
    """A pyvmomi ServiceInstance for the simulator described by ``section`` (the JSON section)."""
    from pyVim.connect import SmartConnect

    return SmartConnect(host=section["host"], port=int(section["port"]), user=section["user"],
                        pwd=section["password"], disableSslCertValidation=True)


def marked_vms(section: Mapping[str, Any], key: str, value: str) -> dict[str, dict[str, dict[str, str]]]:
    """Every VM whose custom attribute ``key`` is ``value`` (how duplicates and orphans are counted):
    name -> {"marks": its custom attributes by name, "extra": its extraConfig}."""
    from pyVim.connect import Disconnect
    from pyVmomi import vim

    si = connect(section)
    try:
        content = si.RetrieveContent()
        fields = {f.key: f.name for f in content.customFieldsManager.field or []}
        view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
        try:
            out = {}
            for vm in view.view:
                marks = {fields.get(cv.key): cv.value for cv in vm.customValue}
                if marks.get(key) == value:
                    out[vm.name] = {"marks": marks, "extra": {o.key: o.value for o in vm.config.extraConfig}}
            return out
        finally:
            view.Destroy()
    finally:
        Disconnect(si)


def _find(content, kind, name):
    view = content.viewManager.CreateContainerView(content.rootFolder, [kind], True)
    try:
        return next((o for o in view.view if o.name == name), None)
    finally:
        view.Destroy()


def _prepare_inventory(section: Mapping[str, Any]) -> None:
    """Idempotently create folder ``fleetwright`` and the template ``fw-ubuntu-template``."""
    from pyVim.connect import Disconnect
    from pyVim.task import WaitForTask
    from pyVmomi import vim

    si = connect(section)
    try:
        content = si.RetrieveContent()
        dc = _find(content, vim.Datacenter, DATACENTER)
        if dc is None:
            raise RuntimeError(f"vcsim has no datacenter {DATACENTER}")
        search = content.searchIndex
        folder = search.FindByInventoryPath(f"{DATACENTER}/vm/{FOLDER}")
        if folder is None:
            dc.vmFolder.CreateFolder(FOLDER)
        tpl = search.FindByInventoryPath(f"{DATACENTER}/vm/{TEMPLATE}")
        if tpl is None:
            src = _find(content, vim.VirtualMachine, SOURCE_VM)
            cluster = _find(content, vim.ClusterComputeResource, CLUSTER)
            ds = _find(content, vim.Datastore, DATASTORE)
            spec = vim.vm.CloneSpec(location=vim.vm.RelocateSpec(pool=cluster.resourcePool, datastore=ds),
                                    powerOn=False, template=False)
            task = src.CloneVM_Task(folder=dc.vmFolder, name=TEMPLATE, spec=spec)
            WaitForTask(task)
            tpl = task.info.result
            # vcsim ignores a ConfigSpec inside a CloneSpec: reconfigure after cloning
            WaitForTask(tpl.ReconfigVM_Task(vim.vm.ConfigSpec(
                numCPUs=2, memoryMB=2048, annotation="fleetwright test template (ubuntu)",
                guestId="ubuntu64Guest")))
            if tpl.runtime.powerState != vim.VirtualMachinePowerState.poweredOff:
                WaitForTask(tpl.PowerOffVM_Task())
            tpl.MarkAsTemplate()
    finally:
        Disconnect(si)


# --------------------------------------------------------------------------- delay (fault)


def _delay_url(section: Mapping[str, Any]) -> str:
    return f"https://{section['host']}:{section['port']}/fleetwright/delay"


def _http(url: str, body: Any = None) -> dict:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="PUT" if data is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
        return json.loads(r.read())


def get_delay(cfg: Config | None = None) -> dict:
    return _http(_delay_url(_section(cfg or Config())))


def set_delay(cfg: Config | None = None, method_delay: Mapping[str, int] | None = None, delay: int = 0) -> dict:
    """Replace the simulator's SOAP delays at runtime, e.g. ``{"CloneVM_Task": 800}`` (ms)."""
    return _http(_delay_url(_section(cfg or Config())), {"delay": int(delay), "method_delay": dict(method_delay or {})})


@contextlib.contextmanager
def method_delay(cfg: Config | None = None, **delays: int) -> Iterator[None]:
    """``with method_delay(cfg, CloneVM_Task=800): ...`` -- delays restored on exit."""
    before = get_delay(cfg)
    merged = dict(before.get("method_delay") or {})
    merged.update(delays)
    set_delay(cfg, merged, before.get("delay", 0))
    try:
        yield
    finally:
        set_delay(cfg, before.get("method_delay") or {}, before.get("delay", 0))


# --------------------------------------------------------------------------- contract


def _section(cfg: Config, port: int | None = None) -> dict[str, Any]:
    if port is None:
        port = (get_state(cfg, "vsphere") or {}).get("port")
        if port is None:
            raise RuntimeError("vsphere (vcsim) is not up; run `fleetwright testenv up --only vsphere`")
    return {
        "url": f"https://127.0.0.1:{port}/sdk",
        "host": "127.0.0.1",
        "port": int(port),
        "user": USER,
        "password": PASSWORD,
        "insecure": True,
        "datacenter": DATACENTER,
        "cluster": CLUSTER,
        "datastore": DATASTORE,
        "network": NETWORK,
        "folder": FOLDER,
        "folder_path": f"{DATACENTER}/vm/{FOLDER}",
        "template": TEMPLATE,
        "template_path": f"{DATACENTER}/vm/{TEMPLATE}",
        "resource_pool": f"{DATACENTER}/host/{CLUSTER}/Resources",
        "delay_url": f"https://127.0.0.1:{port}/fleetwright/delay",
        "pid": read_pid(NAME, cfg),
    }


def up(cfg: Config) -> dict[str, Any]:
    b = build(cfg)
    with file_lock(cfg.path("vsphere.lock"), "vsphere up"):
        st = get_state(cfg, "vsphere") or {}
        port = st.get("port")
        if is_running(NAME, cfg) and port and port_open(port):
            section = _section(cfg, port)
            _prepare_inventory(section)
            return section
        stop_process(NAME, cfg)  # a stale / half-started one
        if not port or port_open(port):
            port = 8989 if not port_open(8989) and not port else free_port()
        argv = [str(b), "-l", f"127.0.0.1:{port}", "-username", USER, "-password", PASSWORD]
        md = (cfg.options.get("vsphere") or {}).get("method_delay")
        if md:
            argv += ["-method-delay", md if isinstance(md, str) else ",".join(f"{k}:{v}" for k, v in md.items())]
        progress(f"starting vcsim on 127.0.0.1:{port}")
        start_process(NAME, argv, cfg.log(NAME), cfg=cfg)
        update_state(cfg, "vsphere", {"port": port})
        section = _section(cfg, port)
        try:
            wait_for(lambda: is_running(NAME, cfg) and _http(section["delay_url"]) is not None, 30, "vcsim")
        except TimeoutError as e:
            raise RuntimeError(f"{e}; vcsim log:\n{tail(cfg.log(NAME))}") from None
        _prepare_inventory(section)
        progress("vcsim ready (inventory prepared)")
        return _section(cfg, port)


def down(cfg: Config) -> None:
    if stop_process(NAME, cfg):
        progress("stopped vcsim")
    update_state(cfg, "vsphere", None)


def status(cfg: Config) -> dict[str, Any]:
    st = get_state(cfg, "vsphere") or {}
    running = is_running(NAME, cfg)
    out: dict[str, Any] = {"running": running}
    if st.get("port"):
        out.update(_section(cfg, st["port"]))
        out["running"] = running
    return out


def restart(cfg: Config) -> dict[str, Any]:
    """Stop and start again (the inventory is rebuilt: vcsim keeps it only in memory)."""
    stop_process(NAME, cfg)
    return up(cfg)
