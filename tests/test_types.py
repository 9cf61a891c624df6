"""SDK types and the wire codec (pure data, no server)."""
from __future__ import annotations

import concurrent.futures
import threading

import numpy as np
import pytest
import torch

import gradwire
from gradwire.v1 import codec
from gradwire.v1 import tensor_pb2


def test_model_input_methods():
    mi = gradwire.ModelInput.from_ints([1, 2, 3])
    grown = mi.append_int(4).append(gradwire.EncodedTextChunk([5, 6]))
    assert mi.to_ints() == [1, 2, 3] and mi.length == 3  # append* return new objects
    assert grown.to_ints() == [1, 2, 3, 4, 5, 6] and grown.length == 6
    assert gradwire.ModelInput.empty().length == 0
    assert gradwire.ModelInput.from_ints(torch.tensor([7, 8])).to_ints() == [7, 8]


def test_datum_converts_torch_numpy_and_lists_by_key():
    datum = gradwire.Datum(model_input=gradwire.ModelInput.from_ints([1, 2]),
                           loss_fn_inputs={"target_tokens": torch.tensor([3, 4], dtype=torch.int32),
                                           "weights": np.array([1, 0]),
                                           "advantages": [0.5, -0.5],
                                           "extra": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)})
    inputs = datum.loss_fn_inputs
    assert inputs["target_tokens"].dtype == "int64" and inputs["target_tokens"].tolist() == [3, 4]
    assert inputs["weights"].dtype == "float32" and inputs["weights"].to_numpy().dtype == np.float32
    assert inputs["advantages"].to_torch().dtype == torch.float32
    assert inputs["extra"].dtype == "float32" and inputs["extra"].tolist() == [1.0, 2.0]


def test_tensor_data_round_trips():
    array = np.arange(12, dtype=np.int64).reshape(3, 4)
    data = gradwire.TensorData.from_numpy(array)
    assert data.shape == (3, 4) and data.tolist() == array.tolist()
    assert torch.equal(data.to_torch(), torch.from_numpy(array))
    assert gradwire.TensorData.from_torch(torch.ones(2, 2)).dtype == "float32"
    with pytest.raises(ValueError):
        gradwire.TensorData([1, 2, 3], "int64", (2, 2))


def test_token_ids_a_cast_would_change_are_refused():
    """Ids that are not integers, or do not fit the wire's int32, raise naming the id instead of
    being truncated or wrapped (2**32 + 8 would arrive as 8 and train token 8)."""
    for tokens in ([5, 6.7], ["5"], [5, None]):
        with pytest.raises(TypeError, match="is not an integer"):
            gradwire.ModelInput.from_ints(tokens)
    for tokens in ([5, 2**32 + 8], [-(2**31) - 1], np.array([5, 2**31], dtype=np.int64)):
        with pytest.raises(ValueError, match=f"token id {tokens[-1]} .* does not fit the wire's int32"):
            codec.tokens_to_chunk(np.asarray(tokens))
    with pytest.raises(TypeError, match="token ids must be integers, not float64"):
        codec.tokens_to_chunk(np.array([5.0, 6.0]))
    assert codec.tokens_from_text_chunk(codec.tokens_to_chunk(np.array([0, 2**31 - 1])).encoded_text).tolist() \
        == [0, 2**31 - 1]


def test_int64_loss_inputs_refuse_what_a_cast_would_change():
    """target_tokens (int64 by key) keep whole numbers given as floats and refuse fractions, NaN
    and values past int64, naming the key."""
    def datum(targets):
        return gradwire.Datum(model_input=gradwire.ModelInput.from_ints([1, 2]), loss_fn_inputs={"target_tokens": targets})
    assert datum(np.array([3.0, 4.0])).loss_fn_inputs["target_tokens"].tolist() == [3, 4]
    assert datum(np.array([3, 2**63 - 1], dtype=np.uint64)).loss_fn_inputs["target_tokens"].tolist() == [3, 2**63 - 1]
    for targets in ([3, 8.9], [3, float("nan")], np.array([3, 2**63], dtype=np.uint64), [3.0, 2.0**63]):
        with pytest.raises(ValueError, match=r"loss_fn_inputs\['target_tokens'\]: int64 values must be"):
            datum(targets)


def test_loss_inputs_that_are_no_numbers_are_refused_naming_the_key():
    """A dict or text where a loss input's numbers go: TypeError or ValueError naming the key."""
    for key, value, error in (("weights", {"a": 1}, TypeError), ("weights", ["x", "y"], ValueError),
                              ("target_tokens", {"a": 1}, ValueError), ("advantages", [object()], TypeError)):
        with pytest.raises(error, match=rf"loss_fn_inputs\['{key}'\]: "):
            gradwire.Datum(model_input=gradwire.ModelInput.from_ints([1, 2]), loss_fn_inputs={key: value})


