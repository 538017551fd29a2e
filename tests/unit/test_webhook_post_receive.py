"""`fleetwright webhook post-receive`: one signed generic delivery per pushed branch, with the pusher git
http-backend authenticated (REMOTE_USER). The receiver here is a plain local HTTP server recording requests."""
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from fleetwright.webhook.verify import hmac_hex

pytestmark = pytest.mark.unit
CLI = str(Path(sys.executable).parent / "fleetwright")


def test_post_receive_signs_each_branch_and_names_the_authenticated_pusher():
    got = []

    class H(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append((self.path, dict(self.headers), body))
            self.send_response(202)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        old, new = "1" * 40, "2" * 40
        lines = f"{old} {new} refs/heads/main\n{'0' * 40} {'3' * 40} refs/heads/feature\n"
        env = dict(os.environ, FLEETWRIGHT_WEBHOOK_SECRET="s3cret-value", REMOTE_USER="bob")
        r = subprocess.run([CLI, "webhook", "post-receive", "--url", f"http://127.0.0.1:{srv.server_port}",
                            "--repo-url", "http://git.example/defs.git"], input=lines, env=env, capture_output=True,
                           text=True, timeout=60)
    finally:
        srv.shutdown()
    assert r.returncode == 0, r.stderr
    assert "s3cret-value" not in r.stdout + r.stderr
    assert [p for p, _, _ in got] == ["/hooks/generic", "/hooks/generic"]
    path, headers, body = got[0]
    assert headers["X-Fleetwright-Signature"] == "sha256=" + hmac_hex(b"s3cret-value", body)
    payload = json.loads(body)
    assert (payload["ref"], payload["before"], payload["after"]) == ("refs/heads/main", old, new)
    assert payload["pusher"]["name"] == "bob" and payload["repository"]["clone_url"] == "http://git.example/defs.git"
    assert json.loads(got[1][2])["ref"] == "refs/heads/feature"


def test_post_receive_without_a_secret_is_an_error_and_sends_nothing():
    env = {k: v for k, v in os.environ.items() if k != "FLEETWRIGHT_WEBHOOK_SECRET"}
    r = subprocess.run([CLI, "webhook", "post-receive", "--url", "http://127.0.0.1:9", "--repo-url", "x"],
                       input="", env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "$FLEETWRIGHT_WEBHOOK_SECRET is empty" in r.stderr
