"""The server-wide rule for malformed requests, as a gRPC interceptor.

A message that does not parse is the client's error: it gets INVALID_ARGUMENT
naming the message type, on every method of every service, instead of gRPC's
UNKNOWN "Unexpected DecodeError". For a client stream the undecodable message
surfaces as a ServiceError raised by the request iterator, so the handler
fails the stream's job like any other bad message (it never stays parked).

An exception that escapes a handler is a server bug, never the client's: it is
logged and answered INTERNAL with its type, instead of UNKNOWN (a method a
servicer leaves unimplemented answers UNIMPLEMENTED). (The fuzz test
asserts that no malformed request gets either code.)
"""
from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf.message import DecodeError

from gradwire_server.errors import FieldViolation, ServiceError, abort, internal, invalid_argument

log = logging.getLogger(__name__)


class Undecodable:
    """Stands in for a request message whose bytes did not parse."""

    def __init__(self, message_type: str, error: Exception):
        self.message_type = message_type
        self.error = error

    def service_error(self) -> ServiceError:
        return invalid_argument([FieldViolation(
            "request", f"the bytes are not a valid {self.message_type} message ({self.error})")])


class MalformedRequestGuard(grpc.aio.ServerInterceptor):
    """Decodes every request message itself so a bad one becomes INVALID_ARGUMENT."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        decode = _tolerant(handler.request_deserializer)
        serialize = handler.response_serializer
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _unary_unary(handler.unary_unary, method), decode, serialize)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _unary_stream(handler.unary_stream, method), decode, serialize)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _stream_unary(handler.stream_unary, method), decode, serialize)
        return grpc.stream_stream_rpc_method_handler(
            _stream_stream(handler.stream_stream, method), decode, serialize)


def _tolerant(deserialize: Callable[[bytes], object]) -> Callable[[bytes], object]:
    message_type = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    name = message_type.full_name if message_type is not None else "request"

    def decode(raw: bytes) -> object:
        try:
            return deserialize(raw)
        except (DecodeError, ValueError, TypeError, RecursionError) as error:
            return Undecodable(name, error)

    return decode


async def _checked(requests: AsyncIterator) -> AsyncIterator:
    async for request in requests:
        if isinstance(request, Undecodable):
            raise request.service_error()
        yield request


async def _fail(context, method: str, error: BaseException) -> None:
    if context.done():  # answered or cancelled already (e.g. the client left mid-stream): nothing to tell
        log.debug("%s: %r after its RPC ended", method, error)
        return
    if isinstance(error, ServiceError):
        await abort(context, error)
    if isinstance(error, NotImplementedError):  # a generated servicer's default method
        await abort(context, ServiceError(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented",
                                          "UNIMPLEMENTED"))
    log.error("%s failed", method, exc_info=error)
    await abort(context, internal(error))


def _unary_unary(behavior, method: str):
    async def guarded(request, context):
        try:
            if isinstance(request, Undecodable):
                raise request.service_error()
            return await behavior(request, context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as error:  # noqa: BLE001 - answered with a status, never UNKNOWN
            await _fail(context, method, error)
    return guarded


def _stream_unary(behavior, method: str):
    async def guarded(requests, context):
        try:
            return await behavior(_checked(requests), context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as error:  # noqa: BLE001
            await _fail(context, method, error)
    return guarded


def _unary_stream(behavior, method: str):
    if not inspect.isasyncgenfunction(behavior):  # writes with context.write (e.g. health Watch)
        return _unary_unary(behavior, method)

    async def guarded(request, context):
        try:
            if isinstance(request, Undecodable):
                raise request.service_error()
            async for response in behavior(request, context):
                yield response
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as error:  # noqa: BLE001
            await _fail(context, method, error)
    return guarded


def _stream_stream(behavior, method: str):
    if not inspect.isasyncgenfunction(behavior):
        return _stream_unary(behavior, method)

    async def guarded(requests, context):
        try:
            async for response in behavior(_checked(requests), context):
                yield response
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as error:  # noqa: BLE001
            await _fail(context, method, error)
    return guarded
