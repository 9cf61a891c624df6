"""The issue's bad-input table, one test per row: each sends exactly that request and
asserts its status code and that nothing changed (the run's weights and accumulated
gradients are exactly as before)."""
from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
import torch
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import duration_pb2

import gradwire
from gradwire.v1 import codec, sampling_service_pb2, tensor_pb2
from gradwire.v1 import sampling_service_pb2_grpc, training_service_pb2_grpc
from gradwire.v1 import training_service_pb2 as pb
from gradwire_server import scheduler, validation
from reference import (METHODS, assert_optimizer_equal, assert_state_equal, checkpoint_files, greedy_reference,
                       optimizer_state, random_data, raw_request, reference_base_model, run_state,
                       server_gradients, succeeded, trained_run, worker_busy)

KB_100 = "x" * 100_000
FLOAT32_NORM_LIMIT = torch.finfo(torch.float32).max ** 0.5  # a larger norm's square overflows


@pytest.fixture()
def run(server, service):
    """A trained run with accumulated gradients (so 'nothing changed' covers both)."""
    tc = trained_run(service)
    tc.forward_backward(random_data(60), "cross_entropy").result()
    return tc


def status_of(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call(*args, timeout=30, **kwargs)
    return raised.value


def fb_request(run_id: str, seq_id: int = 0, **tensors: tensor_pb2.Tensor) -> pb.ForwardBackwardRequest:
    """One datum of 4 tokens whose loss_fn_inputs are `tensors`."""
    request = raw_request(run_id, seq_id, [gradwire.Datum(model_input=gradwire.ModelInput.from_ints([1, 2, 3, 4]),
                                                          loss_fn_inputs={})])
    for key, tensor in tensors.items():
        request.data[0].loss_fn_inputs[key].CopyFrom(tensor)
    return request


def sparse_target(rows: int, width: int) -> tensor_pb2.Tensor:
    """A sparse int64 target of shape [rows, width] with one entry per row (a few hundred bytes)."""
    csr = tensor_pb2.SparseCsr(values=np.arange(rows, dtype="<i8").tobytes(),
                               crow_indices=np.arange(rows + 1, dtype="<i8").tobytes(),
                               col_indices=np.zeros(rows, dtype="<i8").tobytes())
    return tensor_pb2.Tensor(sparse_csr=csr, dtype=tensor_pb2.INT64, shape=[rows, width])


@pytest.mark.parametrize("service_name, method", METHODS, ids=[f"{s}/{m.name}" for s, m in METHODS])
def test_undecodable_message_on_every_method(server, run, service_name, method):
    """The byte 0xff parses as no message: INVALID_ARGUMENT naming the message type."""
    before = run_state(server, run.model_id)
    path = f"/{service_name}/{method.name}"
    with grpc.insecure_channel(server.address) as channel:
        kinds = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
                 (True, False): channel.stream_unary, (True, True): channel.stream_stream}
        call = kinds[method.client_streaming, method.server_streaming](
            path, request_serializer=None, response_deserializer=None)
        request = iter([b"\xff"]) if method.client_streaming else b"\xff"
        with pytest.raises(grpc.RpcError) as raised:
            answer = call(request, timeout=30)
            if method.server_streaming:
                list(answer)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, raised.value.details())
    assert method.input_type.full_name in raised.value.details()
    assert_state_equal(before, run_state(server, run.model_id))


