"""Fault injection for tests and the demo: AWS API faults and SSH host faults.

``env`` is the environment document (``{"aws": {...}, "hosts": {...}, ...}``) or just the
part's section.

AWS (served by ``testenv.aws_server``; see its docstring for the spec keys)::

    aws_fault(env, service="eks", action="DescribeCluster", status=429, count=2)
    aws_fault(env, service="ec2", status=503, rate=0.3)          # 30 % of all EC2 calls
    aws_fault(env, service="eks", action="*", status=0, latency_ms=300)   # latency only
    aws_faults(env)        # {"faults": [... with matched/injected/delayed counters], ...}
    aws_clear_faults(env)
    aws_reset(env)         # clean account (and no faults)
    aws_calls(env)         # {"eks:DescribeCluster": 3, ...}
    aws_concurrency(env)   # {"in_flight": 0, "peak": 4}: calls served at once (reset=True: peak := now)
    aws_settings(env, update_seconds=0.2, addon_seconds=0.2)
    aws_map_endpoint(env, "c1", "https://127.0.1.11:6443", ca_b64)   # DescribeCluster -> local API
    aws_clear_endpoints(env)

Hosts (``address`` is the host's 127.0.1.x address)::

    host_freeze(env, address) / host_thaw(env, address)  SIGSTOP / SIGCONT every process of it
    host_drop(env, address) / host_undrop(env, address)  iptables DROP of packets to the address
    host_kill(env, address)                   SIGKILL everything in the host (power cut)
    host_restart(env, address)                power cut, then boot again (files kept)

For the host helpers ``env`` names the state dir the host belongs to (the hosts section
carries ``state_dir``); it may also be a ``testenv.common.Config``, or be left out:
``host_freeze("127.0.1.11")`` uses ``FLEETWRIGHT_TESTENV_DIR`` (default /tmp/fleetwright-testenv).
"""
from __future__ import annotations

import json
import urllib.request
from typing import Any

from testenv import hosts as _hosts
from testenv.common import Config

# --------------------------------------------------------------------------- AWS


def _control(env: dict[str, Any]) -> str:
    sec = env.get("aws", env)
    return sec["control_url"].rstrip("/")


def _call(env: dict[str, Any], method: str, what: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{_control(env)}/{what}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{method} {what}: {e.code} {e.read().decode(errors='replace')}")


def aws_fault(env: dict[str, Any], **spec: Any) -> dict[str, Any]:
    """Add a fault.  Keys: service, action (botocore operation name, "*" for all), status
    (429 default; 5xx; 0 = latency only), code, message, rate (0..1), count, latency_ms,
    method, path (regex on the URL path).  Returns the fault with its ``id``."""
    return _call(env, "POST", "faults", spec)


def aws_faults(env: dict[str, Any]) -> dict[str, Any]:
    return _call(env, "GET", "faults")


def aws_clear_faults(env: dict[str, Any], fault_id: str | None = None) -> None:
    _call(env, "DELETE", f"faults/{fault_id}" if fault_id else "faults")


def aws_reset(env: dict[str, Any]) -> None:
    _call(env, "POST", "reset", {})


def aws_calls(env: dict[str, Any], clear: bool = False) -> dict[str, int]:
    return _call(env, "DELETE" if clear else "GET", "calls")


def aws_concurrency(env: dict[str, Any], reset: bool = False) -> dict[str, int]:
    """API calls the AWS server is serving at once: ``{"in_flight": n, "peak": m}`` (``reset``: peak := now)."""
    return _call(env, "DELETE" if reset else "GET", "concurrency")


def aws_settings(env: dict[str, Any], **settings: float) -> dict[str, float]:
    return _call(env, "POST", "settings", settings) if settings else _call(env, "GET",
                                                                              "settings")


def aws_map_endpoint(env: dict[str, Any], cluster: str, endpoint: str,
                     certificate_authority: str = "") -> dict[str, Any]:
    """Make DescribeCluster of EKS cluster ``cluster`` report a local Kubernetes API."""
    return _call(env, "POST", "endpoints", {"cluster": cluster, "endpoint": endpoint,
                                            "certificate_authority": certificate_authority})


def aws_clear_endpoints(env: dict[str, Any]) -> None:
    """Forget every endpoint mapping: DescribeCluster reports moto's own values again."""
    _call(env, "DELETE", "endpoints")


# --------------------------------------------------------------------------- hosts


def _host_args(env: Any, address: str | None) -> tuple[Config, str]:
    """Accepts (env, address), (hosts_section, address), (Config, address) or (address,)."""
    if address is None:
        env, address = None, env
    if isinstance(env, Config):
        return env, address
    if isinstance(env, dict):
        sec = env["hosts"] if isinstance(env.get("hosts"), dict) else env
        if sec.get("state_dir"):
            return Config(state_dir=sec["state_dir"]), address
    return Config(), address


def host_freeze(env: Any, address: str | None = None) -> int:
    """SIGSTOP every process in the host's mount namespace; returns how many."""
    cfg, address = _host_args(env, address)
    return _hosts.host_freeze(cfg, address)


def host_thaw(env: Any, address: str | None = None) -> int:
    cfg, address = _host_args(env, address)
    return _hosts.host_thaw(cfg, address)


def host_drop(env: Any, address: str | None = None) -> None:
    cfg, address = _host_args(env, address)
    _hosts.host_drop(address, cfg)


def host_undrop(env: Any, address: str | None = None) -> None:
    cfg, address = _host_args(env, address)
    _hosts.host_undrop(address, cfg)


def host_kill(env: Any, address: str | None = None) -> int:
    cfg, address = _host_args(env, address)
    return _hosts.host_kill(cfg, address)


def host_restart(env: Any, address: str | None = None) -> dict[str, Any]:
    cfg, address = _host_args(env, address)
    return _hosts.host_restart(cfg, address)
