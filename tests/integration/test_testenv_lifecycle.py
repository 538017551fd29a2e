"""`fleetwright testenv up|status|down` as a person runs it, in a state directory of its own
(so the session's shared environment is never touched)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testenv.common import Config

FLEETWRIGHT = [sys.executable, "-c", "from fleetwright.cli import main; main()"]
PARTS = "kube,vsphere"


def _cli(env: dict[str, str], *args: str, timeout: float = 900) -> tuple[dict, str, float]:
    t0 = time.monotonic()
    r = subprocess.run([*FLEETWRIGHT, "testenv", *args], env=env, capture_output=True, text=True, timeout=timeout,
                       cwd=Path(__file__).resolve().parents[2])
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, f"testenv {' '.join(args)} failed (rc={r.returncode}):\n{r.stderr[-3000:]}"
    return json.loads(r.stdout), r.stderr, elapsed  # stdout is exactly one JSON document


def _our_processes(state_dir: str) -> list[str]:
    """Live (non-zombie) processes started for this state dir: by environment or command line."""
    found = []
    marker = f"FLEETWRIGHT_TESTENV_DIR={state_dir}".encode()
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            stat = (p / "stat").read_text()
            if stat[stat.rfind(")") + 2] in "ZX":
                continue
            cmd = (p / "cmdline").read_bytes()
            environ = (p / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0") or state_dir.encode() in cmd:
            shown = cmd.replace(b"\0", b" ").decode(errors="replace")[:200]
            found.append(f"{p.name}: {shown}")
    return found


@pytest.fixture
def own_env(tmp_path_factory):
    state = str(tmp_path_factory.mktemp("testenv-lifecycle"))
    env = dict(os.environ, FLEETWRIGHT_TESTENV_DIR=state, FLEETWRIGHT_CACHE=str(Config().cache_dir))
    yield state, env
    # never leave anything behind, even when an assertion failed half way
    subprocess.run([*FLEETWRIGHT, "testenv", "down"], env=env, capture_output=True, timeout=120)


def test_up_twice_status_down(own_env):
    state, env = own_env
    doc1, err1, t1 = _cli(env, "up", "--only", PARTS, "--kube-clusters", "2")
    assert doc1["state_dir"] == state
    assert set(doc1["kube"]["clusters"]) == {"mgmt", "workload-1"}
    for c in doc1["kube"]["clusters"].values():
        assert c["server"].startswith("https://127.0.0.1:") and c["token"]
        assert Path(c["ca_file"]).is_file() and Path(c["kubeconfig"]).is_file()
    assert all(Path(b).is_file() for b in doc1["kube"]["binaries"].values())
    assert doc1["vsphere"]["url"].startswith("https://127.0.0.1:")
    assert json.loads(Path(state, "env.json").read_text()) == doc1
    assert "[testenv" in err1  # progress on stderr

    doc2, _, t2 = _cli(env, "up", "--only", PARTS, "--kube-clusters", "2")
    assert doc2 == doc1  # idempotent: same endpoints, tokens, pids
    assert t2 < 30, f"warm up took {t2:.1f}s"

    st, _, _ = _cli(env, "status")
    assert st["kube"]["etcd"]["running"]
    assert all(c["running"] and c["controller_manager_running"] for c in st["kube"]["clusters"].values())
    assert st["vsphere"]["running"] and st["vsphere"]["port"] == doc1["vsphere"]["port"]
    pids = [st["kube"]["etcd"]["pid"], st["vsphere"]["pid"]] + [
        c[k] for c in st["kube"]["clusters"].values() for k in ("apiserver_pid", "controller_manager_pid")]
    assert all(pids) and len(_our_processes(state)) >= len(pids)

    down, _, _ = _cli(env, "down")
    assert not down["errors"]
    left = _our_processes(state)
    assert not left, "processes left after down:\n" + "\n".join(left)
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().split(") ")[1][0] in "ZX", f"pid {pid} still runs"

    st2, _, _ = _cli(env, "status")
    assert not st2["vsphere"]["running"] and not st2["kube"]["etcd"]["running"] and st2["kube"]["clusters"] == {}
    # down twice is harmless
    _cli(env, "down")
