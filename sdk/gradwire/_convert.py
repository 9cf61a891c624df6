"""SDK types <-> gradwire.v1 messages."""
from __future__ import annotations

import datetime
import numbers
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from google.protobuf.message import Message

from gradwire import types
from gradwire.errors import UnsupportedFeatureError
from gradwire.v1 import codec, datum_pb2
from gradwire.v1 import resource_service_pb2 as rpb
from gradwire.v1 import sampling_service_pb2 as sampling_pb
from gradwire.v1 import training_service_pb2 as pb


def model_input_chunks(model_input: types.ModelInput) -> list[datum_pb2.Chunk]:
    if not isinstance(model_input, types.ModelInput):
        raise TypeError(f"{_cut(model_input)} is not a ModelInput (ModelInput.from_ints(tokens) makes one)")
    return [_chunk(chunk) for chunk in model_input.chunks]


def prompt_chunks(prompt: types.ModelInput) -> list[datum_pb2.Chunk]:
    """A sampling prompt's chunks; the TypeError / ValueError names `prompt`."""
    try:
        return model_input_chunks(prompt)
    except (TypeError, ValueError) as error:
        raise _naming(error, "prompt") from None


def _chunk(chunk: types.ModelInputChunk) -> datum_pb2.Chunk:
    if isinstance(chunk, types.ImageChunk):
        return datum_pb2.Chunk(image=datum_pb2.ImageChunk(data=chunk.data, format=chunk.format,
                                                          expected_tokens=chunk.expected_tokens))
    if isinstance(chunk, types.ImageAssetPointerChunk):
        raise UnsupportedFeatureError("ImageAssetPointerChunk",
                                      "images stored with the hosted service; send an ImageChunk")
    return codec.tokens_to_chunk(np.asarray(chunk.tokens))


def datum_to_proto(datum: types.Datum, keys: Iterable[str] | None = None) -> datum_pb2.Datum:
    """Encodes a Datum; `keys` limits which loss_fn_inputs travel."""
    try:
        chunks = model_input_chunks(datum.model_input)
    except (TypeError, ValueError) as error:
        raise _naming(error, "model_input") from None
    inputs = datum.loss_fn_inputs if keys is None else {
        key: datum.loss_fn_inputs[key] for key in keys if key in datum.loss_fn_inputs}
    return datum_pb2.Datum(model_input=chunks,
                           loss_fn_inputs={key: codec.tensor_to_proto(value.data)
                                           for key, value in inputs.items()})


# The largest datum one message carries: the server's (and gRPC's default) 4 MiB limit, less
# room for the rest of the request.
MAX_DATUM_BYTES = 4 * 1024 * 1024 - 64 * 1024


def datum_pieces(data: Iterable[types.Datum], keys: Iterable[str] | None,
                 budget_bytes: int) -> Iterator[list[datum_pb2.Datum]]:
    """Encodes datums lazily into consecutive lists of at most budget_bytes each
    (a datum larger than the budget travels alone; one larger than a message is
    a ValueError naming it, raised when its piece is encoded)."""
    keys = None if keys is None else tuple(keys)
    piece: list[datum_pb2.Datum] = []
    size = 0
    for index, datum in enumerate(data):
        try:
            if not isinstance(datum, types.Datum):
                datum = types.Datum(**datum)
            message = datum_to_proto(datum, keys)
        except (TypeError, ValueError) as error:
            raise _naming(error, f"data[{index}]") from None
        message_size = message.ByteSize() + 8  # + field tag and length prefix
        if message_size > MAX_DATUM_BYTES:
            raise ValueError(f"data[{index}] is {message_size / 2**20:.2f} MiB encoded, more than one gRPC "
                             f"message carries ({MAX_DATUM_BYTES / 2**20:.2f} MiB): split it into shorter datums")
        if piece and size + message_size > budget_bytes:
            yield piece
            piece, size = [], 0
        piece.append(message)
        size += message_size
    yield piece


def loss_fn_config(config: dict[str, float] | None) -> dict[str, float]:
    """The config as the request's map of names to float64 numbers; TypeError/ValueError naming
    the entry that is not one."""
    out = {}
    for key, value in (config or {}).items():
        if not isinstance(key, str):
            raise TypeError(f"loss_fn_config: key {key!r} is not a str")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"loss_fn_config[{key!r}]: {value!r} is not a number")
        try:
            out[key] = float(value)
        except OverflowError:
            raise ValueError(f"loss_fn_config[{key!r}] is too large for a float64") from None
    return out


def message(message_type: type[Message], **fields: Any) -> Message:
    """message_type(**fields); a field protobuf refuses is named in the TypeError / ValueError."""
    try:
        return message_type(**fields)
    except (TypeError, ValueError):
        for name, value in fields.items():
            try:
                message_type(**{name: value})
            except (TypeError, ValueError) as refused:
                raise _naming(refused, f"{name}={value!r}") from None
        raise


