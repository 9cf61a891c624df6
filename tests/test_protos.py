"""The committed stubs match the protos, and the Tinker wire field numbers are kept."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from gradwire.v1 import datum_pb2, tensor_pb2
from gradwire.v1 import sampling_service_pb2 as sampling_pb
from gradwire.v1 import training_service_pb2 as pb

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "sdk" / "gradwire" / "v1"


def test_committed_stubs_are_up_to_date(tmp_path):
    """scripts/gen_protos.py regenerates exactly the committed sdk/gradwire/v1/
    files: same names, same bytes (so editing a .proto without regenerating fails)."""
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    generated = {path.name: path.read_bytes() for path in (tmp_path / "gradwire" / "v1").iterdir()}
    committed = {path.name: path.read_bytes() for path in COMMITTED.iterdir()
                 if path.is_file() and path.name != "codec.py"}  # the hand-written codec lives beside them
    assert "training_service_pb2.py" in generated
    assert sorted(generated) == sorted(committed)
    stale = [name for name in generated if generated[name] != committed[name]]
    assert not stale, f"stale stubs, run scripts/gen_protos.py: {stale}"


TINKER_FIELDS = [
    (datum_pb2.Datum, {"model_input": 1, "loss_fn_inputs": 2}),
    (datum_pb2.Chunk, {"encoded_text": 1, "image": 2}),
    (datum_pb2.EncodedTextChunk, {"tokens": 1}),
    (datum_pb2.ImageChunk, {"data": 1, "format": 2, "expected_tokens": 3}),
    (tensor_pb2.Tensor, {"dense": 1, "sparse_csr": 2, "dtype": 3, "shape": 4}),
    (tensor_pb2.SparseCsr, {"values": 1, "crow_indices": 2, "col_indices": 3}),
    (pb.ForwardBackwardRequest, {"model_id": 1, "seq_id": 2, "data": 3, "loss_fn": 4,
                                 "loss_fn_config": 5, "forward_only": 6}),
    (pb.ForwardBackwardOutput, {"loss_fn_output_type": 1, "loss_fn_outputs": 2, "metrics": 3}),
    (tensor_pb2.ArrayRecord, {"type_tag": 1, "fields": 2, "num_datums": 3}),
    (tensor_pb2.BatchedTensor, {"data": 1, "offsets": 2, "dtype": 3, "trailing_shape": 4}),
    (sampling_pb.SamplingParams, {"max_tokens": 1, "seed": 2, "temperature": 3, "top_k": 4, "top_p": 5,
                                  "stop_strs": 6, "stop_tokens": 7}),
    (sampling_pb.SampleResponse, {"sequences": 1, "prompt_logprobs": 2, "topk_prompt_logprobs": 3,
                                  "prompt_cache_hit_tokens": 4}),
    (sampling_pb.SampledSequence, {"stop_reason": 1, "tokens": 2, "logprobs": 3}),
]


@pytest.mark.parametrize("message, numbers", TINKER_FIELDS, ids=[m.DESCRIPTOR.name for m, _ in TINKER_FIELDS])
def test_tinker_field_numbers_are_kept(message, numbers):
    """Each field shared with the Tinker SDK's schema keeps its name and number,
    so Tinker-encoded bytes decode unchanged."""
    fields = message.DESCRIPTOR.fields_by_name
    assert {name: fields[name].number for name in numbers if name in fields} == numbers


def test_tinker_dtype_values_are_kept():
    """DType enum values match Tinker's."""
    values = {v.name: v.number for v in tensor_pb2.DESCRIPTOR.enum_types_by_name["DType"].values}
    assert {name: values.get(name) for name in ("FLOAT32", "INT64", "INT32", "BFLOAT16")} == \
        {"FLOAT32": 1, "INT64": 2, "INT32": 3, "BFLOAT16": 4}


def test_tinker_stop_reason_values_are_kept():
    """StopReason enum values match Tinker's."""
    assert {v.name: v.number for v in sampling_pb.StopReason.DESCRIPTOR.values} == \
        {"STOP_REASON_STOP": 0, "STOP_REASON_LENGTH": 1}
