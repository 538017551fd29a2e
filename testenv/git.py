"""Git part of the test environment: a real Git server reached over the network (smart HTTP).

``testenv/git_server.py`` runs ``git http-backend`` (Debian's ``git`` package; installed by ``up``
when missing) behind HTTP Basic auth on a free 127.0.0.1 port. Clients speak git's own protocol
to it: ``git clone http://127.0.0.1:PORT/NAME.git`` with user ``fleetwright`` and the random
token below (a token, as GitHub/GitLab/Gitea take one over HTTPS). Bare repositories live in
``<state_dir>/git/repos/NAME.git``; pushes are accepted (``http.receivepack``).

Section of the environment document::

    {"url": "http://127.0.0.1:41234", "user": "fleetwright", "token": "9f...",
     "root": "/tmp/fleetwright-testenv/git/repos", "control_url": "http://127.0.0.1:41234/fleetwright-testenv",
     "pid": 1234}

Python API: :func:`create_repo` (a bare repository, optionally seeded from a directory),
:func:`repo_url`, :func:`askpass_env` (environment for a ``git`` command of a test that must
authenticate), and :func:`hold_next_push` (a context manager: the next push waits until the
block has pushed something else, so it is rejected as non-fast-forward).
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from testenv.common import (Config, apt_install, file_lock, free_port, get_state, progress, read_pid, start_process,
                            stop_process, update_state, wait_for, which)

NAME = "git"
USER = "fleetwright"
REPO_ROOT = Path(__file__).resolve().parent.parent
CONTROL = "/fleetwright-testenv"


def _cfg(cfg: Config | None) -> Config:
    return cfg if cfg is not None else Config()


def _dirs(cfg: Config) -> tuple[Path, Path]:
    base = cfg.state_dir / "git"
    repos = base / "repos"
    repos.mkdir(parents=True, exist_ok=True)
    return base, repos


def _request(sec: dict, path: str, method: str = "GET", timeout: float = 5.0) -> dict:
    auth = base64.b64encode(f"{sec['user']}:{sec['token']}".encode()).decode()
    req = urllib.request.Request(sec["control_url"] + path, data=b"" if method == "POST" else None, method=method,
                                 headers={"Authorization": f"Basic {auth}"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def up(cfg: Config | None = None) -> dict[str, Any]:
    """Start the Git server if it is not running; return its section (the same on every call)."""
    cfg = _cfg(cfg)
    if not which("git") or not Path("/usr/lib/git-core/git-http-backend").exists():
        apt_install(["git"])
    with file_lock(cfg.path("git.lock"), "git up"):
        pid, sec = read_pid(NAME, cfg), get_state(cfg, NAME)
        if pid is not None and sec:
            try:
                if _request(sec, "/health").get("pid") == pid:
                    return sec
            except OSError:
                pass
            stop_process(NAME, cfg)
        base, repos = _dirs(cfg)
        token_file = base / "token"
        if not token_file.exists():
            fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(20))
        token = token_file.read_text().strip()
        port = int((cfg.options.get("git") or {}).get("port") or free_port())
        progress(f"git: starting the Git server (git http-backend) on 127.0.0.1:{port}")
        pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        pid = start_process(NAME, [sys.executable, "-m", "testenv.git_server", "--root", str(repos), "--port", str(port),
                                   "--token-file", str(token_file)], env={"PYTHONPATH": pythonpath}, cfg=cfg, cwd=REPO_ROOT)
        url = f"http://127.0.0.1:{port}"
        sec = {"url": url, "user": USER, "token": token, "root": str(repos), "control_url": url + CONTROL, "pid": pid}

        def ready() -> bool:
            if read_pid(NAME, cfg) is None:
                raise RuntimeError(f"git server exited; see {cfg.log(NAME)}")
            return _request(sec, "/health", timeout=1).get("pid") == pid

        try:
            wait_for(ready, 30, f"git server on port {port}", interval=0.1)
        except Exception:
            stop_process(NAME, cfg)
            raise
        update_state(cfg, NAME, sec)
        progress(f"git: ready at {url} (pid {pid})")
        return sec


def down(cfg: Config | None = None) -> None:
    """Stop the server and delete its repositories (the next ``up`` starts empty)."""
    cfg = _cfg(cfg)
    with file_lock(cfg.path("git.lock"), "git down"):
        if stop_process(NAME, cfg):
            progress("git: stopped")
        update_state(cfg, NAME, None)
        shutil.rmtree(cfg.state_dir / "git", ignore_errors=True)


def status(cfg: Config | None = None) -> dict[str, Any]:
    cfg = _cfg(cfg)
    pid, sec = read_pid(NAME, cfg), get_state(cfg, NAME) or {}
    out: dict[str, Any] = {"running": pid is not None, "pid": pid}
    if pid is not None and sec:
        out.update({k: v for k, v in sec.items() if k != "token"})
        try:
            out["healthy"] = _request(sec, "/health").get("pid") == pid
        except OSError:
            out["healthy"] = False
        out["repos"] = sorted(p.name for p in Path(sec["root"]).glob("*.git"))
    return out


# --------------------------------------------------------------------------- helpers for tests and the demo


def repo_url(sec: dict, name: str) -> str:
    return f"{sec['url']}/{name}.git"


@contextlib.contextmanager
def askpass_env(sec: dict) -> Iterator[dict[str, str]]:
    """Environment for a ``git`` command that authenticates to the server (token via GIT_ASKPASS, not argv)."""
    d = tempfile.mkdtemp(prefix="fw-testenv-git-")
    try:
        script = Path(d) / "askpass"
        script.write_text('#!/bin/sh\ncase "$1" in Username*) echo "$FW_TESTENV_GIT_USER";; '
                          '*) echo "$FW_TESTENV_GIT_TOKEN";; esac\n')
        script.chmod(0o700)
        yield dict(os.environ, GIT_ASKPASS=str(script), GIT_TERMINAL_PROMPT="0", FW_TESTENV_GIT_USER=sec["user"],
                   FW_TESTENV_GIT_TOKEN=sec["token"])
    finally:
        shutil.rmtree(d, ignore_errors=True)


def as_person(sec: dict, person: str) -> dict:
    """The section with a person's own account instead of the service account (unchanged for others)."""
    from .git_server import PEOPLE, person_token

    return dict(sec, user=person, token=person_token(sec["token"], person)) if person in PEOPLE else sec


