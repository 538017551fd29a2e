"""The one mapping of botocore errors onto ``models.errors`` (backends/CONTRACT.md, Errors)."""
from __future__ import annotations

from botocore.exceptions import (BotoCoreError, ClientError, ConnectionError as BotoConnectionError,
                                 HTTPClientError, NoCredentialsError, NoRegionError,
                                 ParamValidationError, PartialCredentialsError)

from models.errors import FleetwrightError, InFlight, PermanentError, TransientError

_THROTTLING = {"Throttling", "ThrottlingException", "ThrottledException", "TooManyRequestsException",
               "RequestLimitExceeded", "RequestThrottled", "RequestThrottledException", "SlowDown",
               "PriorRequestNotComplete", "EC2ThrottledException", "BandwidthLimitExceeded",
               "ProvisionedThroughputExceededException"}
# A quota, not a rate: EKS (LimitExceededException: too many clusters, node groups, ...) and IAM (LimitExceeded:
# too many roles, policies per role, ...) answer so when an account limit is reached. Retrying cannot help.
# Elsewhere (Kinesis, API Gateway, ...) LimitExceededException is throttling.
_QUOTA_SERVICES = {"eks", "iam"}
_QUOTA = {"LimitExceededException", "LimitExceeded"}
MAX_RETRY_AFTER = 300.0  # seconds: a longer Retry-After is clamped
_SERVER = {"ServiceUnavailable", "ServiceUnavailableException", "InternalFailure", "InternalError",
           "InternalServerError", "ServerException", "Unavailable", "RequestTimeout",
           "RequestTimeoutException", "IDPCommunicationError"}
_PERMANENT = {"ResourceLimitExceeded", "ResourceLimitExceededException", "AccessDenied",
              "AccessDeniedException", "UnauthorizedOperation", "UnrecognizedClientException",
              "UnrecognizedClient", "InvalidClientTokenId", "AuthFailure", "SignatureDoesNotMatch",
              "ExpiredToken", "ExpiredTokenException", "OptInRequired", "UnsupportedAvailabilityZoneException",
              "MalformedPolicyDocument", "UnsupportedOperation", "VpcLimitExceeded", "SubnetLimitExceeded",
              "NoSuchEntity", "InvalidRequestException", "NotFoundException"}
_NOT_FOUND = {"ResourceNotFoundException", "NoSuchEntity", "NotFoundException", "InvalidVpcID.NotFound",
              "InvalidSubnetID.NotFound", "InvalidVpcId.NotFound", "InvalidSubnetId.NotFound",
              "AccessPointNotFound"}  # classic ELB
_GONE = object()


def _code(exc: ClientError) -> tuple[str, int]:
    err = exc.response.get("Error", {}) or {}
    status = int((exc.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode") or 0)
    return str(err.get("Code") or ""), status


def _retry_after(exc: ClientError) -> float | None:
    """The server's ``Retry-After`` (seconds), if it sent one."""
    headers = (exc.response.get("ResponseMetadata", {}) or {}).get("HTTPHeaders") or {}
    raw = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    try:
        return min(max(float(raw), 0.0), MAX_RETRY_AFTER) if raw is not None else None
    except (TypeError, ValueError):
        return None  # an HTTP date: rare for AWS; the task's backoff applies


def map_error(exc: BaseException, *, operation: str = "", missing_ok: bool = False) -> FleetwrightError | None:
    """THE mapping of botocore errors to fleetwright's error tree.

    Returns ``None`` when the error means "already gone" and ``missing_ok`` is set (a lookup
    that finds nothing, a delete of what is gone): the caller treats that as success.
    The message names the operation and the AWS error code, never credentials.
    """
    what = f"AWS {operation}" if operation else "AWS call"
    if isinstance(exc, FleetwrightError):
        return exc
    if isinstance(exc, ClientError):
        code, status = _code(exc)
        msg = (exc.response.get("Error", {}) or {}).get("Message") or ""
        text = f"{what} failed: {code or status}: {msg}".rstrip(": ")
        if missing_ok and (code in _NOT_FOUND or code.endswith("NotFound") or code.endswith("NotFoundException")):
            return None
        service = operation.partition(":")[0].lower() if ":" in operation else ""
        if code in _QUOTA and (service in _QUOTA_SERVICES or not service):
            return PermanentError(f"{text} (an account quota; raise it with AWS Service Quotas)")
        if code in _THROTTLING or code in _QUOTA or code.startswith("Throttl") or status == 429:
            return TransientError(text, delay=_retry_after(exc))
        if code in _SERVER or status >= 500:
            return TransientError(text, delay=_retry_after(exc))
        if code == "ResourceInUseException":
            return InFlight(text)
        if code in ("DependencyViolation", "IncorrectState", "IncorrectInstanceState", "ConcurrentModification",
                    "ConcurrentModificationException", "OperationAborted"):
            return TransientError(text)  # something is still being torn down or changed: try again later
        if code.startswith("InvalidParameter") or code in _PERMANENT or code.startswith("InvalidClient"):
            return PermanentError(text)
        if code in _NOT_FOUND or code.endswith(".NotFound"):
            return PermanentError(text)
        return PermanentError(text)  # any other 4xx: retrying the same request will not help
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError, NoRegionError, ParamValidationError)):
        return PermanentError(f"{what}: {type(exc).__name__}: {exc}")
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):  # EndpointConnectionError, Connect/ReadTimeout, reset
        return TransientError(f"{what}: {type(exc).__name__}: {exc}")
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return TransientError(f"{what}: {type(exc).__name__}: {exc}")
    if isinstance(exc, BotoCoreError):
        return PermanentError(f"{what}: {type(exc).__name__}: {exc}")
    return PermanentError(f"{what}: unexpected {type(exc).__name__}: {exc}")
