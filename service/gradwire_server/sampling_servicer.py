"""gradwire.v1.SamplingService: validates, resolves the weights, hands a
SampleTask to the scheduler (outside any training run's order). No torch here."""
from __future__ import annotations

import pathlib
from collections.abc import Callable


from google.protobuf import empty_pb2

from gradwire.v1 import sampling_service_pb2_grpc as pb_grpc
from gradwire_server import sampling_validation, validation
from gradwire_server.engine import Engine
from gradwire_server.errors import (FieldViolation, ServiceError, abort, abort_with_status, invalid_argument,
                                    not_found, request_id_reused)
from gradwire_server.operations import OperationStore
from gradwire_server.sampler import DecodeLoop, SampleSpec
from gradwire_server.sampler_weights import SamplerAdapters, is_ephemeral_path
from gradwire_server.sampling_task import SampleTask
from gradwire_server.scheduler import Scheduler
from gradwire_server.training_servicer import ModelInfo, loaded

OPERATION_OWNER = "sampling"  # operations are named operations/sampling/...
_MAX_REMEMBERED_REQUESTS = 4096  # request_ids kept before forgetting finished, dropped operations


class SamplingServicer(pb_grpc.SamplingServiceServicer):
    def __init__(self, store: OperationStore, checkpoint_root: pathlib.Path):
        self.store = store
        self.checkpoint_root = checkpoint_root
        self.engine: Engine | None = None
        self.scheduler: Scheduler | None = None
        self.info: ModelInfo | None = None
        self.adapters: SamplerAdapters | None = None
        self.loop: DecodeLoop | None = None
        self.special_tokens: dict[str, int] = {}  # the tokenizer's special tokens' texts and ids
        # request_id -> (its operation, its request's fingerprint)
        self._operation_of_request: dict[str, tuple[str, bytes]] = {}

    def attach(self, engine: Engine, scheduler: Scheduler, info: ModelInfo, adapters: SamplerAdapters,
               loop: DecodeLoop) -> None:
        """Called once the model is loaded; until then every call is UNAVAILABLE."""
        self.engine, self.scheduler, self.info, self.adapters, self.loop = engine, scheduler, info, adapters, loop
        tokenizer = engine.base.tokenizer
        self.special_tokens = dict(zip(tokenizer.all_special_tokens, tokenizer.all_special_ids))

    async def Sample(self, request, context):
        try:
            return self._submit(request, "Sample", lambda info: sampling_validation.sample_spec(
                request, info.vocab_size, info.max_context_length,
                special_tokens=self.special_tokens)).snapshot()
        except ServiceError as error:
            await abort(context, error)

    async def ComputeLogprobs(self, request, context):
        try:
            return self._submit(request, "ComputeLogprobs", lambda info: sampling_validation.logprobs_spec(
                request, info.vocab_size, info.max_context_length)).snapshot()
        except ServiceError as error:
            await abort(context, error)

    async def SampleStream(self, request, context):
        """Yields each decode turn's new tokens; the operation is internal and
        deleted at the end. A client that goes away cancels the generation."""
        try:
            record = self._submit(request, "SampleStream", lambda info: sampling_validation.sample_spec(
                request, info.vocab_size, info.max_context_length, stream=True,
                special_tokens=self.special_tokens), stream=True)
        except ServiceError as error:
            await abort(context, error)
        name, sent = record.operation.name, 0
        try:
            while True:
                await record.wait_progress(sent)
                if record.deleted and not record.operation.done:  # by a client, through Operations
                    await abort(context, not_found("operation", name, "deleted while it streamed"))
                while sent < len(record.outputs):
                    yield record.outputs[sent]
                    sent += 1
                if record.operation.done and sent == len(record.outputs):
                    break
        finally:
            if record.on_cancel is not None:
                record.on_cancel()
            try:
                self.store.delete(name)
            except ServiceError:
                pass  # a client deleted it through Operations already
        if record.operation.HasField("error"):
            await abort_with_status(context, record.operation.error)

    async def ReleaseSamplerWeights(self, request, context):
        try:
            self._ready()
            if not is_ephemeral_path(request.model_path):
                raise invalid_argument([FieldViolation(
                    "model_path", f"{request.model_path!r} is no ephemeral snapshot path "
                                  "(gradwire://<run_id>/ephemeral/<id>); delete checkpoints with "
                                  "ResourceService.DeleteCheckpoint")])
            adapters = self.adapters
            await self.scheduler.run_on_worker("release-sampler-weights",
                                               lambda: adapters.release(request.model_path))
            return empty_pb2.Empty()
        except ServiceError as error:
            await abort(context, error)

    def _submit(self, request, kind: str, validate: Callable[[ModelInfo], SampleSpec], stream: bool = False):
        """The operation of a retried request_id, or a new one for a valid request."""
        info = self._ready()
        if not stream:  # (SampleStream ignores request_id)
            validation.request_id(request.request_id)
        existing = self._operation_of_request.get(request.request_id) if request.request_id else None
        if existing is not None and not stream:
            operation, fingerprint = existing
            try:
                record = self.store.get(operation)
            except ServiceError:
                del self._operation_of_request[request.request_id]  # expired or deleted: a new request
            else:
                if fingerprint != validation.request_fingerprint(request):
                    raise request_id_reused(request.request_id, operation)
                return record
        if request.WhichOneof("model") == "model_path" and is_ephemeral_path(request.model_path):
            checkpoint = self.adapters.snapshot(request.model_path)
        else:
            checkpoint = sampling_validation.weights_checkpoint(request, info.names, self.checkpoint_root)
        spec = validate(info)
        if self.loop.uses_kv_cache(spec):
            sampling_validation.check_kv_budget(spec, self.loop.pool.usable_blocks, self.loop.pool.block_bytes)
        task = SampleTask(self.loop, self.adapters, checkpoint, spec, self._completion_text, stream=stream)
        record = self.scheduler.submit_unordered(OPERATION_OWNER, kind, task)
        self.loop.arrive(task.join)  # joins a running batch at its next step
        if request.request_id and not stream:
            self._remember(request.request_id, record.operation.name, validation.request_fingerprint(request))
        return record

    def _completion_text(self, tokens: list[int]) -> str:
        """The text stop strings are matched in: without special tokens (as vLLM's, which
        Tinker's samplers follow), so "<|im_end|>" holds no "e" and no "|"."""
        return self.engine.base.tokenizer.decode(tokens, skip_special_tokens=True)

    def _remember(self, request_id: str, operation: str, fingerprint: bytes) -> None:
        """Maps request_id -> operation for retries, forgetting operations the store dropped."""
        if len(self._operation_of_request) >= _MAX_REMEMBERED_REQUESTS:
            live = set(self.store.names(f"operations/{OPERATION_OWNER}/"))
            self._operation_of_request = {r: kept for r, kept in self._operation_of_request.items()
                                          if kept[0] in live}
        self._operation_of_request[request_id] = (operation, fingerprint)

    def _ready(self) -> ModelInfo:
        return loaded(self.info)
