"""Machines part of the test environment: real Linux hosts (systemd-nspawn) for the kubeadm path.

Why: the metal and vSphere backends install production Kubernetes (containerd, kubelet, kubeadm
under systemd) with the playbooks. That needs hosts where systemd is PID 1, kubelet runs Pods and
binaries can be replaced -- which the fast SSH hosts of ``testenv/hosts.py`` are not.

What a machine is:

* a copy of a **cached base rootfs** (``debootstrap --variant=minbase bookworm`` from Debian's
  mirror, cached in ``<cache>/machines-<key>/rootfs``), booted with ``systemd-nspawn -b``: systemd as
  PID 1, its own network namespace, attached to the bridge ``fwbr0`` (10.250.0.1/24, created by
  ``up``; the host's ``ip_forward`` is left as it is, so nothing leaves this machine);
* addresses 10.250.0.11, .12, ... (systemd-networkd, static), SSH key auth as root, host keys
  signed by the test environment's host CA (``known_hosts`` trusts ``@cert-authority 10.250.0.*``);
* the OS packages a Kubernetes node needs are pre-installed from Debian (containerd, runc,
  containernetworking-plugins, conntrack, socat, ...), as a local mirror would provide them: the
  machines cannot reach a mirror, so the playbooks' ``apt`` tasks find them present;
* machine quirks of nspawn (NOT Kubernetes settings, which are the playbooks' job) are fixed in
  the rootfs, so the product runs unchanged: ``fw-machine-prep.service`` remounts the cgroup v1
  controllers read-write and shadows the global sysctls kubelet insists on with read-only files
  (the host kernel is never changed); ``DefaultTimeoutStopSec=15s``.

Artefacts (the "configurable artefact location" of an air-gapped site): the 7 static Kubernetes
binaries of v1.20.2 and v1.21.0 plus ``crictl`` (``testenv/kube.py`` builds them) and the images
kubeadm wants, built locally from Debian packages (``registry.fleetwright.test/k8s/...``), are
served over HTTP from 10.250.0.1 (``artefacts_url``): ``<url>/kubernetes/<version>/<binary>``,
``<url>/images/<version>/<image>.tar``, each directory with ``SHA256SUMS``.

Section of the environment document::

    {"bridge": "fwbr0", "gateway": "10.250.0.1", "network": "10.250.0.0/24",
     "artefacts_url": "http://10.250.0.1:PORT", "image_repository": "registry.fleetwright.test/k8s",
     "versions": {"v1.20.2": {...images...}, "v1.21.0": {...}}, "user": "root",
     "private_key": ".../machines/ssh/id_ed25519", "known_hosts": ".../machines/ssh/known_hosts",
     "machines": [{"name": "m1", "address": "10.250.0.11", "port": 22}, ...]}

Python API: ``ensure_machine(cfg, name, address=None, fresh=False)``, ``stop_machine``,
``start_machine`` (same rootfs), ``remove_machine``, ``machine_processes``, ``ssh``,
``machine_address(i)``. Machine addresses are fixed: runs that boot machines hold
``/tmp/fw-machines.lock`` like every on-prem test. Memory: ~105 MB idle, ~840 MB as a
control-plane node, ~300 MB as a worker.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from testenv import kube
from testenv.common import (
    Config,
    apt_install,
    file_lock,
    free_port,
    get_state,
    locked_state,
    progress,
    read_pid,
    run,
    start_process,
    stop_process,
    wait_for,
)

BRIDGE = "fwbr0"
NETWORK = "10.250.0.0/24"
GATEWAY = "10.250.0.1"
FIRST = 11  # machine i (1-based) gets 10.250.0.(10+i)
SUITE = "bookworm"
IMAGE_REPOSITORY = "registry.fleetwright.test/k8s"
BUSYBOX_IMAGE = "registry.fleetwright.test/busybox:1.35"
# STAND-INS for the example components' images, which cannot be had here (no registry): busybox
# tagged with their names, whose entrypoint ignores its arguments and runs until SIGTERM, so the
# components' Deployments really run and become Available on the machines.
WORKLOAD_STANDINS = ("quay.io/prometheus/prometheus:v2.50.1", "quay.io/jetstack/cert-manager-controller:v1.14.4",
                     "ghcr.io/fluxcd/source-controller:v1.2.4", "registry.k8s.io/ingress-nginx/controller:v1.10.0")
IMAGES_REV = "2"  # bump when the image set changes: a warm cache then builds the new set
HOST_APT = ["systemd-container", "debootstrap", "openssh-client", "iproute2"]
# the machine's OS
BASE_PACKAGES = ["systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "python3-apt", "iproute2",
                 "kmod", "procps", "ca-certificates", "iputils-ping", "busybox-static", "curl"]
# what the prepare playbook installs on a Debian host (pre-installed: machines reach no mirror)
NODE_PACKAGES = ["containerd", "runc", "containernetworking-plugins", "conntrack", "socat", "ethtool",
                 "ebtables", "iptables"]
CGROUP_V1 = ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids", "systemd")
# global (not namespaced) sysctls kubelet checks or sets: shadowed inside machines (value kubelet wants)
SHADOW_SYSCTLS = {"vm.overcommit_memory": "1", "kernel.panic": "10", "kernel.panic_on_oops": "1",
                  "vm.panic_on_oom": "0"}
ETCD_TAG = "3.4.13-0"  # what kubeadm v1.20/v1.21 asks for; Debian's etcd-server 3.4.23 serves it
PAUSE_TAG = "3.2"  # kubeadm v1.20 (v1.21 wants 3.4.1: tagged both)
PAUSE_TAGS = ("3.2", "3.4.1")
COREDNS_NOTE = "Debian has no CoreDNS: kubeadm's addon/coredns phase must be skipped"

_PREP_SCRIPT = """#!/bin/sh
# fleetwright test machine (systemd-nspawn): make the nspawn-provided cgroup v1 hierarchies
# writable for containerd/kubelet, and shadow the global sysctls kubelet insists on with read-only
# files holding the values it wants, so it neither fails nor changes the host kernel.
mount -o remount,bind,rw /sys/fs/cgroup
for d in /sys/fs/cgroup/*/; do mount -o remount,bind,rw "$d"; done
[ -e /sys/fs/cgroup/cpu,cpuacct ] || ln -s cpu /sys/fs/cgroup/cpu,cpuacct || true
for f in /etc/fw-machine/sysctl/*; do
  k=$(basename "$f" | tr . /)
  mountpoint -q /proc/sys/$k || mount --bind -o ro "$f" /proc/sys/$k
done
exit 0
"""
_PREP_UNIT = """[Unit]
Description=fleetwright test machine: writable cgroups, shadowed global sysctls (nspawn quirks)
DefaultDependencies=no
Before=sysinit.target containerd.service kubelet.service
After=local-fs.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/etc/fw-machine/prep.sh

[Install]
WantedBy=sysinit.target
"""


def _cfg(cfg: Config | None) -> Config:
    return cfg if cfg is not None else Config()


def _base(cfg: Config) -> Path:
    return cfg.state_dir / "machines"


def _opts(cfg: Config) -> dict[str, Any]:
    return cfg.options.get("machines") or {}


def _proc(name: str) -> str:
    return f"machine-{name}"


def machine_address(i: int) -> str:
    """Address of the i-th (1-based) machine."""
    return str(ipaddress.ip_network(NETWORK).network_address + FIRST + i - 1)


def _check(name: str, address: str) -> None:
    if not re.fullmatch(r"[a-z][a-z0-9-]{0,30}", name):
        raise ValueError(f"invalid machine name {name!r} (lowercase letters, digits, '-')")
    ip = ipaddress.ip_address(address)
    net = ipaddress.ip_network(NETWORK)
    if ip not in net or str(ip) == GATEWAY or ip in (net.network_address, net.broadcast_address):
        raise ValueError(f"machine address {address} is not a host address of {NETWORK} (other than {GATEWAY})")


# --------------------------------------------------------------------------- cache: base rootfs


def _cache_key() -> str:
    h = hashlib.sha256(json.dumps([SUITE, BASE_PACKAGES, NODE_PACKAGES, _PREP_SCRIPT, _PREP_UNIT,
                                   SHADOW_SYSCTLS]).encode())
    return h.hexdigest()[:10]


def cache_root(cfg: Config) -> Path:
    return cfg.cache_dir / f"machines-{SUITE}-{_cache_key()}"


def _mirror() -> str:
    src = Path("/etc/apt/sources.list.d/debian.sources")
    with contextlib.suppress(OSError):
        m = re.search(r"(?m)^URIs:\s*(\S+/debian)\s*$", src.read_text())
        if m:
            return m.group(1)
    return "http://deb.debian.org/debian"


def base_rootfs(cfg: Config) -> Path:
    """The machine image every machine is copied from (debootstrap once, ~90 s; cached)."""
    root = cache_root(cfg)
    r = root / "rootfs"
    if (root / "rootfs.done").exists():
        return r
    apt_install(HOST_APT)
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / "build.lock", "machine base rootfs"):
        if (root / "rootfs.done").exists():
            return r
        t0 = time.monotonic()
        tmp = root / "rootfs.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        log = root / "debootstrap.log"
        log.write_text("")
        progress(f"debootstrap {SUITE} for the test machines (first time only, about 90 s; log: {log})")
        run(["debootstrap", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES + NODE_PACKAGES),
             SUITE, str(tmp), _mirror()], log=log)
        (tmp / "etc/fw-machine/sysctl").mkdir(parents=True, exist_ok=True)
        for k, v in SHADOW_SYSCTLS.items():
            (tmp / "etc/fw-machine/sysctl" / k).write_text(v + "\n")
        (tmp / "etc/fw-machine/prep.sh").write_text(_PREP_SCRIPT)
        (tmp / "etc/fw-machine/prep.sh").chmod(0o755)
        (tmp / "etc/systemd/system/fw-machine-prep.service").write_text(_PREP_UNIT)
        (tmp / "etc/systemd/system.conf.d").mkdir(parents=True, exist_ok=True)
        # a busybox `sh` as a Pod's PID 1 ignores SIGTERM: do not let shutdown wait 90 s for it
        (tmp / "etc/systemd/system.conf.d/10-fw-machine.conf").write_text("[Manager]\nDefaultTimeoutStopSec=15s\n")
        wants = tmp / "etc/systemd/system/sysinit.target.wants"
        wants.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            (wants / "fw-machine-prep.service").symlink_to("/etc/systemd/system/fw-machine-prep.service")
        mu = tmp / "etc/systemd/system/multi-user.target.wants"
        mu.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            (mu / "systemd-networkd.service").symlink_to("/lib/systemd/system/systemd-networkd.service")
        for f in (tmp / "etc/ssh").glob("ssh_host_*"):
            f.unlink()
        (tmp / "etc/machine-id").write_text("")
        with contextlib.suppress(FileNotFoundError):
            (tmp / "etc/resolv.conf").unlink()
        shutil.rmtree(tmp / "var/cache/apt/archives", ignore_errors=True)
        (tmp / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
        shutil.rmtree(r, ignore_errors=True)
        os.replace(tmp, r)
        (root / "rootfs.done").write_text(time.strftime("%F %T"))
        progress(f"base rootfs ready in {time.monotonic() - t0:.0f}s -> {r}")
    return r


# --------------------------------------------------------------------------- cache: images


def _tar_add(tf: tarfile.TarFile, name: str, *, data: bytes | None = None, src: Path | None = None,
             link: str | None = None, mode: int = 0o755, seen: set[str]) -> None:
    parts = name.strip("/").split("/")
    for i in range(1, len(parts)):
        d = "/".join(parts[:i])
        if d not in seen:
            seen.add(d)
            ti = tarfile.TarInfo(d + "/")
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 0
            tf.addfile(ti)
    ti = tarfile.TarInfo(name.strip("/"))
    ti.mtime = 0
    if link is not None:
        ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, link, 0o777
        tf.addfile(ti)
    elif src is not None:
        st = src.stat()
        ti.size, ti.mode = st.st_size, st.st_mode & 0o7777
        with open(src, "rb") as f:
            tf.addfile(ti, f)
    else:
        ti.size, ti.mode = len(data or b""), mode
        tf.addfile(ti, io.BytesIO(data or b""))


def write_image(out: Path, tags: list[str], files: dict[str, Path], links: dict[str, str] | None = None,
                dirs: tuple[str, ...] = ("tmp",), entrypoint: list[str] | None = None,
                cmd: list[str] | None = None) -> None:
    """A one-layer image as ``docker save`` writes it (docker-archive), no registry involved."""
    layer = io.BytesIO()
    seen: set[str] = set()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d in dirs:
            ti = tarfile.TarInfo(d.strip("/") + "/")
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o1777 if d.strip("/") == "tmp" else 0o755, 0
            seen.add(d.strip("/"))
            tf.addfile(ti)
        for dest, src in sorted(files.items()):
            _tar_add(tf, dest, src=src, seen=seen)
        for dest, target in sorted((links or {}).items()):
            _tar_add(tf, dest, link=target, seen=seen)
    blob = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(blob).hexdigest()
    conf: dict[str, Any] = {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}
    if entrypoint:
        conf["Entrypoint"] = entrypoint
    if cmd:
        conf["Cmd"] = cmd
    config = json.dumps({"architecture": "amd64", "os": "linux", "created": "1970-01-01T00:00:00Z", "config": conf,
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]},
                         "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "fleetwright testenv"}]},
                        sort_keys=True).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    layer_name = diff_id.split(":")[1] + "/layer.tar"
    manifest = json.dumps([{"Config": config_name, "RepoTags": tags, "Layers": [layer_name]}]).encode()
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as t:
        for name, data in ((config_name, config), (layer_name, blob), ("manifest.json", manifest)):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 0
            t.addfile(ti, io.BytesIO(data))
    os.replace(tmp, out)


def _libs(root: Path, binaries: list[str]) -> dict[str, Path]:
    """The shared libraries of ``binaries`` inside ``root`` (ldd in a chroot), as image files."""
    out: dict[str, Path] = {}
    for b in binaries:
        text = subprocess.run(["chroot", str(root), "ldd", b], capture_output=True, text=True, check=True).stdout
        for line in text.splitlines():
            m = re.search(r"(/\S+) \(0x", line)
            if m:
                lib = m.group(1)
                real = subprocess.run(["chroot", str(root), "readlink", "-f", lib], capture_output=True,
                                      text=True, check=True).stdout.strip()
                out[lib] = root / real.lstrip("/")
    return out


def _sha256sums(d: Path) -> None:
    lines = []
    for f in sorted(d.iterdir()):
        if f.is_file() and f.name != "SHA256SUMS" and not f.name.startswith("."):
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            lines.append(f"{h.hexdigest()}  {f.name}\n")
    (d / "SHA256SUMS").write_text("".join(lines))


def image_dir(cfg: Config, version: str) -> Path:
    return cache_root(cfg) / f"images-{version}-r{IMAGES_REV}"


def images(cfg: Config, version: str) -> Path:
    """The images kubeadm ``version`` wants, built from the cached binaries and Debian packages."""
    d = image_dir(cfg, version)
    if (d / "SHA256SUMS").exists():
        return d
    kube.build(cfg, full=True)
    root = base_rootfs(cfg)
    with file_lock(cache_root(cfg) / "build.lock", f"images {version}"):
        if (d / "SHA256SUMS").exists():
            return d
        t0 = time.monotonic()
        tmp = d.with_name(d.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        bins = kube.node_binaries(cfg, version)
        for c in ("kube-apiserver", "kube-controller-manager", "kube-scheduler"):
            write_image(tmp / f"{c}.tar", [f"{IMAGE_REPOSITORY}/{c}:{version}"],
                        {f"usr/local/bin/{c}": Path(bins[c])}, entrypoint=[f"/usr/local/bin/{c}"])
        # kube-proxy needs iptables (nft) and conntrack with their libraries
        xt = "usr/sbin/xtables-nft-multi"
        files = {"usr/local/bin/kube-proxy": Path(bins["kube-proxy"]), xt: root / xt,
                 "usr/sbin/conntrack": root / "usr/sbin/conntrack", "etc/ethertypes": root / "etc/ethertypes"}
        for f in (root / "usr/lib/x86_64-linux-gnu/xtables").iterdir():
            files[f"usr/lib/x86_64-linux-gnu/xtables/{f.name}"] = f.resolve()
        files.update({k.lstrip("/"): v for k, v in _libs(root, ["/" + xt, "/usr/sbin/conntrack"]).items()})
        links = {f"usr/sbin/{t}": "xtables-nft-multi" for t in (
            "iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore")}
        write_image(tmp / "kube-proxy.tar", [f"{IMAGE_REPOSITORY}/kube-proxy:{version}"], files, links,
                    dirs=("tmp", "run"), entrypoint=["/usr/local/bin/kube-proxy"])
        # etcd: Debian's etcd-server (needs only libc), tagged as kubeadm expects
        etcd = Path(kube.binaries(cfg)["etcd"])
        libc = {k.lstrip("/"): v for k, v in _libs(root, ["/bin/true"]).items() if "libc.so" in k or "ld-linux" in k}
        write_image(tmp / "etcd.tar", [f"{IMAGE_REPOSITORY}/etcd:{ETCD_TAG}"], {"usr/local/bin/etcd": etcd, **libc},
                    dirs=("tmp", "var/lib/etcd"))
        # pause: compiled statically from the Kubernetes source (the cached orig tarball)
        work = cfg.cache_dir / f"kube-{kube.KUBE_VERSION}-build"
        member = "kubernetes-1.20.2/build/pause/linux/pause.c"
        run(["tar", "xzf", str(work / kube.ORIG_TARBALL), "-C", str(tmp), member], log=tmp / "pause.log")
        run(["gcc", "-Os", "-static", "-o", str(tmp / "pause"), str(tmp / member),
             f"-DVERSION=fleetwright-{PAUSE_TAG}"], log=tmp / "pause.log")
        write_image(tmp / "pause.tar", [f"{IMAGE_REPOSITORY}/pause:{t}" for t in PAUSE_TAGS],
                    {"pause": tmp / "pause"}, dirs=(), entrypoint=["/pause"])
        # busybox for workloads (Debian's busybox-static)
        bb = root / "bin/busybox"
        applets = subprocess.run([str(bb), "--list"], capture_output=True, text=True, check=True).stdout.split()
        write_image(tmp / "busybox.tar", [BUSYBOX_IMAGE], {"bin/busybox": bb},
                    {f"bin/{a}": "busybox" for a in applets if a != "busybox"}, dirs=("tmp", "etc"), cmd=["sh"])
        write_image(tmp / "workload-standins.tar", list(WORKLOAD_STANDINS), {"bin/busybox": bb},
                    {f"bin/{a}": "busybox" for a in applets if a != "busybox"}, dirs=("tmp", "etc"),
                    entrypoint=["/bin/sh", "-c", "trap 'exit 0' TERM; echo stand-in for $0; while :; do sleep 1; done",
                                "fleetwright-testenv-standin"])
        for junk in ("pause", "pause.log", "kubernetes-1.20.2"):
            p = tmp / junk
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        _sha256sums(tmp)
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
        progress(f"images {version} built in {time.monotonic() - t0:.0f}s -> {d}")
    return d


def image_list(version: str) -> list[str]:
    """The image references kubeadm ``version`` uses with ``imageRepository: IMAGE_REPOSITORY``."""
    return [f"{IMAGE_REPOSITORY}/{c}:{version}" for c in
            ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy")] + [
        f"{IMAGE_REPOSITORY}/etcd:{ETCD_TAG}", f"{IMAGE_REPOSITORY}/pause:{PAUSE_TAG}", BUSYBOX_IMAGE]


# --------------------------------------------------------------------------- artefact server


def _artefact_dir(cfg: Config) -> Path:
    return _base(cfg) / "artefacts"


def _prepare_artefacts(cfg: Config) -> Path:
    """``<state>/machines/artefacts``: symlinks into the cache, served read-only over HTTP."""
    a = _artefact_dir(cfg)
    for version in (kube.KUBE_VERSION, kube.UPGRADE_VERSION):
        bdir = kube.kube_bin_dir(cfg, version)
        if not (bdir / "SHA256SUMS").exists():
            with file_lock(cfg.cache_dir / f"kube-{kube.KUBE_VERSION}.build.lock", "checksums"):
                if not (bdir / "SHA256SUMS").exists():
                    _sha256sums(bdir)
        for sub, src in (("kubernetes", bdir), ("images", images(cfg, version))):
            link = a / sub / version
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink() or os.readlink(link) != str(src):
                link.unlink(missing_ok=True)
                link.symlink_to(src)
    return a


def _ensure_server(cfg: Config) -> str:
    st = get_state(cfg, "machines") or {}
    url = st.get("artefacts_url")
    if url and read_pid("machines-artefacts", cfg) is not None:
        return url
    d = _prepare_artefacts(cfg)
    port = free_port(GATEWAY)
    start_process("machines-artefacts", [sys.executable, "-m", "http.server", "--bind", GATEWAY, str(port),
                                         "--directory", str(d)], cfg=cfg)
    wait_for(lambda: _port_open(GATEWAY, port), 20, f"artefact server on {GATEWAY}:{port}")
    return f"http://{GATEWAY}:{port}"


def _port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


# --------------------------------------------------------------------------- bridge


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def ensure_bridge() -> None:
    """The private bridge (10.250.0.1/24). ip_forward is NOT touched: nothing is routed off this host."""
    if _ip("link", "show", BRIDGE, check=False).returncode != 0:
        _ip("link", "add", BRIDGE, "type", "bridge")
    if f"{GATEWAY}/24" not in _ip("-4", "addr", "show", "dev", BRIDGE).stdout:
        _ip("addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")


def _bridge_ports() -> list[str]:
    r = _ip("-o", "link", "show", "master", BRIDGE, check=False)
    return [ln.split(":")[1].strip().split("@")[0] for ln in r.stdout.splitlines() if ln.strip()]


def remove_bridge_if_unused() -> bool:
    if _ip("link", "show", BRIDGE, check=False).returncode != 0:
        return False
    if _bridge_ports():
        return False  # machines of another state dir still run
    _ip("link", "del", BRIDGE, check=False)
    return True


# --------------------------------------------------------------------------- keys


def client_key(cfg: Config) -> Path:
    d = _base(cfg) / "ssh"
    key = d / "id_ed25519"
    if not key.exists():
        d.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fleetwright-testenv-machines",
                        "-f", str(key)], check=True)
    return key


def known_hosts(cfg: Config) -> Path:
    """A host CA for the machines; known_hosts trusts it for 10.250.0.* (host keys checked strictly)."""
    d = _base(cfg) / "ssh"
    ca = d / "host_ca"
    if not ca.exists():
        d.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fleetwright-testenv-machine-ca",
                        "-f", str(ca)], check=True)
    known = d / "known_hosts"
    line = f"@cert-authority 10.250.0.* {(d / 'host_ca.pub').read_text().strip()}\n"
    if not known.exists() or known.read_text() != line:
        known.write_text(line)
    return known


# --------------------------------------------------------------------------- machines


def _mdir(cfg: Config, name: str) -> Path:
    return _base(cfg) / "m" / name


def _make_rootfs(cfg: Config, name: str, address: str) -> Path:
    md = _mdir(cfg, name)
    r = md / "rootfs"
    if (md / "rootfs.done").exists():
        return r
    base = base_rootfs(cfg)
    shutil.rmtree(md, ignore_errors=True)
    md.mkdir(parents=True)
    run(["cp", "-a", "--reflink=auto", str(base), str(r)], log=md / "make.log")
    (r / "etc/hostname").write_text(name + "\n")
    (r / "etc/hosts").write_text(f"127.0.0.1 localhost\n{address} {name}\n")
    (r / "etc/machine-id").write_text(hashlib.sha256(os.urandom(32)).hexdigest()[:32] + "\n")
    (r / "etc/resolv.conf").write_text(f"nameserver {GATEWAY}\n")
    net = r / "etc/systemd/network"
    net.mkdir(parents=True, exist_ok=True)
    (net / "10-host0.network").write_text(
        f"[Match]\nName=host0\n[Network]\nAddress={address}/24\nGateway={GATEWAY}\n"
        "LinkLocalAddressing=no\nIPv6AcceptRA=no\n")
    hk = r / "etc/ssh/ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(hk)], check=True)
    known_hosts(cfg)
    subprocess.run(["ssh-keygen", "-q", "-s", str(_base(cfg) / "ssh/host_ca"), "-I", name, "-h", "-n", address,
                    f"{hk}.pub"], check=True, capture_output=True)
    (r / "etc/ssh/sshd_config.d").mkdir(parents=True, exist_ok=True)
    (r / "etc/ssh/sshd_config.d/10-fleetwright-testenv.conf").write_text(
        "HostKey /etc/ssh/ssh_host_ed25519_key\nHostCertificate /etc/ssh/ssh_host_ed25519_key-cert.pub\n"
        "PasswordAuthentication no\nUseDNS no\nMaxStartups 100:30:200\nMaxSessions 50\n")
    ssh_dir = r / "root/.ssh"
    ssh_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (ssh_dir / "authorized_keys").write_text(Path(f"{client_key(cfg)}.pub").read_text())
    (ssh_dir / "authorized_keys").chmod(0o600)
    (md / "info.json").write_text(json.dumps({"name": name, "address": address}))
    (md / "rootfs.done").write_text(time.strftime("%F %T"))
    return r


def _cgroup_name(name: str) -> str:
    return f"fwm-{name}"


def _own_cgroups(pid: int | str = "self") -> dict[str, str]:
    """controller -> path of ``pid``'s cgroup in each v1 hierarchy (and 'unified')."""
    out: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        for c in (ctrls.split(",") if ctrls else ["unified"]):
            out[c.replace("name=", "")] = path
    return out


def _find_dirs(base: Path, leaf: str, depth: int = 4) -> list[Path]:
    found, level = [], [base]
    for _ in range(depth):
        nxt = []
        for d in level:
            with contextlib.suppress(OSError):
                for c in d.iterdir():
                    if c.is_dir():
                        (found if c.name == leaf else nxt).append(c)
        level = nxt
    return found


def boot_exec(name: str, rootfs: str) -> None:
    """(In the started process.) Move into a cgroup of our own in every hierarchy, so the machine's
    cgroup namespace has its own root, then exec systemd-nspawn."""
    cur = _own_cgroups()
    leaf = _cgroup_name(name)
    for h in (*CGROUP_V1, "unified"):
        base = Path("/sys/fs/cgroup") / h
        if not base.is_dir():
            continue
        parent = base / cur.get(h, "/").lstrip("/")
        d = parent / leaf
        d.mkdir(exist_ok=True)
        if h == "cpuset":
            for f in ("cpuset.cpus", "cpuset.mems"):
                (d / f).write_text((parent / f).read_text())
        (d / "cgroup.procs").write_text(str(os.getpid()))
    os.execvp("systemd-nspawn", [
        "systemd-nspawn", "-b", "-D", rootfs, "-M", name, "--register=no", "--keep-unit",
        f"--network-bridge={BRIDGE}", "--capability=all", "--private-users=no", "--console=read-only",
        "--resolv-conf=off", "--system-call-filter=@keyring", "--bind=/dev/kmsg"])


def machine_processes(name: str) -> list[int]:
    """Every process in the machine's own cgroup (pids hierarchy, recursively)."""
    pids: set[int] = set()
    for d in _find_dirs(Path("/sys/fs/cgroup/pids"), _cgroup_name(name)):
        for f in d.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(x) for x in f.read_text().split())
    return sorted(pids)


def _ssh_banner(address: str) -> bool:
    try:
        with socket.create_connection((address, 22), timeout=1) as s:
            s.settimeout(2)
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def ssh_argv(cfg: Config, address: str) -> list[str]:
    return ["ssh", "-q", "-i", str(client_key(cfg)), "-o", f"UserKnownHostsFile={known_hosts(cfg)}",
            "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=5", "-o", "BatchMode=yes",
            "-o", "LogLevel=ERROR", f"root@{address}"]


def ssh(cfg: Config | None, address: str, command: str, check: bool = True,
        timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``command`` on a machine as root (host key checked against the machines' CA)."""
    cfg = _cfg(cfg)
    r = subprocess.run([*ssh_argv(cfg, address), command], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"ssh {address} {command!r}: rc={r.returncode}: {r.stderr.strip()[-500:]}")
    return r


def _entry(name: str, address: str) -> dict[str, Any]:
    return {"name": name, "address": address, "port": 22}


def ensure_machine(cfg: Config | None, name: str, address: str | None = None, fresh: bool = False,
                   timeout: float = 120) -> dict[str, Any]:
    """Boot machine ``name`` at ``address`` (made from the base rootfs unless it exists; ``fresh``
    remakes it) and wait until its sshd answers and systemd has finished booting. Idempotent."""
    cfg = _cfg(cfg)
    known = {m["name"]: m["address"] for m in (get_state(cfg, "machines") or {}).get("machines", [])}
    address = address or known.get(name)
    if address is None:
        raise ValueError(f"machine {name}: no address given and none known")
    _check(name, address)
    ensure_bridge()
    with file_lock(cfg.path("machines.lock"), "machines"):
        with locked_state(cfg) as st:
            sec = st.setdefault("machines", {"machines": []})
            # a stopped machine gives its address up (its rootfs stays until remove_machine or down)
            sec["machines"] = [m for m in sec["machines"] if m["name"] == name or read_pid(_proc(m["name"]), cfg)]
            clash = [m for m in sec["machines"] if (m["address"] == address) != (m["name"] == name)]
            if clash:
                raise ValueError(f"machine {name} at {address} clashes with running machine {clash[0]}")
        if fresh:
            _stop(cfg, name)
            shutil.rmtree(_mdir(cfg, name), ignore_errors=True)
        elif (_mdir(cfg, name) / "info.json").exists():
            had = json.loads((_mdir(cfg, name) / "info.json").read_text())["address"]
            if had != address:
                raise ValueError(f"machine {name} exists at {had}, not {address} (use fresh=True)")
        t0 = time.monotonic()
        rootfs = _make_rootfs(cfg, name, address)
        if read_pid(_proc(name), cfg) is None:
            if _port_open(address, 22):
                raise RuntimeError(f"{address}:22 already answers: a machine of another state dir? "
                                   "(machine runs hold /tmp/fw-machines.lock)")
            start_process(_proc(name), [sys.executable, "-m", "testenv.machines", "boot", name, str(rootfs)],
                          log=_mdir(cfg, name) / "console.log", cfg=cfg)
        wait_for(lambda: _ssh_banner(address), timeout, f"sshd of machine {name} ({address})", interval=0.3)

        def booted() -> bool:
            r = ssh(cfg, address, "systemctl is-system-running", check=False, timeout=20)
            state = r.stdout.strip()
            if state == "degraded":
                failed = ssh(cfg, address, "systemctl --failed --no-legend --plain", check=False).stdout.strip()
                raise RuntimeError(f"machine {name} booted degraded: {failed}")
            return state == "running"

        wait_for(booted, timeout, f"machine {name} to finish booting", interval=0.3)
        with locked_state(cfg) as st:
            sec = st.setdefault("machines", {"machines": []})
            sec["machines"] = [m for m in sec["machines"] if m["name"] != name] + [_entry(name, address)]
        progress(f"machine {name} ({address}) up in {time.monotonic() - t0:.1f}s")
    return _entry(name, address)


def start_machine(cfg: Config | None, name: str) -> dict[str, Any]:
    """Boot a stopped machine again (same rootfs: what it had on disk survives)."""
    return ensure_machine(cfg, name)


def _stop(cfg: Config, name: str, graceful: bool = True) -> bool:
    pid = read_pid(_proc(name), cfg)
    ran = pid is not None
    md = _mdir(cfg, name)
    address = None
    with contextlib.suppress(OSError, ValueError, KeyError):
        address = json.loads((md / "info.json").read_text())["address"]
    if pid is not None:
        if graceful and address:
            # Pod containers first (a busybox PID 1 ignores SIGTERM), then a clean poweroff
            with contextlib.suppress(Exception):
                ssh(cfg, address, "systemctl stop kubelet 2>/dev/null; for t in $(ctr -n k8s.io tasks ls -q "
                                  "2>/dev/null); do ctr -n k8s.io tasks kill -s KILL $t; done; true",
                    check=False, timeout=20)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)  # nspawn: a clean shutdown of the machine's systemd
        deadline = time.monotonic() + (40 if graceful else 3)
        while time.monotonic() < deadline and read_pid(_proc(name), cfg) is not None:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.2)
    left = machine_processes(name)
    if left:
        progress(f"machine {name}: SIGKILL {len(left)} left-over processes")
        for p in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        wait_for(lambda: not machine_processes(name), 20, f"processes of machine {name} to end")
    stop_process(_proc(name), cfg, timeout=2)
    for h in (*CGROUP_V1, "unified"):
        for d in _find_dirs(Path("/sys/fs/cgroup") / h, _cgroup_name(name)):
            for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    sub.rmdir()
            with contextlib.suppress(OSError):
                d.rmdir()
    return ran


def stop_machine(cfg: Config | None, name: str, graceful: bool = True) -> bool:
    """Power the machine off (kill its Pods' tasks, clean shutdown, SIGKILL what is left of its
    cgroup after 40 s). Its rootfs stays. ``graceful=False``: pull the plug. True if it ran."""
    cfg = _cfg(cfg)
    with file_lock(cfg.path("machines.lock"), "machines"):
        t0 = time.monotonic()
        ran = _stop(cfg, name, graceful)
        if ran:
            progress(f"machine {name} stopped in {time.monotonic() - t0:.1f}s")
        return ran


def remove_machine(cfg: Config | None, name: str) -> None:
    """Stop the machine and delete its rootfs and state entry."""
    cfg = _cfg(cfg)
    stop_machine(cfg, name)
    shutil.rmtree(_mdir(cfg, name), ignore_errors=True)
    with locked_state(cfg) as st:
        sec = st.get("machines")
        if sec:
            sec["machines"] = [m for m in sec.get("machines", []) if m["name"] != name]


def machine_memory_mb(name: str) -> float | None:
    """Memory of the machine's cgroup (RSS + cache) in MB."""
    for d in _find_dirs(Path("/sys/fs/cgroup/memory"), _cgroup_name(name)):
        with contextlib.suppress(OSError, ValueError):
            return int((d / "memory.usage_in_bytes").read_text()) / 1048576
    return None


# --------------------------------------------------------------------------- part API


def _section(cfg: Config, url: str | None) -> dict[str, Any]:
    st = get_state(cfg, "machines") or {}
    return {"bridge": BRIDGE, "gateway": GATEWAY, "network": NETWORK, "artefacts_url": url,
            "image_repository": IMAGE_REPOSITORY, "busybox_image": BUSYBOX_IMAGE,
            "versions": {v: {"images": image_list(v)} for v in (kube.KUBE_VERSION, kube.UPGRADE_VERSION)},
            "user": "root", "private_key": str(client_key(cfg)), "known_hosts": str(known_hosts(cfg)),
            "base_rootfs": str(cache_root(cfg) / "rootfs"), "state_dir": str(cfg.state_dir),
            "machines": st.get("machines", [])}


def up(cfg: Config | None = None) -> dict[str, Any]:
    """Build what is missing (binaries, base rootfs, images), create the bridge, serve the artefacts,
    and boot ``options["machines"]["count"]`` machines m1..mN (default 0)."""
    cfg = _cfg(cfg)
    apt_install(HOST_APT)
    kube.build(cfg, full=True)
    base_rootfs(cfg)
    ensure_bridge()
    url = _ensure_server(cfg)
    with locked_state(cfg) as st:
        sec = st.setdefault("machines", {"machines": []})
        sec["artefacts_url"] = url
    for i in range(1, int(_opts(cfg).get("count", 0)) + 1):
        ensure_machine(cfg, f"m{i}", machine_address(i))
    return _section(cfg, url)


def down(cfg: Config | None = None) -> None:
    """Stop every machine of this state dir (no nspawn or machine process left), the artefact server,
    delete the machines' rootfs copies, and remove the bridge when no machine uses it."""
    cfg = _cfg(cfg)
    stop_process("vsphere-machines", cfg)  # testenv/vsphere_machines.py first: it would boot VMs' machines again
    names = {m["name"] for m in (get_state(cfg, "machines") or {}).get("machines", [])}
    mroot = _base(cfg) / "m"
    if mroot.is_dir():
        names |= {p.name for p in mroot.iterdir() if p.is_dir()}
    if cfg.pid_dir.is_dir():
        names |= {f.stem[len("machine-"):] for f in cfg.pid_dir.glob("machine-*.pid")}
    for n in sorted(names):
        stop_machine(cfg, n)
        shutil.rmtree(_mdir(cfg, n), ignore_errors=True)
    stop_process("machines-artefacts", cfg)
    with locked_state(cfg) as st:
        st.pop("machines", None)
        st.pop("vsphere_machines", None)
    remove_bridge_if_unused()


def status(cfg: Config | None = None) -> dict[str, Any]:
    cfg = _cfg(cfg)
    st = get_state(cfg, "machines") or {}
    ms = []
    for m in st.get("machines", []):
        pid = read_pid(_proc(m["name"]), cfg)
        ms.append({**m, "running": pid is not None, "pid": pid, "processes": len(machine_processes(m["name"])),
                   "memory_mb": round(machine_memory_mb(m["name"]) or 0, 1) if pid else None})
    return {"bridge": BRIDGE if _ip("link", "show", BRIDGE, check=False).returncode == 0 else None,
            "artefacts_url": st.get("artefacts_url"),
            "artefacts_server": read_pid("machines-artefacts", cfg) is not None,
            "base_rootfs_cached": (cache_root(cfg) / "rootfs.done").exists(),
            "binaries_cached": kube.full_built(cfg), "machines": ms}


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "boot":
        boot_exec(sys.argv[2], sys.argv[3])
    else:
        print("usage: python -m testenv.machines boot NAME ROOTFS", file=sys.stderr)
        sys.exit(2)
