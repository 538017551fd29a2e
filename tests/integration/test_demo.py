"""The README's first command: `fleetwright demo` end to end, in its own test environment."""
from __future__ import annotations

import pytest

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.heavy  # runs in make test-heavy: ~10 min, its own whole test environment
def test_demo_runs_the_example_fleet_end_to_end(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import tempfile

    # a state dir the postgres user can traverse (pytest's own tmp dirs are private to root)
    state = tempfile.mkdtemp(prefix="fw-demo-testenv-", dir="/tmp")
    os.chmod(state, 0o755)
    env = dict(os.environ, FLEETWRIGHT_TESTENV_DIR=state)
    env.pop("PREFECT_API_URL", None)
    results = ROOT / "bench" / "RESULTS.md"
    before = results.read_text() if results.exists() else None
    cli = str(Path(sys.executable).parent / "fleetwright")
    try:
        r = subprocess.run([cli, "demo", "--port", str(port), "--keep"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=1200)
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-6000:]
        kept = _sweep_runs(port)
    finally:
        stop = subprocess.run([cli, "demo", "--stop"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert "prefect-worker: stopped" in stop.stdout and "prefect-server: stopped" in stop.stdout
    # timings are written only when asked (--record)
    assert (results.read_text() if results.exists() else None) == before
    # the schedule was paused while the scenario ran: only the demo's own two sweeps ran; kept, it is active again
    assert kept["ran"] == 2 and kept["schedules_active"] == [True], kept
    assert "reconcile-fleet's 15-minute schedule is paused while the demo runs" in out
    for line in ('create-cluster {"cluster": "us-web-staging"}: Completed',
                 'create-cluster {"cluster": "dc1-web-dev"}: Completed',
                 'create-cluster {"cluster": "edge-lab-01"}: Completed',
                 'onboard-team {"team": "payments"}: Completed',
                 'rollout-fleet {"clusters": ["us-web-staging"]}: Completed'):
        assert line in out, out[-6000:]
    # the version bump was pushed to Git: the post-receive hook's delivery started sync-from-git, which started
    # the rollout that upgraded the cluster
    pushed = out[out.index("the webhook starts sync-from-git"):out.index("change things behind")]
    assert "sync-from-git {\"after\": " in pushed and ": Completed" in pushed and "by the webhook" in pushed, pushed
    assert "us-web-staging   converged" in pushed, pushed
    assert "add-component" in out and "Prefect UI: http://127.0.0.1:" in out
    # the sweep corrected the correct-mode clusters and reported the report-mode one
    sweep = out[out.index("reconcile-fleet: report and correct"):]
    assert "us-web-staging   corrected" in sweep and "dc1-web-dev      corrected" in sweep
    assert "edge-lab-01      drift" in sweep
    # nothing left running from the demo's own environment
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path / "testenv")], capture_output=True, text=True).stdout
    assert not leftovers.strip(), leftovers


def _sweep_runs(port: int) -> dict:
    """reconcile-fleet runs that ran (not merely scheduled), and whether its schedule is active now."""
    from prefect.client.orchestration import PrefectClient, get_client  # noqa: F401
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{port}/api"}):
        with get_client(sync_client=True) as c:
            dep = c.read_deployment_by_name("reconcile-fleet/reconcile-fleet")
            runs = c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
            return {"ran": sum(1 for fr in runs if fr.state and fr.state.type.value not in ("SCHEDULED", "PENDING")),
                    "schedules_active": [s.active for s in dep.schedules]}
