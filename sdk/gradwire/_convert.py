"""SDK types <-> gradwire.v1 messages."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from gradwire import _codec, types
from gradwire.v1 import datum_pb2
from gradwire.v1 import training_service_pb2 as pb


def datum_to_proto(datum: types.Datum, keys: Iterable[str] | None = None) -> datum_pb2.Datum:
    """Encodes a Datum; `keys` limits which loss_fn_inputs travel."""
    chunks = [_codec.tokens_to_chunk(np.asarray(chunk.tokens)) for chunk in datum.model_input.chunks]
    inputs = datum.loss_fn_inputs if keys is None else {
        key: datum.loss_fn_inputs[key] for key in keys if key in datum.loss_fn_inputs}
    return datum_pb2.Datum(model_input=chunks,
                           loss_fn_inputs={key: _codec.tensor_to_proto(value.data)
                                           for key, value in inputs.items()})


def forward_backward_request(model_id: str, seq_id: int, data: Sequence[types.Datum], loss_fn: str,
                             loss_fn_config: dict[str, float] | None,
                             keys: Iterable[str] | None = None) -> pb.ForwardBackwardRequest:
    keys = None if keys is None else tuple(keys)
    return pb.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn=loss_fn,
                                     loss_fn_config=loss_fn_config or {},
                                     data=[datum_to_proto(d, keys) for d in data])


def forward_backward_output(output: pb.ForwardBackwardOutput) -> types.ForwardBackwardOutput:
    per_datum: list[dict[str, types.TensorData]] = []
    for record in output.loss_fn_outputs:
        fields = {name: _codec.batched_from_proto(batched) for name, batched in record.fields.items()}
        for i in range(record.num_datums):
            per_datum.append({name: types.TensorData.from_numpy(arrays[i])
                              for name, arrays in fields.items()})
    return types.ForwardBackwardOutput(output.loss_fn_output_type, per_datum, dict(output.metrics))


def adam_params(params: types.AdamParams) -> pb.AdamParams:
    return pb.AdamParams(learning_rate=params.learning_rate, beta1=params.beta1, beta2=params.beta2,
                         eps=params.eps, weight_decay=params.weight_decay,
                         grad_clip_norm=params.grad_clip_norm)


def lora_config(response: pb.LoraConfig) -> types.LoraConfig:
    return types.LoraConfig(rank=response.rank,
                            seed=response.seed if response.HasField("seed") else None,
                            train_unembed=response.train_unembed, train_mlp=response.train_mlp,
                            train_attn=response.train_attn)
