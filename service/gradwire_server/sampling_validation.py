"""Validation of sampling requests: protobuf in, a SampleSpec and the weights'
checkpoint out, or INVALID_ARGUMENT / NOT_FOUND naming each offending field.
Nothing here touches the model, so a rejected request changes nothing."""
from __future__ import annotations

import math
import pathlib
import secrets
from collections.abc import Mapping, Sequence

import grpc
import numpy as np

from gradwire.v1 import codec
from gradwire.v1 import sampling_service_pb2 as pb
from gradwire_server import checkpoints
from gradwire_server.errors import FieldViolation, ServiceError, invalid_argument, not_found
from gradwire_server.kv_cache import blocks_for
from gradwire_server.sampler import SampleSpec, SamplingSettings
from gradwire_server.validation import check_token_range

MAX_TOPK_PROMPT_LOGPROBS = 20
MAX_NUM_SAMPLES = 256  # each sample holds its own KV blocks for the tokens it generates
# Sample's response rides inside one Operation, within gRPC's 4 MiB default.
MAX_RESPONSE_BYTES = 3 * 1024 * 1024
# A temperature below this samples greedily (the limit it tends to), as logits
# divided by a tiny one overflow float32.
GREEDY_BELOW_TEMPERATURE = 1e-5
_BYTES_PER_SAMPLED_TOKEN = 8   # int32 token + float32 logprob
# Every decode step matches each row's stop strings in its completion's last (longest stop)
# characters, on the worker every request shares: bounded, so one request cannot slow the rest.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 256


def sampler_checkpoint(checkpoint_root: pathlib.Path, model_path: str, served_model: str
                       ) -> checkpoints.Checkpoint:
    """The complete sampler checkpoint `model_path` (gradwire://<run_id>/sampler_weights/<name>)
    of the served base model."""
    if checkpoints.parse_path(model_path, "model_path").kind != "sampler_weights":
        raise invalid_argument([FieldViolation(
            "model_path", f"{model_path!r} is a training checkpoint; sample from a "
                          "gradwire://<run_id>/sampler_weights/<name> path (save_weights_for_sampler)")])
    try:
        checkpoint = checkpoints.find(checkpoint_root, model_path, "model_path")
    except ServiceError as error:
        if error.code == grpc.StatusCode.NOT_FOUND:
            raise not_found("model_path", model_path) from None
        raise
    checkpoints.check_base_model(checkpoint, served_model)
    return checkpoint


def weights_checkpoint(request: pb.SampleRequest | pb.ComputeLogprobsRequest, served_names: tuple[str, ...],
                       checkpoint_root: pathlib.Path) -> checkpoints.Checkpoint | None:
    """The sampler checkpoint the request names, or None for the base model.
    served_names: the served model's name, then its aliases."""
    which = request.WhichOneof("model")
    if which is None:
        raise invalid_argument([FieldViolation("model", "set model_path or base_model")])
    if which == "base_model":
        if request.base_model not in served_names:
            raise not_found("base_model", request.base_model,
                            f"this server serves {' = '.join(map(repr, served_names))}")
        return None
    return sampler_checkpoint(checkpoint_root, request.model_path, served_names[0])


