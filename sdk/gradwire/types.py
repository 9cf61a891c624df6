"""SDK data types, named and shaped as in the Tinker API."""
from __future__ import annotations

import copy
import dataclasses
import datetime
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Union

import numpy as np

from gradwire.errors import RequestErrorCategory

if TYPE_CHECKING:
    import torch

__all__ = [
    "AdamOptimizerConfig", "AdamParams", "Checkpoint", "CheckpointType", "CheckpointsListResponse", "Cursor",
    "Datum", "EncodedTextChunk", "ForwardBackwardOutput", "GetInfoResponse", "GetServerCapabilitiesResponse",
    "ImageAssetPointerChunk", "ImageChunk", "LoadWeightsResponse", "LoraConfig", "LossFnType", "ModelData", "ModelID",
    "ModelInput", "ModelInputChunk", "OptimParams", "OptimStepResponse", "OptimizerConfig",
    "ParsedCheckpointTinkerPath", "PromptProvenanceSpan", "RequestErrorCategory", "SampleResponse",
    "SampledProvenanceSpan",
    "SampledSequence", "SampledTokens", "SamplingParams", "SaveWeightsForSamplerResponse", "SaveWeightsResponse",
    "StopReason", "SupportedModel", "TensorData", "TensorDtype", "TopkLogprobs", "TrainingRun",
    "TrainingRunsResponse", "UnloadModelResponse",
]

ModelID = str
CheckpointType = Literal["training", "sampler"]
TensorDtype = Literal["int64", "float32"]
# Tinker 0.38's loss names. gradwire's server trains the first six (GetServerCapabilities
# lists them) and refuses stable_reinforce (no public formula) and custom, with the reason.
LossFnType = Literal["cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce",
                     "custom"]

_NUMPY_DTYPES = {"int64": np.int64, "float32": np.float32}
# Loss inputs whose dtype is fixed by their name; other keys keep their kind.
_DTYPE_OF_KEY = {"target_tokens": "int64", "weights": "float32", "advantages": "float32",
                 "logprobs": "float32", "sequence_ratio_mask": "float32"}


@dataclass
class TensorData:
    """An int64 or float32 array: flat row-major `data`, `dtype` and `shape`."""

    data: Any
    dtype: Literal["int64", "float32"]
    shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.dtype not in _NUMPY_DTYPES:
            raise ValueError(f"TensorData dtype must be int64 or float32, got {self.dtype!r}")
        flat = (_exact_int64(self.data) if self.dtype == "int64"
                else np.asarray(self.data, dtype=np.float32)).reshape(-1)
        self.shape = tuple(self.shape) if self.shape is not None else (flat.size,)
        self.data = flat.reshape(self.shape)  # stored shaped; validates the size

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> TensorData:
        """Wraps an integer (as int64) or floating (as float32) array."""
        array = np.asarray(array)
        dtype = "int64" if np.issubdtype(array.dtype, np.integer) or array.dtype == bool else "float32"
        return cls(array, dtype, array.shape)

    @classmethod
    def from_torch(cls, tensor: torch.Tensor) -> TensorData:
        """Wraps a torch tensor (bf16/fp16 are widened to float32)."""
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()
        return cls.from_numpy(tensor.numpy())

    def to_numpy(self) -> np.ndarray:
        """The array with its shape."""
        return self.data

    def to_torch(self) -> torch.Tensor:
        """The array as a torch tensor (a copy)."""
        import torch

        return torch.from_numpy(np.array(self.data))

    def tolist(self) -> list:
        """Nested Python lists."""
        return self.data.tolist()


def _exact_int64(data: Any) -> np.ndarray:
    """`data` as int64, refusing what a cast would change: fractions, NaN, values past int64."""
    array = np.asarray(data)
    if array.dtype.kind in "ib" or (array.dtype.kind == "u" and (not array.size or array.max() <= 2**63 - 1)):
        return array.astype(np.int64)
    if array.dtype.kind == "f":
        exact = np.isfinite(array) & (array == np.round(array)) & (np.abs(array) < 2.0**63)
        if exact.all():
            return array.astype(np.int64)
        raise ValueError(f"int64 values must be whole numbers, not {array.reshape(-1)[~exact.reshape(-1)][0]}")
    raise ValueError(f"int64 values must be integers that fit int64, not {array.dtype} values")


