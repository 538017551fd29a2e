"""The README's first command: `fleetwright demo` end to end, in its own test environment."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_the_example_fleet_end_to_end(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, FLEETWRIGHT_TESTENV_DIR=str(tmp_path / "testenv"))
    env.pop("PREFECT_API_URL", None)
    r = subprocess.run([str(Path(sys.executable).parent / "fleetwright"), "demo", "--port", str(port), "--no-record"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    for line in ('create-cluster {"cluster": "us-web-staging"}: Completed',
                 'create-cluster {"cluster": "dc1-web-dev"}: Completed',
                 'create-cluster {"cluster": "edge-lab-01"}: Completed',
                 'onboard-team {"team": "payments"}: Completed',
                 'upgrade-cluster {"cluster": "us-web-staging", "to_version": "1.21"}: Completed'):
        assert line in out, out[-6000:]
    assert "add-component" in out and "Prefect UI: http://127.0.0.1:" in out
    # the sweep corrected the correct-mode clusters and reported the report-mode one
    sweep = out[out.index("reconcile-fleet: report and correct"):]
    assert "us-web-staging   corrected" in sweep and "dc1-web-dev      corrected" in sweep
    assert "edge-lab-01      drift" in sweep
    # nothing left running from the demo's own environment
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path / "testenv")], capture_output=True, text=True).stdout
    assert not leftovers.strip(), leftovers