def sample_spec(request: pb.SampleRequest, vocab_size: int, max_context: int, stream: bool = False,
                special_tokens: Mapping[str, int] | None = None) -> SampleSpec:
    """Validates a SampleRequest's prompt, counts and params, reporting every violation at once.
    A Sample's whole result must fit one message; a stream sends it per decode turn.
    `special_tokens`: the tokenizer's special tokens' texts and ids (see _stops)."""
    violations: list[FieldViolation] = []
    prompt = _prompt(request.prompt, vocab_size, violations)
    if prompt.size >= max_context:
        violations.append(FieldViolation(
            "prompt", f"{prompt.size} tokens leave no room to generate in the model's context "
                      f"of {max_context}"))
    num_samples = request.num_samples if request.HasField("num_samples") else 1
    if not 1 <= num_samples <= MAX_NUM_SAMPLES:
        violations.append(FieldViolation("num_samples", f"must be in [1, {MAX_NUM_SAMPLES}], got {num_samples}"))
    settings = _settings(request.sampling_params, prompt.size, vocab_size, max_context, special_tokens or {},
                         violations)
    k = request.topk_prompt_logprobs
    if not 0 <= k <= MAX_TOPK_PROMPT_LOGPROBS:
        violations.append(FieldViolation("topk_prompt_logprobs",
                                         f"must be in [0, {MAX_TOPK_PROMPT_LOGPROBS}], got {k}"))
    top = request.topk_sample_logprobs
    if not 0 <= top <= MAX_TOPK_PROMPT_LOGPROBS:
        violations.append(FieldViolation("topk_sample_logprobs",
                                         f"must be in [0, {MAX_TOPK_PROMPT_LOGPROBS}], got {top}"))
    elif top and stream:
        violations.append(FieldViolation("topk_sample_logprobs",
                                         "is not supported by SampleStream; use Sample"))
    last_n = _last_n(request, violations)
    if last_n is not None and not (request.include_prompt_logprobs or k):
        violations.append(FieldViolation("prompt_logprobs_last_n", "scores nothing without include_prompt_logprobs "
                                                                   "or topk_prompt_logprobs"))
    prompt_score_bytes = prompt.size * (4 * request.include_prompt_logprobs + 8 * k)
    response_bytes = num_samples * settings.max_tokens * (_BYTES_PER_SAMPLED_TOKEN + 8 * top) \
        + prompt_score_bytes if not violations else 0
    if (prompt_score_bytes if stream else response_bytes) > MAX_RESPONSE_BYTES:
        # SampleStream carries the samples in pieces, but not their top-k logprobs
        remedies = "fewer prompt scores" + (", or use SampleStream" if not (stream or top) else "")
        violations.append(FieldViolation(
            "num_samples", f"{num_samples} samples of up to {settings.max_tokens} tokens and the prompt's "
                           f"scores exceed one response message ({MAX_RESPONSE_BYTES} bytes): send fewer "
                           f"samples, a smaller max_tokens, {remedies}"))
    if violations:
        raise invalid_argument(violations)
    return SampleSpec(prompt, num_samples, settings, request.include_prompt_logprobs, k, top, last_n)


def logprobs_spec(request: pb.ComputeLogprobsRequest, vocab_size: int, max_context: int) -> SampleSpec:
    """Validates a ComputeLogprobsRequest: a prompt-only SampleSpec."""
    violations: list[FieldViolation] = []
    prompt = _prompt(request.prompt, vocab_size, violations)
    if prompt.size > max_context:
        violations.append(FieldViolation(
            "prompt", f"{prompt.size} tokens exceed the model's context of {max_context}"))
    last_n = _last_n(request, violations)
    if violations:
        raise invalid_argument(violations)
    return SampleSpec(prompt, 0, SamplingSettings(max_tokens=0, seed=0), prompt_logprobs=True,
                      prompt_logprobs_last_n=last_n)


def _last_n(request: pb.SampleRequest | pb.ComputeLogprobsRequest,
            violations: list[FieldViolation]) -> int | None:
    if not request.HasField("prompt_logprobs_last_n"):
        return None
    if request.prompt_logprobs_last_n < 1:
        violations.append(FieldViolation("prompt_logprobs_last_n",
                                         f"must be >= 1, got {request.prompt_logprobs_last_n}"))
    return request.prompt_logprobs_last_n


def _prompt(chunks: Sequence, vocab_size: int, violations: list[FieldViolation]) -> np.ndarray:
    pieces = []
    for c, chunk in enumerate(chunks):
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            violations.append(FieldViolation(f"prompt[{c}]",
                                             f"{kind or 'empty'} chunks are not supported by text models"))
            continue
        try:
            pieces.append(codec.tokens_from_text_chunk(chunk.encoded_text))
        except codec.WireFormatError as error:
            violations.append(FieldViolation(f"prompt[{c}].encoded_text", str(error)))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    if tokens.size == 0 and not violations:
        violations.append(FieldViolation("prompt", "is empty; send at least one token"))
    check_token_range(tokens, "prompt", vocab_size, violations)
    return tokens


