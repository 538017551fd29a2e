"""Definitions from an SSH Git remote: a bare repository on a test host (real sshd, key auth, host keys signed by
the test hosts' CA), read and written back through the product's credentials block. On-prem session: the hosts
have fixed loopback addresses."""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from models.errors import PermanentError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "fleet"


def _ssh(hosts: dict, addr: str, command: str) -> str:
    from testenv.hosts import ssh

    return ssh(hosts, addr, command).stdout.strip()


@pytest.fixture()
def ssh_repo(ssh_hosts, prefect_api, tmp_path, monkeypatch):
    """A bare repository on the first test host, seeded with the example fleet over SSH; its two URL forms."""
    addr = ssh_hosts["hosts"][0]["address"]
    name = f"defs-{os.urandom(3).hex()}.git"
    _ssh(ssh_hosts, addr, f"git init -q --bare -b main /root/{name}")
    ssh_cmd = f"ssh -i {ssh_hosts['private_key']} -o IdentitiesOnly=yes -o UserKnownHostsFile={ssh_hosts['known_hosts']}"
    with tempfile.TemporaryDirectory() as work:
        env = dict(os.environ, GIT_SSH_COMMAND=ssh_cmd)
        ident = ["-c", "user.name=platform", "-c", "user.email=platform@fleetwright.invalid"]
        for args in (["init", "-q", "-b", "main", work], ["-C", work, "add", "-A"],
                     ["-C", work, *ident, "commit", "-q", "-m", "the definitions"],
                     ["-C", work, "push", "-q", f"ssh://root@{addr}/root/{name}", "main"]):
            if args[0] == "init":
                subprocess.run(["cp", "-r", f"{EXAMPLES}/.", work], check=True)
            subprocess.run(["git", *args], env=env, check=True, capture_output=True)
    monkeypatch.setenv("FLEETWRIGHT_GIT_CACHE", str(tmp_path / "cache"))
    from pydantic import SecretStr

    from tasks.blocks import GitCredentialsBlock

    GitCredentialsBlock(username="root", ssh_private_key=SecretStr(Path(ssh_hosts["private_key"]).read_text()),
                        known_hosts=Path(ssh_hosts["known_hosts"]).read_text()).save("git-ssh-test", overwrite=True)
    yield {"addr": addr, "name": name, "ssh": f"ssh://root@{addr}/root/{name}", "scp": f"root@{addr}:/root/{name}"}
    _ssh(ssh_hosts, addr, f"rm -rf /root/{name}")


def test_an_ssh_remote_is_read_and_written_back_with_the_blocks_key(ssh_hosts, ssh_repo):
    from backends import private
    from backends.git import RemoteRepo
    from tasks.blocks import git_credentials
    from tasks.definitions import DefinitionsSource, load_definitions

    head = _ssh(ssh_hosts, ssh_repo["addr"], f"git --git-dir /root/{ssh_repo['name']} rev-parse main")
    for url in (ssh_repo["ssh"], ssh_repo["scp"]):  # ssh:// and git@host:path forms
        defs, _ = load_definitions.fn(DefinitionsSource(repo=url, ref="main", credentials_block="git-ssh-test"))
        assert "edge-lab-01" in defs.clusters
    repo = RemoteRepo(ssh_repo["ssh"], git_credentials("git-ssh-test"))
    repo.fetch()
    assert repo.resolve("main") == head
    res = repo.write_back(head, "main", {"componentsets/ssh.yaml": "kind: x\n"}, message="over ssh", author="alice")
    assert res.attempts == 1 and not res.unchanged
    assert _ssh(ssh_hosts, ssh_repo["addr"], f"git --git-dir /root/{ssh_repo['name']} rev-parse main") == res.sha
    assert _ssh(ssh_hosts, ssh_repo["addr"],
                f"git --git-dir /root/{ssh_repo['name']} show main:componentsets/ssh.yaml") == "kind: x"
    # the key was written for each command and removed after it: nothing of it is left
    key = Path(ssh_hosts["private_key"]).read_text().strip().splitlines()[1]
    found = subprocess.run(["grep", "-r", "-l", "-F", key, str(private.root()), str(Path(os.environ["FLEETWRIGHT_GIT_CACHE"]))],
                           capture_output=True, text=True)
    assert found.stdout == "", f"the SSH key was left in {found.stdout}"


def test_an_ssh_remote_with_an_unknown_host_key_is_refused(ssh_hosts, ssh_repo, tmp_path):
    """known_hosts that do not trust the host: refused (never accepted on first sight), with a clear reason."""
    from pydantic import SecretStr

    from backends.git import GitCredentials, RemoteRepo

    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other_ca")], check=True)
    other = f"@cert-authority 127.* {(tmp_path / 'other_ca.pub').read_text().strip()}\n"
    creds = GitCredentials(username="root", ssh_private_key=SecretStr(Path(ssh_hosts["private_key"]).read_text()),
                           known_hosts=other)
    with pytest.raises(PermanentError, match="(?i)host key verification failed"):
        RemoteRepo(ssh_repo["ssh"], creds).fetch()
    # and a key the host does not accept: refused as a credentials problem
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "stranger")], check=True)
    creds = GitCredentials(username="root", ssh_private_key=SecretStr((tmp_path / "stranger").read_text()),
                           known_hosts=Path(ssh_hosts["known_hosts"]).read_text())
    with pytest.raises(PermanentError, match="Git credentials block"):
        RemoteRepo(ssh_repo["ssh"], creds).fetch()