def as_tensor_data(value: Any, key: str = "") -> TensorData:
    """Converts a TensorData, torch tensor, numpy array or (nested) list to TensorData."""
    if isinstance(value, TensorData):
        array = value.data
    elif hasattr(value, "detach"):  # torch.Tensor, without importing torch
        array = TensorData.from_torch(value).data
    else:
        array = np.asarray(value)
    dtype = _DTYPE_OF_KEY.get(key)
    if dtype is None:
        dtype = "int64" if np.issubdtype(array.dtype, np.integer) or array.dtype == bool else "float32"
    try:
        return TensorData(array, dtype, array.shape)
    except (TypeError, ValueError) as error:  # TypeError: values that are no numbers (e.g. a dict)
        raise type(error)(f"loss_fn_inputs[{key!r}]: {error}") from None


def _token_id(value: Any) -> int:
    try:
        return operator.index(value)  # an int or numpy integer; a float would be truncated
    except TypeError:
        raise TypeError(f"token id {value!r} is not an integer") from None


@dataclass
class EncodedTextChunk:
    """A run of token ids."""

    tokens: list[int]
    type: Literal["encoded_text"] = "encoded_text"

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass
class ImageChunk:
    """An image, for vision models (gradwire's text models reject it, naming the chunk)."""

    data: bytes
    format: Literal["png", "jpeg"]
    expected_tokens: int | None = None
    type: Literal["image"] = "image"

    @property
    def length(self) -> int:
        return _image_length(self)


@dataclass
class ImageAssetPointerChunk:
    """An image stored with the hosted service (by location). gradwire has no asset
    store: sending one raises UnsupportedFeatureError."""

    format: Literal["png", "jpeg"]
    location: str
    expected_tokens: int | None = None
    type: Literal["image_asset_pointer"] = "image_asset_pointer"

    @property
    def length(self) -> int:
        return _image_length(self)


def _image_length(chunk: ImageChunk | ImageAssetPointerChunk) -> int:
    """An image's model positions: only the caller knows them (expected_tokens)."""
    if chunk.expected_tokens is None:
        raise ValueError(f"{type(chunk).__name__}.length: expected_tokens is not set")
    return chunk.expected_tokens


ModelInputChunk = Union[EncodedTextChunk, ImageChunk, ImageAssetPointerChunk]


@dataclass
class ModelInput:
    """What the model reads: a list of chunks (token runs, or images for vision models)."""

    chunks: list[ModelInputChunk] = field(default_factory=list)

    @classmethod
    def from_ints(cls, tokens: Any) -> ModelInput:
        """One chunk holding `tokens` (a list, numpy array or torch tensor of ids)."""
        if hasattr(tokens, "tolist"):
            tokens = tokens.tolist()
        return cls([EncodedTextChunk([_token_id(t) for t in tokens])])

    @classmethod
    def empty(cls) -> ModelInput:
        return cls([])

    def to_ints(self) -> list[int]:
        """All token ids, chunk after chunk."""
        out: list[int] = []
        for chunk in self.chunks:
            if not isinstance(chunk, EncodedTextChunk):
                raise ValueError(f"to_ints: {type(chunk).__name__} holds no token ids")
            out.extend(chunk.tokens)
        return out

    @property
    def length(self) -> int:
        """Number of model positions."""
        return sum(chunk.length for chunk in self.chunks)

    def append(self, chunk: ModelInputChunk) -> ModelInput:
        """A new ModelInput with `chunk` added at the end."""
        return ModelInput([*self.chunks, chunk])

    def append_int(self, token: int) -> ModelInput:
        """A new ModelInput with one more token at the end (an int: 1.7 or "5" is a TypeError)."""
        token = operator.index(token)
        if self.chunks and isinstance(self.chunks[-1], EncodedTextChunk):
            last = EncodedTextChunk([*self.chunks[-1].tokens, token])
            return ModelInput([*self.chunks[:-1], last])
        return self.append(EncodedTextChunk([token]))


@dataclass(frozen=True, kw_only=True)
class _ProvenanceSpan:
    """What both provenance span kinds share: the fields and their checks."""

    sequence_id: str
    offset: int = 0
    length: int

    def __post_init__(self) -> None:
        kind = type(self).__name__
        if not self.sequence_id:
            raise ValueError(f"{kind}.sequence_id must be non-empty")
        if self.length < 1:
            raise ValueError(f"{kind}.length must be >= 1, got {self.length}")
        if self.offset < 0:
            raise ValueError(f"{kind}.offset must be >= 0, got {self.offset}")


# Each kind is decorated too: an undecorated subclass of a frozen dataclass would accept new attributes.
@dataclass(frozen=True, kw_only=True)
class PromptProvenanceSpan(_ProvenanceSpan):
    """Datum positions that are positions [offset, offset + length) of the prompt of
    the sample request that produced sequence `sequence_id`."""


@dataclass(frozen=True, kw_only=True)
class SampledProvenanceSpan(_ProvenanceSpan):
    """Datum positions that are positions [offset, offset + length) of the tokens
    sampled as sequence `sequence_id`."""


@dataclass
class Datum:
    """One training example: model input plus per-token loss inputs.

    `loss_fn_inputs` values may be TensorData, torch tensors, numpy arrays or
    lists; they are converted on construction (target_tokens to int64;
    weights, advantages, logprobs and sequence_ratio_mask to float32).
    `provenance` (see with_provenance) stays on the client: no built-in loss of
    gradwire reads it.
    """

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = field(default_factory=dict)
    provenance: dict[str, list[PromptProvenanceSpan | SampledProvenanceSpan]] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.loss_fn_inputs, Mapping):
            raise TypeError(f"loss_fn_inputs: a {type(self.loss_fn_inputs).__name__} is not a dict of "
                            "field names to tensors")
        self.loss_fn_inputs = {key: as_tensor_data(value, key)
                               for key, value in self.loss_fn_inputs.items()}

    def with_provenance(self, model_input: list[PromptProvenanceSpan | SampledProvenanceSpan] | None = None,
                        loss_fn_inputs: list[PromptProvenanceSpan | SampledProvenanceSpan] | None = None
                        ) -> Datum:
        """A copy that names the sampled sequence behind each position: the spans of
        each field tile it in order (their lengths sum to model_input.length).
        Tinker's stable_reinforce reads these; gradwire checks them and keeps them
        with the datum (its losses do not need them)."""
        provenance = dict(self.provenance or {})
        for name, spans in (("model_input", model_input), ("loss_fn_inputs", loss_fn_inputs)):
            if spans is None:
                continue
            covered = sum(span.length for span in spans)
            if covered != self.model_input.length:
                raise ValueError(f"with_provenance: the {name} spans cover {covered} positions, "
                                 f"the datum has {self.model_input.length}")
            provenance[name] = list(spans)
        return dataclasses.replace(self, provenance=provenance)


@dataclass
class ForwardBackwardOutput:
    """Result of forward / forward_backward / forward_backward_custom."""

    loss_fn_output_type: str
    loss_fn_outputs: list[dict[str, TensorData]]
    metrics: dict[str, float]


@dataclass
class AdamParams:
    """AdamW hyperparameters (Tinker's defaults; weight decay is decoupled)."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


@dataclass
class OptimStepResponse:
    """Result of optim_step."""

    metrics: dict[str, float] | None = None


@dataclass
class LoraConfig:
    """LoRA settings of a training run."""

    rank: int = 32
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


@dataclass
class SupportedModel:
    model_name: str
    max_context_length: int
    vocab_size: int


@dataclass
class GetServerCapabilitiesResponse:
    """What the server offers."""

    supported_models: list[SupportedModel]
    loss_fns: list[str]
    limits: dict[str, float]
    device: str
    dtype: str = "float32"  # the frozen base weights' dtype (LoRA, gradients, AdamW: float32)
    # The sampler's KV cache at the time of the call: budget_bytes, used_bytes, reserved_bytes,
    # block_tokens, running_sequences, waiting_requests.
    kv_cache: dict[str, int] = field(default_factory=dict)
    # How training passes run: compiled_layers (--compile), activation_checkpointing, attention
    # (--attention: "auto", "efficient", "math" or "eager"); {} from a server too old to say.
    training: dict[str, bool | str] = field(default_factory=dict)
    # Where sampled, top-k and prompt logprobs come from (--sampler-logprobs): "training" (the
    # training forward of each finished sample: forward's numbers exactly) or "decode" (the decode
    # steps that drew the tokens); "" from a server too old to say.
    sampler_logprobs: str = ""


@dataclass
class ModelData:
    """The base model of a training run: its architecture, name and tokenizer."""

    arch: str
    model_name: str
    tokenizer_id: str


@dataclass
class GetInfoResponse:
    """Description of a training run."""

    model_id: str
    model_name: str
    is_lora: bool
    lora_rank: int
    lora_config: LoraConfig
    model_data: ModelData
    step: int


@dataclass
class SaveWeightsResponse:
    """Result of save_state: the checkpoint's path, gradwire://<run_id>/weights/<name>."""

    path: str


