import datetime

from google.longrunning import operations_pb2 as _operations_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from gradwire.v1 import datum_pb2 as _datum_pb2
from gradwire.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LoraConfig(_message.Message):
    __slots__ = ("rank", "seed", "train_unembed", "train_mlp", "train_attn")
    RANK_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TRAIN_UNEMBED_FIELD_NUMBER: _ClassVar[int]
    TRAIN_MLP_FIELD_NUMBER: _ClassVar[int]
    TRAIN_ATTN_FIELD_NUMBER: _ClassVar[int]
    rank: int
    seed: int
    train_unembed: bool
    train_mlp: bool
    train_attn: bool
    def __init__(self, rank: _Optional[int] = ..., seed: _Optional[int] = ..., train_unembed: _Optional[bool] = ..., train_mlp: _Optional[bool] = ..., train_attn: _Optional[bool] = ...) -> None: ...

class AdamParams(_message.Message):
    __slots__ = ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm")
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    GRAD_CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    learning_rate: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    grad_clip_norm: float
    def __init__(self, learning_rate: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., weight_decay: _Optional[float] = ..., grad_clip_norm: _Optional[float] = ...) -> None: ...

class GetServerCapabilitiesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SupportedModel(_message.Message):
    __slots__ = ("model_name", "max_context_length", "vocab_size")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    max_context_length: int
    vocab_size: int
    def __init__(self, model_name: _Optional[str] = ..., max_context_length: _Optional[int] = ..., vocab_size: _Optional[int] = ...) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("max_message_bytes", "max_lora_rank", "max_wait_seconds", "operation_ttl_seconds", "micro_batch_tokens", "keep_graph_budget_bytes", "activation_bytes_per_token")
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OPERATION_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KEEP_GRAPH_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: int
    max_lora_rank: int
    max_wait_seconds: float
    operation_ttl_seconds: float
    micro_batch_tokens: int
    keep_graph_budget_bytes: int
    activation_bytes_per_token: int
    def __init__(self, max_message_bytes: _Optional[int] = ..., max_lora_rank: _Optional[int] = ..., max_wait_seconds: _Optional[float] = ..., operation_ttl_seconds: _Optional[float] = ..., micro_batch_tokens: _Optional[int] = ..., keep_graph_budget_bytes: _Optional[int] = ..., activation_bytes_per_token: _Optional[int] = ...) -> None: ...

class GetServerCapabilitiesResponse(_message.Message):
    __slots__ = ("supported_models", "loss_fns", "limits", "device", "dtype", "kv_cache", "training", "sampler_logprobs")
    SUPPORTED_MODELS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FNS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    supported_models: _containers.RepeatedCompositeFieldContainer[SupportedModel]
    loss_fns: _containers.RepeatedScalarFieldContainer[str]
    limits: ServerLimits
    device: str
    dtype: str
    kv_cache: KvCacheUsage
    training: TrainingSettings
    sampler_logprobs: str
    def __init__(self, supported_models: _Optional[_Iterable[_Union[SupportedModel, _Mapping]]] = ..., loss_fns: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., kv_cache: _Optional[_Union[KvCacheUsage, _Mapping]] = ..., training: _Optional[_Union[TrainingSettings, _Mapping]] = ..., sampler_logprobs: _Optional[str] = ...) -> None: ...

class TrainingSettings(_message.Message):
    __slots__ = ("compiled_layers", "activation_checkpointing", "attention")
    COMPILED_LAYERS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_CHECKPOINTING_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    compiled_layers: bool
    activation_checkpointing: bool
    attention: str
    def __init__(self, compiled_layers: _Optional[bool] = ..., activation_checkpointing: _Optional[bool] = ..., attention: _Optional[str] = ...) -> None: ...

class KvCacheUsage(_message.Message):
    __slots__ = ("budget_bytes", "used_bytes", "reserved_bytes", "block_tokens", "running_sequences", "waiting_requests")
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    WAITING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    budget_bytes: int
    used_bytes: int
    reserved_bytes: int
    block_tokens: int
    running_sequences: int
    waiting_requests: int
    def __init__(self, budget_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., reserved_bytes: _Optional[int] = ..., block_tokens: _Optional[int] = ..., running_sequences: _Optional[int] = ..., waiting_requests: _Optional[int] = ...) -> None: ...

