"""SDK types from server messages (_convert; pure data, no server): each proto field
reaches the SDK type."""
from __future__ import annotations

import dataclasses

import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from gradwire import _convert, types
from gradwire.v1 import training_service_pb2 as pb

_NUMBER_TYPES = (FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT32,
                 FieldDescriptor.CPPTYPE_UINT64, FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT)


def distinct_number_per_field(message_type: type[Message]) -> dict[str, float]:
    """A value for each field of a message of numbers, each its own and none the default
    (a field left at 0 would read the same carried or dropped)."""
    values: dict[str, float] = {}
    for number, field in enumerate(message_type.DESCRIPTOR.fields, start=1):
        # The SDK holds these messages as dicts of numbers: another kind of field needs its own conversion.
        assert field.cpp_type in _NUMBER_TYPES, f"{field.full_name} is not a number"
        values[field.name] = number + 0.5 if field.cpp_type in (FieldDescriptor.CPPTYPE_DOUBLE,
                                                                 FieldDescriptor.CPPTYPE_FLOAT) else number
    return values


@pytest.mark.parametrize("name", ["limits", "kv_cache"])
def test_capabilities_carry_every_field_of_limits_and_kv_cache(name):
    message_type = type(getattr(pb.GetServerCapabilitiesResponse(), name))
    values = distinct_number_per_field(message_type)
    response = pb.GetServerCapabilitiesResponse(**{name: message_type(**values)})
    assert getattr(_convert.server_capabilities(response), name) == values


@pytest.mark.parametrize("settings", [dict(compiled_layers=True), dict(activation_checkpointing=True),
                                      dict(attention="eager"), None])
def test_capabilities_carry_the_training_settings(settings):
    """Every field of TrainingSettings, each set alone; none from a server too old to send it."""
    response = pb.GetServerCapabilitiesResponse(
        training=None if settings is None else pb.TrainingSettings(**settings))
    expected = {} if settings is None else {f.name: settings.get(f.name, f.default_value)
                                            for f in pb.TrainingSettings.DESCRIPTOR.fields}
    assert _convert.server_capabilities(response).training == expected


def test_run_info_carries_every_field_of_get_info_response():
    assert {f.name for f in pb.GetInfoResponse.DESCRIPTOR.fields} == \
        {f.name for f in dataclasses.fields(types.GetInfoResponse)}
    response = pb.GetInfoResponse(model_id="run-1", model_name="tiny-random", is_lora=True, lora_rank=4,
                                  lora_config=pb.LoraConfig(rank=4, seed=7, train_mlp=True),
                                  model_data={"arch": "LlamaForCausalLM", "tokenizer": "tiny-random"}, step=3)
    assert _convert.run_info(response) == types.GetInfoResponse(
        model_id="run-1", model_name="tiny-random", is_lora=True, lora_rank=4,
        lora_config=types.LoraConfig(rank=4, seed=7, train_unembed=False, train_mlp=True, train_attn=False),
        model_data=types.ModelData(arch="LlamaForCausalLM", model_name="tiny-random", tokenizer_id="tiny-random"),
        step=3)