@dataclass
class SaveWeightsForSamplerResponse:
    """Result of save_weights_for_sampler: gradwire://<run_id>/sampler_weights/<name>."""

    path: str


@dataclass
class LoadWeightsResponse:
    """Result of load_state / load_state_with_optimizer: the checkpoint loaded."""

    path: str


@dataclass
class UnloadModelResponse:
    """Result of unload."""

    model_id: str


@dataclass
class Checkpoint:
    """A saved checkpoint (Tinker's fields, plus the run that saved it)."""

    checkpoint_id: str                       # "weights/<name>" or "sampler_weights/<name>"
    checkpoint_type: Literal["training", "sampler"]
    time: datetime.datetime
    path: str
    size_bytes: int
    expires_at: datetime.datetime | None = None  # None: kept until deleted
    training_run_id: str = ""

    @property
    def tinker_path(self) -> str:
        """Tinker's name for `path` (gradwire://...; gradwire accepts tinker://... too)."""
        return self.path


@dataclass
class TrainingRun:
    """A training run known to the server, loaded in memory or not."""

    training_run_id: str
    base_model: str
    is_lora: bool
    lora_rank: int
    lora_config: LoraConfig
    user_metadata: dict[str, str]
    created_time: datetime.datetime
    last_request_time: datetime.datetime
    step: int
    loaded: bool
    source_checkpoint: str | None = None
    last_checkpoint: Checkpoint | None = None
    last_sampler_checkpoint: Checkpoint | None = None


StopReason = Literal["length", "stop"]


@dataclass
class Cursor:
    """Where a page of a listing sits in the whole."""

    offset: int
    limit: int
    total_count: int


@dataclass
class TrainingRunsResponse:
    """A page of RestClient.list_training_runs."""

    training_runs: list[TrainingRun]
    cursor: Cursor | None = None


@dataclass
class CheckpointsListResponse:
    """RestClient.list_checkpoints / list_user_checkpoints."""

    checkpoints: list[Checkpoint]
    cursor: Cursor | None = None


@dataclass
class ParsedCheckpointTinkerPath:
    """A checkpoint path split into its parts; `tinker://` and `gradwire://` both parse."""

    tinker_path: str
    training_run_id: str
    checkpoint_type: Literal["training", "sampler"]
    checkpoint_id: str  # "weights/<name>" or "sampler_weights/<name>"

    @classmethod
    def from_tinker_path(cls, tinker_path: str) -> ParsedCheckpointTinkerPath:
        scheme = next((s for s in ("gradwire://", "tinker://") if tinker_path.startswith(s)), None)
        parts = tinker_path[len(scheme):].split("/") if scheme else []
        if len(parts) != 3 or parts[1] not in ("weights", "sampler_weights") or not all(parts):
            raise ValueError(f"{tinker_path!r} is not a checkpoint path: expected "
                             "gradwire://<run_id>/weights/<name> or gradwire://<run_id>/sampler_weights/<name>")
        return cls(tinker_path, parts[0], "training" if parts[1] == "weights" else "sampler",
                   f"{parts[1]}/{parts[2]}")


@dataclass(frozen=True)
class AdamOptimizerConfig:
    """The optimizer family of a training run: AdamW (gradwire's only one)."""

    type: Literal["adamw"] = "adamw"


OptimizerConfig = AdamOptimizerConfig
OptimParams = AdamParams  # the per-step hyperparameters of gradwire's one optimizer family


