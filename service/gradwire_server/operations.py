"""Operation store and the google.longrunning.Operations service (AIP-151).

A finished operation stays retrievable until deleted or `ttl_s` after it
finished, so a waiter that timed out never loses a result. Lives on the event
loop; the worker thread reports through loop.call_soon_threadsafe.
"""
from __future__ import annotations

import asyncio
import itertools
import pathlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import empty_pb2, message, timestamp_pb2

from gradwire.v1 import training_service_pb2 as pb
from gradwire_server import paging
from gradwire_server.errors import FieldViolation, ServiceError, abort, cut, invalid_argument, not_found
from gradwire_server.output_spool import OutputSpool, fresh_folder

State = pb.OperationMetadata.State


@dataclass
class OperationRecord:
    operation: operations_pb2.Operation
    metadata: pb.OperationMetadata
    done: asyncio.Event = field(default_factory=asyncio.Event)
    finished_at: float | None = None
    on_cancel: Callable[[], bool] | None = None  # cancels it if still queued
    outputs: list = field(default_factory=list)  # streamed pieces (sampling), as computed
    spool: OutputSpool | None = None  # per-datum arrays of a forward(-backward), on disk
    progress: asyncio.Condition = field(default_factory=asyncio.Condition)
    deleted: bool = False  # dropped from the store (DeleteOperation, its TTL, the server stopping)

    @property
    def output_count(self) -> int:
        return len(self.spool) if self.spool is not None else len(self.outputs)

    async def notify_progress(self) -> None:
        async with self.progress:
            self.progress.notify_all()

    async def wait_progress(self, seen_outputs: int) -> None:
        """Returns once there are more than `seen_outputs` outputs or the operation is done
        or deleted."""
        async with self.progress:
            await self.progress.wait_for(lambda: self.output_count > seen_outputs or self.operation.done
                                         or self.deleted)

    def check_present(self) -> None:
        """NOT_FOUND once the operation was deleted (a call waiting on it or reading its
        outputs ends with that, not with a result cut short)."""
        if self.deleted:
            raise not_found("operation", self.operation.name, "deleted while this call waited on it")

    def snapshot(self) -> operations_pb2.Operation:
        self.operation.metadata.Pack(self.metadata)
        return self.operation


class OperationStore:
    """Operations by name. Per-datum outputs of forward(-backward) operations go to a
    file each under `spool_folder` (emptied now), removed with the operation."""

    def __init__(self, spool_folder: pathlib.Path, ttl_s: float = 1800.0, max_wait_s: float = 30.0):
        self.ttl_s = ttl_s
        self.max_wait_s = max_wait_s
        self.spool_folder = fresh_folder(spool_folder)
        self._records: dict[str, OperationRecord] = {}
        self._counter = itertools.count(1)

    def create(self, kind: str, model_id: str, seq_id: int, num_datums: int) -> OperationRecord:
        name = f"operations/{model_id}/{next(self._counter)}-{secrets.token_hex(4)}"
        metadata = pb.OperationMetadata(model_id=model_id, seq_id=seq_id, kind=kind,
                                        state=State.QUEUED, create_time=_now(),
                                        num_datums=num_datums)
        record = OperationRecord(operations_pb2.Operation(name=name), metadata)
        self._records[name] = record
        return record

    def get(self, name: str) -> OperationRecord:
        record = self._records.get(name)
        if record is None:
            raise not_found("operation", name)
        return record

    def spool_outputs(self, record: OperationRecord) -> None:
        """The record's outputs (numpy arrays) will go to a file of their own."""
        record.spool = OutputSpool(self.spool_folder / record.operation.name.replace("/", "_"))

    def add_outputs(self, name: str, outputs: list) -> None:
        record = self._records.get(name)
        if record is not None:
            if record.spool is not None:
                record.spool.append(outputs)
            else:
                record.outputs.extend(outputs)
            asyncio.ensure_future(record.notify_progress())

    def set_running(self, name: str) -> None:
        record = self._records.get(name)
        if record is not None and not record.operation.done:
            record.metadata.state = State.RUNNING
            record.metadata.start_time.CopyFrom(_now())

    def finish(self, name: str, response: message.Message | None = None,
               error: ServiceError | None = None) -> None:
        """Completes an operation with a response or an error (first call wins)."""
        record = self._records.get(name)
        if record is None or record.operation.done:
            return
        if error is not None:
            record.operation.error.CopyFrom(error.to_status())
            record.metadata.state = State.CANCELLED if error.reason == "CANCELLED" else State.FAILED
        else:
            record.operation.response.Pack(response)
            record.metadata.state = State.SUCCEEDED
        record.metadata.end_time.CopyFrom(_now())
        record.operation.done = True
        record.finished_at = time.monotonic()
        record.on_cancel = None
        record.done.set()
        asyncio.ensure_future(record.notify_progress())

    async def wait(self, name: str, timeout_s: float) -> OperationRecord:
        """The operation once done, or as it is after `timeout_s` (at most max_wait_s);
        NOT_FOUND if it is deleted meanwhile."""
        record = self.get(name)
        if not record.operation.done:
            try:
                async with record.progress:
                    await asyncio.wait_for(record.progress.wait_for(lambda: record.operation.done or record.deleted),
                                           min(timeout_s, self.max_wait_s))
            except asyncio.TimeoutError:
                pass
        record.check_present()
        return record

    def delete(self, name: str) -> None:
        self._drop(self.get(name))

    def _drop(self, record: OperationRecord) -> None:
        del self._records[record.operation.name]
        record.deleted = True
        if record.spool is not None:
            record.spool.remove()
        asyncio.ensure_future(record.notify_progress())  # waiters end NOT_FOUND

    def names(self, prefix: str) -> list[str]:
        return [name for name in self._records if name.startswith(prefix)]

    def expire(self) -> int:
        """Drops operations finished more than ttl_s ago; returns how many."""
        cutoff = time.monotonic() - self.ttl_s
        stale = [r for r in self._records.values() if r.finished_at is not None and r.finished_at < cutoff]
        for record in stale:
            self._drop(record)
        return len(stale)

    def close(self) -> None:
        """Drops every operation and its spool file (the server stops)."""
        for record in list(self._records.values()):
            self._drop(record)