def test_a_future_is_fetched_in_the_background_and_waiters_keep_their_own_timeouts():
    """The value is fetched without anyone asking (done() turns True, callbacks run, the
    future is a concurrent.futures.Future); while one thread waits, another's
    result(timeout) gives up within its own timeout with an APITimeoutError, which is a
    TimeoutError; cancel() cannot take a request back."""
    release = threading.Event()
    threading.Timer(10, release.set).start()  # (a waiter blocked behind the first would return then)
    future = gradwire.APIFuture(lambda: release.wait() and "value")
    called = threading.Event()
    future.add_done_callback(lambda done: called.set())
    first = threading.Thread(target=future.result)
    first.start()
    with pytest.raises(gradwire.APITimeoutError, match="no result within 0.2 s"):
        future.result(timeout=0.2)
    assert not future.done() and not future.cancel()
    release.set()
    done, _ = concurrent.futures.wait([future], timeout=30)
    assert done == {future} and called.wait(30)
    first.join(30)
    assert future.result(timeout=0) == "value"
    failing = gradwire.APIFuture(lambda: 1 / 0)
    assert isinstance(concurrent.futures.wait([failing], timeout=30).done.pop().exception(), ZeroDivisionError)


def test_codec_dense_and_readable_forms_agree():
    array = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    np.testing.assert_array_equal(codec.tensor_from_proto(codec.tensor_to_proto(array)), array)
    readable = tensor_pb2.Tensor(float_values=tensor_pb2.FloatValues(values=array.reshape(-1)), shape=[5, 3])
    np.testing.assert_array_equal(codec.tensor_from_proto(readable), array)
    ints = tensor_pb2.Tensor(int64_values=tensor_pb2.Int64Values(values=[1, 2, 3]))
    assert codec.tensor_from_proto(ints).tolist() == [1, 2, 3]


def test_codec_bfloat16_and_sparse():
    values = np.array([1.5, -2.0, 0.25], dtype=np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    decoded = codec.tensor_from_proto(tensor_pb2.Tensor(dense=bf16, dtype=tensor_pb2.BFLOAT16, shape=[3]))
    np.testing.assert_array_equal(decoded, values)
    csr = tensor_pb2.SparseCsr(values=np.array([7, 8], dtype="<i8").tobytes(),
                               crow_indices=np.array([0, 1, 1, 2], dtype="<i8").tobytes(),
                               col_indices=np.array([2, 0], dtype="<i8").tobytes())
    dense = codec.tensor_from_proto(tensor_pb2.Tensor(sparse_csr=csr, dtype=tensor_pb2.INT64, shape=[3, 3]))
    assert dense.tolist() == [[0, 0, 7], [0, 0, 0], [8, 0, 0]]


def test_batched_tensor_round_trip():
    arrays = [np.random.default_rng(i).normal(size=(n, 2)).astype(np.float32) for i, n in enumerate((3, 1, 4))]
    restored = codec.batched_from_proto(codec.batched_to_proto(arrays))
    assert len(restored) == 3
    for a, b in zip(arrays, restored):
        np.testing.assert_array_equal(a, b)


def test_model_copy_replaces_fields_as_pydantic_does_for_tinker_code():
    """datum.model_copy(update=...) (code written for Tinker's pydantic types calls it): the
    new fields are converted as the constructor converts them, the original is untouched, and
    deep=True copies the tensors too."""
    datum = gradwire.Datum(model_input=gradwire.ModelInput.from_ints([1, 2]), loss_fn_inputs={"target_tokens": [2, 3]})
    weighted = datum.model_copy(update={"loss_fn_inputs": {**datum.loss_fn_inputs, "weights": [1, 0]}})
    assert weighted.loss_fn_inputs["weights"].data.dtype == np.float32
    assert list(datum.loss_fn_inputs) == ["target_tokens"]
    deep = datum.model_copy(deep=True)
    deep.loss_fn_inputs["target_tokens"].data[0] = 7
    assert datum.loss_fn_inputs["target_tokens"].data[0] == 2
    assert gradwire.SamplingParams(max_tokens=5).model_copy(update={"seed": 3}) == \
        gradwire.SamplingParams(max_tokens=5, seed=3)


def test_append_int_takes_only_ints():
    """append_int(1.7) appended token 1 and append_int("5") token 5; now they are TypeErrors,
    and numpy integers still go in."""
    model_input = gradwire.ModelInput.from_ints([1])
    assert model_input.append_int(np.int64(2)).append_int(3).to_ints() == [1, 2, 3]
    for bad in (1.7, "5"):
        with pytest.raises(TypeError):
            model_input.append_int(bad)
