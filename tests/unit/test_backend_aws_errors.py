"""The AWS backend's one error-mapping function, its taint conversion and its EKS token (no server)."""
from __future__ import annotations

import base64
from urllib.parse import parse_qs, urlsplit

import pytest
from botocore.exceptions import (ClientError, ConnectTimeoutError, EndpointConnectionError, NoCredentialsError,
                                 ParamValidationError, ReadTimeoutError)

from backends.aws import AwsBackend, eks_taint, make_eks_token, map_error
from backends.connections import AwsConnection, Connections
from models.errors import InFlight, OwnershipConflict, PermanentError, TransientError


def client_error(code: str, status: int = 400, op: str = "DescribeCluster") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": f"msg {code}"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, op)


@pytest.mark.parametrize("code,status", [
    ("ThrottlingException", 429), ("Throttling", 400), ("TooManyRequestsException", 429),
    ("RequestLimitExceeded", 503), ("ServiceUnavailable", 503), ("ServiceUnavailableException", 503),
    ("InternalFailure", 500), ("InternalError", 500), ("ServerException", 500), ("Whatever", 502),
    ("SomethingNew", 429), ("DependencyViolation", 400),
])
def test_transient(code, status):
    e = map_error(client_error(code, status), operation="eks:DescribeCluster")
    assert type(e) is TransientError
    assert "eks:DescribeCluster" in str(e) and code in str(e)


def test_in_use_is_in_flight():
    e = map_error(client_error("ResourceInUseException", 409), operation="eks:UpdateClusterVersion")
    assert isinstance(e, InFlight) and isinstance(e, TransientError)


@pytest.mark.parametrize("code,status", [
    ("InvalidParameterException", 400), ("InvalidParameterValue", 400), ("InvalidParameterCombination", 400),
    ("ResourceLimitExceededException", 400), ("ResourceLimitExceeded", 400), ("AccessDenied", 403),
    ("AccessDeniedException", 403), ("UnrecognizedClientException", 403), ("InvalidClientTokenId", 403),
    ("UnauthorizedOperation", 403), ("InvalidRequestException", 400), ("MalformedPolicyDocument", 400),
    ("SomeUnknown4xx", 400),
])
def test_permanent(code, status):
    e = map_error(client_error(code, status))
    assert type(e) is PermanentError


@pytest.mark.parametrize("code", ["ResourceNotFoundException", "NoSuchEntity", "InvalidVpcID.NotFound",
                                  "InvalidSubnetID.NotFound", "NotFoundException", "LoadBalancerNotFound",
                                  "TargetGroupNotFound", "AccessPointNotFound", "NatGatewayNotFound",
                                  "InvalidAllocationID.NotFound"])
def test_not_found_when_deleting_is_success(code):
    assert map_error(client_error(code, 404), missing_ok=True) is None
    # ...but not when something was expected to be there
    assert isinstance(map_error(client_error(code, 404)), PermanentError)


@pytest.mark.parametrize("exc", [
    EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
    ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"),
    ReadTimeoutError(endpoint_url="http://127.0.0.1:1"),
    ConnectionResetError("reset"),
])
def test_connection_problems_are_transient(exc):
    assert type(map_error(exc, operation="ec2:DescribeVpcs")) is TransientError


@pytest.mark.parametrize("exc", [NoCredentialsError(), ParamValidationError(report="bad"), ValueError("x")])
def test_local_problems_are_permanent(exc):
    assert type(map_error(exc)) is PermanentError


def test_fleetwright_errors_pass_through():
    e = OwnershipConflict("not ours")
    assert map_error(e) is e


def test_messages_carry_no_credentials():
    backend = AwsBackend(Connections(aws=AwsConnection(endpoint_url="http://127.0.0.1:9", access_key_id="AKIDSECRETKEY",
                                                       secret_access_key="sekrit/value", max_attempts=1,
                                                       timeout_seconds=1)))
    with pytest.raises(TransientError) as ei:
        backend._call("eks", "us-east-1", "list_clusters")
    assert "sekrit" not in str(ei.value) and "AKIDSECRETKEY" not in str(ei.value)
    assert ei.value.__cause__ is None and ei.value.__suppress_context__


@pytest.mark.parametrize("taint,want", [
    ("dedicated=gpu:NoSchedule", {"key": "dedicated", "value": "gpu", "effect": "NO_SCHEDULE"}),
    ("spot:NoExecute", {"key": "spot", "effect": "NO_EXECUTE"}),
    ("a=b:PreferNoSchedule", {"key": "a", "value": "b", "effect": "PREFER_NO_SCHEDULE"}),
])
def test_taints(taint, want):
    assert eks_taint(taint) == want


def test_bad_taint():
    with pytest.raises(PermanentError):
        eks_taint("dedicated=gpu")


def _decode(token: str) -> str:
    assert token.startswith("k8s-aws-v1.")
    body = token[len("k8s-aws-v1."):]
    assert "=" not in body and "+" not in body and "/" not in body  # urlsafe, no padding
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()


