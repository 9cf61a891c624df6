"""Per-run ordering and the single compute worker.

Each training run numbers its requests (seq_id from 1). A request is held
until every lower seq_id of its run has been accepted (waiting at most
`gap_timeout_s` for a missing one), then queued. One worker thread owns the
device and takes queued jobs round-robin across runs, so no run waits behind
another run's whole queue. When a run's request fails, the requests of that
run queued behind it fail with ABORTED naming it; later ones run normally.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from google.protobuf import message

from gradwire_server.engine import RunNotFound
from gradwire_server.errors import (FieldViolation, ServiceError, aborted, already_used, cancelled,
                                    failed_precondition, internal, invalid_argument, request_id_reused,
                                    resource_exhausted, stopping)
from gradwire_server.memory import OutOfMemory
from gradwire_server.operations import OperationRecord, OperationStore

log = logging.getLogger(__name__)

MAX_SEQ_ID = 2**31 - 1  # seq_id is an int32: 1..MAX_SEQ_ID, and 0 asks for the next free one
MAX_SEQ_AHEAD = 2**16  # how far past a run's next seq_id a request is accepted (and held)

@dataclass
class Step:
    """What a task reports after one turn on the worker."""

    done: bool
    response: message.Message | None = None
    outputs: list | None = None  # per-datum outputs computed in this turn


class Task(Protocol):
    """Work for the worker, done in one or more turns (a streamed batch takes a
    turn per piece, so other runs interleave with it)."""

    def step(self) -> Step: ...

    def ready(self) -> bool:
        """Whether step() has something to do now (False: waiting for input)."""
        ...

    def discard(self) -> None:
        """Drops partial work; the run must be left as it was."""
        ...


class OneShot:
    """A task done in one turn."""

    def __init__(self, work: Callable[[], message.Message | None]):
        self.work = work

    def step(self) -> Step:
        return Step(True, self.work())

    def ready(self) -> bool:
        return True

    def discard(self) -> None:
        pass


@dataclass
class Job:
    op_name: str
    run_id: str
    seq_id: int
    task: Task | None        # None: a rejected request that only holds its place
    cancelled: bool = False
    started: bool = False
    stepping: bool = False   # the worker computes a turn of it now (under the lock)
    cancel_asked: bool = False  # while stepping: cancelled after the turn, unless it finishes the job
    finished: bool = False   # computed or failed: its outcome is on its way to the operation
    aborted: bool = False    # failed while held: it only keeps its seq_id, which is passed over


@dataclass
class RunOrder:
    next_seq: int = 1
    held: dict[int, Job] = field(default_factory=dict)
    op_of_seq: dict[int, str] = field(default_factory=dict)
    request_of_seq: dict[int, tuple[str, str]] = field(default_factory=dict)  # (request_id, kind)


class Scheduler:
    def __init__(self, store: OperationStore, loop: asyncio.AbstractEventLoop,
                 gap_timeout_s: float = 60.0):
        self.store = store
        self.loop = loop
        self.gap_timeout_s = gap_timeout_s
        self._orders: dict[str, RunOrder] = {}
        # Shared with the worker thread, under _lock.
        self._lock = threading.Condition()
        self._ready: dict[str, deque[Job]] = {}
        self._rotation: deque[str] = deque()    # runs with a job to step now
        self._parked: set[str] = set()          # runs whose head job waits for input
        self._stopping = False
        self._draining = False                  # event-loop side: new work is refused
        self._thread: threading.Thread | None = None

    # ---- event-loop side ------------------------------------------------------

    def existing(self, run_id: str, seq_id: int, request_id: str, kind: str) -> str | None:
        """The operation of an already-accepted (run, seq_id) when this request is its
        retry (AIP-155: the same non-empty request_id, and the same RPC). ALREADY_EXISTS
        otherwise: without a request_id a request is never taken for a retry, which could
        be another RPC (an OptimStep answered with a ForwardBackward's operation would
        never run). (Fields other than the RPC are not compared: hashing a batch of many
        MB on the event loop would cost every request.)"""
        order = self._orders.get(run_id)
        if order is None or seq_id == 0 or seq_id not in order.op_of_seq:
            return None
        first_request_id, first_kind = order.request_of_seq[seq_id]
        if not request_id or first_request_id != request_id:
            raise already_used(seq_id, order.op_of_seq[seq_id])
        if first_kind != kind:
            raise request_id_reused(request_id, f"{order.op_of_seq[seq_id]}, a {first_kind}", "another RPC")
        return order.op_of_seq[seq_id]

    def check_reach(self, run_id: str, seq_id: int) -> None:
        """INVALID_ARGUMENT for a seq_id MAX_SEQ_AHEAD or more past the run's next one. Held,
        it would wait for requests no client sends, and once its gap expired the run's order
        would move past it: from the last seq_id, to where no request can follow."""
        order = self._orders.get(run_id)
        next_seq = order.next_seq if order else 1
        if seq_id >= next_seq + MAX_SEQ_AHEAD:
            raise invalid_argument([FieldViolation(
                "seq_id", f"{seq_id} is too far past the next seq_id of {run_id}, {next_seq}: "
                          f"at most {MAX_SEQ_AHEAD - 1} past it are accepted")])

    def submit(self, run_id: str, seq_id: int, request_id: str, kind: str,
               task: Task, num_datums: int = 0) -> OperationRecord:
        """Accepts a validated request (or a stream's header); returns its operation."""
        self._check_accepting()
        order = self._orders.setdefault(run_id, RunOrder())
        seq_id = seq_id or self._next_free(order)
        if seq_id > MAX_SEQ_ID:
            raise invalid_argument([FieldViolation(
                "seq_id", f"0 asks for the next free seq_id of {run_id}, but {MAX_SEQ_ID} is taken")])
        if seq_id < order.next_seq:
            raise aborted(f"seq_id {seq_id} of {run_id} has already run or was skipped")
        record = self.store.create(kind, run_id, seq_id, num_datums)
        job = Job(record.operation.name, run_id, seq_id, task)
        record.on_cancel = lambda: self._cancel(job)
        self._place(order, job, request_id, kind)
        return record

    def submit_unordered(self, owner: str, kind: str, task: Task) -> OperationRecord:
        """Accepts work outside any run's order (sampling); returns its operation.
        It is queued on its own, so it takes turns with every run and with other
        unordered work instead of waiting behind them."""
        self._check_accepting()
        record = self.store.create(kind, owner, 0, 0)
        job = Job(record.operation.name, record.operation.name, 0, task)
        record.on_cancel = lambda: self._cancel(job)
        with self._lock:
            self._enqueue(job)
        return record

    def reject(self, run_id: str, seq_id: int, request_id: str, kind: str, error: ServiceError) -> None:
        """A request failed validation: it still consumes its seq_id, and the
        run's requests held behind it are aborted."""
        if seq_id == 0:
            return
        order = self._orders.setdefault(run_id, RunOrder())
        if seq_id < order.next_seq or seq_id in order.held:
            return
        record = self.store.create("Rejected", run_id, seq_id, 0)
        self.store.finish(record.operation.name, error=error)
        self._place(order, Job(record.operation.name, run_id, seq_id, None), request_id, kind)

    def fail_held(self, run_id: str, op_name: str, error: ServiceError) -> bool:
        """Fails a job still held for a lower seq_id (never queued) at once: it keeps
        its place and, once released, aborts what is held behind it, as a rejected
        request does. False if the job is not held (the worker fails it then)."""
        order = self._orders.get(run_id)
        held = [job for job in order.held.values() if job.op_name == op_name and not job.aborted] if order else []
        if not held:
            return False
        held[0].task = None
        self.store.finish(op_name, error=error)
        return True

    def _check_accepting(self) -> None:
        if self._draining:
            raise stopping()

    def abort_held(self, error: ServiceError) -> None:
        """Fails every run's requests held for a lower seq_id (none of them ran) with `error`."""
        for order in self._orders.values():
            self._abort_held(order, error)

    def _next_free(self, order: RunOrder) -> int:
        return max([order.next_seq - 1, *order.held]) + 1

    def _place(self, order: RunOrder, job: Job, request_id: str, kind: str) -> None:
        order.op_of_seq[job.seq_id] = job.op_name
        order.request_of_seq[job.seq_id] = (request_id, kind)
        order.held[job.seq_id] = job
        if job.seq_id > order.next_seq:
            self.loop.call_later(self.gap_timeout_s, self._gap_expired, job.run_id, job.seq_id)
        self._release(order)

    def _release(self, order: RunOrder) -> None:
        while order.next_seq in order.held:
            job = order.held.pop(order.next_seq)
            order.next_seq += 1
            if job.aborted:
                continue
            if job.task is None:
                why = f"not run: request {job.op_name} (seq_id {job.seq_id}) was rejected"
                self._abort_held(order, aborted(why))
            else:  # a cancelled job too: the worker discards it, freeing what it holds
                with self._lock:
                    self._enqueue(job)

    def _abort_held(self, order: RunOrder, error: ServiceError) -> None:
        """Fails the held jobs. Each keeps its seq_id, passed over once the order reaches
        it, so a lower seq_id that arrives later still runs."""
        for job in order.held.values():
            if not job.aborted:
                job.aborted = True
                self.store.finish(job.op_name, error=error)

    def _gap_expired(self, run_id: str, seq_id: int) -> None:
        order = self._orders[run_id]
        if seq_id in order.held and order.next_seq < seq_id:
            self._abort_held(order, aborted(f"not run: seq_id {order.next_seq} of {run_id} never arrived "
                                            f"within {self.gap_timeout_s:g} s"))
            order.next_seq = max(order.held) + 1  # the missing seq_ids are skipped
            order.held.clear()

    def _cancel(self, job: Job) -> bool:
        """CancelOperation, best effort (AIP-151): a job the worker is not computing now is
        dropped (nothing of it was applied) and fails CANCELLED. One whose turn is being
        computed is cancelled after that turn, unless the turn finishes it: then it was
        applied, and its result stands."""
        with self._lock:
            if job.cancelled or job.finished:
                return False
            if job.stepping:
                job.cancel_asked = True
                return False
            job.cancelled = True  # the worker skips it; a held one still releases its place
            self._unpark(job.run_id)  # a parked run's cancelled head is dropped at its turn
        self.store.finish(job.op_name, error=cancelled("cancelled by the client"))
        return True

    def _on_failure(self, run_id: str, failed_op: str) -> None:
        order = self._orders.get(run_id)
        if order is not None:
            self._abort_held(order, aborted(f"not run: earlier request {failed_op} failed"))

    # ---- worker side ------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work_loop, name="gradwire-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()

    def drain(self) -> None:
        """Stops the worker once the step it computes ends, then fails every job that did
        not finish (queued, waiting for a stream's input, or a stream part-way: nothing of
        it is applied) with stopping(). Blocks: call it in a thread, after refuse_new_work()."""
        self.stop()
        with self._lock:
            jobs = [job for queue in self._ready.values() for job in queue]
            self._ready.clear()
            self._rotation.clear()
            self._parked.clear()
        for job in jobs:
            job.task.discard()
            if job.op_name and not job.cancelled:
                self.loop.call_soon_threadsafe(self.store.finish, job.op_name, None, stopping())

    def refuse_new_work(self) -> None:
        """From now on requests are refused with stopping() (event-loop side)."""
        self._draining = True

    def run_on_worker(self, label: str, work: Callable[[], object]) -> asyncio.Future:
        """Runs unordered device work (e.g. creating a run) on the worker; awaitable."""
        self._check_accepting()
        future = self.loop.create_future()

        def wrapped() -> None:
            try:
                result = work()
            except BaseException as error:  # noqa: BLE001 - handed to the awaiting coroutine
                self.loop.call_soon_threadsafe(_settle, future, None, error)
            else:
                self.loop.call_soon_threadsafe(_settle, future, result, None)

        with self._lock:
            self._enqueue(Job("", f"__control__/{label}", 0, OneShot(wrapped)))
        return future

    def wake(self, run_id: str) -> None:
        """A parked run's task has input again (called after feeding it)."""
        with self._lock:
            self._unpark(run_id)

    def _unpark(self, run_id: str) -> None:  # caller holds _lock
        if run_id in self._parked:
            self._parked.discard(run_id)
            self._rotation.append(run_id)
            self._lock.notify()

    def _enqueue(self, job: Job) -> None:  # caller holds _lock
        queue = self._ready.setdefault(job.run_id, deque())
        if not queue and job.run_id not in self._parked:
            self._rotation.append(job.run_id)
        queue.append(job)
        self._lock.notify()

    def _next_job(self) -> Job | None:
        """The head job of the next run in rotation (it stays queued until done)."""
        with self._lock:
            while True:
                if self._stopping:
                    return None
                if self._rotation:
                    run_id = self._rotation.popleft()
                    queue = self._ready[run_id]
                    if queue[0].cancelled:
                        queue[0].task.discard()
                        self._pop_head(run_id)
                        continue
                    if not queue[0].task.ready():
                        self._parked.add(run_id)  # wake() or a cancel brings it back
                        continue
                    queue[0].stepping = True
                    return queue[0]
                self._lock.wait()

    def _pop_head(self, run_id: str) -> None:  # caller holds _lock
        queue = self._ready[run_id]
        queue.popleft()
        self._parked.discard(run_id)
        if queue:
            if run_id not in self._rotation:
                self._rotation.append(run_id)
        else:
            del self._ready[run_id]

    def _work_loop(self) -> None:
        while (job := self._next_job()) is not None:
            if job.op_name and not job.started:
                job.started = True
                self.loop.call_soon_threadsafe(self.store.set_running, job.op_name)
            try:
                step, error = job.task.step(), None
            except ServiceError as service_error:
                # Without its traceback: the frames of the failed step (and the
                # tensors they hold) are freed now, not when the next job comes.
                step, error = None, service_error.with_traceback(None)
            except OutOfMemory as out_of_memory:
                step, error = None, resource_exhausted(str(out_of_memory))
            except torch.OutOfMemoryError as out_of_memory:  # outside a loss pass (optimizer, sampling)
                step, error = None, resource_exhausted(f"out of device memory: {out_of_memory}")
            except RunNotFound as gone:  # e.g. queued behind an UnloadModel
                step, error = None, failed_precondition(str(gone), "RUN_NOT_LOADED")
            except Exception as failure:  # noqa: BLE001 - reported in Operation.error
                log.exception("%s failed", job.op_name or job.run_id)
                step, error = None, internal(failure)
            if error is not None:
                job.task.discard()
                self._fail(job, error)
                continue
            with self._lock:
                job.stepping = False
                cancelled_now = job.cancel_asked and not step.done
                if cancelled_now:  # cancelled during the turn, which applied nothing
                    job.cancelled = True
                    job.task.discard()
                    self._pop_head(job.run_id)
                elif step.done:
                    job.finished = True
                    self._pop_head(job.run_id)
                elif job.task.ready():
                    self._rotation.append(job.run_id)  # one piece per turn: others interleave
                else:
                    self._parked.add(job.run_id)
            if cancelled_now:
                self.loop.call_soon_threadsafe(self.store.finish, job.op_name, None,
                                               cancelled("cancelled by the client"))
                continue
            if step.outputs:
                self.loop.call_soon_threadsafe(self.store.add_outputs, job.op_name, step.outputs)
            if step.done and job.op_name:
                self.loop.call_soon_threadsafe(self.store.finish, job.op_name, step.response, None)

    def _fail(self, failed: Job, error: ServiceError) -> None:
        """Fails a job and aborts its run's jobs queued behind it."""
        with self._lock:
            failed.stepping, failed.finished = False, True
            queue = self._ready.pop(failed.run_id, deque())
            self._parked.discard(failed.run_id)
        queue.popleft()
        self.loop.call_soon_threadsafe(self.store.finish, failed.op_name, None, error)
        why = aborted(f"not run: earlier request {failed.op_name} (seq_id {failed.seq_id}) failed")
        for job in queue:
            job.task.discard()
            if not job.cancelled:  # a cancelled one is finished already
                self.loop.call_soon_threadsafe(self.store.finish, job.op_name, None, why)
        self.loop.call_soon_threadsafe(self._on_failure, failed.run_id, failed.op_name)


def _settle(future: asyncio.Future, result: object, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
