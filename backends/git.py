"""Remote definitions repositories: a cache clone per worker, read at one commit, written back by push.

Why this exists: the definitions live in a Git repository that every worker reads and writes
(``https://``, ``http://``, ``ssh://``, ``git@host:path``, ``git://`` or ``file://``). Each worker
keeps a bare **cache clone** (``$FLEETWRIGHT_GIT_CACHE``, default ``~/.cache/fleetwright/git``),
one per URL, fetched at the start of every run under a file lock (two flow processes on one worker
fetching at once is safe). A run resolves its ref to ONE commit SHA and reads files by that SHA, so
a push during the run never changes what the run reads (objects are immutable; the cache has
``gc.auto=0`` so nothing a run reads is pruned under it).

Credentials (:class:`GitCredentials`, filled from a Prefect block by ``tasks.blocks``) never appear
in argv, in the URL or in logs: a token goes through ``GIT_ASKPASS`` (a script that echoes
environment variables set for that one ``git`` process), an SSH key through ``GIT_SSH_COMMAND``.
The script, the key and the known-hosts file are written to a run directory inside the process's
private directory (``backends/private.py``: 0700, never the shared temp dir), removed after the
command. Stored credential helpers are switched off for these commands.

Network commands (fetch, push, ls-remote) run under the watchdog ``backends/reaper.py``, as
Ansible does: when the process that started them dies (even by SIGKILL) the whole tree (``git``,
``git-remote-http``, ``ssh``) is killed at once and the run directory with the credentials is
removed; a process directory left anyway is swept by the next process that starts.

Write-back (:func:`write_back`): the change (files to add or replace) is made as a commit on the
run's commit with git plumbing (a private index, ``commit-tree``), checked by the caller, and
pushed. A push rejected because the branch moved (non-fast-forward / fetch first) is handled like
``git pull --rebase``: fetch, re-apply the change on the new head, push again, a bounded number
of times; a change that conflicts with the new head (the same file written differently) fails
with that reason. Nothing is half-applied: the branch moves by one commit or not at all.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from pydantic import SecretStr

from models.errors import PermanentError, TransientError

from . import private
from .definitions import read_git

_URL = re.compile(r"^(https?|ssh|git|file)://", re.I)
_SCP = re.compile(r"^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:(?!//)")
_SHA = re.compile(r"^[0-9a-f]{40}$")
_USERINFO = re.compile(r"^(https?|ssh|git)://[^/@]*:[^/@]*@", re.I)


def is_remote(repo: str) -> bool:
    """A Git URL (``https://``, ``ssh://``, ``git@host:path``, ``file://``...), not a local path."""
    return bool(_URL.match(repo) or _SCP.match(repo))


def check_url(url: str) -> str:
    """Refuse URLs carrying a password or token: credentials belong in the Git credentials block."""
    if _USERINFO.match(url):
        raise PermanentError(f"{redact(url)}: the URL carries credentials; put them in the Git credentials block "
                             "(tasks.blocks.GitCredentialsBlock) and use the plain URL")
    return url


def redact(text: str) -> str:
    return re.sub(r"(://[^/@\s:]*):[^/@\s]*@", r"\1:***@", text)


def cache_root() -> Path:
    return Path(os.environ.get("FLEETWRIGHT_GIT_CACHE") or Path.home() / ".cache" / "fleetwright" / "git").expanduser()


@dataclass(frozen=True)
class GitCredentials:
    """What a Git host needs from us: a token (HTTPS) or an SSH key. Values come from a Prefect block."""

    username: str = "git"
    token: Optional[SecretStr] = None
    ssh_private_key: Optional[SecretStr] = None
    known_hosts: str = ""


@contextlib.contextmanager
def auth_env(creds: Optional[GitCredentials]) -> Iterator[dict[str, str]]:
    """Environment for one network ``git`` command: no prompts, no stored helpers, our token or key only.

    Its run directory (``FW_GIT_RUN_DIR``, in the process's private directory) holds the askpass
    script, the key and the known hosts, and is removed when the block ends (or, after a kill, by
    the watchdog).
    """
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0", GIT_CONFIG_NOSYSTEM="1",
               GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0="credential.helper", GIT_CONFIG_VALUE_0="")
    for k in ("FW_GIT_USERNAME", "FW_GIT_PASSWORD", "GIT_ASKPASS", "SSH_ASKPASS"):
        env.pop(k, None)
    with private.run_dir("git") as d:
        env["FW_GIT_RUN_DIR"] = str(d)
        ssh = ["ssh", "-o", "BatchMode=yes"]
        if creds is not None and creds.token is not None:
            script = Path(d) / "askpass"
            script.write_text('#!/bin/sh\ncase "$1" in Username*) printf "%s\\n" "$FW_GIT_USERNAME";; '
                              '*) printf "%s\\n" "$FW_GIT_PASSWORD";; esac\n')
            script.chmod(0o700)
            env.update(GIT_ASKPASS=str(script), FW_GIT_USERNAME=creds.username,
                       FW_GIT_PASSWORD=creds.token.get_secret_value())
        if creds is not None and creds.ssh_private_key is not None:
            key = Path(d) / "id"
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(creds.ssh_private_key.get_secret_value().strip() + "\n")
            ssh += ["-i", str(key), "-o", "IdentitiesOnly=yes"]
        if creds is not None and creds.known_hosts.strip():  # else the user's known hosts, strictly (BatchMode)
            kh = Path(d) / "known_hosts"
            kh.write_text(creds.known_hosts.strip() + "\n")
            ssh += ["-o", f"UserKnownHostsFile={kh}", "-o", "StrictHostKeyChecking=yes"]
        env["GIT_SSH_COMMAND"] = " ".join(ssh)
        yield env