def git(sec: dict, *args: str, cwd: Path | str | None = None) -> str:
    """Run ``git ARGS`` authenticated to the server; returns stdout, raises with stderr on failure."""
    with askpass_env(sec) as env:
        r = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"git {' '.join(args[:2])} failed: {r.stderr.strip()}")
    return r.stdout


def create_repo(sec: dict, name: str, seed: Path | str | None = None, branch: str = "main",
                author: str = "platform") -> str:
    """A fresh bare repository ``NAME.git`` (replacing one of that name); with ``seed``, its first commit
    holds the seed directory's files, pushed over the network. Returns the clone URL."""
    bare = Path(sec["root"]) / f"{name}.git"
    shutil.rmtree(bare, ignore_errors=True)
    subprocess.run(["git", "init", "-q", "--bare", "-b", branch, str(bare)], check=True, capture_output=True)
    subprocess.run(["git", "-C", str(bare), "config", "http.receivepack", "true"], check=True)
    url = repo_url(sec, name)
    if seed is not None:
        with tempfile.TemporaryDirectory(prefix="fw-testenv-seed-") as tmp:
            work = Path(tmp) / "w"
            shutil.copytree(seed, work)
            ident = ["-c", f"user.name={author}", "-c", f"user.email={author}@fleetwright.invalid"]
            subprocess.run(["git", "init", "-q", "-b", branch, str(work)], check=True, capture_output=True)
            subprocess.run(["git", "-C", str(work), "add", "-A"], check=True, capture_output=True)
            subprocess.run(["git", "-C", str(work), *ident, "commit", "-q", "-m", "the definitions"], check=True,
                           capture_output=True)
            git(sec, "-C", str(work), "push", "-q", url, f"HEAD:refs/heads/{branch}")
    return url


