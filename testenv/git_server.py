"""The test environment's Git server: git's own smart HTTP protocol (``git http-backend``) behind Basic auth.

Run as ``python -m testenv.git_server --root DIR --port P --token-file F`` (``testenv.git`` starts it).
Every request must carry HTTP Basic credentials ``fleetwright:<token>`` (the token file's content);
a wrong or missing one gets 401, as a Git host answers a bad token. Authenticated requests are handed
to ``git http-backend`` (CGI) with ``REMOTE_USER`` set, so clones, fetches and pushes are the real
protocol (v0/v1/v2, gzip and chunked request bodies) over the network, to bare repositories under
``--root``.

Fault control (not Git): ``/fleetwright-testenv/hold-push`` (POST) arms a hold on the NEXT push: its
first request (``GET .../info/refs?service=git-receive-pack``) waits until
``/fleetwright-testenv/release`` (POST), and ``/fleetwright-testenv/held`` (GET) says how many requests
are waiting. A test pushes another commit meanwhile, so the held push is rejected as non-fast-forward,
exactly as when someone else pushed first. Control requests need the same credentials.
"""
from __future__ import annotations

import argparse
import base64
import hmac
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

CONTROL = "/fleetwright-testenv"
USER = "fleetwright"  # the service account (fleetwright's own block); the control endpoints take only it
PEOPLE = ("alice", "bob", "carol")  # personal accounts, so a push names the person who made it (REMOTE_USER)


def person_token(master: str, person: str) -> str:
    """A person's password on this server, derived from the server's token (nothing more to store)."""
    return hmac.new(master.encode(), f"person:{person}".encode(), "sha256").hexdigest()[:40]


class _State:
    def __init__(self, root: str, token: str) -> None:
        self.root, self.token = root, token
        self.lock = threading.Condition()
        self.armed = 0
        self.held = 0
        self.released = 0
        self.pushes = 0


class Handler(BaseHTTPRequestHandler):
    server_version = "fleetwright-testenv-git/1"
    protocol_version = "HTTP/1.1"
    state: _State

    def log_message(self, fmt: str, *args) -> None:  # never the Authorization header
        sys.stderr.write(f"{time.strftime('%F %T')} {self.address_string()} {fmt % args}\n")

    # ------------------------------------------------------------------ helpers
    def _send(self, code: int, body: bytes = b"", ctype: str = "text/plain", extra: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _authorized(self) -> str | None:
        """The authenticated account, or None."""
        h = self.headers.get("Authorization", "")
        if not h.startswith("Basic "):
            return None
        try:
            user, _, pw = base64.b64decode(h[6:]).decode().partition(":")
        except ValueError:
            return None
        if hmac.compare_digest(user, USER) and hmac.compare_digest(pw, self.state.token):
            return USER
        if user in PEOPLE and hmac.compare_digest(pw, person_token(self.state.token, user)):
            return user
        return None

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    # ------------------------------------------------------------------ control
    def _control(self, path: str) -> None:
        st = self.state
        with st.lock:
            if path == "/hold-push" and self.command == "POST":
                st.armed += 1
            elif path == "/release" and self.command == "POST":
                st.released += 1
                st.armed = 0  # a hold nobody used is dropped too
                st.lock.notify_all()
            elif path not in ("/held", "/health"):
                self._send(404, b"unknown control path\n")
                return
            doc = {"armed": st.armed, "held": st.held, "pushes": st.pushes, "pid": os.getpid()}
        self._send(200, json.dumps(doc).encode(), "application/json")

    def _maybe_hold(self, query: str) -> None:
        if "service=git-receive-pack" not in query or self.command != "GET":
            return
        st = self.state
        with st.lock:
            st.pushes += 1
            if st.armed <= 0:
                return
            st.armed -= 1
            st.held += 1
            ticket = st.released
            st.lock.wait_for(lambda: st.released > ticket, timeout=300)
            st.held -= 1

    # ------------------------------------------------------------------ git
    def _handle(self) -> None:
        parts = urlsplit(self.path)
        user = self._authorized()
        if user is None:
            self._send(401, b"authentication required\n", extra={"WWW-Authenticate": 'Basic realm="fleetwright-testenv"'})
            return
        if parts.path.startswith(CONTROL):
            if user != USER:
                self._send(403, b"the control endpoints are for the service account\n")
                return
            self._control(parts.path[len(CONTROL):])
            return
        self._maybe_hold(parts.query)
        body = self._body() if self.command == "POST" else b""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": self.state.root, "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": parts.path, "QUERY_STRING": parts.query, "REQUEST_METHOD": self.command,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""), "CONTENT_LENGTH": str(len(body)),
            "REMOTE_USER": user, "REMOTE_ADDR": self.client_address[0], "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PROTOCOL": "HTTP/1.1",
        }
        if self.headers.get("Content-Encoding"):
            env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
        if self.headers.get("Git-Protocol"):
            env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
        r = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True)
        if r.stderr:
            sys.stderr.write(r.stderr.decode(errors="replace"))
        head, sep, rest = r.stdout.partition(b"\r\n\r\n")
        if not sep:
            head, sep, rest = r.stdout.partition(b"\n\n")
        code, headers = 200, {}
        for line in head.decode(errors="replace").splitlines():
            k, _, v = line.partition(":")
            if k.lower() == "status":
                code = int(v.strip().split()[0])
            elif k:
                headers[k.strip()] = v.strip()
        self.send_response(code)
        for k, v in headers.items():
            if k.lower() != "content-length":
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(rest)))
        self.end_headers()
        self.wfile.write(rest)

    do_GET = do_POST = do_HEAD = _handle


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--token-file", required=True)
    a = p.parse_args(argv)
    with open(a.token_file) as f:
        token = f.read().strip()
    Handler.state = _State(os.path.abspath(a.root), token)
    srv = ThreadingHTTPServer((a.host, a.port), Handler)
    srv.daemon_threads = True
    sys.stderr.write(f"git server on http://{a.host}:{a.port} serving {a.root}\n")
    sys.stderr.flush()
    srv.serve_forever()


if __name__ == "__main__":
    main()
