"""Bad input gets INVALID_ARGUMENT / NOT_FOUND naming the datum index and field,
and changes nothing: weights and accumulated gradients stay exactly as they were."""
from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status

import gradwire
from gradwire.v1 import codec
from gradwire.v1 import tensor_pb2
from gradwire.v1 import training_service_pb2 as pb
from gradwire.v1 import training_service_pb2_grpc as pb_grpc
from reference import assert_state_equal, random_data, raw_request, run_state, sender_held, trained_run


def datum(tokens, **inputs) -> gradwire.Datum:
    return gradwire.Datum(model_input=gradwire.ModelInput.from_ints(tokens), loss_fn_inputs=inputs)


GOOD = [1, 2, 3, 4]

# (case, data, loss_fn, the field named in the error, words in its description)
SDK_CASES = [
    ("token outside vocab", [datum(GOOD, target_tokens=GOOD), datum([5, 320, 7], target_tokens=[1, 2, 3])],
     "cross_entropy", "data[1].model_input", "outside the vocabulary"),
    ("target outside vocab", [datum(GOOD, target_tokens=[1, 2, -1, 4])],
     "cross_entropy", 'data[0].loss_fn_inputs["target_tokens"]', "outside the vocabulary"),
    ("target length", [datum(GOOD, target_tokens=GOOD), datum(GOOD, target_tokens=[1, 2, 3])],
     "cross_entropy", 'data[1].loss_fn_inputs["target_tokens"]', "does not match the model input"),
    ("weights shape", [datum(GOOD, target_tokens=GOOD, weights=[1.0, 1.0, 1.0, 1.0, 1.0])],
     "cross_entropy", 'data[0].loss_fn_inputs["weights"]', "does not match the model input"),
    ("unknown loss", [datum(GOOD, target_tokens=GOOD)], "no_such_loss", "loss_fn", "unknown loss"),
    ("missing input", [datum(GOOD, target_tokens=GOOD), datum(GOOD, weights=[1.0] * 4)],
     "cross_entropy", 'data[1].loss_fn_inputs["target_tokens"]', "required"),
    ("nan weight", [datum(GOOD, target_tokens=GOOD, weights=[1.0, float("nan"), 1.0, 1.0])],
     "cross_entropy", 'data[0].loss_fn_inputs["weights"]', "NaN"),
    ("inf weight", [datum(GOOD, target_tokens=GOOD), datum(GOOD, target_tokens=GOOD, weights=[np.inf] * 4)],
     "cross_entropy", 'data[1].loss_fn_inputs["weights"]', "infinity"),
    ("unknown input", [datum(GOOD, target_tokens=GOOD, weight=[1.0] * 4)],
     "cross_entropy", 'data[0].loss_fn_inputs["weight"]', "not an input of this loss"),
    ("empty data", [], "cross_entropy", "data", "empty"),
    ("empty model input", [datum([], target_tokens=np.zeros(0, np.int64))],
     "cross_entropy", "data[0].model_input", "empty"),
]


@pytest.mark.parametrize("case, data, loss_fn, field, words", SDK_CASES, ids=[c[0] for c in SDK_CASES])
def test_bad_batch_is_rejected_and_changes_nothing(server, service, case, data, loss_fn, field, words):
    tc = trained_run(service)
    tc.forward_backward(random_data(50), "cross_entropy").result()  # accumulated gradients to protect
    before = run_state(server, tc.model_id)
    with sender_held(tc):
        rejected = tc.forward_backward(data, loss_fn)
        queued_step = tc.optim_step(gradwire.AdamParams(learning_rate=1e-2))
    with pytest.raises(gradwire.BadRequestError) as raised:
        rejected.result()
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in str(raised.value) and words in str(raised.value)
    assert any(f == field and words in d for f, d in raised.value.field_violations)
    with pytest.raises(gradwire.AbortedError):
        queued_step.result()  # never a step without the gradient the user meant to include
    assert_state_equal(before, run_state(server, tc.model_id))
    tc.forward(random_data(51), "cross_entropy").result()  # the run stays usable


def request_with(model_id: str, tensors: dict[str, tensor_pb2.Tensor], tokens=GOOD) -> pb.ForwardBackwardRequest:
    request = raw_request(model_id, 0, [datum(tokens)])
    for key, tensor in tensors.items():
        request.data[0].loss_fn_inputs[key].CopyFrom(tensor)
    return request


