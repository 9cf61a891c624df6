"""Exceptions raised by the SDK, named and nested as in the Tinker SDK, all under
GradwireError (also exported as TinkerError, the official SDK's base class)."""
from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2


class GradwireError(Exception):
    """Base class of every error the SDK raises."""


TinkerError = GradwireError  # the official SDK's name of the base class


class UnsupportedFeatureError(GradwireError, NotImplementedError):
    """A feature of the hosted Tinker service that a self-hosted gradwire server does
    not have (billing, projects, sessions, publishing, ...); the message names it."""

    def __init__(self, feature: str, why: str = "it is a feature of the hosted Tinker service"):
        super().__init__(f"{feature} is not supported by gradwire: {why}")
        self.feature = feature


class APIError(GradwireError):
    """The server (or the connection to it) reported a failure."""


class APIStatusError(APIError):
    """The server answered with a non-OK gRPC status.

    `code` is the grpc.StatusCode, `reason` the ErrorInfo reason, and
    `field_violations` the BadRequest (field, description) pairs, if any.
    """

    def __init__(self, message: str, code: grpc.StatusCode,
                 reason: str = "", field_violations: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.field_violations = field_violations or []


class BadRequestError(APIStatusError):
    """INVALID_ARGUMENT: the request was rejected; nothing was changed."""


class AuthenticationError(APIStatusError):
    """UNAUTHENTICATED."""


class PermissionDeniedError(APIStatusError):
    """PERMISSION_DENIED."""


class NotFoundError(APIStatusError):
    """NOT_FOUND: an unknown run, operation or checkpoint."""


class UnprocessableEntityError(APIStatusError):
    """A well-formed request the server cannot act on (the official SDK's HTTP 422;
    gradwire reports such requests as BadRequestError)."""


class ConflictError(APIStatusError):
    """ALREADY_EXISTS or FAILED_PRECONDITION."""


class AbortedError(APIStatusError):
    """ABORTED: an earlier request of the same run failed, so this one did not run."""


class RateLimitError(APIStatusError):
    """RESOURCE_EXHAUSTED."""


class InternalServerError(APIStatusError):
    """INTERNAL, UNKNOWN or another server-side failure."""


class APIConnectionError(APIError):
    """The server could not be reached (UNAVAILABLE)."""


class APITimeoutError(APIConnectionError):
    """A deadline passed before the server answered."""


class APIResponseValidationError(APIError):
    """The server's answer did not have the expected shape."""


class RequestCancelledError(APIError):
    """The operation was cancelled."""


class CustomLossError(GradwireError):
    """The user's loss function raised or returned something unusable.

    Nothing was applied to the model.
    """


_CLASS_OF_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: BadRequestError,
    grpc.StatusCode.OUT_OF_RANGE: BadRequestError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: ConflictError,
    grpc.StatusCode.FAILED_PRECONDITION: ConflictError,
    grpc.StatusCode.ABORTED: AbortedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimitError,
}


def error_from_status(status: status_pb2.Status) -> GradwireError:
    """The exception for a google.rpc.Status (an RPC's error or Operation.error)."""
    code = _code_of_number(status.code)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return APITimeoutError(status.message)
    if code == grpc.StatusCode.UNAVAILABLE:
        return APIConnectionError(status.message)
    if code == grpc.StatusCode.CANCELLED:
        return RequestCancelledError(status.message)
    reason, violations = "", []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = [(v.field, v.description) for v in bad.field_violations]
    cls = _CLASS_OF_CODE.get(code, InternalServerError)
    return cls(f"{code.name}: {status.message}", code, reason, violations)


def error_from_rpc(error: grpc.RpcError) -> GradwireError:
    """The exception for a failed gRPC call, with its rich status details."""
    from grpc_status import rpc_status

    status = rpc_status.from_call(error) if hasattr(error, "trailing_metadata") else None
    if status is None:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        status = status_pb2.Status(code=code.value[0], message=details or "")
    return error_from_status(status)


def _code_of_number(number: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN
