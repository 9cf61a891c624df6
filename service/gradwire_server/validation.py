"""Request validation: protobuf in, engine-ready numpy arrays out, or an
INVALID_ARGUMENT naming each offending datum index and field. Nothing here
touches the model, so a rejected request changes nothing."""
from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np
from google.protobuf import message

from gradwire.v1 import codec
from gradwire.v1 import training_service_pb2 as pb
from gradwire_server.batch import AdamSettings, DatumArrays, LoraSettings, LossRequest
from gradwire_server.errors import FieldViolation, invalid_argument
from gradwire_server.losses import LOSSES, UNAVAILABLE_LOSSES
from gradwire_server.scheduler import MAX_SEQ_ID

MAX_LORA_RANK = 256
# Decoded loss inputs (target_tokens, weights, ...), checked from the shapes before
# anything is allocated: a sparse tensor of a few bytes may claim terabytes.
MAX_DATUM_INPUT_BYTES = 64 * 2**20    # all loss_fn_inputs of one datum
MAX_REQUEST_INPUT_BYTES = 256 * 2**20  # all datums of a unary request, or of one stream message
MAX_REQUEST_ID_CHARS = 256
MAX_USER_METADATA_BYTES = 16 * 2**10  # a run's or checkpoint's labels: listings of runs carry them
MAX_CONFIG_VALUE = 1e6                 # |loss_fn_config value|: far beyond any sensible setting
# AdamW hyperparameters: finite, and bounded so a step cannot overflow float32 weights.
MAX_LEARNING_RATE = 10.0
MAX_WEIGHT_DECAY = 100.0
MAX_EPS = 1.0
# A checkpoint's time to live: a century, so its expiry time stays a listable timestamp.
MAX_TTL_SECONDS = 100 * 365 * 24 * 3600
_MAX_VIOLATIONS = 20


def loss_request(request: pb.ForwardBackwardRequest, vocab_size: int, max_context: int) -> LossRequest:
    """Validates a ForwardBackwardRequest, reporting every violation at once."""
    violations = _loss_violations(request.loss_fn, request.loss_fn_config)
    if not request.data:
        violations.append(FieldViolation("data", "is empty; send at least one datum"))
    data = _data(request.data, LOSSES.get(request.loss_fn), vocab_size, max_context, 0, violations)
    if violations:
        raise invalid_argument(violations)
    return LossRequest(data, request.loss_fn, dict(request.loss_fn_config))


def loss_header(loss_fn: str, config: Mapping[str, float]) -> None:
    """Validates the loss and its config (a stream's header)."""
    violations = _loss_violations(loss_fn, config)
    if violations:
        raise invalid_argument(violations)


def data_batch(datums: Sequence, loss_fn: str, vocab_size: int, max_context: int,
               index_offset: int) -> list[DatumArrays]:
    """Validates one piece of a streamed batch; datum indices count from index_offset."""
    violations: list[FieldViolation] = []
    data = _data(datums, LOSSES[loss_fn], vocab_size, max_context, index_offset, violations)
    if violations:
        raise invalid_argument(violations)
    return data


def _loss_violations(loss_fn: str, config: Mapping[str, float]) -> list[FieldViolation]:
    spec = LOSSES.get(loss_fn)
    if loss_fn in UNAVAILABLE_LOSSES:
        return [FieldViolation("loss_fn", f"{loss_fn!r} is not available on gradwire: "
                                          f"{UNAVAILABLE_LOSSES[loss_fn]}")]
    if spec is None:
        return [FieldViolation("loss_fn", f"unknown loss {loss_fn!r}; built-in losses: {sorted(LOSSES)}")]
    violations = []
    for key, value in config.items():
        if key not in spec.config_keys:
            violations.append(FieldViolation(
                f"loss_fn_config[{key!r}]",
                f"{loss_fn} has no config key {key!r}; accepted: {sorted(spec.config_keys)}"))
        elif not abs(value) <= MAX_CONFIG_VALUE:  # also false for NaN
            violations.append(FieldViolation(f"loss_fn_config[{key!r}]",
                                             f"must be finite and within ±{MAX_CONFIG_VALUE:g}, got {value}"))
    for key in sorted(spec.required_config - set(config)):
        violations.append(FieldViolation(f"loss_fn_config[{key!r}]",
                                         f"is required by {loss_fn} and missing (no default)"))
    if not violations and spec.check_config is not None:
        for key, problem in spec.check_config({**spec.config_defaults, **config}):
            violations.append(FieldViolation(f"loss_fn_config[{key!r}]", problem))
    return violations


def seq_id(value: int) -> None:
    """A request's seq_id: 0 (next free) or 1..MAX_SEQ_ID."""
    if not 0 <= value <= MAX_SEQ_ID:
        raise invalid_argument([FieldViolation(
            "seq_id", f"must be 0 (after every request already submitted) or in [1, {MAX_SEQ_ID}], "
                      f"got {value}")])


