"""Real Kubernetes control planes: kube-apiserver + kube-controller-manager v1.20.2 on loopback.

* Built once from Debian's ``kubernetes`` *source* package (bookworm-security,
  1.20.5+really1.20.2) with Debian's Go, cached in ``<cache>/kube-v1.20.2/bin``: all 7 static
  binaries plus ``crictl`` (the machines part uses them too), and the same source stamped v1.21.0
  in ``<cache>/kube-v1.21.0/bin`` (see :func:`build`).
* ONE etcd (Debian's ``etcd-server``) serves every control plane; each control plane is
  isolated by ``--etcd-prefix /fleetwright/<name>`` and has its own 127.0.0.1 port, CA and
  serving certificate (SAN 127.0.0.1), admin token (tokens.csv), kubeconfig and a
  kube-controller-manager (namespace deletion, service-account tokens, quota status).
* No scheduler, no kubelet: Pods stay Pending.

Python API (also used by the pytest plugin and by the hosts/EKS mapping):
``ensure_control_plane(cfg, name)``, ``stop_control_plane``, ``start_control_plane``,
``delete_control_plane``, ``list_control_planes``, ``binaries``.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from testenv.common import (
    Config,
    apt_install,
    file_lock,
    free_port,
    get_state,
    is_running,
    locked_state,
    port_open,
    progress,
    read_pid,
    run,
    start_process,
    stop_process,
    tail,
    wait_for,
)

KUBE_VERSION = "v1.20.2"
# the same source relinked with this version stamped, for upgrade tests (same code, new label)
UPGRADE_VERSION = "v1.21.0"
NODE_BINARIES = ("kubelet", "kubeadm", "kubectl", "kube-scheduler", "kube-proxy", "kube-apiserver",
                 "kube-controller-manager")
KUBE_COMMIT = "faecb196815e248d3ecfb03c680a4507229c2a56"
DEB_SOURCE = "kubernetes=1.20.5+really1.20.2-1.1+deb12u1"
ORIG_TARBALL = "kubernetes_1.20.5+really1.20.2.orig.tar.gz"
BUILD_APT = ["golang-go", "rsync", "golang-github-modern-go-reflect2-dev", "etcd-server", "openssl"]
ETCD = "etcd"
SERVICE_CIDR = "10.96.0.0/24"
DEFAULT_CLUSTER = "mgmt"
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?$")


# --------------------------------------------------------------------------- build


def kube_bin_dir(cfg: Config, version: str = KUBE_VERSION) -> Path:
    return cfg.cache_dir / f"kube-{version}" / "bin"


def binaries(cfg: Config) -> dict[str, str]:
    b = kube_bin_dir(cfg)
    return {
        "kube-apiserver": str(b / "kube-apiserver"),
        "kube-controller-manager": str(b / "kube-controller-manager"),
        "etcd": shutil.which(ETCD) or "/usr/bin/etcd",
    }


def node_binaries(cfg: Config, version: str = KUBE_VERSION) -> dict[str, str]:
    """The 7 static binaries of one version (and, for KUBE_VERSION, ``crictl``) for the machines part."""
    b = kube_bin_dir(cfg, version)
    names = NODE_BINARIES + (("crictl",) if version == KUBE_VERSION else ())
    return {n: str(b / n) for n in names}


def _built(cfg: Config) -> bool:
    b = kube_bin_dir(cfg)
    return all(os.access(b / n, os.X_OK) for n in ("kube-apiserver", "kube-controller-manager"))


def full_built(cfg: Config) -> bool:
    """All node binaries of both versions (what the machines part needs) are in the cache."""
    return all(os.access(p, os.X_OK) for v in (KUBE_VERSION, UPGRADE_VERSION) for p in node_binaries(cfg, v).values())


def _version_file(work: Path, version: str) -> Path:
    """kube's hack/lib/version.sh ignores KUBE_GIT_VERSION in a ``git archive`` tree (Debian's orig
    tarball hard-codes v1.20.2) but honours KUBE_GIT_VERSION_FILE: the way to stamp v1.21.0."""
    major, minor = version.lstrip("v").split(".")[:2]
    f = work / f"version-{version}.env"
    f.write_text(f"KUBE_GIT_COMMIT='{KUBE_COMMIT}'\nKUBE_GIT_TREE_STATE='clean'\nKUBE_GIT_VERSION='{version}'\n"
                 f"KUBE_GIT_MAJOR='{major}'\nKUBE_GIT_MINOR='{minor}'\n")
    return f


def _install_bins(src: Path, dest: Path, names: tuple[str, ...]) -> None:
    """Copy into the cache file by file (temp name + rename): running processes keep their inode and a
    concurrent start never sees a half-written binary."""
    dest.mkdir(parents=True, exist_ok=True)
    for n in names:
        tmp = dest / f".{n}.tmp"
        shutil.copy2(src / n, tmp)
        os.replace(tmp, dest / n)


def build(cfg: Config, full: bool = False) -> dict[str, str]:
    """Build Kubernetes from Debian's source package once, cached.

    One build makes everything both parts need: the 7 static node binaries (kubelet, kubeadm,
    kubectl, kube-scheduler, kube-proxy, kube-apiserver, kube-controller-manager) plus ``crictl``
    (``testenv/crictl-lite``, a stand-in: Debian has no cri-tools) for KUBE_VERSION, then the same
    source relinked with the version stamped UPGRADE_VERSION (the Go cache makes that a relink).
    The kube part needs only the apiserver and controller manager (``full=False``: an older cache
    holding just those two is enough); the machines part asks for ``full=True``.
    About 13 minutes cold on 2 cores. A lock file serialises concurrent callers: the second waits
    and then finds the binaries.
    """
    apt_install(BUILD_APT)
    done = full_built if full else _built
    if done(cfg):
        return binaries(cfg)
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(cfg.cache_dir / f"kube-{KUBE_VERSION}.build.lock", "kube build"):
        if done(cfg):
            return binaries(cfg)
        t0 = time.monotonic()
        work = cfg.cache_dir / f"kube-{KUBE_VERSION}-build"
        log = cfg.cache_dir / f"kube-{KUBE_VERSION}-build.log"
        log.write_text("")
        progress(f"building Kubernetes {KUBE_VERSION} ({len(NODE_BINARIES)} binaries + crictl) and its "
                 f"{UPGRADE_VERSION} relabel from Debian's source package (first time only, about 13 min; log: {log})")
        aptd = work / "apt"
        for d in ("lists/partial", "cache/archives/partial", "parts"):
            (aptd / d).mkdir(parents=True, exist_ok=True)
        src = Path("/etc/apt/sources.list.d/debian.sources")
        if src.exists():
            text = re.sub(r"(?m)^Types: deb$", "Types: deb-src", src.read_text())
            (aptd / "parts" / "src.sources").write_text(text)
        else:  # classic one-line sources.list
            lines = [ln.replace("deb ", "deb-src ", 1) for ln in Path("/etc/apt/sources.list").read_text().splitlines()
                     if ln.startswith("deb ")]
            (aptd / "parts" / "src.list").write_text("\n".join(lines) + "\n")
        apto = ["-o", "Dir::Etc::SourceList=/dev/null", "-o", f"Dir::Etc::SourceParts={aptd / 'parts'}",
                "-o", f"Dir::State::Lists={aptd / 'lists'}", "-o", f"Dir::Cache={aptd / 'cache'}"]
        if not (work / ORIG_TARBALL).exists():
            progress("  fetching the kubernetes source package (apt-get source --download-only)")
            run(["apt-get", *apto, "update", "-qq"], log=log)
            run(["apt-get", *apto, "source", "--download-only", DEB_SOURCE, "-qq"], log=log, cwd=work)
        tree = work / "kubernetes-1.20.2"
        if tree.exists():
            shutil.rmtree(tree)
        progress("  unpacking")
        run(["tar", "xzf", ORIG_TARBALL], log=log, cwd=work)
        # Go >= 1.18 fix: the vendored reflect2 v1.0.1 crashes on map iteration (custom objects);
        # use Debian's reflect2 1.0.2 instead.
        vendored = tree / "vendor/github.com/modern-go/reflect2"
        shutil.rmtree(vendored)
        shutil.copytree("/usr/share/gocode/src/github.com/modern-go/reflect2", vendored)
        # crictl stand-in, compiled inside the tree so it uses the vendored CRI client
        (tree / "cmd/crictl").mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(__file__).with_name("crictl-lite.go"), tree / "cmd/crictl/main.go")
        env = dict(os.environ, HOME=str(work / "home"), GOFLAGS="", GOPROXY="off", GOCACHE=str(work / "gocache"),
                   CGO_ENABLED="0", KUBE_STATIC_OVERRIDES="kubelet", KUBE_GIT_TREE_STATE="clean",
                   KUBE_GIT_COMMIT=KUBE_COMMIT)
        env.pop("GOPATH", None)
        what = "WHAT=" + " ".join(f"cmd/{n}" for n in NODE_BINARIES + ("crictl",))
        for version in (KUBE_VERSION, UPGRADE_VERSION):
            progress(f"  compiling {version} (go build; progress dots every 30 s)")
            env.update(KUBE_GIT_VERSION=version, KUBE_GIT_VERSION_FILE=str(_version_file(work, version)))
            with open(log, "ab") as out:
                p = subprocess.Popen(["make", what], cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
                while True:
                    try:
                        rc = p.wait(timeout=30)
                        break
                    except subprocess.TimeoutExpired:
                        progress(f"  ... still compiling ({time.monotonic() - t0:.0f}s)")
            if rc != 0:
                raise RuntimeError(f"kube build failed (rc={rc}); see {log}:\n{tail(log)}")
            names = NODE_BINARIES + (("crictl",) if version == KUBE_VERSION else ())
            _install_bins(tree / "_output/bin", kube_bin_dir(cfg, version), names)
            progress(f"  {version} built ({time.monotonic() - t0:.0f}s) -> {kube_bin_dir(cfg, version)}")
        # keep the downloaded source package, drop the big tree and Go cache (1.7 GB)
        shutil.rmtree(tree, ignore_errors=True)
        shutil.rmtree(work / "gocache", ignore_errors=True)
        progress(f"built kube {KUBE_VERSION} + {UPGRADE_VERSION} in {time.monotonic() - t0:.0f}s")
    return binaries(cfg)


# --------------------------------------------------------------------------- helpers


def _kdir(cfg: Config) -> Path:
    d = cfg.state_dir / "kube"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _cdir(cfg: Config, name: str) -> Path:
    return _kdir(cfg) / "clusters" / name


def _lock(cfg: Config):
    return file_lock(cfg.path("kube.lock"), "kube")


def _check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise ValueError(f"invalid control-plane name {name!r} (lowercase letters, digits and '-')")


def _openssl(*args: str, log: Path) -> None:
    run(["openssl", *args], log=log)


def _make_pki(d: Path, name: str, log: Path) -> None:
    """Per-cluster CA, serving certificate (SAN 127.0.0.1) and service-account key pair."""
    if (d / "serving.crt").exists() and (d / "sa.pub").exists():
        return
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"), "-days", "3650",
             "-subj", f"/CN=fleetwright-testenv-{name}-ca",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             log=log)
    (d / "serving.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
        "DNS:kubernetes.default.svc,IP:10.96.0.1\n")
    _openssl("req", *ec, "-keyout", str(d / "serving.key"), "-out", str(d / "serving.csr"),
             "-subj", f"/CN=kube-apiserver-{name}", log=log)
    _openssl("x509", "-req", "-in", str(d / "serving.csr"), "-CA", str(d / "ca.crt"), "-CAkey", str(d / "ca.key"),
             "-CAcreateserial", "-out", str(d / "serving.crt"), "-days", "3650", "-extfile", str(d / "serving.ext"),
             log=log)
    _openssl("genrsa", "-out", str(d / "sa.key"), "2048", log=log)
    _openssl("rsa", "-in", str(d / "sa.key"), "-pubout", "-out", str(d / "sa.pub"), log=log)


def _kubeconfig(server: str, ca_file: str, token: str, name: str) -> str:
    return json.dumps({
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": name, "cluster": {"server": server, "certificate-authority": ca_file}}],
        "users": [{"name": f"{name}-admin", "user": {"token": token}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": f"{name}-admin"}}],
        "current-context": name,
    }, indent=2) + "\n"


def _https_get(url: str, token: str, ca_file: str, timeout: float = 2.0) -> tuple[int, str]:
    ctx = ssl.create_default_context(cafile=ca_file)
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def _rss_mb(pid: int | None) -> float | None:
    if not pid:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


# --------------------------------------------------------------------------- etcd


def _etcd_state(cfg: Config) -> dict[str, Any]:
    return (get_state(cfg, "kube") or {}).get("etcd") or {}


def _etcd_url(cfg: Config) -> str:
    return f"http://127.0.0.1:{_etcd_state(cfg)['client_port']}"


def _etcd_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return json.loads(r.read()).get("health") in ("true", True)
    except Exception:  # noqa: BLE001
        return False


def _ensure_etcd(cfg: Config) -> str:
    st = _etcd_state(cfg)
    if is_running("kube-etcd", cfg) and st and _etcd_healthy(f"http://127.0.0.1:{st['client_port']}"):
        return f"http://127.0.0.1:{st['client_port']}"
    stop_process("kube-etcd", cfg)
    cp, pp = st.get("client_port"), st.get("peer_port")
    if not cp or port_open(cp) or not pp or port_open(pp):
        cp, pp = free_port(), free_port()
        while pp == cp:
            pp = free_port()
    data = _kdir(cfg) / "etcd-data"
    data.mkdir(parents=True, exist_ok=True)
    os.chmod(data, 0o700)
    etcd = binaries(cfg)["etcd"]
    progress(f"starting etcd on 127.0.0.1:{cp}")
    start_process("kube-etcd", [
        etcd, "--name", "fleetwright", "--data-dir", str(data),
        "--listen-client-urls", f"http://127.0.0.1:{cp}", "--advertise-client-urls", f"http://127.0.0.1:{cp}",
        "--listen-peer-urls", f"http://127.0.0.1:{pp}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{pp}",
        "--initial-cluster", f"fleetwright=http://127.0.0.1:{pp}", "--logger", "zap", "--log-level", "warn",
        "--quota-backend-bytes", str(2 * 1024**3),
    ], cfg.log("kube-etcd"), cfg=cfg)
    with locked_state(cfg) as s:
        s.setdefault("kube", {})["etcd"] = {"client_port": cp, "peer_port": pp}
    url = f"http://127.0.0.1:{cp}"
    try:
        wait_for(lambda: _etcd_healthy(url) or (not is_running("kube-etcd", cfg) and _raise("etcd exited")),
                 30, "etcd health")
    except (TimeoutError, RuntimeError) as e:
        raise RuntimeError(f"etcd did not start: {e}\n{tail(cfg.log('kube-etcd'))}") from None
    return url


def _raise(msg: str) -> bool:
    raise RuntimeError(msg)


def _etcd_delete_prefix(url: str, prefix: str) -> int:
    """Delete every key under ``prefix`` through etcd's v3 JSON gateway."""
    import base64

    key = prefix.encode()
    end = key[:-1] + bytes([key[-1] + 1])
    body = json.dumps({"key": base64.b64encode(key).decode(), "range_end": base64.b64encode(end).decode()}).encode()
    req = urllib.request.Request(url + "/v3/kv/deleterange", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return int(json.loads(r.read()).get("deleted", 0))


# --------------------------------------------------------------------------- control planes


def _etcd_prefix(name: str) -> str:
    return f"/fleetwright/{name}"


def _cp_info(cfg: Config, name: str, st: dict[str, Any]) -> dict[str, Any]:
    d = _cdir(cfg, name)
    return {
        "name": name,
        "server": f"https://127.0.0.1:{st['port']}",
        "port": st["port"],
        "token": st["token"],
        "ca_file": str(d / "ca.crt"),
        "kubeconfig": str(d / "kubeconfig"),
        "etcd_prefix": _etcd_prefix(name),
    }


def _cluster_states(cfg: Config) -> dict[str, dict[str, Any]]:
    return (get_state(cfg, "kube") or {}).get("clusters") or {}


def _start_cp_processes(cfg: Config, name: str, st: dict[str, Any]) -> None:
    d = _cdir(cfg, name)
    b = binaries(cfg)
    port = st["port"]
    etcd_url = _etcd_url(cfg)
    api, kcm = f"kube-{name}-apiserver", f"kube-{name}-controller-manager"
    if not is_running(api, cfg):
        if port_open(port):
            raise RuntimeError(f"port {port} of control plane {name} is taken by another process")
        progress(f"starting kube-apiserver {name} on https://127.0.0.1:{port}")
        start_process(api, [
            b["kube-apiserver"], "--etcd-servers", etcd_url, "--etcd-prefix", _etcd_prefix(name),
            "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1", "--secure-port", str(port),
            "--insecure-port", "0",
            "--tls-cert-file", str(d / "serving.crt"), "--tls-private-key-file", str(d / "serving.key"),
            "--token-auth-file", str(d / "tokens.csv"), "--authorization-mode", "RBAC",
            "--service-account-issuer", "https://kubernetes.default.svc",
            "--service-account-key-file", str(d / "sa.pub"),
            "--service-account-signing-key-file", str(d / "sa.key"),
            "--service-cluster-ip-range", SERVICE_CIDR, "--allow-privileged",
            "--disable-admission-plugins", "ServiceAccount", "--profiling=false", "--v", "1",
        ], cfg.log(api), cfg=cfg)
    token, ca = st["token"], str(d / "ca.crt")

    def ready() -> bool:
        if not is_running(api, cfg):
            raise RuntimeError(f"kube-apiserver {name} exited:\n{tail(cfg.log(api))}")
        code, body = _https_get(f"https://127.0.0.1:{port}/readyz", token, ca)
        return code == 200 and body.strip() == "ok"

    wait_for(ready, 90, f"kube-apiserver {name} /readyz")
    if not is_running(kcm, cfg):
        progress(f"starting kube-controller-manager {name}")
        start_process(kcm, [
            b["kube-controller-manager"], "--kubeconfig", str(d / "kcm.kubeconfig"),
            "--leader-elect=false", "--port", "0", "--secure-port", "0",
            "--service-account-private-key-file", str(d / "sa.key"), "--root-ca-file", ca,
            "--use-service-account-credentials=false", "--controllers", "*,-bootstrapsigner,-tokencleaner",
            "--profiling=false", "--v", "1",
        ], cfg.log(kcm), cfg=cfg)

    def kcm_ready() -> bool:
        # the service-account controller makes default/default once the controller manager is working
        if not is_running(kcm, cfg):
            raise RuntimeError(f"kube-controller-manager {name} exited:\n{tail(cfg.log(kcm))}")
        code, _ = _https_get(f"https://127.0.0.1:{port}/api/v1/namespaces/default/serviceaccounts/default",
                             token, ca)
        return code == 200

    wait_for(kcm_ready, 60, f"kube-controller-manager {name} (default service account)")
    agent = f"kube-{name}-node-agent"
    if not is_running(agent, cfg):  # the stand-in for kubelets (testenv/node_agent.py): Nodes Ready, Pods Running
        tok = d / "agent.token"
        tok.write_text(token + "\n")
        os.chmod(tok, 0o600)
        start_process(agent, [sys.executable, str(Path(__file__).with_name("node_agent.py")),
                              "--server", f"https://127.0.0.1:{port}", "--token-file", str(tok), "--ca-file", ca],
                      cfg.log(agent), cfg=cfg)


def ensure_control_plane(cfg: Config, name: str = DEFAULT_CLUSTER) -> dict[str, Any]:
    """Make (or start again) the control plane ``name``; return server/token/ca_file/kubeconfig."""
    _check_name(name)
    build(cfg)
    with _lock(cfg):
        _ensure_etcd(cfg)
        st = _cluster_states(cfg).get(name)
        d = _cdir(cfg, name)
        if st is None:
            d.mkdir(parents=True, exist_ok=True)
            log = cfg.log(f"kube-{name}-pki")
            _make_pki(d, name, log)
            st = {"port": free_port(), "token": secrets.token_hex(24), "kcm_token": secrets.token_hex(24)}
            with locked_state(cfg) as s:
                s.setdefault("kube", {}).setdefault("clusters", {})[name] = st
        (d / "tokens.csv").write_text(
            f'{st["token"]},admin,admin-uid,system:masters\n'
            f'{st["kcm_token"]},system:kube-controller-manager,kcm-uid,system:masters\n')
        info = _cp_info(cfg, name, st)
        Path(info["kubeconfig"]).write_text(_kubeconfig(info["server"], info["ca_file"], st["token"], name))
        (d / "kcm.kubeconfig").write_text(_kubeconfig(info["server"], info["ca_file"], st["kcm_token"], name))
        os.chmod(info["kubeconfig"], 0o600)
        _start_cp_processes(cfg, name, st)
        return info


def start_control_plane(cfg: Config, name: str) -> dict[str, Any]:
    """Start a stopped control plane again: same port, token, certificates and data."""
    if name not in _cluster_states(cfg):
        raise KeyError(f"no control plane {name!r}")
    return ensure_control_plane(cfg, name)


def stop_control_plane(cfg: Config, name: str) -> None:
    """Stop the apiserver and controller manager of ``name``; its data stays in etcd (fault tests)."""
    with _lock(cfg):
        stop_process(f"kube-{name}-node-agent", cfg)
        stop_process(f"kube-{name}-controller-manager", cfg)
        stop_process(f"kube-{name}-apiserver", cfg)
    progress(f"stopped control plane {name}")


def delete_control_plane(cfg: Config, name: str) -> None:
    """Stop ``name`` and remove everything of it: its etcd prefix, certificates and state."""
    stop_control_plane(cfg, name)
    with _lock(cfg):
        if _etcd_state(cfg) and is_running("kube-etcd", cfg):
            n = _etcd_delete_prefix(_etcd_url(cfg), _etcd_prefix(name) + "/")
            progress(f"deleted control plane {name} ({n} etcd keys)")
        shutil.rmtree(_cdir(cfg, name), ignore_errors=True)
        with locked_state(cfg) as s:
            (s.get("kube") or {}).get("clusters", {}).pop(name, None)


def list_control_planes(cfg: Config) -> list[str]:
    return sorted(_cluster_states(cfg))


def control_plane_status(cfg: Config, name: str) -> dict[str, Any]:
    st = _cluster_states(cfg)[name]
    api = read_pid(f"kube-{name}-apiserver", cfg)
    kcm = read_pid(f"kube-{name}-controller-manager", cfg)
    return {**_cp_info(cfg, name, st), "running": api is not None,
            "apiserver_pid": api, "controller_manager_pid": kcm,
            "controller_manager_running": kcm is not None,
            "apiserver_rss_mb": _rss_mb(api), "controller_manager_rss_mb": _rss_mb(kcm)}


def default_cluster_names(n: int) -> list[str]:
    return [DEFAULT_CLUSTER] + [f"workload-{i}" for i in range(1, max(n, 1))]


def api_client(info: dict[str, Any]):
    """A ``kubernetes.client.ApiClient`` for a control plane (TLS verified against its CA)."""
    from kubernetes import client

    c = client.Configuration()
    c.host = info["server"]
    c.ssl_ca_cert = info["ca_file"]
    c.verify_ssl = True
    c.api_key = {"BearerToken": info["token"]}
    c.api_key_prefix = {"BearerToken": "Bearer"}
    return client.ApiClient(c)


# --------------------------------------------------------------------------- contract


def up(cfg: Config) -> dict[str, Any]:
    """Build if needed, start etcd and ``cfg.kube_clusters`` control planes (mgmt, workload-1, ...).

    Control planes made on demand (``ensure_control_plane``) are listed too while they run; they
    are not started again here. Returns the JSON section.
    """
    build(cfg)
    names = default_cluster_names(cfg.kube_clusters)
    clusters = {n: ensure_control_plane(cfg, n) for n in names}
    states = _cluster_states(cfg)
    for n in list_control_planes(cfg):
        if n not in clusters and is_running(f"kube-{n}-apiserver", cfg):
            clusters[n] = _cp_info(cfg, n, states[n])
    return {"binaries": binaries(cfg), "etcd": {"url": _etcd_url(cfg)}, "clusters": clusters}


def down(cfg: Config) -> None:
    """Stop every control plane and etcd; the cluster data (etcd, certificates, tokens) is removed."""
    with _lock(cfg):
        for name in list_control_planes(cfg):
            stop_process(f"kube-{name}-node-agent", cfg)
            stop_process(f"kube-{name}-controller-manager", cfg)
            stop_process(f"kube-{name}-apiserver", cfg)
        # also anything with a pid file but no state entry (half-made control planes)
        if cfg.pid_dir.exists():
            for f in sorted(cfg.pid_dir.glob("kube-*.pid")):
                if f.stem != "kube-etcd":
                    stop_process(f.stem, cfg)
        stop_process("kube-etcd", cfg)
        shutil.rmtree(cfg.state_dir / "kube", ignore_errors=True)
        with locked_state(cfg) as s:
            s.pop("kube", None)
    progress("stopped kube (etcd and control planes)")


def status(cfg: Config) -> dict[str, Any]:
    et = _etcd_state(cfg)
    etcd_pid = read_pid("kube-etcd", cfg)
    return {
        "running": etcd_pid is not None,
        "binaries": binaries(cfg),
        "built": _built(cfg),
        "etcd": {"url": f"http://127.0.0.1:{et['client_port']}" if et else None, "running": etcd_pid is not None,
                 "pid": etcd_pid, "rss_mb": _rss_mb(etcd_pid)},
        "clusters": {n: control_plane_status(cfg, n) for n in list_control_planes(cfg)},
    }


if __name__ == "__main__":  # python -m testenv.kube build
    import sys

    if sys.argv[1:] == ["build"]:
        print(json.dumps(build(Config()), indent=2))
