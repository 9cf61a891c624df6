"""google.rpc.Status errors (AIP-193): canonical code, ErrorInfo always,
BadRequest field violations for bad input."""
from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "gradwire.dev"
# The status travels in trailing metadata (grpc-message, grpc-status-details-bin in
# base64), which gRPC peers refuse beyond 8 KiB in all: the message is cut, and the
# violations listed within a budget, each cut too.
MAX_MESSAGE_CHARS = 1000
MAX_FIELD_CHARS = 100
MAX_DESCRIPTION_CHARS = 300
MAX_VIOLATIONS_CHARS = 3000
_SHOWN_VALUE_CHARS = 100


def cut(value: str, limit: int = _SHOWN_VALUE_CHARS) -> str:
    """`value` as shown in an error: at most `limit` characters, the rest counted."""
    return value if len(value) <= limit else f"{value[:limit]}... ({len(value)} characters)"


@dataclass
class FieldViolation:
    field: str        # e.g. 'data[3].loss_fn_inputs["weights"]'
    description: str


class ServiceError(Exception):
    """An error with a canonical code, raised anywhere below the servicers."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str,
                 violations: list[FieldViolation] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.violations = violations or []

    def to_status(self) -> status_pb2.Status:
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN))
        details = [info]
        if self.violations:
            bad = any_pb2.Any()
            bad.Pack(error_details_pb2.BadRequest(field_violations=_within_budget(self.violations)))
            details.append(bad)
        return status_pb2.Status(code=self.code.value[0], message=cut(self.message, MAX_MESSAGE_CHARS),
                                 details=details)


def _within_budget(violations: list[FieldViolation]) -> list[error_details_pb2.BadRequest.FieldViolation]:
    shown, used = [], 0
    for violation in violations:
        field, description = cut(violation.field, MAX_FIELD_CHARS), cut(violation.description, MAX_DESCRIPTION_CHARS)
        used += len(field) + len(description)
        if shown and used > MAX_VIOLATIONS_CHARS:
            break
        shown.append(error_details_pb2.BadRequest.FieldViolation(field=field, description=description))
    return shown


def invalid_argument(violations: list[FieldViolation]) -> ServiceError:
    """INVALID_ARGUMENT listing every violation (the first few in the message)."""
    shown = "; ".join(f"{v.field}: {v.description}" for v in violations[:5])
    more = f" (and {len(violations) - 5} more)" if len(violations) > 5 else ""
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, shown + more, "INVALID_INPUT", violations)


def not_found(what: str, name: str, hint: str = "") -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, f"{what} {cut(name)!r} not found" + (f" ({hint})" if hint else ""),
                        f"{what.upper().replace(' ', '_')}_NOT_FOUND")


def failed_precondition(message: str, reason: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.FAILED_PRECONDITION, message, reason)


def already_exists(message: str, reason: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.ALREADY_EXISTS, message, reason)


def data_loss(message: str) -> ServiceError:
    """A stored file is corrupt or truncated."""
    return ServiceError(grpc.StatusCode.DATA_LOSS, message, "CORRUPT_CHECKPOINT")


def aborted(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.ABORTED, message, "EARLIER_REQUEST_FAILED")


def checkpoint_replaced(path: str) -> ServiceError:
    """A checkpoint saved again (other weights at its path) since a request naming it found it."""
    return ServiceError(grpc.StatusCode.ABORTED, f"checkpoint {path} was saved again since this request found "
                        "it; send the request again for the weights it holds now", "CHECKPOINT_REPLACED")


def already_used(seq_id: int, operation: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.ALREADY_EXISTS,
                        f"seq_id {seq_id} is already taken by {operation}; a retry returns that operation only "
                        "when it carries the first request's request_id", "SEQ_ID_ALREADY_USED")


def request_id_reused(request_id: str, first: str, what: str = "other fields") -> ServiceError:
    """A request_id sent again with `what` (other fields, another RPC): not a retry (AIP-155),
    and the first request's result would be this one's silently."""
    return ServiceError(grpc.StatusCode.ALREADY_EXISTS,
                        f"request_id {cut(request_id)!r} was sent before with {what} ({first}); a retry repeats "
                        "the first request exactly, and a new request needs a new request_id", "REQUEST_ID_REUSED")


def internal(error: BaseException) -> ServiceError:
    return ServiceError(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}", "INTERNAL")


def resource_exhausted(message: str) -> ServiceError:
    """The device ran out of memory for this request (others are unaffected)."""
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, "OUT_OF_MEMORY")


def stopping() -> ServiceError:
    """A request the server refuses or does not finish because it is stopping (SIGTERM): new,
    held, queued, a stream still uploading, a sample still decoding. A training request of
    these applied nothing."""
    return ServiceError(grpc.StatusCode.UNAVAILABLE, "the server is stopping: send the request again to a server "
                        "that is serving (a training request it did not finish applied nothing)", "STOPPING")


def cancelled(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.CANCELLED, message, "CANCELLED")


async def abort(context: grpc.aio.ServicerContext, error: ServiceError) -> None:
    """Ends the RPC with the error's rich status."""
    await abort_with_status(context, error.to_status())


async def abort_with_status(context: grpc.aio.ServicerContext, status: status_pb2.Status) -> None:
    await context.abort_with_status(rpc_status.to_status(status))