WIRE_CASES = [
    ("int32 targets", {"target_tokens": codec.tensor_to_proto(np.array(GOOD, dtype=np.int32))},
     'data[0].loss_fn_inputs["target_tokens"]', "expected int64"),
    ("int64 weights", {"target_tokens": codec.tensor_to_proto(np.array(GOOD)),
                       "weights": codec.tensor_to_proto(np.ones(4, dtype=np.int64))},
     'data[0].loss_fn_inputs["weights"]', "expected float32"),
    ("truncated bytes", {"target_tokens": tensor_pb2.Tensor(dense=b"\x01" * 12, dtype=tensor_pb2.INT64,
                                                            shape=[4])},
     'data[0].loss_fn_inputs["target_tokens"]', "whole number"),
    ("shape mismatch", {"target_tokens": tensor_pb2.Tensor(dense=np.array(GOOD).tobytes(),
                                                           dtype=tensor_pb2.INT64, shape=[2, 3])},
     'data[0].loss_fn_inputs["target_tokens"]', "do not fill shape"),
]


@pytest.mark.parametrize("case, tensors, field, words", WIRE_CASES, ids=[c[0] for c in WIRE_CASES])
def test_malformed_wire_tensors_are_rejected(server, service, case, tensors, field, words):
    """What another language's client could send: wrong dtypes and inconsistent bytes.
    The rich status carries ErrorInfo and a BadRequest naming the field."""
    tc = trained_run(service)
    tc.forward_backward(random_data(52), "cross_entropy").result()
    before = run_state(server, tc.model_id)
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            pb_grpc.TrainingServiceStub(channel).ForwardBackward(request_with(tc.model_id, tensors))
    status = rpc_status.from_call(raised.value)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    assert status.details[0].Unpack(info) and info.reason == "INVALID_INPUT"
    assert status.details[1].Unpack(bad)
    assert [(v.field, words in v.description) for v in bad.field_violations] == [(field, True)]
    assert_state_equal(before, run_state(server, tc.model_id))


def test_unknown_run_is_not_found(service):
    ghost = gradwire.TrainingClient(service, "run-does-not-exist", "tiny-random")
    with pytest.raises(gradwire.NotFoundError, match="run-does-not-exist"):
        ghost.forward_backward(random_data(53), "cross_entropy").result()
    with pytest.raises(gradwire.NotFoundError):
        ghost.get_info()


def test_bad_adam_params_and_lora_config(server, service):
    tc = trained_run(service)
    tc.forward_backward(random_data(54), "cross_entropy").result()
    before = run_state(server, tc.model_id)
    with pytest.raises(gradwire.BadRequestError, match="adam_params.learning_rate"):
        tc.optim_step(gradwire.AdamParams(learning_rate=-1.0)).result()
    with pytest.raises(gradwire.BadRequestError, match="adam_params.beta2"):
        tc.optim_step(gradwire.AdamParams(beta2=1.0)).result()
    assert_state_equal(before, run_state(server, tc.model_id))
    with pytest.raises(gradwire.BadRequestError, match=r"lora_config.rank: must be in \[1, 256\], got 257"):
        service.create_lora_training_client("tiny-random", rank=257)
    with pytest.raises(gradwire.BadRequestError, match="selects no module"):
        service.create_lora_training_client("tiny-random", rank=4, train_mlp=False, train_attn=False,
                                            train_unembed=False)
    with pytest.raises(gradwire.BadRequestError, match="base_model"):
        service.create_lora_training_client("some-other-model", rank=4)


def _custom(loss: Callable[[list[torch.Tensor]], object]):
    return lambda data, logprobs: loss(logprobs)