def _settings(params: pb.SamplingParams, prompt_length: int, vocab_size: int, max_context: int,
              special_tokens: Mapping[str, int], violations: list[FieldViolation]) -> SamplingSettings:
    where = "sampling_params"
    room = max_context - prompt_length
    if params.HasField("max_tokens"):
        max_tokens = params.max_tokens
        if max_tokens <= 0:
            violations.append(FieldViolation(f"{where}.max_tokens", f"must be >= 1, got {max_tokens}"))
        elif max_tokens > room >= 1:
            violations.append(FieldViolation(
                f"{where}.max_tokens", f"prompt ({prompt_length} tokens) + max_tokens ({max_tokens}) "
                                       f"exceeds the model's context of {max_context}"))
    else:
        max_tokens = room
    temperature = params.temperature if params.HasField("temperature") else 1.0
    if not math.isfinite(temperature) or temperature < 0:
        violations.append(FieldViolation(f"{where}.temperature", f"must be finite and >= 0, got {temperature}"))
    elif temperature < GREEDY_BELOW_TEMPERATURE:
        temperature = 0.0  # greedy: dividing logits by it would overflow to inf
    top_k = params.top_k if params.HasField("top_k") else -1
    if top_k < -1:
        violations.append(FieldViolation(f"{where}.top_k", f"must be -1 or 0 (off) or >= 1, got {top_k}"))
    top_p = params.top_p if params.HasField("top_p") else 1.0
    if not 0 < top_p <= 1:  # also false for NaN
        violations.append(FieldViolation(f"{where}.top_p", f"must be in (0, 1], got {top_p}"))
    stop_strings, special_stops = _stops(params.stop_strs.strings, special_tokens, violations)
    stop_tokens = np.asarray(params.stop_tokens.tokens, dtype=np.int64)
    check_token_range(stop_tokens, f"{where}.stop_tokens.tokens", vocab_size, violations)
    seed = params.seed if params.HasField("seed") else secrets.randbits(63)
    return SamplingSettings(max_tokens=max_tokens, seed=seed, temperature=temperature, top_k=max(top_k, 0),
                            top_p=top_p, stop_strings=stop_strings,
                            stop_tokens=frozenset(stop_tokens.tolist()) | special_stops)


def check_kv_budget(spec: SampleSpec, usable_blocks: int, block_bytes: int) -> None:
    """INVALID_ARGUMENT if the request's worst case exceeds the whole KV cache (it could
    never be admitted), naming what to cut: the prompt, the samples or max_tokens."""
    need = spec.worst_case_blocks()
    if need <= usable_blocks:
        return
    length = len(spec.prompt)
    if not spec.num_samples or blocks_for(length + 1) > usable_blocks:  # not even one token after it fits
        field = "prompt"
    elif spec.worst_case_blocks(num_samples=1) <= usable_blocks:
        field = "num_samples"
    else:
        field = "sampling_params.max_tokens"
    what = f"the prompt ({length} tokens)"
    if spec.num_samples:
        samples = "1 sample" if spec.num_samples == 1 else f"{spec.num_samples} samples"
        what += f" and {samples} of up to {spec.settings.max_tokens} tokens"
    raise invalid_argument([FieldViolation(field, (
        f"{what} need up to {need * block_bytes / 2**20:.1f} MiB of KV cache, more than the server's whole budget "
        f"holds for sequences ({usable_blocks * block_bytes / 2**20:.1f} MiB, --kv-cache-mb)"))])


def _stops(strings: Sequence[str], special_tokens: Mapping[str, int], violations: list[FieldViolation]
           ) -> tuple[tuple[str, ...], frozenset[int]]:
    """Stop strings to match in the completion's text (decoded without special tokens), and
    the ids of those that are a special token's text ("<|im_end|>"), which end a sample as
    that token does: in that text they never appear. A string holding a special token among
    other text could never match, so it is refused."""
    texts, tokens = [], set()
    if len(strings) > MAX_STOP_STRINGS:
        violations.append(FieldViolation("sampling_params.stop_strs.strings",
                                         f"has {len(strings)} stop strings, at most {MAX_STOP_STRINGS} are allowed"))
        return (), frozenset()
    for i, stop in enumerate(strings):
        held = next((special for special in special_tokens if special in stop), None)
        if not stop:
            violations.append(FieldViolation(f"sampling_params.stop_strs.strings[{i}]", "is empty"))
        elif len(stop) > MAX_STOP_STRING_CHARS:
            violations.append(FieldViolation(f"sampling_params.stop_strs.strings[{i}]",
                                             f"has {len(stop)} characters, at most {MAX_STOP_STRING_CHARS} "
                                             "are allowed"))
        elif stop in special_tokens:
            tokens.add(special_tokens[stop])
        elif held is not None:
            violations.append(FieldViolation(
                f"sampling_params.stop_strs.strings[{i}]",
                f"holds the special token {held!r} among other text, which never matches: stop strings are "
                f"matched in the text without special tokens; send {held!r} as a stop string of its own"))
        else:
            texts.append(stop)
    return tuple(texts), frozenset(tokens)
