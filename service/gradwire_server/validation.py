"""Request validation: protobuf in, engine-ready numpy arrays out, or an
INVALID_ARGUMENT naming each offending datum index and field. Nothing here
touches the model, so a rejected request changes nothing."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from gradwire import _codec
from gradwire.v1 import training_service_pb2 as pb
from gradwire_server.batch import AdamSettings, DatumArrays, LoraSettings, LossRequest
from gradwire_server.errors import FieldViolation, invalid_argument
from gradwire_server.losses import LOSSES, UNAVAILABLE_LOSSES

MAX_LORA_RANK = 256
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
        elif not math.isfinite(value):
            violations.append(FieldViolation(f"loss_fn_config[{key!r}]", "must be finite"))
    for key in sorted(spec.required_config - set(config)):
        violations.append(FieldViolation(f"loss_fn_config[{key!r}]",
                                         f"is required by {loss_fn} and missing (no default)"))
    if not violations and spec.check_config is not None:
        for key, problem in spec.check_config({**spec.config_defaults, **config}):
            violations.append(FieldViolation(f"loss_fn_config[{key!r}]", problem))
    return violations


def _data(datums: Sequence, spec, vocab_size: int, max_context: int, index_offset: int,
          violations: list[FieldViolation]) -> list[DatumArrays]:
    data = []
    for i, datum in enumerate(datums):
        if len(violations) >= _MAX_VIOLATIONS:
            break
        data.append(_datum(datum, index_offset + i, spec, vocab_size, max_context, violations))
    return data


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
            pieces.append(_codec.tokens_from_text_chunk(chunk.encoded_text))
        except _codec.WireFormatError as error:
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
            array = _codec.tensor_from_proto(tensor)
        except _codec.WireFormatError as error:
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