PROMPT = gradwire.ModelInput.from_ints([1, 2, 3])
# (call on (training client, sampler, service), error, words): refused in the SDK, naming the field.
SDK_REFUSALS = [
    ("lr None", lambda tc, s, sc: tc.optim_step(gradwire.AdamParams(learning_rate=None)), TypeError,
     "optim_params.learning_rate: None is not a number"),
    ("beta1 str", lambda tc, s, sc: tc.optim_step(gradwire.AdamParams(beta1="0.9")), TypeError,
     "optim_params.beta1: '0.9' is not a number"),
    ("lr bool", lambda tc, s, sc: tc.optim_step(gradwire.AdamParams(learning_rate=True)), TypeError,
     "optim_params.learning_rate: True is not a number"),
    ("rank 0", lambda tc, s, sc: sc.create_lora_training_client("tiny-random", rank=0), ValueError,
     "rank: must be >= 1, got 0"),
    ("rank float", lambda tc, s, sc: sc.create_lora_training_client("tiny-random", rank=4.0), TypeError,
     "rank: 4.0 is not an int"),
    ("train_mlp None", lambda tc, s, sc: sc.create_lora_training_client("tiny-random", rank=4, train_mlp=None),
     TypeError, "train_mlp: None is not a bool"),
    ("seed -1", lambda tc, s, sc: sc.create_lora_training_client("tiny-random", rank=4, seed=-1), ValueError,
     "seed=-1: "),
    ("metadata int", lambda tc, s, sc: sc.create_lora_training_client("tiny-random", rank=4, user_metadata={"a": 1}),
     TypeError, "user_metadata="),
    ("stop mixed", lambda tc, s, sc: s.sample(PROMPT, 1, gradwire.SamplingParams(stop=["54", 54])), TypeError,
     "sampling_params.stop: ['54', 54] is neither all strings nor all token ids"),
    ("stop float", lambda tc, s, sc: s.sample(PROMPT, 1, gradwire.SamplingParams(stop=[1.5])), TypeError,
     "sampling_params.stop: [1.5] is neither"),
    ("stop bytes", lambda tc, s, sc: s.sample(PROMPT, 1, gradwire.SamplingParams(stop=b"a")), TypeError,
     "sampling_params.stop: b'a' is not a str, a list of str or a list of token ids"),
    ("seed -1 sampling", lambda tc, s, sc: s.sample(PROMPT, 1, gradwire.SamplingParams(seed=-1)), ValueError,
     "sampling_params: seed=-1: "),
    ("max_tokens float", lambda tc, s, sc: s.sample(PROMPT, 1, gradwire.SamplingParams(max_tokens=1.5)), TypeError,
     "sampling_params: max_tokens=1.5: "),
    ("num_samples float", lambda tc, s, sc: s.sample(PROMPT, 2.0, gradwire.SamplingParams()), TypeError,
     "num_samples=2.0: "),
    ("prompt list", lambda tc, s, sc: s.sample([1, 2, 3], 1, gradwire.SamplingParams()), TypeError,
     "prompt: [1, 2, 3] is not a ModelInput"),
    ("params None", lambda tc, s, sc: s.sample(PROMPT, 1, None), TypeError,
     "sampling_params: None is not a SamplingParams"),
    ("logprobs prompt str", lambda tc, s, sc: s.compute_logprobs("hi"), TypeError,
     "prompt: 'hi' is not a ModelInput"),
    ("load_state None", lambda tc, s, sc: tc.load_state(None), TypeError, "path: None is not a str"),
    ("model_input list", lambda tc, s, sc: tc.forward_backward(
        [gradwire.Datum(model_input=[1, 2, 3], loss_fn_inputs={"target_tokens": [2, 3, 4]})], "cross_entropy"),
     TypeError, "data[0]: model_input: [1, 2, 3] is not a ModelInput"),
    ("loss_fn_inputs list", lambda tc, s, sc: gradwire.Datum(model_input=PROMPT, loss_fn_inputs=[[1, 2, 3]]),
     TypeError, "loss_fn_inputs: a list is not a dict"),
    ("metrics list", lambda tc, s, sc: tc.forward_backward_custom(
        random_data(60), _custom(lambda lp: (lp[0].sum(), [1.0]))), gradwire.CustomLossError,
     "must return its metrics as a dict, got list"),
    ("metric str", lambda tc, s, sc: tc.forward_backward_custom(
        random_data(60), _custom(lambda lp: (lp[0].sum(), {"m": "x"}))), gradwire.CustomLossError,
     "metric 'm' = 'x' is not a number"),
    ("metric key int", lambda tc, s, sc: tc.forward_backward_custom(
        random_data(60), _custom(lambda lp: (lp[0].sum(), {7: 1.0}))), gradwire.CustomLossError,
     "metric name 7 is not a str"),
    ("complex loss", lambda tc, s, sc: tc.forward_backward_custom(
        random_data(60), _custom(lambda lp: (lp[0].sum() * (1 + 1j), {}))), gradwire.CustomLossError,
     "must return a real scalar tensor loss, got torch.complex64"),
]


@pytest.mark.parametrize("call, error, words", [case[1:] for case in SDK_REFUSALS],
                         ids=[case[0] for case in SDK_REFUSALS])
def test_the_sdk_refuses_a_mistyped_field_naming_it_and_nothing_changes(server, service, call, error, words):
    """Values the SDK would otherwise have replaced by a default (None, rank 0), converted
    wrongly (stop=[1.5] as token 1, b"a" as 97) or failed on with a bare error: a TypeError /
    ValueError / CustomLossError naming the field. No run is created, the run's weights and
    gradients are as before, and its next request runs at once."""
    tc = trained_run(service)
    sampler = service.create_sampling_client(base_model="tiny-random")
    rest = service.create_rest_client()
    runs = len(rest.list_training_runs(limit=10**6).result().training_runs)
    before = run_state(server, tc.model_id)

    with pytest.raises(error) as raised:
        call(tc, sampler, service).result(30)

    assert words in str(raised.value)
    assert_state_equal(before, run_state(server, tc.model_id))
    assert len(rest.list_training_runs(limit=10**6).result().training_runs) == runs
    assert tc.forward_backward(random_data(61), "cross_entropy").result(30).metrics["loss:sum"] > 0
