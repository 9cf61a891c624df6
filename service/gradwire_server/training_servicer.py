"""gradwire.v1.TrainingService: validates, converts, hands work to the scheduler.
No torch here; the engine runs on the worker thread."""
from __future__ import annotations

from dataclasses import dataclass

import grpc

from gradwire import _codec
from gradwire.v1 import tensor_pb2
from gradwire.v1 import training_service_pb2 as pb
from gradwire.v1 import training_service_pb2_grpc as pb_grpc
from gradwire_server import validation
from gradwire_server.engine import Engine, ForwardResult
from gradwire_server.errors import FieldViolation, ServiceError, abort, invalid_argument, not_found
from gradwire_server.losses import LOSSES
from gradwire_server.operations import OperationStore
from gradwire_server.scheduler import Scheduler


@dataclass
class ModelInfo:
    name: str
    architecture: str
    vocab_size: int
    max_context_length: int
    device: str
    tokenizer_files: dict[str, bytes]


class TrainingServicer(pb_grpc.TrainingServiceServicer):
    def __init__(self, store: OperationStore, max_message_bytes: int):
        self.store = store
        self.max_message_bytes = max_message_bytes
        self.engine: Engine | None = None
        self.scheduler: Scheduler | None = None
        self.info: ModelInfo | None = None

    def attach(self, engine: Engine, scheduler: Scheduler, info: ModelInfo) -> None:
        """Called once the model is loaded; until then every call is UNAVAILABLE."""
        self.engine, self.scheduler, self.info = engine, scheduler, info

    async def GetServerCapabilities(self, request, context):
        info = self._ready()
        return pb.GetServerCapabilitiesResponse(
            supported_models=[pb.SupportedModel(model_name=info.name,
                                                max_context_length=info.max_context_length,
                                                vocab_size=info.vocab_size)],
            loss_fns=sorted(LOSSES), device=info.device,
            limits=pb.ServerLimits(max_message_bytes=self.max_message_bytes,
                                   max_lora_rank=validation.MAX_LORA_RANK,
                                   max_wait_seconds=self.store.max_wait_s,
                                   operation_ttl_seconds=self.store.ttl_s))

    async def CreateModel(self, request, context):
        try:
            info = self._ready()
            if request.base_model not in ("", info.name):
                raise invalid_argument([FieldViolation(
                    "base_model", f"this server serves {info.name!r}, not {request.base_model!r}")])
            lora = validation.lora_settings(request.lora_config)
            try:
                run_id = await self.scheduler.run_on_worker("create", lambda: self.engine.create_run(lora))
            except ValueError as error:
                raise invalid_argument([FieldViolation("lora_config", str(error))]) from None
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
            if request.base_model not in ("", info.name):
                raise not_found("base model", request.base_model)
            return pb.GetTokenizerResponse(files=info.tokenizer_files)
        except ServiceError as error:
            await abort(context, error)

    async def Forward(self, request, context):
        return await self._loss_rpc(request, context, "Forward", backward=False)

    async def ForwardBackward(self, request, context):
        return await self._loss_rpc(request, context, "ForwardBackward", backward=True)

    async def OptimStep(self, request, context):
        try:
            self._ready()
            self._run(request.model_id)
            if (existing := self.scheduler.existing(request.model_id, request.seq_id,
                                                    request.request_id)) is not None:
                return self.store.get(existing).snapshot()
            try:
                adam = validation.adam_settings(request.adam_params)
            except ServiceError as error:
                self.scheduler.reject(request.model_id, request.seq_id, request.request_id, error)
                raise
            engine, model_id = self.engine, request.model_id
            record = self.scheduler.submit(
                model_id, request.seq_id, request.request_id, "OptimStep",
                lambda: pb.OptimStepResponse(metrics=engine.optim_step(model_id, adam)))
            return record.snapshot()
        except ServiceError as error:
            await abort(context, error)

    async def _loss_rpc(self, request: pb.ForwardBackwardRequest, context, kind: str, backward: bool):
        try:
            info = self._ready()
            self._run(request.model_id)
            if (existing := self.scheduler.existing(request.model_id, request.seq_id,
                                                    request.request_id)) is not None:
                return self.store.get(existing).snapshot()
            try:
                loss_request = validation.loss_request(request, info.vocab_size, info.max_context_length)
            except ServiceError as error:
                self.scheduler.reject(request.model_id, request.seq_id, request.request_id, error)
                raise
            compute = self.engine.forward_backward if backward else self.engine.forward
            model_id = request.model_id
            record = self.scheduler.submit(
                model_id, request.seq_id, request.request_id, kind,
                lambda: forward_output_proto(compute(model_id, loss_request)),
                num_datums=len(loss_request.data))
            return record.snapshot()
        except ServiceError as error:
            await abort(context, error)

    def _ready(self) -> ModelInfo:
        if self.info is None:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the model is still loading", "LOADING")
        return self.info

    def _run(self, model_id: str):
        run = self.engine.runs.get(model_id)
        if run is None:
            raise not_found("training run", model_id)
        return run


def forward_output_proto(result: ForwardResult) -> pb.ForwardBackwardOutput:
    record = tensor_pb2.ArrayRecord(
        type_tag="logprobs", num_datums=len(result.logprobs),
        fields={"logprobs": _codec.batched_to_proto(result.logprobs)})
    return pb.ForwardBackwardOutput(loss_fn_output_type="TensorData", loss_fn_outputs=[record],
                                    metrics=result.metrics)