def test_eks_token_shape_for_real_aws():
    """As `aws eks get-token`: a presigned regional STS GetCallerIdentity URL signing x-k8s-aws-id."""
    backend = AwsBackend(Connections(aws=AwsConnection(access_key_id="AKIDEXAMPLE", secret_access_key="secret")))
    class D:  # the token needs only the cluster's name and region
        name = "eu-web-prod-1"
        backend = type("B", (), {"region": "eu-west-1"})()

    url = _decode(backend.token(D))
    parts = urlsplit(url)
    assert parts.scheme == "https" and parts.netloc == "sts.eu-west-1.amazonaws.com" and parts.path == "/"
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert q["Action"] == "GetCallerIdentity" and q["Version"] == "2011-06-15"
    assert q["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    assert q["X-Amz-Credential"].startswith("AKIDEXAMPLE/") and q["X-Amz-Credential"].endswith("/eu-west-1/sts/aws4_request")
    assert q["X-Amz-Expires"] == "60"
    assert set(q["X-Amz-SignedHeaders"].split(";")) == {"host", "x-k8s-aws-id"}
    assert len(q["X-Amz-Signature"]) == 64
    assert "secret" not in url


def test_eks_token_is_deterministic_per_cluster_and_time(monkeypatch):
    import botocore.session

    s = botocore.session.get_session()
    s.set_credentials("AKIDEXAMPLE", "secret")
    a = _decode(make_eks_token(s, "c1", "us-east-1"))
    b = _decode(make_eks_token(s, "c2", "us-east-1"))
    assert "sts.us-east-1.amazonaws.com" in a
    assert parse_qs(urlsplit(a).query)["X-Amz-Signature"] != parse_qs(urlsplit(b).query)["X-Amz-Signature"]
    cn = _decode(make_eks_token(s, "c1", "cn-north-1"))
    assert urlsplit(cn).netloc == "sts.cn-north-1.amazonaws.com.cn"


# --------------------------------------------------------------------------- quotas, Retry-After, bounded retries

@pytest.mark.parametrize("code,operation", [
    ("LimitExceededException", "eks:CreateNodegroup"), ("LimitExceededException", "eks:CreateCluster"),
    ("LimitExceeded", "iam:CreateRole"), ("LimitExceeded", "iam:AttachRolePolicy"), ("LimitExceededException", ""),
])
def test_limit_exceeded_is_a_quota_in_eks_and_iam(code, operation):
    e = map_error(client_error(code, 400 if code.endswith("Exception") else 409), operation=operation)
    assert type(e) is PermanentError and "quota" in str(e)


def test_limit_exceeded_elsewhere_is_throttling():
    assert type(map_error(client_error("LimitExceededException", 400), operation="kinesis:PutRecord")) is TransientError


def client_error_with_headers(code: str, status: int, headers: dict) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "slow down"},
                        "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": headers}}, "DescribeCluster")


@pytest.mark.parametrize("headers,delay", [({"retry-after": "7"}, 7.0), ({"Retry-After": "2.5"}, 2.5), ({}, None),
                                           ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, None),
                                           ({"retry-after": "99999"}, 300.0)])
def test_retry_after_is_carried(headers, delay):
    e = map_error(client_error_with_headers("ThrottlingException", 429, headers), operation="eks:DescribeCluster")
    assert type(e) is TransientError and e.delay == delay
    e = map_error(client_error_with_headers("ServiceUnavailable", 503, headers), operation="ec2:DescribeVpcs")
    assert type(e) is TransientError and e.delay == delay


class _Failed:
    def __init__(self, exc):
        self.exc = exc

    def result(self, raise_on_failure=True):
        raise self.exc


class _Run:
    def __init__(self, started=None):
        import uuid

        self.id, self.start_time = uuid.uuid4(), started


def test_task_retry_waits_at_least_the_servers_delay():
    import time

    from tasks.retry import retry_transient

    t0 = time.monotonic()
    assert retry_transient(None, _Run(), _Failed(TransientError("throttled", delay=0.3))) is True
    assert time.monotonic() - t0 >= 0.3  # a lower bound only: sleeping never returns early
    assert retry_transient(None, _Run(), _Failed(PermanentError("no"))) is False
    assert retry_transient(None, _Run(), _Failed(ValueError("bug"))) is False


def test_task_retries_have_a_bound_in_total(monkeypatch):
    from datetime import datetime, timedelta, timezone

    from tasks.retry import retry_transient

    monkeypatch.setenv("FLEETWRIGHT_RETRY_TOTAL_SECONDS", "600")
    long_ago = datetime.now(timezone.utc) - timedelta(seconds=601)
    assert retry_transient(None, _Run(long_ago), _Failed(TransientError("timed out waiting"))) is False
    recent = datetime.now(timezone.utc) - timedelta(seconds=10)
    assert retry_transient(None, _Run(recent), _Failed(TransientError("timed out waiting"))) is True
    # a delay that would take the run past the bound is not waited for
    assert retry_transient(None, _Run(recent), _Failed(TransientError("throttled", delay=595))) is False
    # the first attempt counts, even if a later attempt reports a fresh start time
    run = _Run(long_ago)
    retry_transient(None, run, _Failed(TransientError("x")))
    run.start_time = datetime.now(timezone.utc)
    assert retry_transient(None, run, _Failed(TransientError("x"))) is False