class CreateModelRequest(_message.Message):
    __slots__ = ("base_model", "lora_config", "user_metadata", "request_id")
    class UserMetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    LORA_CONFIG_FIELD_NUMBER: _ClassVar[int]
    USER_METADATA_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    base_model: str
    lora_config: LoraConfig
    user_metadata: _containers.ScalarMap[str, str]
    request_id: str
    def __init__(self, base_model: _Optional[str] = ..., lora_config: _Optional[_Union[LoraConfig, _Mapping]] = ..., user_metadata: _Optional[_Mapping[str, str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class CreateModelResponse(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("model_id", "model_name", "is_lora", "lora_rank", "lora_config", "model_data", "step")
    class ModelDataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    IS_LORA_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_CONFIG_FIELD_NUMBER: _ClassVar[int]
    MODEL_DATA_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    model_name: str
    is_lora: bool
    lora_rank: int
    lora_config: LoraConfig
    model_data: _containers.ScalarMap[str, str]
    step: int
    def __init__(self, model_id: _Optional[str] = ..., model_name: _Optional[str] = ..., is_lora: _Optional[bool] = ..., lora_rank: _Optional[int] = ..., lora_config: _Optional[_Union[LoraConfig, _Mapping]] = ..., model_data: _Optional[_Mapping[str, str]] = ..., step: _Optional[int] = ...) -> None: ...

class GetTokenizerRequest(_message.Message):
    __slots__ = ("base_model",)
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    base_model: str
    def __init__(self, base_model: _Optional[str] = ...) -> None: ...

class GetTokenizerResponse(_message.Message):
    __slots__ = ("files",)
    class FilesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    FILES_FIELD_NUMBER: _ClassVar[int]
    files: _containers.ScalarMap[str, bytes]
    def __init__(self, files: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class ForwardBackwardRequest(_message.Message):
    __slots__ = ("model_id", "seq_id", "data", "loss_fn", "loss_fn_config", "forward_only", "request_id", "keep_graph", "reuse_forward")
    class LossFnConfigEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LOSS_FN_FIELD_NUMBER: _ClassVar[int]
    LOSS_FN_CONFIG_FIELD_NUMBER: _ClassVar[int]
    FORWARD_ONLY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KEEP_GRAPH_FIELD_NUMBER: _ClassVar[int]
    REUSE_FORWARD_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    seq_id: int
    data: _containers.RepeatedCompositeFieldContainer[_datum_pb2.Datum]
    loss_fn: str
    loss_fn_config: _containers.ScalarMap[str, float]
    forward_only: bool
    request_id: str
    keep_graph: bool
    reuse_forward: str
    def __init__(self, model_id: _Optional[str] = ..., seq_id: _Optional[int] = ..., data: _Optional[_Iterable[_Union[_datum_pb2.Datum, _Mapping]]] = ..., loss_fn: _Optional[str] = ..., loss_fn_config: _Optional[_Mapping[str, float]] = ..., forward_only: _Optional[bool] = ..., request_id: _Optional[str] = ..., keep_graph: _Optional[bool] = ..., reuse_forward: _Optional[str] = ...) -> None: ...

class ForwardBackwardOutput(_message.Message):
    __slots__ = ("loss_fn_output_type", "loss_fn_outputs", "metrics", "outputs_streamed", "first_datum_index", "graph_kept", "reused_datums")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    LOSS_FN_OUTPUT_TYPE_FIELD_NUMBER: _ClassVar[int]
    LOSS_FN_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_STREAMED_FIELD_NUMBER: _ClassVar[int]
    FIRST_DATUM_INDEX_FIELD_NUMBER: _ClassVar[int]
    GRAPH_KEPT_FIELD_NUMBER: _ClassVar[int]
    REUSED_DATUMS_FIELD_NUMBER: _ClassVar[int]
    loss_fn_output_type: str
    loss_fn_outputs: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.ArrayRecord]
    metrics: _containers.ScalarMap[str, float]
    outputs_streamed: bool
    first_datum_index: int
    graph_kept: bool
    reused_datums: int
    def __init__(self, loss_fn_output_type: _Optional[str] = ..., loss_fn_outputs: _Optional[_Iterable[_Union[_tensor_pb2.ArrayRecord, _Mapping]]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., outputs_streamed: _Optional[bool] = ..., first_datum_index: _Optional[int] = ..., graph_kept: _Optional[bool] = ..., reused_datums: _Optional[int] = ...) -> None: ...

class StreamHeader(_message.Message):
    __slots__ = ("model_id", "seq_id", "loss_fn", "loss_fn_config", "request_id", "keep_graph", "reuse_forward")
    class LossFnConfigEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    LOSS_FN_FIELD_NUMBER: _ClassVar[int]
    LOSS_FN_CONFIG_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KEEP_GRAPH_FIELD_NUMBER: _ClassVar[int]
    REUSE_FORWARD_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    seq_id: int
    loss_fn: str
    loss_fn_config: _containers.ScalarMap[str, float]
    request_id: str
    keep_graph: bool
    reuse_forward: str
    def __init__(self, model_id: _Optional[str] = ..., seq_id: _Optional[int] = ..., loss_fn: _Optional[str] = ..., loss_fn_config: _Optional[_Mapping[str, float]] = ..., request_id: _Optional[str] = ..., keep_graph: _Optional[bool] = ..., reuse_forward: _Optional[str] = ...) -> None: ...

class DatumBatch(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: _containers.RepeatedCompositeFieldContainer[_datum_pb2.Datum]
    def __init__(self, data: _Optional[_Iterable[_Union[_datum_pb2.Datum, _Mapping]]] = ...) -> None: ...

class StreamEnd(_message.Message):
    __slots__ = ("num_datums",)
    NUM_DATUMS_FIELD_NUMBER: _ClassVar[int]
    num_datums: int
    def __init__(self, num_datums: _Optional[int] = ...) -> None: ...

class ForwardBackwardStreamRequest(_message.Message):
    __slots__ = ("header", "batch", "end")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    header: StreamHeader
    batch: DatumBatch
    end: StreamEnd
    def __init__(self, header: _Optional[_Union[StreamHeader, _Mapping]] = ..., batch: _Optional[_Union[DatumBatch, _Mapping]] = ..., end: _Optional[_Union[StreamEnd, _Mapping]] = ...) -> None: ...

class ReadOutputsRequest(_message.Message):
    __slots__ = ("name", "start_datum_index")
    NAME_FIELD_NUMBER: _ClassVar[int]
    START_DATUM_INDEX_FIELD_NUMBER: _ClassVar[int]
    name: str
    start_datum_index: int
    def __init__(self, name: _Optional[str] = ..., start_datum_index: _Optional[int] = ...) -> None: ...

class OptimStepRequest(_message.Message):
    __slots__ = ("model_id", "seq_id", "adam_params", "request_id")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    ADAM_PARAMS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    seq_id: int
    adam_params: AdamParams
    request_id: str
    def __init__(self, model_id: _Optional[str] = ..., seq_id: _Optional[int] = ..., adam_params: _Optional[_Union[AdamParams, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class OptimStepResponse(_message.Message):
    __slots__ = ("metrics",)
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    METRICS_FIELD_NUMBER: _ClassVar[int]
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class OperationMetadata(_message.Message):
    __slots__ = ("model_id", "seq_id", "kind", "state", "create_time", "start_time", "end_time", "num_datums")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[OperationMetadata.State]
        QUEUED: _ClassVar[OperationMetadata.State]
        RUNNING: _ClassVar[OperationMetadata.State]
        SUCCEEDED: _ClassVar[OperationMetadata.State]
        FAILED: _ClassVar[OperationMetadata.State]
        CANCELLED: _ClassVar[OperationMetadata.State]
    STATE_UNSPECIFIED: OperationMetadata.State
    QUEUED: OperationMetadata.State
    RUNNING: OperationMetadata.State
    SUCCEEDED: OperationMetadata.State
    FAILED: OperationMetadata.State
    CANCELLED: OperationMetadata.State
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    NUM_DATUMS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    seq_id: int
    kind: str
    state: OperationMetadata.State
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    num_datums: int
    def __init__(self, model_id: _Optional[str] = ..., seq_id: _Optional[int] = ..., kind: _Optional[str] = ..., state: _Optional[_Union[OperationMetadata.State, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., num_datums: _Optional[int] = ...) -> None: ...

class SaveWeightsRequest(_message.Message):
    __slots__ = ("model_id", "seq_id", "name", "request_id", "ttl_seconds", "overwrite", "user_metadata")
    class UserMetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    USER_METADATA_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    seq_id: int
    name: str
    request_id: str
    ttl_seconds: int
    overwrite: bool
    user_metadata: _containers.ScalarMap[str, str]
    def __init__(self, model_id: _Optional[str] = ..., seq_id: _Optional[int] = ..., name: _Optional[str] = ..., request_id: _Optional[str] = ..., ttl_seconds: _Optional[int] = ..., overwrite: _Optional[bool] = ..., user_metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SaveWeightsResponse(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class SaveWeightsForSamplerRequest(_message.Message):
    __slots__ = ("model_id", "seq_id", "name", "request_id", "ttl_seconds", "user_metadata", "ephemeral")
    class UserMetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    USER_METADATA_FIELD_NUMBER: _ClassVar[int]
    EPHEMERAL_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    seq_id: int
    name: str
    request_id: str
    ttl_seconds: int
    user_metadata: _containers.ScalarMap[str, str]
    ephemeral: bool
    def __init__(self, model_id: _Optional[str] = ..., seq_id: _Optional[int] = ..., name: _Optional[str] = ..., request_id: _Optional[str] = ..., ttl_seconds: _Optional[int] = ..., user_metadata: _Optional[_Mapping[str, str]] = ..., ephemeral: _Optional[bool] = ...) -> None: ...

class SaveWeightsForSamplerResponse(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class LoadWeightsRequest(_message.Message):
    __slots__ = ("model_id", "seq_id", "path", "optimizer", "request_id")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    seq_id: int
    path: str
    optimizer: bool
    request_id: str
    def __init__(self, model_id: _Optional[str] = ..., seq_id: _Optional[int] = ..., path: _Optional[str] = ..., optimizer: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class LoadWeightsResponse(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class CreateModelFromStateRequest(_message.Message):
    __slots__ = ("path", "optimizer", "user_metadata", "request_id")
    class UserMetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PATH_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    USER_METADATA_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    path: str
    optimizer: bool
    user_metadata: _containers.ScalarMap[str, str]
    request_id: str
    def __init__(self, path: _Optional[str] = ..., optimizer: _Optional[bool] = ..., user_metadata: _Optional[_Mapping[str, str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("model_id", "seq_id", "request_id")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    seq_id: int
    request_id: str
    def __init__(self, model_id: _Optional[str] = ..., seq_id: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...
