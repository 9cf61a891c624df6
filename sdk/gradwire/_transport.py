"""The SDK's transport: one gRPC channel, its retry rule, and operation polling.

Every client (ServiceClient, TrainingClient, SamplingClient, RestClient) goes
through one Transport, so none of the client modules imports another for
plumbing.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import duration_pb2

from gradwire.errors import APIConnectionError, APITimeoutError, GradwireError, error_from_rpc, failed_request
from gradwire.futures import APIFuture
from gradwire.v1 import resource_service_pb2_grpc as rpb_grpc
from gradwire.v1 import sampling_service_pb2_grpc as sampling_grpc
from gradwire.v1 import training_service_pb2_grpc as pb_grpc

T = TypeVar("T")

POLL_S = 30.0  # one WaitOperation long-poll; the server caps it too
METADATA_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")


class Transport:
    """A channel to one server with a stub per service, the bearer token and any
    extra headers as call metadata, and calls retried for up to retry_s seconds
    while the server is unreachable or still loading its model."""

    def __init__(self, target: str, api_key: str | None, retry_s: float,
                 headers: dict[str, str] | None = None):
        self.retry_s = retry_s
        self.metadata = ((("authorization", f"Bearer {api_key}"),) if api_key else ()) + _metadata(headers or {})
        self.channel = grpc.insecure_channel(target)
        self.closed = False
        self.training = pb_grpc.TrainingServiceStub(self.channel)
        self.resources = rpb_grpc.ResourceServiceStub(self.channel)
        self.sampling = sampling_grpc.SamplingServiceStub(self.channel)
        self.operations = operations_pb2_grpc.OperationsStub(self.channel)

    def unary(self, stub_method, request, timeout: float | None = None):
        """Calls stub_method, retrying while the server is unreachable or still loading
        (UNAVAILABLE) for up to `retry_s` seconds. Retrying is safe: a training request
        or a run's creation carries its request_id, so a copy that did arrive is the
        same request (AIP-155); the other calls only read, or delete by name."""
        return self.retrying(lambda: stub_method(request, metadata=self.metadata, timeout=timeout))

    def retrying(self, call: Callable[[], T]) -> T:
        """call(), again (from the start) while it fails UNAVAILABLE, for up to `retry_s`
        seconds; another failure raises as the SDK's error."""
        self.check_open()
        give_up = time.monotonic() + self.retry_s
        for pause in backoff():
            try:
                return call()
            except grpc.RpcError as error:
                self.check_open()  # closed meanwhile: that, not the CANCELLED it caused
                if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() + pause > give_up:
                    raise error_from_rpc(error) from None
            except ValueError:  # grpc's "closed channel", when close() came after check_open() above
                self.check_open()
                raise
            time.sleep(pause)

    def wait_operation(self, name: str, timeout: float | None) -> operations_pb2.Operation:
        """Long-polls until the operation is done or `timeout` seconds pass."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            poll = POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic()))
            request = operations_pb2.WaitOperationRequest(
                name=name, timeout=duration_pb2.Duration(seconds=int(poll), nanos=int(poll % 1 * 1e9)))
            try:
                operation = self.unary(self.operations.WaitOperation, request, timeout=poll + 30.0)
            except APITimeoutError:  # this poll's own deadline (a stalled server): not done yet
                operation = None
            if operation is not None and operation.done:
                return operation
            if deadline is not None and time.monotonic() >= deadline:
                raise APITimeoutError(f"{name} is not done after {timeout} s; it keeps running, "
                                      "call result() again to keep waiting")

    def operation_result(self, name: str, message_type,
                         convert: Callable[[Any], Any] = lambda response: response, delete: bool = True):
        """convert(unpacked response) of a finished operation, which is then deleted (unless
        not `delete`: the caller deletes it later, off its critical path)."""
        operation = self.wait_operation(name, None)
        if operation.HasField("error"):
            raise failed_request(operation.error, name)
        response = message_type()
        operation.response.Unpack(response)
        result = convert(response)
        if delete:
            self.delete_operation(name)
        return result

    def delete_operation(self, name: str) -> None:
        """Deletes a finished operation; best effort (the server's TTL removes it anyway)."""
        try:
            self.operations.DeleteOperation(operations_pb2.DeleteOperationRequest(name=name),
                                            metadata=self.metadata)
        except (grpc.RpcError, ValueError):  # ValueError: the channel is closed
            pass

    def check_open(self) -> None:
        """APIConnectionError once close() was called (gRPC's own error is a bare ValueError)."""
        if self.closed:
            raise APIConnectionError("the client is closed (close() was called): nothing more is sent or "
                                     "received (a request sent before it may still run on the server)")

    def close(self) -> None:
        self.closed = True
        self.channel.close()


def _metadata(headers: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """Extra headers as gRPC metadata (lower-case keys); ValueError naming one gRPC cannot
    send (it would fail every call as if the server had failed)."""
    metadata = []
    for key, value in headers.items():
        name = key.lower() if isinstance(key, str) else key
        if not (isinstance(name, str) and name and all(c in METADATA_KEY_CHARS for c in name)) or name.endswith("-bin"):
            raise ValueError(f"header {key!r}: a name of letters, digits, '-', '_' or '.' (not ending in -bin)")
        if not (isinstance(value, str) and all(" " <= c <= "~" for c in value)):
            raise ValueError(f"header {key!r}: its value must be printable ASCII text, got {value!r}")
        metadata.append((name, value))
    return tuple(metadata)


def backoff() -> Iterator[float]:
    """Pauses between retries: 0.1 s doubling up to 2 s."""
    pause = 0.1
    while True:
        yield pause
        pause = min(2 * pause, 2.0)


def request_id() -> str:
    """A fresh id per request: a retry reuses it, another client's request cannot."""
    return uuid.uuid4().hex


async def submitted(future: APIFuture) -> APIFuture:
    """Waits (without blocking the loop) until the request has its place on the server."""
    try:
        # Shielded: a caller that stops waiting (a cancelled task, wait_for's timeout) must not
        # cancel the send queue's future; the request keeps its place and runs.
        await asyncio.shield(asyncio.wrap_future(future._submitted))
    except GradwireError:
        pass  # delivered by future.result()
    return future