def _cut(value: Any) -> str:
    """repr(value), cut to a readable length for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _naming(error: TypeError | ValueError, where: str) -> TypeError | ValueError:
    """The error again, its message prefixed with where in the request it arose."""
    return (TypeError if isinstance(error, TypeError) else ValueError)(f"{where}: {error}")


def forward_backward_output(output: pb.ForwardBackwardOutput,
                            streamed: Iterable[pb.ForwardBackwardOutput] = ()) -> types.ForwardBackwardOutput:
    """The SDK result from the operation's response plus any ReadOutputs chunks."""
    per_datum: list[dict[str, types.TensorData]] = []
    records = [r for part in (output, *streamed) for r in part.loss_fn_outputs]
    for record in records:
        fields = {name: codec.batched_from_proto(batched) for name, batched in record.fields.items()}
        for i in range(record.num_datums):
            per_datum.append({name: types.TensorData.from_numpy(arrays[i])
                              for name, arrays in fields.items()})
    return types.ForwardBackwardOutput(output.loss_fn_output_type, per_datum, dict(output.metrics))


def adam_params(params: types.AdamParams) -> pb.AdamParams:
    """AdamParams as a message; a TypeError names a field that is not a number (None included:
    a default is never put in its place)."""
    values = {}
    for name in ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm"):
        value = getattr(params, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"optim_params.{name}: {value!r} is not a number")
        values[name] = float(value)
    return pb.AdamParams(**values)


def new_lora_config(rank: int, seed: int | None, train_mlp: bool, train_attn: bool, train_unembed: bool
                    ) -> pb.LoraConfig:
    """A new run's LoRA settings; TypeError / ValueError naming the one refused (rank 0 would
    read as unset on the wire: the server's default rank)."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"rank: {rank!r} is not an int")
    if rank < 1:
        raise ValueError(f"rank: must be >= 1, got {rank}")
    for name, value in (("train_mlp", train_mlp), ("train_attn", train_attn), ("train_unembed", train_unembed)):
        if not isinstance(value, bool):
            raise TypeError(f"{name}: {value!r} is not a bool")
    return message(pb.LoraConfig, rank=rank, seed=seed, train_mlp=train_mlp, train_attn=train_attn,
                   train_unembed=train_unembed)


def lora_config(response: pb.LoraConfig) -> types.LoraConfig:
    return types.LoraConfig(rank=response.rank,
                            seed=response.seed if response.HasField("seed") else None,
                            train_unembed=response.train_unembed, train_mlp=response.train_mlp,
                            train_attn=response.train_attn)


def server_capabilities(response: pb.GetServerCapabilitiesResponse) -> types.GetServerCapabilitiesResponse:
    return types.GetServerCapabilitiesResponse(
        supported_models=[types.SupportedModel(m.model_name, m.max_context_length, m.vocab_size)
                          for m in response.supported_models],
        loss_fns=list(response.loss_fns), device=response.device,
        limits=_fields_by_name(response.limits), dtype=response.dtype,
        kv_cache=_fields_by_name(response.kv_cache),
        training=_fields_by_name(response.training) if response.HasField("training") else {},
        sampler_logprobs=response.sampler_logprobs)


def _fields_by_name(message: Message) -> dict[str, Any]:
    """Every field of a message of scalars, by name: read from its descriptor, so a field
    added to the proto reaches the SDK's dict without a change here."""
    return {f.name: getattr(message, f.name) for f in message.DESCRIPTOR.fields}


def run_info(response: pb.GetInfoResponse) -> types.GetInfoResponse:
    return types.GetInfoResponse(model_id=response.model_id, model_name=response.model_name,
                                 is_lora=response.is_lora, lora_rank=response.lora_rank,
                                 lora_config=lora_config(response.lora_config),
                                 model_data=types.ModelData(arch=response.model_data.get("arch", ""),
                                                            model_name=response.model_name,
                                                            tokenizer_id=response.model_data.get("tokenizer", "")),
                                 step=response.step)


def checkpoint(message: rpb.Checkpoint) -> types.Checkpoint:
    return types.Checkpoint(
        checkpoint_id=message.checkpoint_id, checkpoint_type=message.checkpoint_type,
        time=message.time.ToDatetime(datetime.timezone.utc), path=message.path,
        size_bytes=message.size_bytes,
        expires_at=message.expires_at.ToDatetime(datetime.timezone.utc)
        if message.HasField("expires_at") else None,
        training_run_id=message.training_run_id)


