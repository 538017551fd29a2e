"""Credentials as Prefect blocks, and the Connections the backends are given.

Blocks: prefect-aws's ``AwsCredentials`` (block name ``fleetwright-aws``; more accounts as
``fleetwright-aws-<name>``, chosen by a Cluster's ``backend.credentials: <name>``),
``VsphereCredentials`` (``fleetwright-vsphere``), ``SshKey``
(``fleetwright-ssh``) and ``GitCredentialsBlock`` (``fleetwright-git``: the token or SSH
key for the definitions repository), all with ``SecretStr`` fields. When a block is missing,
the JSON file named by ``FLEETWRIGHT_CONNECTIONS`` is used, and for AWS the
standard boto3 credential chain. Credentials are never flow parameters.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from backends import private
from backends.connections import Connections, SshConnection, VsphereConnection, load_connections

AWS_BLOCK = "fleetwright-aws"
VSPHERE_BLOCK = "fleetwright-vsphere"
SSH_BLOCK = "fleetwright-ssh"
GIT_BLOCK = "fleetwright-git"


class VsphereCredentials(Block):
    """A vCenter endpoint and the account fleetwright uses on it."""

    _block_type_name = "fleetwright vSphere credentials"
    host: str
    port: int = 443
    user: str
    password: SecretStr
    insecure: bool = Field(False, description="Skip TLS verification (test environments only)")


class SshKey(Block):
    """The SSH key and user Ansible uses to reach VMs and bare-metal hosts, and the host keys it trusts.

    ``known_hosts`` is the text of a known_hosts file. Host keys are always checked against it
    (``StrictHostKeyChecking=yes``); for VMs cloned with fresh host keys, sign the host keys with an
    SSH CA and give one ``@cert-authority <address pattern> <CA public key>`` line. Without
    ``known_hosts`` ssh's own files (``~/.ssh/known_hosts``) are used, still strictly.
    ``host_key_checking: false`` turns checking off altogether; for throw-away test machines only.
    """

    _block_type_name = "fleetwright SSH key"
    user: str = "root"
    private_key: SecretStr = Field(description="The private key, PEM/OpenSSH text")
    port: int = 22
    known_hosts: Optional[str] = Field(None, description="known_hosts lines (host keys or @cert-authority lines)")
    host_key_checking: bool = Field(True, description="Check host keys (turn off for test machines only)")


class GitCredentialsBlock(Block):
    """How workers authenticate to the definitions repository: an HTTPS token or an SSH key.

    Tokens: GitHub takes any username with a token (use ``x-access-token`` for an app token),
    GitLab ``oauth2`` or the token's name, Gitea the account name. SSH: the private key, and the
    host's ``known_hosts`` line(s) (``@cert-authority`` lines work too); without them the worker's own known
    hosts are used, strictly: an unknown host key is refused, never accepted on first sight.
    """

    _block_type_name = "fleetwright Git credentials"
    username: str = Field("git", description="The HTTPS username that goes with the token")
    token: Optional[SecretStr] = Field(None, description="An HTTPS access token (read + write for write-back)")
    ssh_private_key: Optional[SecretStr] = Field(None, description="An SSH private key (OpenSSH/PEM text)")
    known_hosts: str = Field("", description="known_hosts line(s) of the Git host, for SSH")


def git_credentials(name: str | None = None):
    """The ``backends.git.GitCredentials`` from the named block (default ``fleetwright-git``), or None.

    Git credentials are only ever read from a block (``FLEETWRIGHT_USE_BLOCKS`` does not apply: there
    is no file fallback for them); a source without a block is read anonymously (``file://``, public repos,
    or SSH with the worker's own agent/keys).
    """
    from backends.git import GitCredentials

    block = _load_block(GitCredentialsBlock, name or GIT_BLOCK)
    if block is None:
        if name:  # asked for by name: a missing block is a configuration error, not an anonymous read
            from models.errors import PermanentError

            raise PermanentError(f"no Git credentials block {name!r} (save a tasks.blocks.GitCredentialsBlock)")
        return None
    return GitCredentials(username=block.username, token=block.token, ssh_private_key=block.ssh_private_key,
                          known_hosts=block.known_hosts)


def _aws_connection(block, like):
    """An ``AwsConnection`` from a prefect-aws ``AwsCredentials`` block; unset settings come from ``like``."""
    return like.model_copy(update={
        "access_key_id": SecretStr(block.aws_access_key_id) if block.aws_access_key_id else None,
        "secret_access_key": block.aws_secret_access_key,
        "session_token": SecretStr(block.aws_session_token) if block.aws_session_token else None,
        "profile_name": block.profile_name,
        "endpoint_url": (block.aws_client_parameters.endpoint_url if block.aws_client_parameters else None)
                        or like.endpoint_url,
    })


def _named_aws_blocks(cls) -> dict:
    """Every ``AwsCredentials`` block named ``fleetwright-aws-<name>``, by ``<name>``: the credential sets a
    Cluster picks with ``backend.credentials: <name>`` (other accounts). Read once per process."""
    prefix = f"{AWS_BLOCK}-"
    try:
        from prefect.client.orchestration import get_client

        names: list[str] = []
        with get_client(sync_client=True) as c:
            while True:
                page = c.read_block_documents_by_type(cls.get_block_type_slug(), offset=len(names), limit=200,
                                                      include_secrets=False)
                names += [d.name for d in page if d.name]
                if len(page) < 200:
                    break
    except Exception:  # noqa: BLE001 - API unreachable or no such block type: file/env configuration only
        return {}
    return {n[len(prefix):]: b for n in names if n.startswith(prefix) and n != AWS_BLOCK
            and (b := _load_block(cls, n)) is not None}


def _load_block(cls, name: str):
    try:
        return cls.load(name)
    except (ValueError, RuntimeError):  # no such block (or no API): fall back
        return None
    except Exception:  # noqa: BLE001 - API unreachable: fall back to file/env configuration
        return None


@functools.lru_cache(maxsize=1)
def connections() -> Connections:
    """The process-wide Connections: blocks first, then ``$FLEETWRIGHT_CONNECTIONS``, then SDK defaults."""
    base = load_connections()
    if os.environ.get("FLEETWRIGHT_USE_BLOCKS", "1") != "1":
        return base
    update: dict = {}
    try:
        from prefect_aws import AwsCredentials
    except ImportError:  # pragma: no cover
        AwsCredentials = None
    aws = _load_block(AwsCredentials, AWS_BLOCK) if AwsCredentials else None
    if aws is not None:
        update["aws"] = _aws_connection(aws, base.aws)
    named = _named_aws_blocks(AwsCredentials) if AwsCredentials else {}
    if named:  # a block wins over a connections-file set of the same name
        update["aws_credentials"] = dict(base.aws_credentials) | {
            n: _aws_connection(b, base.aws_credentials.get(n, base.aws)) for n, b in named.items()}
    vs: Optional[VsphereCredentials] = _load_block(VsphereCredentials, VSPHERE_BLOCK)
    if vs is not None:
        update["vsphere"] = VsphereConnection(host=vs.host, port=vs.port, user=vs.user, password=vs.password, insecure=vs.insecure)
    key: Optional[SshKey] = _load_block(SshKey, SSH_BLOCK)
    if key is not None:  # one copy per process, in its private directory (removed at exit or by the next start)
        path = private.write_secret("ssh-key", key.private_key.get_secret_value().rstrip() + "\n")
        known = private.write_secret("known_hosts", key.known_hosts.rstrip() + "\n") if key.known_hosts else None
        old = base.ssh
        update["ssh"] = SshConnection(user=key.user, private_key_file=str(path), port=key.port,
                                      # a block without known_hosts keeps the connections file's, else ssh's own files
                                      known_hosts_file=str(known) if known else (old.known_hosts_file if old else None),
                                      host_key_checking=key.host_key_checking,
                                      **({"supervisor": old.supervisor, "extra_args": old.extra_args} if old else {}))
    return base.model_copy(update=update) if update else base