@pytest.mark.parametrize("request_fields", [
    pytest.param({"page_token": "abc"}, id="token-abc"),
    pytest.param({"page_size": -1}, id="negative-page-size"),
    pytest.param({"page_token": "-1"}, id="token-minus-1"),
    pytest.param({"page_token": "1" * 30}, id="token-30-digits"),
])
def test_list_operations_bad_page(server, stubs, request_fields):
    _, operations = stubs
    error = status_of(operations.ListOperations, operations_pb2.ListOperationsRequest(**request_fields))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_list_operations_pages_through_with_its_tokens(server, stubs, run):
    training, operations = stubs
    for seed in range(3):  # operations the SDK does not delete once read
        succeeded(operations, training.Forward(raw_request(run.model_id, 0, random_data(seed))).name)
    prefix = f"operations/{run.model_id}/"
    everything = operations.ListOperations(operations_pb2.ListOperationsRequest(name=prefix)).operations
    paged, token = [], ""
    while True:
        page = operations.ListOperations(operations_pb2.ListOperationsRequest(name=prefix, page_size=1,
                                                                              page_token=token))
        paged.extend(page.operations)
        token = page.next_page_token
        if not token:
            break
    assert [op.name for op in paged] == [op.name for op in everything] and len(paged) >= 3


def test_ppo_threshold_beyond_bounds(server, stubs, run):
    before = run_state(server, run.model_id)
    request = raw_request(run.model_id, 0, random_data(61))
    request.loss_fn = "ppo"
    request.loss_fn_config["clip_high_threshold"] = 1e308
    for datum in request.data:
        n = len(datum.loss_fn_inputs["target_tokens"].dense) // 8
        datum.loss_fn_inputs.pop("weights")
        datum.loss_fn_inputs["logprobs"].CopyFrom(codec.tensor_to_proto(np.full(n, -1.0, np.float32)))
        datum.loss_fn_inputs["advantages"].CopyFrom(codec.tensor_to_proto(np.ones(n, np.float32)))
    error = status_of(stubs[0].ForwardBackward, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "clip_high_threshold" in error.details()
    assert_state_equal(before, run_state(server, run.model_id))


@pytest.mark.parametrize("target, words", [
    pytest.param(tensor_pb2.Tensor(int64_values=tensor_pb2.Int64Values(values=[1, 2, 3, 4]),
                                   shape=[4] + [1] * 64), "not [N] or [N, K]", id="65-dimensions"),
    pytest.param(sparse_target(7, 2**40), "per datum", id="sparse-7x2^40"),
    pytest.param(sparse_target(7, 2**24), "per datum", id="sparse-7x2^24"),
    pytest.param(tensor_pb2.Tensor(dense=b"", dtype=tensor_pb2.INT64, shape=[4, 0]), "K = 0", id="shape-Nx0"),
    pytest.param(tensor_pb2.Tensor(int64_values=tensor_pb2.Int64Values(values=[1, 2, 3, 4]),
                                   dtype=tensor_pb2.FLOAT32), "int64_values cannot hold dtype FLOAT32",
                 id="int64-values-as-float32"),
])
def test_bad_target_tensor(server, stubs, run, target, words):
    """Rejected naming data[0]'s target_tokens, before anything is decoded or allocated."""
    before = run_state(server, run.model_id)
    error = status_of(stubs[0].ForwardBackward, fb_request(run.model_id, target_tokens=target))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert 'data[0].loss_fn_inputs["target_tokens"]' in error.details() and words in error.details()
    assert_state_equal(before, run_state(server, run.model_id))


def test_a_seq_id_far_past_the_runs_order_is_refused_and_holds_nothing(server, stubs, service):
    """seq_id 2^31 - 1 on a run at its first steps: INVALID_ARGUMENT naming seq_id. Held, it
    wedged the run: once its gap expired the order moved past it, where no seq_id exists. So
    is one scheduler.MAX_SEQ_AHEAD past the next, also when another field is bad too; nothing
    changes, and the run's next requests run at once, by seq_id 0 or the next one."""
    run = trained_run(service)
    before = run_state(server, run.model_id)
    training, operations = stubs
    bad_loss = raw_request(run.model_id, 2**31 - 1, random_data(63))
    bad_loss.loss_fn = "nope"
    next_seq = server.server.scheduler._orders[run.model_id].next_seq
    operations_before = server.server.store.names(f"operations/{run.model_id}/")
    for call, request in ((training.Forward, raw_request(run.model_id, 2**31 - 1, random_data(62))),
                          (training.ForwardBackward, bad_loss),
                          (training.OptimStep, pb.OptimStepRequest(model_id=run.model_id,
                                                                   seq_id=next_seq + scheduler.MAX_SEQ_AHEAD))):
        error = status_of(call, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert error.details().startswith(f"seq_id: {request.seq_id} is too far past the next seq_id of "
                                          f"{run.model_id}, {next_seq}"), error.details()
    assert_state_equal(before, run_state(server, run.model_id))
    assert server.server.scheduler._orders[run.model_id].held == {}
    assert server.server.store.names(f"operations/{run.model_id}/") == operations_before  # none, not even a rejected one
    succeeded(operations, training.ForwardBackward(raw_request(run.model_id, 0, random_data(64)), timeout=30).name)
    succeeded(operations, training.OptimStep(pb.OptimStepRequest(
        model_id=run.model_id, seq_id=next_seq + 1, adam_params=pb.AdamParams()), timeout=30).name)
    assert run.get_info().step == 2


def test_negative_seq_id(server, stubs, run):
    before = run_state(server, run.model_id)
    error = status_of(stubs[0].ForwardBackward, raw_request(run.model_id, -5, random_data(64)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "seq_id" in error.details()
    assert_state_equal(before, run_state(server, run.model_id))
    succeeded(stubs[1], stubs[0].ForwardBackward(raw_request(run.model_id, 0, random_data(65))).name)


def test_read_outputs_from_a_negative_index(server, stubs, run):
    name = stubs[0].Forward(raw_request(run.model_id, 0, random_data(66))).name
    succeeded(stubs[1], name)
    error = status_of(lambda request, timeout: list(stubs[0].ReadOutputs(request, timeout=timeout)),
                      pb.ReadOutputsRequest(name=name, start_datum_index=-2**63))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "start_datum_index" in error.details()


def test_wait_operation_timeouts(server, stubs, run):
    """10^15 s is clamped to the server's cap (here: a done operation answers at once);
    a negative timeout is INVALID_ARGUMENT."""
    training, operations = stubs
    name = training.Forward(raw_request(run.model_id, 0, random_data(67))).name
    succeeded(operations, name)
    waited = operations.WaitOperation(operations_pb2.WaitOperationRequest(
        name=name, timeout=duration_pb2.Duration(seconds=10**15)), timeout=60)
    assert waited.done
    error = status_of(operations.WaitOperation, operations_pb2.WaitOperationRequest(
        name=name, timeout=duration_pb2.Duration(seconds=-1)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "timeout" in error.details()


def test_tiny_temperature_samples_greedily(server):
    """temperature 1e-45 samples exactly what temperature 0 does: the in-process argmax."""
    with grpc.insecure_channel(server.address) as channel:
        stub = sampling_service_pb2_grpc.SamplingServiceStub(channel)
        operations = operations_pb2_grpc.OperationsStub(channel)

        def tokens(temperature: float) -> bytes:
            request = sampling_service_pb2.SampleRequest(
                base_model="tiny-random", prompt=[codec.tokens_to_chunk(np.array([5, 6, 7]))], num_samples=2,
                sampling_params=sampling_service_pb2.SamplingParams(max_tokens=8, temperature=temperature, seed=3))
            response = sampling_service_pb2.SampleResponse()
            succeeded(operations, stub.Sample(request, timeout=30).name).response.Unpack(response)
            return [sequence.tokens for sequence in response.sequences]

        greedy = np.array(greedy_reference(reference_base_model(server), [5, 6, 7], 8), "<i4").tobytes()
        assert tokens(1e-45) == tokens(0.0) == [greedy, greedy]


@pytest.mark.parametrize("adam, field", [
    pytest.param(pb.AdamParams(learning_rate=1e-3, eps=0.0), "adam_params.eps", id="eps-0"),
    pytest.param(pb.AdamParams(learning_rate=1e308), "adam_params.learning_rate", id="lr-1e308"),
    pytest.param(pb.AdamParams(learning_rate=1e-3, weight_decay=1e300), "adam_params.weight_decay", id="wd-1e300"),
])
def test_optimizer_hyperparameters_out_of_bounds(server, stubs, run, adam, field):
    before, moments, step = run_state(server, run.model_id), optimizer_state(server, run.model_id), run.get_info().step
    error = status_of(stubs[0].OptimStep, pb.OptimStepRequest(model_id=run.model_id, adam_params=adam))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and field in error.details()
    assert_state_equal(before, run_state(server, run.model_id))
    assert_optimizer_equal(moments, optimizer_state(server, run.model_id))
    assert run.get_info().step == step


def test_a_step_that_would_write_a_non_finite_weight_changes_nothing(server, service):
    """Within the bounds, learning_rate 10 and weight_decay 100 multiply every weight by
    -999 a step: within a few steps the model overflows. Whichever request meets it first is
    refused FAILED_PRECONDITION and changes nothing: a forward_backward whose gradient is not
    finite adds none of it; a step that would write an infinite weight leaves weights, AdamW's
    moments, the step count and the (finite) gradients as they were."""
    tc = trained_run(service)
    steep = gradwire.AdamParams(learning_rate=10.0, weight_decay=100.0)
    for _ in range(40):
        before_fb = run_state(server, tc.model_id)
        moments, step = optimizer_state(server, tc.model_id), tc.get_info().step
        try:
            tc.forward_backward(random_data(68), "cross_entropy").result()
        except gradwire.ConflictError as error:
            assert error.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "the gradient of this batch is not finite or too large" in str(error) and "loss:sum " in str(error)
            expected = before_fb
            break
        before_step = run_state(server, tc.model_id)
        try:
            tc.optim_step(steep).result()
        except gradwire.ConflictError as error:
            assert error.code == grpc.StatusCode.FAILED_PRECONDITION and "infinite or NaN" in str(error)
            expected = before_step
            break
        assert all(bool(weight.isfinite().all()) for weight, _ in run_state(server, tc.model_id).values())
    else:
        pytest.fail("the model never overflowed")
    after = run_state(server, tc.model_id)
    for name, (weight, grad) in expected.items():
        torch.testing.assert_close(after[name][0], weight, rtol=0, atol=0)
        torch.testing.assert_close(after[name][1], grad, rtol=0, atol=0)
    assert tc.get_info().step == step
    assert_optimizer_equal(moments, optimizer_state(server, tc.model_id))
    tc.forward(random_data(69), "cross_entropy").result()  # the run still answers


def weighted(data: list[gradwire.Datum], weight: float) -> list[gradwire.Datum]:
    """The datums with every cross-entropy weight `weight` (their gradient scales with it)."""
    return [gradwire.Datum(model_input=d.model_input, loss_fn_inputs={
        "target_tokens": d.loss_fn_inputs["target_tokens"],
        "weights": np.full(d.model_input.length, weight, np.float32)}) for d in data]


@pytest.mark.parametrize("weight", [1e38, 1e30], ids=["infinite", "norm-overflows"])
def test_a_forward_backward_whose_gradient_is_not_finite_adds_nothing(server, service, weight):
    """Cross-entropy weights of 1e38 overflow the gradient, of 1e30 give a finite one whose
    norm (and AdamW's second moment) overflows float32: that forward_backward is refused
    FAILED_PRECONDITION naming its loss, the gradients accumulated before it stay exactly as
    they were (added, it would make the step fail and discard them all), the optimizer step
    queued behind it is aborted, and the next step applies the good gradient."""
    tc = service.create_lora_training_client("tiny-random", rank=4, seed=5)
    tc.forward_backward(random_data(70), "cross_entropy").result()
    accumulated = run_state(server, tc.model_id)
    overflowing = weighted(random_data(71), weight)
    accepted = len(server.server.store.names(f"operations/{tc.model_id}/"))
    with worker_busy(server):  # both are queued before the first fails
        refused, queued = tc.forward_backward(overflowing, "cross_entropy"), tc.optim_step(gradwire.AdamParams())
        deadline = time.monotonic() + 30
        while len(server.server.store.names(f"operations/{tc.model_id}/")) < accepted + 2:
            assert time.monotonic() < deadline, "the requests never reached the server"
            time.sleep(0.01)
    with pytest.raises(gradwire.ConflictError, match="the gradient of this batch is not finite or too large") \
            as raised:
        refused.result()
    assert raised.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(gradwire.AbortedError):
        queued.result()
    after = run_state(server, tc.model_id)
    for name, (weight, grad) in accumulated.items():
        torch.testing.assert_close(after[name][0], weight, rtol=0, atol=0)
        torch.testing.assert_close(after[name][1], grad, rtol=0, atol=0)
    assert optimizer_state(server, tc.model_id) == {}
    tc.optim_step(gradwire.AdamParams()).result()
    assert tc.get_info().step == 1


def test_a_refused_later_step_keeps_the_moments_and_the_finite_gradients(server, service):
    """A step after others that would write an infinite weight is refused: weights, AdamW's
    moments, the step count and the (finite) gradients are exactly as they were. (Here one
    weight is set to 1e37 on the worker; weight_decay 100 at learning_rate 10 multiplies it by
    -999.)"""
    tc = trained_run(service)
    for seed in (72, 73):
        tc.forward_backward(random_data(seed), "cross_entropy").result()
        tc.optim_step(gradwire.AdamParams(learning_rate=1e-2)).result()
    tc.forward_backward(random_data(74), "cross_entropy").result()
    server.call(lambda: server.engine.run(tc.model_id).params[0].data.fill_(1e37))
    before, moments, step = run_state(server, tc.model_id), optimizer_state(server, tc.model_id), tc.get_info().step
    with pytest.raises(gradwire.ConflictError, match="infinite or NaN") as raised:
        tc.optim_step(gradwire.AdamParams(learning_rate=10.0, weight_decay=100.0)).result()
    assert "were discarded" not in str(raised.value)
    after = run_state(server, tc.model_id)
    for name, (weight, grad) in before.items():
        torch.testing.assert_close(after[name][0], weight, rtol=0, atol=0)
        torch.testing.assert_close(after[name][1], grad, rtol=0, atol=0)
    assert_optimizer_equal(moments, optimizer_state(server, tc.model_id))
    assert tc.get_info().step == step


@pytest.mark.parametrize("resumed", [False, True], ids=["trained", "resumed-with-its-optimizer"])
def test_a_step_whose_second_moment_would_overflow_is_refused_and_its_gradient_discarded(server, service, resumed):
    """Batches whose gradients were each accepted (every element's square finite) can add up to
    one so large that the step would leave the weights finite but AdamW's second moment
    infinite, and those weights would never move again (here the accumulated gradient is set
    to 1e21 on the worker, what about 60 batches at the per-batch limit add up to). It is
    refused, weights and moments stay as they were, the gradient (useless at any learning
    rate) is discarded, and the run trains on. Also right after load_state_with_optimizer,
    which replaces every moment the check reads."""
    tc = trained_run(service)
    for seed in (75, 76):
        tc.forward_backward(random_data(seed), "cross_entropy").result()
        tc.optim_step(gradwire.AdamParams(learning_rate=1e-2)).result()
    if resumed:
        tc.load_state_with_optimizer(tc.save_state("before-overflow").result().path).result()
    tc.forward_backward(random_data(77), "cross_entropy").result()
    server.call(lambda: server.engine.run(tc.model_id).params[0].grad.fill_(1e21))
    before, moments, step = run_state(server, tc.model_id), optimizer_state(server, tc.model_id), tc.get_info().step

    with pytest.raises(gradwire.ConflictError, match="AdamW moment infinite or NaN; its gradients are too large "
                                                     "or not finite and were discarded") as raised:
        tc.optim_step(gradwire.AdamParams(learning_rate=1e-2)).result()
    assert raised.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert_step_refused_and_gradient_discarded(server, tc, before, moments, step)
    tc.forward_backward(random_data(78), "cross_entropy").result()
    tc.optim_step(gradwire.AdamParams(learning_rate=1e-2)).result()
    trained = run_state(server, tc.model_id)
    assert all(not torch.equal(trained[name][0], weight) for name, (weight, _) in before.items())
    assert all(bool(torch.isfinite(value).all()) for state in optimizer_state(server, tc.model_id).values()
               for value in state.values() if isinstance(value, torch.Tensor))


def assert_step_refused_and_gradient_discarded(server, tc, before: dict, moments: dict, step: int) -> None:
    """After a refused step: the weights, AdamW's moments and the step count are as they were
    (`before`, `moments`, `step`), and the run holds no gradient."""
    after = run_state(server, tc.model_id)
    for name, (weight, _) in before.items():
        torch.testing.assert_close(after[name][0], weight, rtol=0, atol=0)
        assert after[name][1] is None
    assert_optimizer_equal(moments, optimizer_state(server, tc.model_id))
    assert tc.get_info().step == step


def unit_gradient_norm(server, tc, data: list[gradwire.Datum]) -> float:
    """The norm of the gradient of `data` at weight 1 on the run's weights as they are; the
    run's gradient is then cleared by a step that moves no weight (lr 0)."""
    tc.forward_backward(weighted(data, 1.0), "cross_entropy").result()
    grads = [g.flatten() for g in server_gradients(server, tc.model_id).values()]
    tc.optim_step(gradwire.AdamParams(learning_rate=0.0, weight_decay=0.0)).result()
    return float(torch.linalg.vector_norm(torch.cat(grads)))


def test_a_clipped_step_whose_gradient_norm_overflows_is_refused_and_its_gradient_discarded(server, service):
    """Two batches whose gradients' norms are each finite (accepted) add up to one whose norm
    overflows float32: clipped by it (grad_clip_norm), every gradient would become 0 and the
    step move nothing while reporting success. It is refused FAILED_PRECONDITION saying so;
    weights, moments and the step count stay as they were, the gradient is discarded, the
    run trains on."""
    tc = trained_run(service)
    large = weighted(random_data(79), 0.6 * FLOAT32_NORM_LIMIT / unit_gradient_norm(server, tc, random_data(79)))
    tc.forward_backward(large, "cross_entropy").result()
    tc.forward_backward(large, "cross_entropy").result()
    before, moments, step = run_state(server, tc.model_id), optimizer_state(server, tc.model_id), tc.get_info().step
    with pytest.raises(gradwire.ConflictError, match="the gradient overflowed float32 as batches added up, and "
                                                     "clipping by its norm \\(grad_clip_norm\\) would zero every "
                                                     "gradient; its gradients are too large or not finite and were "
                                                     "discarded") as raised:
        tc.optim_step(gradwire.AdamParams(learning_rate=1e-2, grad_clip_norm=1.0)).result()
    assert raised.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert_step_refused_and_gradient_discarded(server, tc, before, moments, step)
    tc.forward_backward(random_data(80), "cross_entropy").result()
    tc.optim_step(gradwire.AdamParams(learning_rate=1e-2, grad_clip_norm=1.0)).result()
    assert tc.get_info().step == step + 1


def test_a_refused_first_step_leaves_the_optimizer_as_new(server, service):
    """A run's first step on gradients that overflowed while accumulating (each forward_backward's
    own gradient is checked; here one is set to inf on the worker) is refused; AdamW then holds
    no state (the next step starts fresh, as on a new run), its hyperparameters are the ones it
    had, and the infinite gradients are discarded: the run trains on as if they had not been."""
    tc = service.create_lora_training_client("tiny-random", rank=4, seed=5)
    tc.forward_backward(random_data(70), "cross_entropy").result()
    server.call(lambda: server.engine.run(tc.model_id).params[0].grad.fill_(float("inf")))
    before = run_state(server, tc.model_id)
    groups = server.call(lambda: [dict(g, params=None) for g in server.engine.run(tc.model_id).optimizer.param_groups])
    with pytest.raises(gradwire.ConflictError, match="infinite or NaN"):
        tc.optim_step(gradwire.AdamParams(learning_rate=0.5, beta1=0.5)).result()
    assert optimizer_state(server, tc.model_id) == {}
    assert server.call(lambda: [dict(g, params=None) for g in server.engine.run(tc.model_id).optimizer.param_groups]
                       ) == groups
    after = run_state(server, tc.model_id)
    for name, (weight, grad) in before.items():
        torch.testing.assert_close(after[name][0], weight, rtol=0, atol=0)
        assert after[name][1] is None
    tc.forward_backward(random_data(71), "cross_entropy").result()
    tc.optim_step(gradwire.AdamParams(learning_rate=0.5, beta1=0.5)).result()
    assert tc.get_info().step == 1
    assert all(bool(weight.isfinite().all()) for weight, _ in run_state(server, tc.model_id).values())


@pytest.mark.parametrize("field", ["model_id", "checkpoint name", "checkpoint path", "operation name",
                                   "request_id"])
def test_100_kb_ids_are_cut_in_the_error(server, service, stubs, run, field):
    """INVALID_ARGUMENT or NOT_FOUND (not RESOURCE_EXHAUSTED): the value is cut in the message.
    No checkpoint is written: no file appears under the checkpoint folder, none is listed."""
    before = run_state(server, run.model_id)
    files_before = checkpoint_files(server)
    training, operations = stubs
    calls = {
        "model_id": lambda: training.GetInfo(pb.GetInfoRequest(model_id=KB_100), timeout=30),
        "checkpoint name": lambda: training.SaveWeights(
            pb.SaveWeightsRequest(model_id=run.model_id, name=KB_100), timeout=30),
        "checkpoint path": lambda: training.LoadWeights(
            pb.LoadWeightsRequest(model_id=run.model_id, path=f"gradwire://{KB_100}"), timeout=30),
        "operation name": lambda: operations.GetOperation(operations_pb2.GetOperationRequest(name=KB_100),
                                                          timeout=30),
        "request_id": lambda: training.ForwardBackward(
            pb.ForwardBackwardRequest(model_id=run.model_id, loss_fn="cross_entropy", request_id=KB_100,
                                      data=raw_request(run.model_id, 0, random_data(69)).data), timeout=30),
    }
    with pytest.raises(grpc.RpcError) as raised:
        calls[field]()
    assert raised.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), \
        raised.value.details()
    assert len(raised.value.details()) < 2000
    assert_state_equal(before, run_state(server, run.model_id))
    assert checkpoint_files(server) == files_before
    assert service.create_rest_client().list_checkpoints(run.model_id).result().checkpoints == []


@pytest.mark.parametrize("rpc", ["Sample", "ComputeLogprobs"])
def test_a_sampling_request_id_over_the_limit_is_refused(server, rpc):
    """As a training request's: INVALID_ARGUMENT naming request_id, and no operation starts
    (nor is the id kept, as a retry's would be)."""
    kind = {"Sample": sampling_service_pb2.SampleRequest,
            "ComputeLogprobs": sampling_service_pb2.ComputeLogprobsRequest}
    request = kind[rpc](base_model="tiny-random", prompt=[codec.tokens_to_chunk(np.array([1, 2, 3]))],
                        request_id="r" * (validation.MAX_REQUEST_ID_CHARS + 1))
    before = server.server.store.names("operations/sampling/")
    with grpc.insecure_channel(server.address) as channel:
        error = status_of(getattr(sampling_service_pb2_grpc.SamplingServiceStub(channel), rpc), request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error.details().startswith("request_id: has 257 characters"), error.details()
    assert server.server.store.names("operations/sampling/") == before
    assert request.request_id not in server.server.sampling._operation_of_request


def test_stream_message_of_no_kind(server, run):
    before = run_state(server, run.model_id)
    messages = [pb.ForwardBackwardStreamRequest(header=pb.StreamHeader(model_id=run.model_id,
                                                                       loss_fn="cross_entropy")),
                pb.ForwardBackwardStreamRequest()]
    with grpc.insecure_channel(server.address) as channel:
        error = status_of(training_service_pb2_grpc.TrainingServiceStub(channel).ForwardBackwardStream,
                          iter(messages))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "kind" in error.details()
    assert_state_equal(before, run_state(server, run.model_id))


def test_empty_base_model(server, stubs):
    runs_before = set(server.engine.runs)
    error = status_of(stubs[0].CreateModel, pb.CreateModelRequest(base_model="",
                                                                  lora_config=pb.LoraConfig(rank=2)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "base_model" in error.details()
    assert set(server.engine.runs) == runs_before


def test_read_outputs_of_an_operation_without_outputs(server, stubs, run):
    training, operations = stubs
    name = training.OptimStep(pb.OptimStepRequest(model_id=run.model_id, adam_params=pb.AdamParams())).name
    succeeded(operations, name)
    error = status_of(lambda request, timeout: list(training.ReadOutputs(request, timeout=timeout)),
                      pb.ReadOutputsRequest(name=name))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "OptimStep" in error.details()


@pytest.mark.parametrize("rpc", ["CreateModel", "CreateModelFromState", "SaveWeights", "SaveWeightsForSampler"])
def test_user_metadata_over_the_limit_is_refused(server, stubs, run, rpc):
    """Labels past MAX_USER_METADATA_BYTES (a listing of runs carries them: unbounded, one
    client's labels could make every listing outgrow a gRPC message) get INVALID_ARGUMENT
    naming user_metadata; no run, checkpoint or weight changes. At the limit they are kept."""
    training = stubs[0]
    state = run.save_state("labelled").result().path
    limit = validation.MAX_USER_METADATA_BYTES
    requests = {
        "CreateModel": lambda labels: pb.CreateModelRequest(base_model="tiny-random", lora_config=pb.LoraConfig(rank=2),
                                                            user_metadata=labels),
        "CreateModelFromState": lambda labels: pb.CreateModelFromStateRequest(path=state, user_metadata=labels),
        "SaveWeights": lambda labels: pb.SaveWeightsRequest(model_id=run.model_id, name="big", user_metadata=labels),
        "SaveWeightsForSampler": lambda labels: pb.SaveWeightsForSamplerRequest(model_id=run.model_id, name="big",
                                                                                user_metadata=labels)}
    over = {"ключ": "é" * (limit // 2)}  # limit / 2 + 4 characters, limit + 8 bytes in UTF-8: bytes count
    runs_before, files_before = set(server.engine.runs), checkpoint_files(server)
    listed_before = server.server.index.list_runs()
    before = run_state(server, run.model_id)
    error = status_of(getattr(training, rpc), requests[rpc](over))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error.details().startswith(f"user_metadata: has {limit + 8} bytes"), error.details()
    assert set(server.engine.runs) == runs_before and checkpoint_files(server) == files_before
    assert server.server.index.list_runs() == listed_before
    assert_state_equal(before, run_state(server, run.model_id))

    at_limit = {"k": "v" * (limit - 1)}
    answer = getattr(training, rpc)(requests[rpc](at_limit), timeout=30)
    if isinstance(answer, operations_pb2.Operation):
        succeeded(stubs[1], answer.name)