class OperationsServicer(operations_pb2_grpc.OperationsServicer):
    """google.longrunning.Operations over the store. List's `name` is a collection:
    "operations" (every one), "operations/<run_id>" (a run's), "operations/sampling"."""

    def __init__(self, store: OperationStore):
        self.store = store

    async def GetOperation(self, request, context):
        try:
            return self.store.get(request.name).snapshot()
        except ServiceError as error:
            await abort(context, error)

    async def WaitOperation(self, request, context):
        """Waits up to `timeout` (default and cap: the server's max_wait_s; a longer one is
        clamped, a negative or malformed one is INVALID_ARGUMENT)."""
        try:
            timeout = _wait_seconds(request, self.store.max_wait_s)
            return (await self.store.wait(request.name, timeout)).snapshot()
        except ServiceError as error:
            await abort(context, error)

    async def ListOperations(self, request, context):
        try:
            done = _done_filter(request.filter)
            collection = _collection(request.name)
            listing = f"operations {collection} {request.filter.replace(' ', '')}"
            after, size = paging.page(request.page_token, request.page_size, listing)
        except ServiceError as error:
            await abort(context, error)
        names = [name for name in self.store.names(collection + "/")  # in creation order
                 if (after is None or _creation(name) > after[0])
                 and (done is None or self.store.get(name).operation.done == done)][:size + 1]
        last = [_creation(names[size - 1])] if len(names) > size else None
        return operations_pb2.ListOperationsResponse(
            operations=[self.store.get(name).snapshot() for name in names[:size]],
            next_page_token=paging.next_token(listing, last, bool(last)))

    async def CancelOperation(self, request, context):
        try:
            record = self.store.get(request.name)
        except ServiceError as error:
            await abort(context, error)
        if record.on_cancel is not None:
            record.on_cancel()
        return empty_pb2.Empty()

    async def DeleteOperation(self, request, context):
        try:
            self.store.delete(request.name)
        except ServiceError as error:
            await abort(context, error)
        return empty_pb2.Empty()


def _creation(name: str) -> int:
    """An operation's place in creation order: the counter its name holds (".../<n>-<hex>")."""
    return int(name.rsplit("/", 1)[1].split("-", 1)[0])


def _collection(name: str) -> str:
    """ListOperations' name without a trailing slash: "operations" or a collection under it
    (INVALID_ARGUMENT otherwise: a bare run id lists nothing, and a prefix of one run's id
    must not list another's)."""
    collection = name.rstrip("/")
    if collection != "operations" and not collection.startswith("operations/"):
        raise invalid_argument([FieldViolation("name", f"{cut(name)!r} is no collection of operations: use "
                                                       "\"operations\", \"operations/<run_id>\" or "
                                                       "\"operations/sampling\"")])
    return collection


def _done_filter(text: str) -> bool | None:
    """ListOperations' filter (AIP-160): none, `done=true` or `done=false`; others are refused,
    not ignored (a list that ignored its filter would look filtered)."""
    compact = text.replace(" ", "")
    if compact in ("", "done=true", "done=false"):
        return None if not compact else compact == "done=true"
    raise invalid_argument([FieldViolation("filter", f"{text!r} is not a supported filter: use done=true or "
                                                     "done=false, or none (operations under `name` are listed)")])


def _wait_seconds(request: operations_pb2.WaitOperationRequest, cap_s: float) -> float:
    if not request.HasField("timeout"):
        return cap_s
    seconds, nanos = request.timeout.seconds, request.timeout.nanos
    if seconds < 0 or nanos < 0 or nanos >= 1_000_000_000:
        raise invalid_argument([FieldViolation(
            "timeout", f"must be a non-negative duration, got {seconds} s and {nanos} ns")])
    return min(seconds + nanos / 1e9, cap_s)


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp
