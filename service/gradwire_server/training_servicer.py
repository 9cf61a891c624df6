"""gradwire.v1.TrainingService: validates, converts, hands work to the scheduler.
No torch here; the engine runs on the worker thread."""
from __future__ import annotations

import asyncio
import dataclasses
import pathlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from google.longrunning import operations_pb2
from google.protobuf.message import Message

from gradwire.v1 import training_service_pb2 as pb
from gradwire.v1 import training_service_pb2_grpc as pb_grpc
from gradwire_server import checkpoints, validation
from gradwire_server.checkpoint_ops import CheckpointOps
from gradwire_server.batch import AdamSettings
from gradwire_server.engine import Engine, NonFiniteStep
from gradwire_server.errors import (FieldViolation, ServiceError, abort, abort_with_status, already_exists,
                                    cancelled, cut, failed_precondition, invalid_argument, not_found,
                                    request_id_reused)
from gradwire_server.loss_task import LossTask, output_records
from gradwire_server.losses import LOSSES
from gradwire_server.memory import MemoryPlan
from gradwire_server.operations import OperationRecord, OperationStore
from gradwire_server.run_index import RunIndex, record_change
from gradwire_server.sampler_weights import SamplerAdapters
from gradwire_server.scheduler import OneShot, Scheduler

T = TypeVar("T")
MAX_BUFFERED_PIECES = 4          # received stream messages waiting for the worker
READ_CHUNK_BYTES = 2 * 1024 * 1024  # outputs per ReadOutputs message
REMEMBERED_CREATIONS = 1024      # request_ids of CreateModel* whose run a retry gets back


@dataclass
class ModelInfo:
    name: str
    architecture: str
    vocab_size: int
    max_context_length: int
    device: str
    tokenizer_files: dict[str, bytes]
    dtype: str
    memory: MemoryPlan
    attention: str                 # gradwire-server --attention
    sampler_logprobs: str          # --sampler-logprobs, resolved: "training" or "decode"
    aliases: tuple[str, ...] = ()  # other names of the model (its Hugging Face hub id)

    @property
    def names(self) -> tuple[str, ...]:
        """Every name the served model answers to, its own first."""
        return (self.name, *self.aliases)


def loaded(info: ModelInfo | None) -> ModelInfo:
    """The served model's info; UNAVAILABLE while it is still loading."""
    if info is None:
        raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the model is still loading", "LOADING")
    return info


class TrainingServicer(pb_grpc.TrainingServiceServicer):
    def __init__(self, store: OperationStore, max_message_bytes: int, checkpoint_root: pathlib.Path,
                 index: RunIndex):
        self.store = store
        self.max_message_bytes = max_message_bytes
        self.checkpoint_root = checkpoint_root
        self.index = index
        self.engine: Engine | None = None
        self.scheduler: Scheduler | None = None
        self.info: ModelInfo | None = None
        self.ops: CheckpointOps | None = None
        self.kv_cache_usage: Callable[[], object] | None = None  # the sampler's KV cache use (a dataclass)
        self.adapters: SamplerAdapters | None = None
        # request_id -> (its request's fingerprint, the creation it started: a retry awaits the
        # same one), newest last.
        self._creations: OrderedDict[str, tuple[bytes, asyncio.Future]] = OrderedDict()
        # Checkpoint path -> the operation of a save of it admitted in this process.
        self._saves: dict[str, str] = {}

    def attach(self, engine: Engine, scheduler: Scheduler, info: ModelInfo, adapters: SamplerAdapters,
               kv_cache_usage: Callable[[], object]) -> None:
        """Called once the model is loaded; until then every call is UNAVAILABLE."""
        self.engine, self.scheduler, self.info, self.adapters = engine, scheduler, info, adapters
        self.kv_cache_usage = kv_cache_usage
        self.ops = CheckpointOps(engine, self.checkpoint_root, self.index, info.name)

    async def GetServerCapabilities(self, request, context):
        try:
            info = self._ready()
        except ServiceError as error:
            await abort(context, error)
        return pb.GetServerCapabilitiesResponse(
            supported_models=[pb.SupportedModel(model_name=name,
                                                max_context_length=info.max_context_length,
                                                vocab_size=info.vocab_size) for name in info.names],
            loss_fns=sorted(LOSSES), device=info.device, dtype=info.dtype,
            limits=pb.ServerLimits(max_message_bytes=self.max_message_bytes,
                                   max_lora_rank=validation.MAX_LORA_RANK,
                                   max_wait_seconds=self.store.max_wait_s,
                                   operation_ttl_seconds=self.store.ttl_s,
                                   micro_batch_tokens=info.memory.micro_batch_tokens,
                                   keep_graph_budget_bytes=info.memory.keep_graph_budget_bytes,
                                   activation_bytes_per_token=info.memory.activation_bytes_per_token),
            kv_cache=pb.KvCacheUsage(**dataclasses.asdict(self.kv_cache_usage())),
            training=pb.TrainingSettings(compiled_layers=self.engine.compiled is not None,
                                         activation_checkpointing=self.engine.activation_checkpointing,
                                         attention=info.attention),
            sampler_logprobs=info.sampler_logprobs)

    async def CreateModel(self, request, context):
        try:
            info = self._ready()
            if request.base_model not in info.names:
                raise invalid_argument([FieldViolation(
                    "base_model", f"this server serves {' = '.join(map(repr, info.names))}, "
                                  f"not {cut(request.base_model)!r}")])
            lora = validation.lora_settings(request.lora_config)
            validation.user_metadata(request.user_metadata)
            engine, index, user_metadata = self.engine, self.index, dict(request.user_metadata)

            def create() -> str:
                try:
                    run_id = engine.create_run(lora)
                except ValueError as error:
                    raise invalid_argument([FieldViolation("lora_config", str(error))]) from None
                record_change(f"new run {run_id}", index.add_run, run_id, info.name, lora, user_metadata)
                return run_id

            run_id = await self._create_once(request, lambda: self.scheduler.run_on_worker("create", create))
            return pb.CreateModelResponse(model_id=run_id)
        except ServiceError as error:
            await abort(context, error)

    async def GetInfo(self, request, context):
        try:
            info = self._ready()
            run = self._run(request.model_id)
            lora = run.lora
            return pb.GetInfoResponse(
                model_id=run.run_id, model_name=info.name, is_lora=True, lora_rank=lora.rank,
                lora_config=pb.LoraConfig(rank=lora.rank, seed=lora.seed, train_unembed=lora.train_unembed,
                                          train_mlp=lora.train_mlp, train_attn=lora.train_attn),
                model_data={"arch": info.architecture, "tokenizer": info.name}, step=run.step)
        except ServiceError as error:
            await abort(context, error)

    async def GetTokenizer(self, request, context):
        try:
            info = self._ready()
            if request.base_model not in ("", *info.names):
                raise not_found("base model", request.base_model)
            return pb.GetTokenizerResponse(files=info.tokenizer_files)
        except ServiceError as error:
            await abort(context, error)

    async def Forward(self, request, context):
        return await self._loss_rpc(request, context, "Forward", backward=False)

    async def ForwardBackward(self, request, context):
        return await self._loss_rpc(request, context, "ForwardBackward", backward=True)

    async def OptimStep(self, request, context):
        engine, index, model_id = self.engine, self.index, request.model_id

        def step(adam: AdamSettings) -> pb.OptimStepResponse:
            try:
                metrics = engine.optim_step(model_id, adam)
            except NonFiniteStep as error:
                raise failed_precondition(str(error), "NON_FINITE_STEP") from None
            record_change(f"the step of {model_id}", index.set_step, model_id, engine.run(model_id).step)
            return pb.OptimStepResponse(metrics=metrics)

        return await self._one_shot_rpc(request, context, "OptimStep",
                                         lambda: validation.adam_settings(request.adam_params), step)

    # ---- checkpoints and unloading (ordered like training requests) -----------------

    async def SaveWeights(self, request, context):
        return await self._save_rpc(request, context, "weights", "SaveWeights", pb.SaveWeightsResponse,
                                    request.overwrite)

    async def SaveWeightsForSampler(self, request, context):
        if request.ephemeral:
            return await self._snapshot_rpc(request, context)
        return await self._save_rpc(request, context, "sampler_weights", "SaveWeightsForSampler",
                                    pb.SaveWeightsForSamplerResponse)

    async def _snapshot_rpc(self, request, context):
        """An in-memory snapshot of the run's adapter for sampling, in the run's order."""
        adapters, model_id = self.adapters, request.model_id

        def snapshot(_) -> pb.SaveWeightsForSamplerResponse:
            return pb.SaveWeightsForSamplerResponse(path=adapters.add_snapshot(model_id))

        return await self._one_shot_rpc(request, context, "SaveWeightsForSampler", lambda: None, snapshot)

    async def LoadWeights(self, request, context):
        ops, model_id, path, optimizer = self.ops, request.model_id, request.path, request.optimizer

        def load(_) -> pb.LoadWeightsResponse:
            ops.load(model_id, path, optimizer)
            return pb.LoadWeightsResponse(path=path)

        return await self._one_shot_rpc(request, context, "LoadWeights",
                                         lambda: ops.loadable(path, optimizer), load)

    async def CreateModelFromState(self, request, context):
        try:
            self._ready()
            ops, path, optimizer = self.ops, request.path, request.optimizer
            validation.user_metadata(request.user_metadata)
            user_metadata = dict(request.user_metadata)

            async def create() -> str:
                await asyncio.to_thread(ops.loadable, path, optimizer)  # fails fast, off the loop
                return await self.scheduler.run_on_worker(
                    "create_from_state", lambda: ops.create_from_state(path, optimizer, user_metadata))

            run_id = await self._create_once(request, create)
            return pb.CreateModelResponse(model_id=run_id)
        except ServiceError as error:
            await abort(context, error)

    async def UnloadModel(self, request, context):
        ops, model_id = self.ops, request.model_id

        def unload(_) -> pb.UnloadModelResponse:
            ops.unload(model_id)
            return pb.UnloadModelResponse(model_id=model_id)

        return await self._one_shot_rpc(request, context, "UnloadModel", lambda: None, unload)

    async def _save_rpc(self, request, context, kind: str, label: str, response_type, overwrite: bool = False):
        ops = self.ops
        ttl = request.ttl_seconds if request.HasField("ttl_seconds") else None
        user_metadata = dict(request.user_metadata)

        def save(path: checkpoints.CheckpointPath):
            # checks the name again (unless overwriting): the folder may have appeared since
            ops.save(path, ttl, overwrite, user_metadata)
            return response_type(path=path.path)

        def validate() -> checkpoints.CheckpointPath:
            validation.user_metadata(request.user_metadata)
            return self._new_checkpoint(request.model_id, kind, request.name, ttl, overwrite)

        def remember(path: checkpoints.CheckpointPath, operation: str) -> None:
            self._saves[path.path] = operation

        return await self._one_shot_rpc(request, context, label, validate, save, remember)

    async def _one_shot_rpc(self, request, context, kind: str, validate: Callable[[], T],
                            work: Callable[[T], Message],
                            admitted: Callable[[T, str], None] = lambda valid, operation: None):
        """An ordered request done in one worker turn: work(validate()) runs in the
        run's seq_id order; returns its Operation (the same one for a retry)."""
        try:
            self._ready()
            existing, valid = self._admit(request.model_id, request.seq_id, request.request_id, kind, validate)
            if existing is not None:
                return existing
            record = self.scheduler.submit(request.model_id, request.seq_id, request.request_id, kind,
                                           OneShot(lambda: work(valid)))
            admitted(valid, record.operation.name)
            return record.snapshot()
        except ServiceError as error:
            await abort(context, error)

    def _new_checkpoint(self, model_id: str, kind: str, name: str, ttl_seconds: int | None,
                        overwrite: bool) -> checkpoints.CheckpointPath:
        """The path a save will write: ALREADY_EXISTS at admission (unless overwriting) if
        the name is taken on disk or by a save admitted before it that has not finished.
        The error is then the RPC's own (its seq_id is used up, as for any rejected
        request) instead of a failed operation that aborts the requests already queued on
        the worker behind it."""
        path = checkpoints.CheckpointPath(model_id, kind, checkpoints.validate_name(name))
        validation.ttl_seconds(ttl_seconds)
        if overwrite:
            return path  # saves of one run run in order: the last one's weights stay
        checkpoints.check_new(self.checkpoint_root, path)
        for saving, operation in list(self._saves.items()):  # forget finished saves
            if self._finished(operation):
                del self._saves[saving]
        if path.path in self._saves:
            raise already_exists(f"checkpoint {path.path} is already being saved by "
                                 f"{self._saves[path.path]}; choose another name", "CHECKPOINT_EXISTS")
        return path

    def _finished(self, operation: str) -> bool:
        try:
            return self.store.get(operation).operation.done
        except ServiceError:  # expired or deleted: finished long ago
            return True

    async def _create_once(self, request, create: Callable[[], Awaitable[str]]) -> str:
        """create()'s run id; a repeated request_id (a retry, AIP-155) gets the run of
        the first request instead of creating another (ALREADY_EXISTS if its fields differ)."""
        request_id = request.request_id
        validation.request_id(request_id)
        if not request_id:
            return await create()
        fingerprint = validation.request_fingerprint(request)
        creation = self._creations.get(request_id)
        if creation is None:
            creation = asyncio.ensure_future(create())
            self._creations[request_id] = (fingerprint, creation)
            creation.add_done_callback(lambda done: self._forget_failed(request_id, done))
            while len(self._creations) > REMEMBERED_CREATIONS:
                self._creations.popitem(last=False)
        else:
            first, creation = creation
            if first != fingerprint:
                raise request_id_reused(request_id, "by a creation of a run")
        # Shielded: a caller that disconnects does not cancel the creation its retry will get.
        return await asyncio.shield(creation)

    def _forget_failed(self, request_id: str, creation: asyncio.Future) -> None:
        """A failed creation created nothing: a retry of it tries again."""
        if (creation.cancelled() or creation.exception() is not None) \
                and self._creations.get(request_id, (None, None))[1] is creation:
            del self._creations[request_id]

    async def ForwardStream(self, request_iterator, context):
        return await self._stream_rpc(request_iterator, context, "ForwardStream", backward=False)

    async def ForwardBackwardStream(self, request_iterator, context):
        return await self._stream_rpc(request_iterator, context, "ForwardBackwardStream", backward=True)

    async def ReadOutputs(self, request, context):
        try:
            record = self.store.get(request.name)
            if record.spool is None:
                raise invalid_argument([FieldViolation(
                    "name", f"{cut(request.name)} is a {record.metadata.kind}, not a Forward or "
                            "ForwardBackward operation: it has no per-datum outputs")])
            if request.start_datum_index < 0:
                raise invalid_argument([FieldViolation(
                    "start_datum_index", f"must be >= 0, got {request.start_datum_index}")])
        except ServiceError as error:
            await abort(context, error)
        index = request.start_datum_index
        while True:
            if record.deleted:
                await abort(context, not_found("operation", request.name, "deleted while its outputs were read"))
            if index < record.output_count:
                chunk = record.spool.read(index, READ_CHUNK_BYTES)
                yield pb.ForwardBackwardOutput(loss_fn_output_type="TensorData", first_datum_index=index,
                                               loss_fn_outputs=output_records(chunk))
                index += len(chunk)
            elif record.operation.done:
                break
            else:
                await record.wait_progress(index)
        if record.operation.HasField("error"):
            await abort_with_status(context, record.operation.error)

    async def _loss_rpc(self, request: pb.ForwardBackwardRequest, context, kind: str, backward: bool):
        try:
            info = self._ready()
            existing, loss_request = self._admit(
                request.model_id, request.seq_id, request.request_id, kind,
                lambda: validation.loss_request(request, info.vocab_size, info.max_context_length))
            if existing is not None:
                return existing
            task, record = self._submit_loss_task(
                request.model_id, request.seq_id, request.request_id, kind, request.loss_fn,
                dict(request.loss_fn_config), backward, len(loss_request.data),
                keep_graph=request.keep_graph, reuse_forward=request.reuse_forward)
            task.feed(loss_request.data)
            task.close()
            self.scheduler.wake(request.model_id)
            return record.snapshot()
        except ServiceError as error:
            await abort(context, error)

    async def _stream_rpc(self, request_iterator, context, kind: str, backward: bool):
        """Header, then datum batches: each piece is validated and handed to the
        worker as it arrives; at most MAX_BUFFERED_PIECES wait in memory.

        However a stream breaks, its job never stays parked: a bad message, an
        undecodable one, or a stream that ends without StreamEnd (how a client
        abandons it) fail the job, and the RPC answers only once the server has
        settled that failure (the job failed, the run's requests queued behind
        it aborted). So a request the client sends after reading the answer is
        never aborted by it. A job that fails underneath the stream (aborted by
        an earlier failure, cancelled) ends the RPC at once with that error."""
        task, header, record = None, None, None
        try:
            info = self._ready()
            first = await anext(aiter(request_iterator), None)
            if first is None or not first.HasField("header"):
                raise invalid_argument([FieldViolation("header", "the first message must be a StreamHeader")])
            header = first.header
            existing, _ = self._admit(header.model_id, header.seq_id, header.request_id, kind,
                                      lambda: validation.loss_header(header.loss_fn, header.loss_fn_config))
            if existing is not None:
                return existing  # a retry: the first stream's operation, whatever became of it
            space = asyncio.Event()
            task, record = self._submit_loss_task(
                header.model_id, header.seq_id, header.request_id, kind, header.loss_fn,
                dict(header.loss_fn_config), backward, 0,
                consumed=lambda: self.scheduler.loop.call_soon_threadsafe(space.set),
                keep_graph=header.keep_graph, reuse_forward=header.reuse_forward)
            received, end = 0, None
            while (message := await _until_done(anext(request_iterator, None), record)) is not None:
                kind_set = message.WhichOneof("kind")
                if end is not None or kind_set == "header":
                    raise invalid_argument([FieldViolation(
                        "kind", "a stream is one header, datum batches, then one end")])
                if kind_set is None:
                    raise invalid_argument([FieldViolation(
                        "kind", f"the message after {received} datums sets none of header, batch, end")])
                if kind_set == "end":
                    end = message.end
                    continue
                data = validation.data_batch(message.batch.data, header.loss_fn, info.vocab_size,
                                             info.max_context_length, index_offset=received)
                received += len(data)
                record.metadata.num_datums = received
                task.feed(data)
                self.scheduler.wake(header.model_id)
                while task.buffered >= MAX_BUFFERED_PIECES:
                    space.clear()
                    await _until_done(space.wait(), record)
            if end is None and _cut_off(context):
                raise asyncio.CancelledError
            if end is None:
                raise invalid_argument([FieldViolation(
                    "end", f"the stream was closed after {received} datums without a StreamEnd: "
                           "abandoned, nothing was applied")])
            if end.num_datums != received:
                raise invalid_argument([FieldViolation(
                    "end.num_datums", f"says {end.num_datums} datums, the server received {received}")])
            if received == 0:
                raise invalid_argument([FieldViolation("data", "the stream held no datum")])
            task.close()
            self.scheduler.wake(header.model_id)
            return record.snapshot()
        except _JobFinished:
            await abort_with_status(context, record.operation.error)
        except ServiceError as error:
            if task is not None:
                if not self.scheduler.fail_held(header.model_id, record.operation.name, error):
                    task.fail(error)
                    self.scheduler.wake(header.model_id)
                    await record.done.wait()  # settled: the job failed, what was queued behind it aborted
                await abort_with_status(context, record.operation.error)
            await abort(context, error)
        except asyncio.CancelledError:
            if task is not None:
                task.fail(cancelled(f"the client cancelled or disconnected during the {kind} stream; "
                                    "nothing was applied"))
                self.scheduler.wake(header.model_id)
            raise

    def _submit_loss_task(self, model_id: str, seq_id: int, request_id: str, kind: str, loss_fn: str,
                          config: dict[str, float], backward: bool, num_datums: int,
                          consumed=lambda: None, keep_graph: bool = False, reuse_forward: str = ""):
        task = LossTask(self.engine, model_id, loss_fn, config, backward, consumed,
                        keep_graph=keep_graph and not backward, reuse_forward=reuse_forward if backward else "")
        record = self.scheduler.submit(model_id, seq_id, request_id, kind, task, num_datums=num_datums)
        self.store.spool_outputs(record)
        task.op_name = record.operation.name  # the task is not ready before its first feed()
        return task, record

    def _admit(self, model_id: str, seq_id: int, request_id: str, kind: str, validate: Callable[[], T]
               ) -> tuple[operations_pb2.Operation | None, T | None]:
        """(the operation of a retried request, None) or (None, validate()). A request
        that fails validation still uses up its seq_id, so the run's order moves on."""
        validation.seq_id(seq_id)
        validation.request_id(request_id)
        self._run(model_id)
        self.scheduler.check_reach(model_id, seq_id)  # refused so, it uses up nothing
        if (existing := self.scheduler.existing(model_id, seq_id, request_id, kind)) is not None:
            return self.store.get(existing).snapshot(), None
        try:
            return None, validate()
        except ServiceError as error:
            self.scheduler.reject(model_id, seq_id, request_id, kind, error)
            raise

    def _ready(self) -> ModelInfo:
        return loaded(self.info)

    def _run(self, model_id: str):
        run = self.engine.runs.get(model_id)
        if run is None:
            if self.index.get_run(model_id) is not None:
                raise failed_precondition(
                    f"training run {model_id!r} is not loaded (it was unloaded, or the server "
                    "restarted); continue from one of its checkpoints with "
                    "create_training_client_from_state", "RUN_NOT_LOADED")
            raise not_found("training run", model_id)
        return run



def _cut_off(context) -> bool:
    """Whether the client was killed, cancelled or ran out of time (its reads just end)."""
    remaining = context.time_remaining()
    return context.cancelled() or (remaining is not None and remaining <= 0)


class _JobFinished(Exception):
    """A stream's job finished (failed) while the stream was still arriving."""


async def _until_done(awaitable: Awaitable[T], record: OperationRecord) -> T:
    """awaitable's result, unless the operation finishes first: then _JobFinished."""
    if record.operation.done:
        raise _JobFinished
    waiting = asyncio.ensure_future(awaitable)
    finished = asyncio.ensure_future(record.done.wait())
    try:
        await asyncio.wait((waiting, finished), return_when=asyncio.FIRST_COMPLETED)
    finally:
        finished.cancel()
        if not waiting.done():
            waiting.cancel()
    if not waiting.done() or waiting.cancelled():
        raise _JobFinished
    return waiting.result()
