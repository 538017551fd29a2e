"""AWS part of the test environment: moto's server (plus EKS updates/add-ons and faults).

The server runs in its own process (``python -m testenv.aws_server``), so every process of a
run (pytest, the demo, a Prefect worker) talks to the same fake account.  See
``testenv/aws_server.py`` for what it adds to moto and for the control endpoints.

Section of the environment document::

    {"endpoint_url": "http://127.0.0.1:5000", "region": "eu-west-1",
     "access_key_id": "testing", "secret_access_key": "testing",
     "control_url": "http://127.0.0.1:5000/fleetwright-testenv", "pid": 1234}
"""
from __future__ import annotations

import json
import os
import socket
import sys
import urllib.request
from pathlib import Path
from typing import Any

from testenv.common import (
    Config,
    file_lock,
    get_state,
    progress,
    read_pid,
    start_process,
    stop_process,
    update_state,
    wait_for,
)

NAME = "aws"
DEFAULT_PORT = 5000
REGION = "eu-west-1"
CONTROL_PREFIX = "/fleetwright-testenv"
REPO_ROOT = Path(__file__).resolve().parent.parent


def _cfg(cfg: Config | None) -> Config:
    return cfg if cfg is not None else Config()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_port(cfg: Config) -> int:
    want = (cfg.options.get("aws") or {}).get("port")
    if want:
        return int(want)
    if _port_free(DEFAULT_PORT):
        return DEFAULT_PORT
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(endpoint_url: str, timeout: float = 2.0) -> dict[str, Any]:
    with urllib.request.urlopen(endpoint_url + CONTROL_PREFIX + "/health",
                                timeout=timeout) as r:
        return json.load(r)


def section_for(port: int, pid: int | None = None) -> dict[str, Any]:
    ep = f"http://127.0.0.1:{port}"
    d: dict[str, Any] = {"endpoint_url": ep, "region": REGION, "access_key_id": "testing",
                         "secret_access_key": "testing", "control_url": ep + CONTROL_PREFIX}
    if pid is not None:
        d["pid"] = pid
    return d


def up(cfg: Config | None = None) -> dict[str, Any]:
    """Start the AWS server if it is not running; return its section (same on every call)."""
    cfg = _cfg(cfg)
    with file_lock(cfg.path("aws.lock"), "aws up"):
        pid = read_pid(NAME, cfg)
        sec = get_state(cfg, NAME)
        if pid is not None and sec:
            try:
                if health(sec["endpoint_url"]).get("pid") == pid:
                    return sec
            except OSError:
                pass
        if pid is not None:  # running but not answering: start afresh
            stop_process(NAME, cfg)
        opts = cfg.options.get("aws") or {}
        port = _pick_port(cfg)
        progress(f"aws: starting moto server on 127.0.0.1:{port}")
        argv = [sys.executable, "-m", "testenv.aws_server", "--port", str(port)]
        if "update_seconds" in opts:
            argv += ["--update-seconds", str(opts["update_seconds"])]
        if "addon_seconds" in opts:
            argv += ["--addon-seconds", str(opts["addon_seconds"])]
        if "create_seconds" in opts:
            argv += ["--create-seconds", str(opts["create_seconds"])]
        pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH"))
                                     if p)
        # AWS managed IAM policies (AmazonEKSClusterPolicy, ...) exist in every real account; moto loads them on request.
        # Its ~2,600 default AMIs are not needed (fleetwright launches no instances) and cost time on every reset.
        env = {"PYTHONPATH": pythonpath, "MOTO_IAM_LOAD_MANAGED_POLICIES": "true", "MOTO_EC2_LOAD_DEFAULT_AMIS": "false"}
        pid = start_process(NAME, argv, env=env, cfg=cfg, cwd=REPO_ROOT)
        sec = section_for(port, pid)

        def ready() -> bool:
            if read_pid(NAME, cfg) is None:
                raise RuntimeError(f"aws server exited; see {cfg.log(NAME)}")
            return health(sec["endpoint_url"], timeout=1).get("pid") == pid

        try:
            wait_for(ready, 180, f"aws server on port {port}", interval=0.1)  # a loaded machine takes its time
        except Exception:
            stop_process(NAME, cfg)
            raise
        update_state(cfg, NAME, sec)
        progress(f"aws: ready at {sec['endpoint_url']} (pid {pid})")
        return sec


def down(cfg: Config | None = None) -> None:
    cfg = _cfg(cfg)
    with file_lock(cfg.path("aws.lock"), "aws down"):
        if stop_process(NAME, cfg):
            progress("aws: stopped")
        update_state(cfg, NAME, None)


def status(cfg: Config | None = None) -> dict[str, Any]:
    cfg = _cfg(cfg)
    pid = read_pid(NAME, cfg)
    sec = get_state(cfg, NAME) or {}
    out: dict[str, Any] = {"running": pid is not None, "pid": pid}
    if pid is not None and sec:
        out.update(sec)
        try:
            out["healthy"] = health(sec["endpoint_url"]).get("pid") == pid
        except OSError:
            out["healthy"] = False
    return out


def client_kwargs(section: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``boto3.client(service, **client_kwargs(env["aws"]))``."""
    sec = section.get("aws", section)
    return {"endpoint_url": sec["endpoint_url"], "region_name": sec["region"],
            "aws_access_key_id": sec["access_key_id"],
            "aws_secret_access_key": sec["secret_access_key"]}


def reset(cfg: Config | None = None) -> None:
    """Clean account: moto reset + EKS update/add-on tables + faults + call counters.

    Settings (update duration) and endpoint mappings stay: they configure the environment.
    """
    cfg = _cfg(cfg)
    sec = get_state(cfg, NAME)
    if not sec:
        raise RuntimeError("the aws part is not up")
    req = urllib.request.Request(sec["control_url"] + "/reset", data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()