@dataclass
class SamplingParams:
    """How to pick tokens.

    max_tokens: most tokens per sample (None: up to the end of the context).
    seed: the same seed gives the same tokens (None: random; in bf16 see the README).
    stop: a string, strings (matched in the completion's text decoded without
    special tokens; a special token's text, "<|im_end|>", stops at that token; at most
    64 strings of at most 256 characters) or
    token ids that end a sequence; the stop's own tokens end the sequence.
    temperature: 0 is greedy. top_k: -1 or 0 is off. top_p: 1.0 is off.
    """

    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | list[int] | None = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0


TOPK_MASK_LOGPROB = -99999.0  # fills top-k rows (and columns) that hold no prediction


@dataclass(frozen=True)
class TopkLogprobs:
    """Top-k (token, logprob) pairs per position as two dense [length, k] matrices
    (int32 ids, float32 logprobs); empty slots hold token 0 and TOPK_MASK_LOGPROB."""

    token_ids: np.ndarray
    logprobs: np.ndarray

    @classmethod
    def from_rows(cls, rows: list[list[tuple[int, float]] | None], k: int) -> TopkLogprobs:
        ids = np.zeros((len(rows), k), dtype=np.int32)
        values = np.full((len(rows), k), TOPK_MASK_LOGPROB, dtype=np.float32)
        for i, row in enumerate(rows):
            for j, (token, logprob) in enumerate(row or []):
                ids[i, j], values[i, j] = token, logprob
        return cls(ids, values)


@dataclass
class SampledSequence:
    """One completion: generated tokens (without the prompt) and their logprobs,
    log_softmax of the model's unscaled logits (comparable to training logprobs).
    `sequence_id` is unique to this sequence (provenance spans name it);
    `topk_logprobs` (with topk_sample_logprobs=k) holds, per generated position,
    the k most likely (token, logprob) pairs."""

    stop_reason: StopReason
    tokens: list[int]
    logprobs: list[float] | None = None
    sequence_id: str | None = field(default=None, compare=False)  # identity, not content
    topk_logprobs: list[list[tuple[int, float]]] | None = None

    @property
    def tokens_np(self) -> np.ndarray:
        """The tokens as an int32 array."""
        return np.asarray(self.tokens, dtype=np.int32)

    @property
    def logprobs_np(self) -> np.ndarray | None:
        """The logprobs as a float32 array (None when not returned)."""
        return None if self.logprobs is None else np.asarray(self.logprobs, dtype=np.float32)

    @property
    def topk_logprobs_np(self) -> TopkLogprobs | None:
        """topk_logprobs as dense matrices (None when not asked for)."""
        if self.topk_logprobs is None:
            return None
        return TopkLogprobs.from_rows(self.topk_logprobs, max((len(r) for r in self.topk_logprobs), default=0))


@dataclass
class SampleResponse:
    """Result of sample: the completions, plus the prompt's logprobs when asked for
    (entry 0 None) and its top-k (token, logprob) pairs per position (entry 0 None)."""

    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None

    @property
    def prompt_logprobs_np(self) -> np.ndarray | None:
        """prompt_logprobs as a float32 array, NaN where there is no score."""
        if self.prompt_logprobs is None:
            return None
        return np.array([np.nan if v is None else v for v in self.prompt_logprobs], dtype=np.float32)

    @property
    def topk_prompt_logprobs_np(self) -> TopkLogprobs | None:
        """topk_prompt_logprobs as dense matrices, masked rows where there is no score."""
        rows = self.topk_prompt_logprobs
        if rows is None:
            return None
        return TopkLogprobs.from_rows(rows, max((len(r) for r in rows if r), default=0))


@dataclass
class SampledTokens:
    """A piece of sample_stream: tokens one sample generated since its previous
    piece; stop_reason is set in the sample's last piece."""

    sequence_index: int
    tokens: list[int]
    logprobs: list[float]
    stop_reason: StopReason | None = None


def _model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False):
    """A copy with `update`'s fields replaced (converted as the constructor converts them),
    as pydantic's model_copy, which code written for Tinker's (pydantic) types calls."""
    source = copy.deepcopy(self) if deep else self
    return dataclasses.replace(source, **(update or {}))


for _name in __all__:
    if dataclasses.is_dataclass(globals()[_name]):
        globals()[_name].model_copy = _model_copy
del _name