REAPER = Path(__file__).resolve().parent / "reaper.py"


def _run(args: list[str], *, env: dict | None = None, input: bytes | None = None, url: str = "") -> subprocess.CompletedProcess:
    """A local ``git`` command (the cache clone's plumbing: short, no network, no credentials)."""
    try:
        return subprocess.run(["git", *args], env=env, input=input, capture_output=True, check=False)
    except FileNotFoundError:
        raise PermanentError("git is not installed") from None


def _run_network(args: list[str], env: dict) -> subprocess.CompletedProcess:
    """A ``git`` command that talks to the remote (``env`` from :func:`auth_env`), under the watchdog
    ``backends/reaper.py``: if this process dies, the command's whole tree is killed and its run
    directory (the credentials) removed."""
    exe = shutil.which("git", path=env.get("PATH"))
    if exe is None:
        raise PermanentError("git is not installed")
    run_dir = env["FW_GIT_RUN_DIR"]
    env = dict({k: v for k, v in env.items() if k != "FW_GIT_RUN_DIR"}, FW_REAPER_PARENT=str(os.getpid()), FW_REAPER_RUN_DIR=run_dir,
               FW_REAPER_PROCESS_DIR=str(Path(run_dir).parent), FW_REAPER_EXEC=exe)
    return subprocess.run([sys.executable, "-I", str(REAPER), *args], env=env, capture_output=True, check=False)


def _err(r: subprocess.CompletedProcess) -> str:
    return redact(r.stderr.decode(errors="replace").strip())


_TRANSIENT = ("could not resolve host", "connection refused", "connection timed out", "timed out", "early eof",
              "the remote end hung up", "502", "503", "504", "unable to access", "failed to connect")


def _raise(what: str, url: str, r: subprocess.CompletedProcess):
    msg = f"git {what} {redact(url)}: {_err(r)}"
    low = msg.lower()
    if "authentication failed" in low or "403" in low or "401" in low or "permission denied" in low \
            or "could not read username" in low:
        raise PermanentError(msg + " (check the Git credentials block)")
    if "host key verification failed" in low:
        raise PermanentError(msg + " (the host's key is not trusted: put its known_hosts line in the Git credentials block)")
    if any(t in low for t in _TRANSIENT):
        raise TransientError(msg)
    raise PermanentError(msg)


@dataclass
class PushResult:
    sha: str  # the commit now at the target ref
    ref: str  # refs/heads/...
    attempts: int
    rebased_onto: list[str]
    unchanged: bool = False  # the change was already there: nothing pushed