def head(sec: dict, name: str, branch: str = "main") -> str:
    """The server's current commit of ``branch`` (read from the bare repository itself)."""
    bare = Path(sec["root"]) / f"{name}.git"
    return subprocess.run(["git", "-C", str(bare), "rev-parse", f"refs/heads/{branch}"], check=True,
                          capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def hold_next_push(sec: dict) -> Iterator[Any]:
    """Arm a hold on the next push; ``with hold_next_push(sec) as h: ...; h.wait_held(); push other; ``
    the block's exit releases it. ``h.wait_held(timeout)`` waits until the push is being held."""
    _request(sec, "/hold-push", "POST")

    class _Hold:
        @staticmethod
        def wait_held(timeout: float = 120) -> None:
            wait_for(lambda: _request(sec, "/held")["held"] > 0, timeout, "a push to be held by the git server")

    try:
        yield _Hold()
    finally:
        _request(sec, "/release", "POST")


class GitServer:
    """What the ``git_server`` fixture returns: the section plus helpers bound to it."""

    def __init__(self, section: dict) -> None:
        self.section = dict(section)
        self.url, self.user, self.token = section["url"], section["user"], section["token"]

    def create(self, name: str, seed: Path | str | None = None, branch: str = "main") -> str:
        """A fresh bare repository (seeded from a directory); returns its clone URL."""
        return create_repo(self.section, name, seed, branch)

    def url_of(self, name: str) -> str:
        return repo_url(self.section, name)

    def head(self, name: str, branch: str = "main") -> str:
        return head(self.section, name, branch)

    def git(self, *args: str, cwd: Path | str | None = None) -> str:
        return git(self.section, *args, cwd=cwd)

    def commit(self, name: str, edits: dict[str, str | None], message: str, author: str = "alice",
               branch: str = "main") -> str:
        """Clone, write (or with None delete) files, commit as ``author`` and push; returns the new commit.

        ``edits`` values are the files' new text, or ``(old, new)`` pairs to replace once in the current text."""
        with tempfile.TemporaryDirectory(prefix="fw-testenv-commit-") as tmp:
            work = Path(tmp) / "w"
            self.git("clone", "-q", "-b", branch, self.url_of(name), str(work))
            for rel, text in edits.items():
                p = work / rel
                if text is None:
                    p.unlink()
                    continue
                if isinstance(text, tuple):
                    old, new = text
                    cur = p.read_text()
                    if old not in cur:
                        raise ValueError(f"{rel}: {old!r} not found")
                    text = cur.replace(old, new, 1)
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text(text)
            ident = ["-c", f"user.name={author}", "-c", f"user.email={author}@fleetwright.invalid"]
            subprocess.run(["git", "-C", str(work), "add", "-A"], check=True, capture_output=True)
            subprocess.run(["git", "-C", str(work), *ident, "commit", "-q", "-m", message], check=True, capture_output=True)
            # pushed with the author's own account when they have one, so the server's REMOTE_USER (what a
            # post-receive hook reports as the pusher) is the person, as on a real Git host
            git(as_person(self.section, author), "-C", str(work), "push", "-q", "origin", f"HEAD:refs/heads/{branch}")
            return subprocess.run(["git", "-C", str(work), "rev-parse", "HEAD"], check=True, capture_output=True,
                                  text=True).stdout.strip()

    def hold_next_push(self):
        return hold_next_push(self.section)

    def save_block(self, name: str = "fleetwright-git") -> None:
        """Save the server's token as fleetwright's Git credentials block (on the current Prefect API)."""
        from pydantic import SecretStr

        from tasks.blocks import GitCredentialsBlock

        GitCredentialsBlock(username=self.user, token=SecretStr(self.token)).save(name, overwrite=True)
