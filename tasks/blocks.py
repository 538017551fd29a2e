"""Credentials as Prefect blocks, and the Connections the backends are given.

Blocks: prefect-aws's ``AwsCredentials`` (block name ``fleetwright-aws``),
``VsphereCredentials`` (``fleetwright-vsphere``) and ``SshKey``
(``fleetwright-ssh``), all with ``SecretStr`` fields. When a block is missing,
the JSON file named by ``FLEETWRIGHT_CONNECTIONS`` is used, and for AWS the
standard boto3 credential chain. Credentials are never flow parameters.
"""
from __future__ import annotations

import functools
import os
import tempfile
from typing import Optional

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from backends.connections import Connections, SshConnection, VsphereConnection, load_connections

AWS_BLOCK = "fleetwright-aws"
VSPHERE_BLOCK = "fleetwright-vsphere"
SSH_BLOCK = "fleetwright-ssh"


class VsphereCredentials(Block):
    """A vCenter endpoint and the account fleetwright uses on it."""

    _block_type_name = "fleetwright vSphere credentials"
    host: str
    port: int = 443
    user: str
    password: SecretStr
    insecure: bool = Field(False, description="Skip TLS verification (test environments only)")


class SshKey(Block):
    """The SSH key and user Ansible uses to reach VMs and bare-metal hosts."""

    _block_type_name = "fleetwright SSH key"
    user: str = "root"
    private_key: SecretStr = Field(description="The private key, PEM/OpenSSH text")
    port: int = 22


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
        update["aws"] = base.aws.model_copy(update={
            "access_key_id": SecretStr(aws.aws_access_key_id) if aws.aws_access_key_id else None,
            "secret_access_key": aws.aws_secret_access_key,
            "session_token": SecretStr(aws.aws_session_token) if aws.aws_session_token else None,
            "profile_name": aws.profile_name,
            "endpoint_url": (aws.aws_client_parameters.endpoint_url if aws.aws_client_parameters else None)
                            or base.aws.endpoint_url,
        })
    vs: Optional[VsphereCredentials] = _load_block(VsphereCredentials, VSPHERE_BLOCK)
    if vs is not None:
        update["vsphere"] = VsphereConnection(host=vs.host, port=vs.port, user=vs.user, password=vs.password, insecure=vs.insecure)
    key: Optional[SshKey] = _load_block(SshKey, SSH_BLOCK)
    if key is not None:
        fd, path = tempfile.mkstemp(prefix="fleetwright-ssh-")
        with os.fdopen(fd, "w") as f:
            f.write(key.private_key.get_secret_value().rstrip() + "\n")
        os.chmod(path, 0o600)
        old = base.ssh
        update["ssh"] = SshConnection(user=key.user, private_key_file=path, port=key.port,
                                      **({"supervisor": old.supervisor, "extra_args": old.extra_args} if old else {}))
    return base.model_copy(update=update) if update else base