def ttl_seconds(value: int | None) -> None:
    """A checkpoint's time to live, if set, is at least one second and at most MAX_TTL_SECONDS."""
    if value is not None and not 1 <= value <= MAX_TTL_SECONDS:
        raise invalid_argument([FieldViolation(
            "ttl_seconds", f"must be within [1, {MAX_TTL_SECONDS}] (a century), got {value}")])


def user_metadata(value: Mapping[str, str]) -> None:
    """A run's or checkpoint's labels hold at most MAX_USER_METADATA_BYTES of keys and values
    (UTF-8): they are stored with it, and a run's come back in every listing of runs."""
    size = sum(len(key.encode()) + len(text.encode()) for key, text in value.items())
    if size > MAX_USER_METADATA_BYTES:
        raise invalid_argument([FieldViolation(
            "user_metadata", f"has {size} bytes of keys and values, at most {MAX_USER_METADATA_BYTES} are allowed")])


def request_id(value: str) -> None:
    """A client-chosen request id (AIP-155: a UUID fits) of at most MAX_REQUEST_ID_CHARS."""
    if len(value) > MAX_REQUEST_ID_CHARS:
        raise invalid_argument([FieldViolation(
            "request_id", f"has {len(value)} characters, at most {MAX_REQUEST_ID_CHARS} are allowed")])


def request_fingerprint(request: message.Message) -> bytes:
    """What a retry of a request_id must repeat: the request's kind and fields, digested."""
    digest = hashlib.blake2b(request.DESCRIPTOR.full_name.encode(), digest_size=16)
    digest.update(request.SerializeToString(deterministic=True))
    return digest.digest()


def _data(datums: Sequence, spec, vocab_size: int, max_context: int, index_offset: int,
          violations: list[FieldViolation]) -> list[DatumArrays]:
    sizes = [_input_bytes(datum, index_offset + i, violations) for i, datum in enumerate(datums)]
    if violations:
        return []
    if sum(sizes) > MAX_REQUEST_INPUT_BYTES:
        violations.append(FieldViolation("data", f"loss_fn_inputs decode to {sum(sizes)} bytes, more than "
                                                 f"{MAX_REQUEST_INPUT_BYTES} per request or stream message"))
        return []
    data = []
    for i, datum in enumerate(datums):
        if len(violations) >= _MAX_VIOLATIONS:
            break
        data.append(_datum(datum, index_offset + i, spec, vocab_size, max_context, violations))
    return data


def _input_bytes(datum, index: int, violations: list[FieldViolation]) -> int:
    """Bytes the datum's loss_fn_inputs decode to, from their shapes alone; a shape that is
    not [N] or [N, K] with K >= 1, or too large a datum, is a violation."""
    total = 0
    for key, tensor in datum.loss_fn_inputs.items():
        field = f'data[{index}].loss_fn_inputs["{key}"]'
        shape = list(tensor.shape)
        nbytes = codec.decoded_nbytes(tensor)
        if len(shape) > 2 or nbytes is None:
            violations.append(FieldViolation(field, f"shape {_shown_shape(shape)} is not [N] or [N, K]"))
        elif len(shape) == 2 and shape[1] == 0:
            violations.append(FieldViolation(field, f"shape {shape} has no target per position (K = 0)"))
        elif nbytes > MAX_DATUM_INPUT_BYTES:
            violations.append(FieldViolation(field, f"shape {shape} decodes to {nbytes} bytes, more than "
                                                    f"{MAX_DATUM_INPUT_BYTES} per datum"))
        else:
            total += nbytes
    if total > MAX_DATUM_INPUT_BYTES:
        violations.append(FieldViolation(f"data[{index}].loss_fn_inputs",
                                         f"decode to {total} bytes, more than {MAX_DATUM_INPUT_BYTES} per datum"))
    return total


def _shown_shape(shape: list[int]) -> str:
    return str(shape) if len(shape) <= 4 else f"[{shape[0]}, {shape[1]}, ... ({len(shape)} dimensions)]"