class RemoteRepo:
    """One remote repository and this worker's cache clone of it."""

    def __init__(self, url: str, creds: Optional[GitCredentials] = None, cache: Optional[Path] = None) -> None:
        self.url = check_url(url)
        self.creds = creds
        slug = re.sub(r"[^A-Za-z0-9]+", "-", redact(url).split("://")[-1])[-40:].strip("-")
        self.path = (cache or cache_root()) / f"{slug}-{hashlib.sha256(url.encode()).hexdigest()[:12]}.git"

    # ------------------------------------------------------------------ cache clone
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(str(self.path) + ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _git(self, *args: str, input: bytes | None = None) -> bytes:
        r = _run(["--git-dir", str(self.path), *args], input=input)
        if r.returncode != 0:
            raise PermanentError(f"git {' '.join(args[:2])} in the cache of {redact(self.url)}: {_err(r)}")
        return r.stdout

    def _ensure(self) -> None:
        if (self.path / "HEAD").exists():
            return
        tmp = Path(tempfile.mkdtemp(prefix=self.path.name + ".", dir=self.path.parent))
        for args in (["init", "-q", "--bare", str(tmp)],
                     ["--git-dir", str(tmp), "config", "remote.origin.url", self.url],
                     ["--git-dir", str(tmp), "config", "gc.auto", "0"],
                     ["--git-dir", str(tmp), "config", "core.logAllRefUpdates", "false"]):
            r = _run(args)
            if r.returncode != 0:
                shutil.rmtree(tmp, ignore_errors=True)
                raise PermanentError(f"git {args[0]}: {_err(r)}")
        os.replace(tmp, self.path)

    _REFSPECS = ("+refs/heads/*:refs/remotes/origin/*", "+refs/tags/*:refs/tags/*", "+HEAD:refs/remotes/origin/HEAD")

    def fetch(self, *extra: str) -> None:
        """Bring the cache clone up to date with the remote (under the cache's file lock)."""
        with self._locked():
            self._ensure()
            with auth_env(self.creds) as env:
                r = _run_network(["--git-dir", str(self.path), "fetch", "-q", "--prune", "--no-write-fetch-head",
                                  "origin", *(extra or self._REFSPECS)], env)
            if r.returncode != 0:
                _raise("fetch", self.url, r)

    def _local(self, ref: str) -> Optional[str]:
        r = _run(["--git-dir", str(self.path), "rev-parse", "-q", "--verify", f"{ref}^{{commit}}"])
        return r.stdout.decode().strip() if r.returncode == 0 else None

    def resolve(self, ref: str) -> str:
        """The commit SHA ``ref`` names on the remote as last fetched (``HEAD``, a branch, a tag or a SHA)."""
        if _SHA.match(ref):
            if self._local(ref):
                return ref
            self.fetch(ref)  # a commit not on a branch (a pull request's head); servers that allow it
            if self._local(ref):
                return ref
            raise PermanentError(f"{redact(self.url)}: commit {ref} not found")
        name = ref[len("refs/heads/"):] if ref.startswith("refs/heads/") else ref
        for cand in ([f"refs/remotes/origin/{name}"] if ref.startswith("refs/heads/") or ref == "HEAD"
                     else [f"refs/remotes/origin/{name}", f"refs/tags/{name}", ref]):
            sha = self._local(cand)
            if sha:
                return sha
        raise PermanentError(f"{redact(self.url)}: no branch, tag or commit {ref!r}")

    def branch_of(self, ref: str) -> str:
        """The branch a ref stands for (``HEAD`` means the remote's default branch)."""
        if ref.startswith("refs/heads/"):
            return ref[len("refs/heads/"):]
        if ref == "HEAD":
            out = self._git("for-each-ref", "--format=%(refname:short) %(objectname)", "refs/remotes/origin/").decode()
            head = self._local("refs/remotes/origin/HEAD")
            names = [line.split()[0].split("/", 1)[1] for line in out.splitlines()
                     if line.split()[1] == head and not line.split()[0].endswith("/HEAD")]
            if "main" in names or "master" in names:
                return "main" if "main" in names else "master"
            if names:
                return names[0]
            raise PermanentError(f"{redact(self.url)}: cannot tell which branch HEAD is")
        if _SHA.match(ref) or self._local(f"refs/tags/{ref}"):
            raise PermanentError(f"{ref!r} is not a branch: write-back needs a branch")
        return ref

    def remote_head(self, ref: str) -> Optional[str]:
        """The remote's current SHA of ``ref`` without fetching (``git ls-remote``); None if absent."""
        want = "HEAD" if ref == "HEAD" else (ref if ref.startswith("refs/") else f"refs/heads/{ref}")
        with auth_env(self.creds) as env:
            r = _run_network(["ls-remote", self.url, want], env)
        if r.returncode != 0:
            _raise("ls-remote", self.url, r)
        for line in r.stdout.decode().splitlines():
            sha, _, name = line.partition("\t")
            if name == want:
                return sha
        return None

    def read(self, sha: str, subdir: str = "") -> dict[str, str]:
        """YAML files at commit ``sha`` (read from the cache clone)."""
        return read_git(self.path, sha, subdir)

    def author_email(self, sha: str) -> str:
        """The author email of a commit (unverified: anyone may write any name into a commit)."""
        return self._git("show", "-s", "--format=%ae", sha).decode().strip()

    def has(self, sha: str) -> bool:
        """The cache clone has that commit."""
        return self._local(sha) is not None

    def is_ancestor(self, a: str, b: str) -> bool:
        return _run(["--git-dir", str(self.path), "merge-base", "--is-ancestor", a, b]).returncode == 0

    def changed_paths(self, a: str, b: str) -> list[str]:
        return self._git("diff", "--name-only", "-z", a, b).decode().split("\0")[:-1]

    # ------------------------------------------------------------------ write-back
    def _commit_on(self, parent: str, files: dict[str, str], message: str, author: str) -> Optional[str]:
        """A commit on ``parent`` with ``files`` written; None when they are already so. Raises on a conflict."""
        with private.run_dir("git-index") as d:
            idx = dict(os.environ, GIT_INDEX_FILE=str(Path(d) / "index"))
            base = ["--git-dir", str(self.path)]
            r = _run([*base, "read-tree", parent], env=idx)
            if r.returncode != 0:
                raise PermanentError(f"git read-tree {parent}: {_err(r)}")
            changed = False
            for rel, text in sorted(files.items()):
                blob = self._git("hash-object", "-w", "--stdin", input=text.encode()).decode().strip()
                have = _run([*base, "rev-parse", "-q", "--verify", f"{parent}:{rel}"])
                if have.returncode == 0:
                    if have.stdout.decode().strip() == blob:
                        continue
                    raise WriteConflict(f"{rel} exists at {parent[:12]} with other content; change it through Git")
                r = _run([*base, "update-index", "--add", "--cacheinfo", f"100644,{blob},{rel}"], env=idx)
                if r.returncode != 0:
                    raise PermanentError(f"git update-index {rel}: {_err(r)}")
                changed = True
            if not changed:
                return None
            tree = _run([*base, "write-tree"], env=idx)
            if tree.returncode != 0:
                raise PermanentError(f"git write-tree: {_err(tree)}")
        ident = dict(os.environ, GIT_AUTHOR_NAME=author, GIT_AUTHOR_EMAIL=f"{author}@fleetwright.invalid",
                     GIT_COMMITTER_NAME="fleetwright", GIT_COMMITTER_EMAIL="fleetwright@fleetwright.invalid")
        r = _run(["--git-dir", str(self.path), "commit-tree", tree.stdout.decode().strip(), "-p", parent, "-m", message],
                 env=ident)
        if r.returncode != 0:
            raise PermanentError(f"git commit-tree: {_err(r)}")
        return r.stdout.decode().strip()

    def write_back(self, base: str, branch: str, files: dict[str, str], *, message: str, author: str,
                   target: Optional[str] = None, attempts: int = 3,
                   check: Optional[Callable[[str], None]] = None) -> PushResult:
        """Commit ``files`` on ``base`` and push to ``target`` (default ``branch``); rebase and retry when rejected.

        ``branch`` is the branch the run read (the head to rebase onto); ``target`` another branch to
        push to (a review branch), created from the commit. ``check(sha)`` validates a commit before it
        is pushed (raise to stop). A change already on the branch pushes nothing.
        """
        ref = f"refs/heads/{target or branch}"
        parent, rebased = base, []
        for attempt in range(1, attempts + 1):
            sha = self._commit_on(parent, files, message, author)
            if sha is None:
                return PushResult(parent, ref, attempt, rebased, unchanged=True)
            if check is not None:
                check(sha)
            with auth_env(self.creds) as env:
                r = _run_network(["--git-dir", str(self.path), "push", "--porcelain", "origin", f"{sha}:{ref}"], env)
            if r.returncode == 0:
                with self._locked():
                    self._git("update-ref", f"refs/remotes/origin/{target or branch}", sha)
                return PushResult(sha, ref, attempt, rebased)
            out = (r.stdout + r.stderr).decode(errors="replace")
            if not re.search(r"non-fast-forward|fetch first|\[rejected\]|stale info", out):
                _raise("push", self.url, r)
            if target:  # a review branch of that name exists with other commits: never overwrite it
                raise WriteConflict(f"branch {target} already exists on {redact(self.url)} with other commits")
            self.fetch()
            new = self.resolve(f"refs/heads/{branch}")
            rebased.append(new)
            parent = new
        raise PushRejected(f"push to {branch} of {redact(self.url)} rejected {attempts} times: the branch keeps "
                           f"moving (last head {parent[:12]}); nothing was changed, run again")


class WriteConflict(PermanentError):
    """The change cannot be applied on the current head (the same file was written differently)."""


class PushRejected(PermanentError):
    """The write-back push was rejected on every attempt (the branch kept moving)."""
