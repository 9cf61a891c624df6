"""Exceptions raised by the SDK, named and nested as in the Tinker SDK, all under
GradwireError (also exported as TinkerError, the official SDK's base class).

Every one pickles (it may cross to another process), and a request that failed after
the server accepted it raises its status class as a RequestFailedError too, as Tinker's
failed futures do (see failed_request)."""
from __future__ import annotations

import enum
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2


class GradwireError(Exception):
    """Base class of every error the SDK raises."""

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __reduce__(self):
        # Rebuilt without calling __init__ (whose signature differs by class), then given
        # back its attributes.
        return _unpickled, (type(self), self.args), self.__dict__


def _unpickled(cls: type[GradwireError], args: tuple) -> GradwireError:
    error = cls.__new__(cls)
    error.args = args
    return error


TinkerError = GradwireError  # the official SDK's name of the base class


class UnsupportedFeatureError(GradwireError, NotImplementedError):
    """A feature of the hosted Tinker service that a self-hosted gradwire server does
    not have (billing, projects, sessions, publishing, ...); the message names it."""

    def __init__(self, feature: str, why: str = "it is a feature of the hosted Tinker service"):
        super().__init__(f"{feature} is not supported by gradwire: {why}")
        self.feature = feature


class APIError(GradwireError):
    """The server (or the connection to it) reported a failure."""

    body: Any = None  # the hosted SDK's HTTP body: gRPC has none


class APIStatusError(APIError):
    """The server answered with a non-OK gRPC status.

    `code` is the grpc.StatusCode, `reason` the ErrorInfo reason, and
    `field_violations` the BadRequest (field, description) pairs, if any;
    `status_code` is the HTTP status the hosted Tinker SDK gives the same error.
    """

    status_code = 500

    def __init__(self, message: str, code: grpc.StatusCode,
                 reason: str = "", field_violations: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.field_violations = field_violations or []


class BadRequestError(APIStatusError):
    """INVALID_ARGUMENT: the request was rejected; nothing was changed."""

    status_code = 400


class AuthenticationError(APIStatusError):
    """UNAUTHENTICATED."""

    status_code = 401


class PermissionDeniedError(APIStatusError):
    """PERMISSION_DENIED."""

    status_code = 403


class NotFoundError(APIStatusError):
    """NOT_FOUND: an unknown run, operation or checkpoint."""

    status_code = 404


class UnprocessableEntityError(APIStatusError):
    """A well-formed request the server cannot act on (the official SDK's HTTP 422;
    gradwire reports such requests as BadRequestError)."""

    status_code = 422


class ConflictError(APIStatusError):
    """ALREADY_EXISTS or FAILED_PRECONDITION."""

    status_code = 409


class AbortedError(APIStatusError):
    """ABORTED: an earlier request of the same run failed, so this one did not run; or a
    checkpoint it names was saved again while it waited (send it again)."""

    status_code = 409


class RateLimitError(APIStatusError):
    """RESOURCE_EXHAUSTED."""

    status_code = 429


class InternalServerError(APIStatusError):
    """INTERNAL, UNKNOWN or another server-side failure."""


class APIConnectionError(APIError):
    """The server could not be reached (UNAVAILABLE)."""


class APITimeoutError(APIConnectionError, TimeoutError):
    """A deadline passed before the server answered, or a wait ran out (result(timeout=...)):
    also a TimeoutError, as a timed-out Tinker future raises."""


class APIResponseValidationError(APIError):
    """The server's answer did not have the expected shape."""


class RequestCancelledError(APIError):
    """The operation was cancelled."""


class RequestErrorCategory(enum.StrEnum):
    """Whose failure a RequestFailedError is (Tinker's categories)."""

    Unknown = enum.auto()
    Server = enum.auto()
    User = enum.auto()


class RequestFailedError(GradwireError):
    """A request the server accepted finished in a failed state (its operation's error),
    as in the Tinker SDK. `request_id` is the operation's name, `category` whose failure
    it was. Raised as its status class too: a forward_backward whose gradient is not finite
    is a ConflictError and a RequestFailedError (one refused on arrival, before it was
    accepted, is its status class only)."""

    def __init__(self, message: str, request_id: str = "",
                 category: RequestErrorCategory = RequestErrorCategory.Unknown):
        super().__init__(message)
        self.request_id = request_id
        self.category = category


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


_USER_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.NOT_FOUND,
                         grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION,
                         grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED})
_SERVER_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNAVAILABLE,
                           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED})


class Failed:
    """Each error class a failed operation can raise, as a RequestFailedError too (a class
    here, so that the error pickles and reads `gradwire.errors.Failed.BadRequestError`)."""


for _cls in (*set(_CLASS_OF_CODE.values()), InternalServerError, APITimeoutError, APIConnectionError,
             RequestCancelledError):
    setattr(Failed, _cls.__name__, type(_cls.__name__, (_cls, RequestFailedError), {
        "__module__": __name__, "__qualname__": f"Failed.{_cls.__name__}", "__doc__": _cls.__doc__}))
del _cls


def failed_request(status: status_pb2.Status, operation: str) -> GradwireError:
    """The exception for an accepted request's failure (Operation.error): error_from_status's,
    as a RequestFailedError too, naming the operation."""
    error = error_from_status(status)
    failed = _unpickled(getattr(Failed, type(error).__name__), error.args)
    failed.__dict__.update(error.__dict__)
    failed.request_id = operation
    code = _code_of_number(status.code)
    failed.category = (RequestErrorCategory.User if code in _USER_CODES else
                       RequestErrorCategory.Server if code in _SERVER_CODES else RequestErrorCategory.Unknown)
    return failed


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