def training_run(message: rpb.TrainingRun) -> types.TrainingRun:
    return types.TrainingRun(
        training_run_id=message.training_run_id, base_model=message.base_model,
        is_lora=message.is_lora, lora_rank=message.lora_rank,
        lora_config=lora_config(message.lora_config), user_metadata=dict(message.user_metadata),
        created_time=message.create_time.ToDatetime(datetime.timezone.utc),
        last_request_time=message.last_request_time.ToDatetime(datetime.timezone.utc),
        step=message.step, loaded=message.loaded,
        source_checkpoint=message.source_checkpoint or None,
        last_checkpoint=checkpoint(message.last_checkpoint)
        if message.HasField("last_checkpoint") else None,
        last_sampler_checkpoint=checkpoint(message.last_sampler_checkpoint)
        if message.HasField("last_sampler_checkpoint") else None)


_STOP_REASONS = {sampling_pb.STOP_REASON_STOP: "stop", sampling_pb.STOP_REASON_LENGTH: "length"}


def sampling_params(params: types.SamplingParams) -> sampling_pb.SamplingParams:
    """SamplingParams as a message; `stop` becomes stop_strs (strings) or stop_tokens (ids).
    A field that does not fit is a TypeError / ValueError naming it."""
    if not isinstance(params, types.SamplingParams):
        raise TypeError(f"sampling_params: {_cut(params)} is not a SamplingParams")
    try:
        built = message(sampling_pb.SamplingParams, max_tokens=params.max_tokens, seed=params.seed,
                        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
    except (TypeError, ValueError) as error:
        raise _naming(error, "sampling_params") from None
    stop = [params.stop] if isinstance(params.stop, str) else params.stop
    if isinstance(stop, np.ndarray) and stop.ndim == 1:
        stop = stop.tolist()
    if stop is None:
        return built
    if not isinstance(stop, (list, tuple)):
        raise TypeError(f"sampling_params.stop: {_cut(stop)} is not a str, a list of str or a list of token ids")
    if not stop:
        return built
    if all(isinstance(s, str) for s in stop):
        built.stop_strs.strings.extend(stop)
    elif all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in stop):
        try:
            built.stop_tokens.tokens.extend(int(s) for s in stop)
        except ValueError as error:
            raise _naming(error, "sampling_params.stop") from None
    else:
        raise TypeError(f"sampling_params.stop: {_cut(stop)} is neither all strings nor all token ids (ints)")
    return built


def sample_response(response: sampling_pb.SampleResponse) -> types.SampleResponse:
    sequences = [types.SampledSequence(stop_reason=_STOP_REASONS[s.stop_reason],
                                       tokens=codec.unpack_int32(s.tokens),
                                       logprobs=codec.unpack_float32(s.logprobs) if s.HasField("logprobs") else None,
                                       sequence_id=s.sequence_id or None,
                                       topk_logprobs=_topk_rows(s.topk_logprobs) if s.HasField("topk_logprobs") else None)
                 for s in response.sequences]
    prompt = prompt_logprobs(response.prompt_logprobs) if response.HasField("prompt_logprobs") else None
    topk = None
    if response.HasField("topk_prompt_logprobs"):
        top = response.topk_prompt_logprobs
        shape = (top.prompt_length, top.k)
        ids = np.frombuffer(top.token_ids, dtype="<i4").reshape(shape).tolist()
        values = np.frombuffer(top.logprobs, dtype="<f4").reshape(shape).tolist()
        # Row 0 and rows left unscored (prompt_logprobs_last_n) hold the mask value.
        topk = [None if r == 0 or v[0] <= types.TOPK_MASK_LOGPROB else list(zip(i, v))
                for r, (i, v) in enumerate(zip(ids, values))]
    return types.SampleResponse(sequences, prompt, topk)


def _topk_rows(top: sampling_pb.TopkSampleLogprobs) -> list[list[tuple[int, float]]]:
    """Per generated token, its k most likely (token, logprob) pairs."""
    ids = np.frombuffer(top.token_ids, dtype="<i4").reshape(-1, top.k).tolist()
    values = np.frombuffer(top.logprobs, dtype="<f4").reshape(-1, top.k).tolist()
    return [list(zip(i, v)) for i, v in zip(ids, values)]


def prompt_logprobs(packed: bytes) -> list[float | None]:
    """Packed float32 prompt logprobs; NaN (no prediction: the first position, or one
    before the last n asked for) becomes None."""
    return [None if np.isnan(v) else v for v in codec.unpack_float32(packed)]


def sampled_tokens(piece: sampling_pb.SampledTokens) -> types.SampledTokens:
    return types.SampledTokens(piece.sequence_index, codec.unpack_int32(piece.tokens), codec.unpack_float32(piece.logprobs),
                               _STOP_REASONS[piece.stop_reason] if piece.done else None)


def gradwire_path(path: str) -> str:
    """tinker://... (as code written for Tinker keeps paths) as gradwire://..."""
    if not isinstance(path, str):
        raise TypeError(f"path: {_cut(path)} is not a str (checkpoint paths read gradwire://<run_id>/weights/<name>)")
    return "gradwire://" + path.removeprefix("tinker://") if path.startswith("tinker://") else path
