"""A Forward/ForwardBackward request as a worker task, fed whole (unary) or in
pieces as a client stream arrives. Each piece's outputs are reported as it
finishes, so ReadOutputs can stream them before the operation is done."""
from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np

from gradwire.v1 import codec
from gradwire.v1 import tensor_pb2
from gradwire.v1 import training_service_pb2 as pb
from gradwire_server.batch import DatumArrays
from gradwire_server.engine import Engine, LossPass, NonFiniteGradient
from gradwire_server.errors import ServiceError, failed_precondition
from gradwire_server.scheduler import Step

# Results up to this size ride inside the Operation; larger ones are read
# with ReadOutputs, so no message exceeds gRPC's 4 MiB default.
INLINE_OUTPUT_BYTES = 3 * 1024 * 1024


class LossTask:
    """Worker side: step() computes one fed piece per turn, then commits.
    Event-loop side: feed(), close(), fail()."""

    def __init__(self, engine: Engine, run_id: str, loss_fn: str, config: dict[str, float],
                 backward: bool, consumed: Callable[[], None] = lambda: None,
                 keep_graph: bool = False, reuse_forward: str = ""):
        self._start = lambda: engine.start_pass(run_id, loss_fn, config, backward, keep_graph, reuse_forward)
        self._release_kept = (lambda: engine.drop_kept_graph(run_id)) if reuse_forward else lambda: None
        self.op_name = ""  # set once the scheduler has named the operation, before any feed()
        self._consumed = consumed
        self._pending: deque[list[DatumArrays]] = deque()
        self._closed = False
        self._error: ServiceError | None = None
        self._pass: LossPass | None = None
        # Outputs kept for an inline response; None once they outgrow it (then they
        # are read back from the operation's spool with ReadOutputs).
        self._inline: list[np.ndarray] | None = []
        self._inline_bytes = 0

    # ---- event-loop side ---------------------------------------------------------

    def feed(self, data: list[DatumArrays]) -> None:
        self._pending.append(data)

    def close(self) -> None:
        """No more pieces: commit when the fed ones are computed."""
        self._closed = True

    def fail(self, error: ServiceError) -> None:
        """The stream broke or held bad data: the task fails with `error`, committing nothing."""
        self._error = error

    @property
    def buffered(self) -> int:
        return len(self._pending)

    # ---- worker side ---------------------------------------------------------------

    def ready(self) -> bool:
        return bool(self._pending) or self._closed or self._error is not None

    def step(self) -> Step:
        if self._error is not None:
            raise self._error
        if self._pass is None:
            self._pass = self._start()
        outputs = None
        if self._pending:
            outputs = self._pass.feed(self._pending.popleft())
            self._keep_inline(outputs)
            self._consumed()
            if not self._closed or self._pending:  # (closed is set after the last feed)
                return Step(False, outputs=outputs)
        # The last piece is computed: commit in the same turn (a unary request takes one turn,
        # not a second trip through the scheduler, which a custom loss's forward leg waits on).
        try:
            metrics = self._pass.commit(self.op_name)
        except NonFiniteGradient as error:
            raise failed_precondition(str(error), "NON_FINITE_GRADIENT") from None
        response = output_proto(self._inline, metrics)
        response.graph_kept, response.reused_datums = self._pass.graph_kept, self._pass.reused_datums
        return Step(True, response, outputs=outputs)

    def _keep_inline(self, outputs: list[np.ndarray]) -> None:
        if self._inline is None:
            return
        self._inline_bytes += sum(a.nbytes for a in outputs)
        if self._inline_bytes > INLINE_OUTPUT_BYTES:
            self._inline = None
        else:
            self._inline.extend(outputs)

    def discard(self) -> None:
        self._pass = None
        self._pending.clear()
        self._release_kept()  # a cancelled backward leg frees the graph it was to use


def output_proto(inline: list[np.ndarray] | None, metrics: dict[str, float]) -> pb.ForwardBackwardOutput:
    """The operation's response: the outputs inline when they fit (`inline`), else
    (None) a pointer to ReadOutputs."""
    response = pb.ForwardBackwardOutput(loss_fn_output_type="TensorData", metrics=metrics)
    if inline is None:
        response.outputs_streamed = True
    else:
        response.loss_fn_outputs.extend(output_records(inline))
    return response


def output_records(outputs: list[np.ndarray]) -> list[tensor_pb2.ArrayRecord]:
    """Per-datum logprobs as ArrayRecords, one per run of consecutive datums of the
    same trailing shape ([N] and [N, K] targets may be mixed in one batch)."""
    records = []
    start = 0
    for end in range(1, len(outputs) + 1):
        if end == len(outputs) or outputs[end].shape[1:] != outputs[start].shape[1:]:
            records.append(tensor_pb2.ArrayRecord(
                type_tag="logprobs", num_datums=end - start,
                fields={"logprobs": codec.batched_to_proto(outputs[start:end])}))
            start = end
    return records