def _datum(datum, index: int, spec, vocab_size: int, max_context: int,
           violations: list[FieldViolation]) -> DatumArrays | None:
    where = f"data[{index}]"
    pieces = []
    for c, chunk in enumerate(datum.model_input):
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            violations.append(FieldViolation(f"{where}.model_input[{c}]",
                                             f"{kind or 'empty'} chunks are not supported by text models"))
            return None
        try:
            pieces.append(codec.tokens_from_text_chunk(chunk.encoded_text))
        except codec.WireFormatError as error:
            violations.append(FieldViolation(f"{where}.model_input[{c}].encoded_text", str(error)))
            return None
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    n = tokens.size
    if n == 0:
        violations.append(FieldViolation(f"{where}.model_input", "is empty"))
        return None
    if n > max_context:
        violations.append(FieldViolation(f"{where}.model_input",
                                         f"{n} tokens exceed the model's context of {max_context}"))
    check_token_range(tokens, f"{where}.model_input", vocab_size, violations)

    inputs: dict[str, np.ndarray] = {}
    for key, tensor in datum.loss_fn_inputs.items():
        field = f'{where}.loss_fn_inputs["{key}"]'
        if spec is not None and key not in spec.required_inputs | spec.optional_inputs:
            violations.append(FieldViolation(field, "is not an input of this loss; accepted: "
                                             f"{sorted(spec.required_inputs | spec.optional_inputs)}"))
            continue
        try:
            array = codec.tensor_from_proto(tensor)
        except codec.WireFormatError as error:
            violations.append(FieldViolation(field, str(error)))
            continue
        expected = np.int64 if key == "target_tokens" else np.float32
        if array.dtype != expected:
            violations.append(FieldViolation(
                field, f"dtype is {array.dtype.name}, expected {np.dtype(expected).name}"))
            continue
        if array.ndim not in (1, 2) or array.shape[0] != n:
            violations.append(FieldViolation(
                field, f"shape {list(array.shape)} does not match the model input: expected [{n}] "
                       f"or [{n}, K] (position i predicts target i)"))
            continue
        if key == "target_tokens":
            if array.ndim == 2 and spec is not None and not spec.multi_target:
                violations.append(FieldViolation(
                    field, f"shape {list(array.shape)}: this loss takes one target per position, "
                           f"shape [{n}]; multi-target [N, K] works with "
                           f"{sorted(name for name, s in LOSSES.items() if s.multi_target)}"))
                continue
            check_token_range(array, field, vocab_size, violations)
        elif not np.isfinite(array).all():
            bad = int(np.flatnonzero(~np.isfinite(array.reshape(-1)))[0])
            violations.append(FieldViolation(field, f"holds NaN or infinity (first at flat index {bad})"))
        inputs[key] = array
    if spec is not None:
        for key in sorted(spec.required_inputs - datum.loss_fn_inputs.keys()):
            violations.append(FieldViolation(f'{where}.loss_fn_inputs["{key}"]',
                                             "is required by this loss and missing"))
    targets = inputs.get("target_tokens")
    if targets is not None:
        for key, array in inputs.items():
            if key != "target_tokens" and array.shape != targets.shape:
                violations.append(FieldViolation(
                    f'{where}.loss_fn_inputs["{key}"]',
                    f"shape {list(array.shape)} differs from target_tokens' {list(targets.shape)}"))
    return DatumArrays(tokens, inputs)


def check_token_range(tokens: np.ndarray, field: str, vocab_size: int,
                       violations: list[FieldViolation]) -> None:
    outside = (tokens < 0) | (tokens >= vocab_size)
    if outside.any():
        position = int(np.flatnonzero(outside.reshape(-1))[0])
        violations.append(FieldViolation(
            field, f"token id {int(tokens.reshape(-1)[position])} at flat index {position} is "
                   f"outside the vocabulary [0, {vocab_size})"))


def adam_settings(params: pb.AdamParams) -> AdamSettings:
    """AdamParams with proto3's unset zeros replaced by Tinker's defaults where 0 is invalid."""
    defaults = AdamSettings()
    settings = AdamSettings(
        learning_rate=params.learning_rate if params.HasField("learning_rate") else defaults.learning_rate,
        beta1=params.beta1 if params.HasField("beta1") else defaults.beta1,
        beta2=params.beta2 if params.HasField("beta2") else defaults.beta2,
        eps=params.eps if params.HasField("eps") else defaults.eps,
        weight_decay=params.weight_decay, grad_clip_norm=params.grad_clip_norm)
    violations = []
    for name in ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm"):
        value = getattr(settings, name)
        if not math.isfinite(value) or value < 0:
            violations.append(FieldViolation(f"adam_params.{name}", f"must be finite and >= 0, got {value}"))
    for name in ("beta1", "beta2"):
        if getattr(settings, name) >= 1:
            violations.append(FieldViolation(f"adam_params.{name}", "must be < 1"))
    if not 0 < settings.eps <= MAX_EPS:  # 0 divides by zero where a gradient is 0
        violations.append(FieldViolation("adam_params.eps", f"must be in (0, {MAX_EPS:g}], got {settings.eps}"))
    for name, high in (("learning_rate", MAX_LEARNING_RATE), ("weight_decay", MAX_WEIGHT_DECAY)):
        if getattr(settings, name) > high:
            violations.append(FieldViolation(f"adam_params.{name}",
                                             f"must be at most {high:g}, got {getattr(settings, name)}"))
    if violations:
        raise invalid_argument(violations)
    return settings


def lora_settings(config: pb.LoraConfig) -> LoraSettings:
    rank = config.rank or 32
    if not 1 <= rank <= MAX_LORA_RANK:
        raise invalid_argument([FieldViolation("lora_config.rank",
                                               f"must be in [1, {MAX_LORA_RANK}], got {rank}")])
    return LoraSettings(rank=rank, seed=config.seed if config.HasField("seed") else None,
                        train_unembed=_true_unless_unset(config, "train_unembed"),
                        train_mlp=_true_unless_unset(config, "train_mlp"),
                        train_attn=_true_unless_unset(config, "train_attn"))


def _true_unless_unset(config: pb.LoraConfig, name: str) -> bool:
    return getattr(config, name) if config.HasField(name) else True
