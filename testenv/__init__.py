"""fleetwright's test environment: real counterparts built, started and stopped on this machine.

Parts (each a module with ``up(cfg) -> dict``, ``down(cfg)``, ``status(cfg) -> dict``; see
``testenv.common``):

* ``kube``    -- ``testenv.kube``: etcd + kube-apiserver/kube-controller-manager v1.20.2
* ``vsphere`` -- ``testenv.vcsim``: govmomi's vcsim
* ``aws``     -- ``testenv.aws``: moto server
* ``hosts``   -- ``testenv.hosts``: SSH hosts on loopback aliases
* ``postgres`` -- ``testenv.postgres``: PostgreSQL for the Prefect server of the production topology
* ``git``     -- ``testenv.git``: a Git server (git http-backend over HTTP, token auth)
* ``machines`` -- ``testenv.machines``: systemd-nspawn machines on a private bridge (kubeadm path);
  only when asked for (not in a plain ``up``)

:func:`up` / :func:`down` / :func:`status` orchestrate them; ``fleetwright testenv`` is the CLI.
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable

from testenv.common import DEFAULT_PARTS, PARTS, Config, progress, read_pid, stop_process

PART_MODULES = {"kube": "testenv.kube", "vsphere": "testenv.vcsim", "aws": "testenv.aws", "hosts": "testenv.hosts",
                "postgres": "testenv.postgres",
                "git": "testenv.git", "machines": "testenv.machines"}


class PartUnavailable(RuntimeError):
    """The module of a part does not exist (yet) or cannot be imported."""


def load_part(part: str) -> ModuleType:
    if part not in PART_MODULES:
        raise ValueError(f"unknown part {part!r}; known: {', '.join(PARTS)}")
    modname = PART_MODULES[part]
    try:
        return importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name == modname:
            raise PartUnavailable(f"{part}: module {modname} does not exist yet") from None
        raise PartUnavailable(f"{part}: cannot import {modname}: {e}") from e
    except ImportError as e:
        raise PartUnavailable(f"{part}: cannot import {modname}: {e}") from e


def parse_only(only: str | Iterable[str] | None) -> tuple[str, ...]:
    if not only:
        return DEFAULT_PARTS
    items = [p.strip() for p in (only.split(",") if isinstance(only, str) else only) if p.strip()]
    bad = [p for p in items if p not in PARTS]
    if bad:
        raise ValueError(f"unknown part(s) {', '.join(bad)}; known: {', '.join(PARTS)}")
    return tuple(p for p in PARTS if p in items)


def env_file(cfg: Config) -> Path:
    return cfg.state_dir / "env.json"


def read_env(cfg: Config) -> dict[str, Any]:
    try:
        return json.loads(env_file(cfg).read_text())
    except (OSError, ValueError):
        return {}


def _write_env(cfg: Config, doc: dict[str, Any]) -> None:
    f = env_file(cfg)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, f)


def _base_doc(cfg: Config) -> dict[str, Any]:
    return {"state_dir": str(cfg.state_dir), "cache_dir": str(cfg.cache_dir), "env_file": str(env_file(cfg))}


def up_part(cfg: Config, part: str) -> dict[str, Any]:
    """Start one part and merge its section into ``env.json``."""
    section = load_part(part).up(cfg)
    doc = {**read_env(cfg), **_base_doc(cfg)}
    doc[part] = section
    _write_env(cfg, doc)
    return section


def up(cfg: Config, strict: bool | None = None) -> dict[str, Any]:
    """Start the parts in ``cfg.only`` (in the order of ``PARTS``).

    A part whose module does not exist is reported in the document as
    ``{"available": false, "error": ...}`` unless ``strict`` (default: when ``cfg.only`` names
    parts explicitly), in which case it raises. Any other failure raises.
    """
    if strict is None:
        strict = tuple(cfg.only) != DEFAULT_PARTS
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    doc = {**read_env(cfg), **_base_doc(cfg)}
    _prebuild(cfg)
    for part in cfg.only:
        try:
            mod = load_part(part)
        except PartUnavailable as e:
            if strict:
                raise
            progress(f"skipping {e}")
            doc[part] = {"available": False, "error": str(e)}
            continue
        progress(f"== {part}")
        doc[part] = mod.up(cfg)
        _write_env(cfg, doc)
    _write_env(cfg, doc)
    return doc


def build_all(cfg: Config) -> dict[str, Any]:
    """Install and build, once and cached, everything the test suite's parts need; start nothing.

    ``make test`` runs this before any test: a cold build (Kubernetes from Debian's source, ~13 min on
    2 cores) must not run inside a test, whose timeout would kill it half-way and leave every later
    test waiting on a new one. vcsim and the machines' base rootfs build beside the Kubernetes build;
    the machine images follow it. Returns the seconds each step took (0 when it was cached)."""
    import threading
    import time

    from testenv import kube, machines, postgres, vcsim
    from testenv.common import apt_install

    took: dict[str, float] = {}
    errors: list[BaseException] = []

    def step(name: str, fn, *args) -> None:
        t0 = time.monotonic()
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the other steps
            errors.append(e)
            progress(f"build {name} failed: {type(e).__name__}: {e}")
        took[name] = round(time.monotonic() - t0, 1)

    apt_install([*postgres.PACKAGES, "git", "iptables"])
    side = [threading.Thread(target=step, args=("vcsim", vcsim.build, cfg), daemon=True),
            threading.Thread(target=step, args=("machines-rootfs", machines.base_rootfs, cfg), daemon=True)]
    for t in side:
        t.start()
    step("kubernetes", kube.build, cfg, True)
    for t in side:
        t.join()
    if not errors:
        for version in (kube.KUBE_VERSION, kube.UPGRADE_VERSION):
            step(f"images-{version}", machines.images, cfg, version)
    if errors:
        raise errors[0]
    return {"cache_dir": str(cfg.cache_dir), "seconds": took}


def _prebuild(cfg: Config) -> None:
    """Build the small parts (vcsim) in the background while the big one (kube) builds."""
    import threading

    if "kube" not in cfg.only or "vsphere" not in cfg.only:
        return
    try:
        from testenv import kube, vcsim
    except ImportError:
        return
    if kube._built(cfg) or os.access(vcsim.binary(cfg), os.X_OK):
        return

    def build() -> None:
        try:
            vcsim.build(cfg)
        except Exception as e:  # noqa: BLE001 - vcsim.up builds (and reports) again
            progress(f"background vcsim build failed: {e}")

    threading.Thread(target=build, name="vcsim-build", daemon=True).start()


def down(cfg: Config, only: Iterable[str] | None = None) -> dict[str, Any]:
    """Stop the given parts (default all, in reverse order), then every process left with a pid file."""
    parts = parse_only(only) if only else PARTS
    errors: dict[str, str] = {}
    for part in reversed(parts):
        try:
            mod = load_part(part)
        except PartUnavailable:
            continue
        try:
            mod.down(cfg)
        except Exception as e:  # noqa: BLE001 - keep stopping the others
            errors[part] = f"{type(e).__name__}: {e}"
            progress(f"{part} down failed: {errors[part]}")
    stopped = []
    if parts == PARTS and cfg.pid_dir.exists():
        for f in sorted(cfg.pid_dir.glob("*.pid")):
            if read_pid(f.stem, cfg) is not None:
                stopped.append(f.stem)
            stop_process(f.stem, cfg)
    if stopped:
        progress(f"stopped leftover processes: {', '.join(stopped)}")
    doc = read_env(cfg)
    for part in parts:
        doc.pop(part, None)
    if parts == PARTS:
        env_file(cfg).unlink(missing_ok=True)
    elif doc:
        _write_env(cfg, doc)
    return {"state_dir": str(cfg.state_dir), "stopped": list(parts), "leftovers_killed": stopped, "errors": errors}


def status(cfg: Config, only: Iterable[str] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = _base_doc(cfg)
    for part in parse_only(only) if only else PARTS:
        try:
            doc[part] = load_part(part).status(cfg)
        except PartUnavailable as e:
            doc[part] = {"available": False, "error": str(e)}
        except Exception as e:  # noqa: BLE001
            doc[part] = {"error": f"{type(e).__name__}: {e}"}
    return doc
