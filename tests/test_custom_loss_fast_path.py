"""The custom-loss fast path: the forward leg's graph is kept on the server and the
backward leg backpropagates through it, so a custom loss costs one forward pass
per datum. Every way the graph can go unused (over budget, another request
first, different data, cancellation, timeout) falls back to recomputing, with
the same result, and frees the graph."""
from __future__ import annotations

import contextlib
import time
import weakref

import grpc
import pytest
from google.longrunning import operations_pb2

import gradwire
from gradwire.v1 import training_service_pb2 as pb
from conftest import raw_stubs, server_config
from gradwire_server.server import BackgroundServer
from reference import (assert_state_equal, finished, forward_batches, new_run, random_data, raw_request,
                       reference_gradients, reference_logprobs, reference_model, relative_error, run_state,
                       server_gradients, succeeded, trained_run, worker_busy)
from test_custom_loss import TOLERANCE, logprob_squared_loss


@contextlib.contextmanager
def keep_graph_budget(server, nbytes: int):
    engine = server.engine
    before = engine.keep_graph_budget_bytes
    server.call(lambda: setattr(engine, "keep_graph_budget_bytes", nbytes))
    try:
        yield
    finally:
        server.call(lambda: setattr(engine, "keep_graph_budget_bytes", before))


def kept_graph(server, run_id: str) -> weakref.ref | None:
    """A weak reference to the run's kept logprobs tensor (the graph hangs off it)."""
    def read():
        kept = server.engine.kept.get(run_id)
        return None if kept is None else weakref.ref(kept.micro_batches[0].target_logprobs)
    return server.call(read)


def holds_graph(server, run_id: str) -> bool:
    return server.call(lambda: run_id in server.engine.kept)


def result(operations, name: str) -> pb.ForwardBackwardOutput:
    output = pb.ForwardBackwardOutput()
    succeeded(operations, name).response.Unpack(output)
    return output


def kept_forward(stubs, run_id: str, seq_id: int, data) -> str:
    training, operations = stubs
    request = raw_request(run_id, seq_id, data)
    request.keep_graph = True
    name = training.Forward(request).name
    assert result(operations, name).graph_kept
    return name


@pytest.mark.parametrize("budget, forward_passes", [(None, 1), (0, 2)])
def test_one_forward_pass_per_datum_and_exact(server, service, budget, forward_passes):
    """Fast path: each datum is forwarded once. Budget 0 (nothing kept): twice. The
    gradient equals in-process autograd either way."""
    data = random_data(50)
    tc = trained_run(service)
    model = reference_model(server, tc.model_id, rank=4)
    budget_context = keep_graph_budget(server, budget) if budget is not None else contextlib.nullcontext()
    with budget_context, forward_batches(server) as counted:
        out = tc.forward_backward_custom(data, logprob_squared_loss).result()
    assert sum(counted) == forward_passes * len(data)

    expected, _ = logprob_squared_loss(data, [reference_logprobs(model, d) for d in data])
    expected.backward()
    assert relative_error(server_gradients(server, tc.model_id),
                          reference_gradients(model, tc.model_id)) <= TOLERANCE
    assert out.metrics["loss:sum"] == pytest.approx(expected.item(), rel=1e-5)
    assert not holds_graph(server, tc.model_id)  # used, then freed


def test_another_runs_request_between_the_legs_changes_nothing(server, service, stubs):
    """The worker serves other runs and samples between a run's two legs (peft then
    makes only their adapter trainable); the reused graph still yields the exact
    gradient, and is freed on use."""
    training, operations = stubs
    tc, other = trained_run(service), trained_run(service, seed=1)
    model = reference_model(server, tc.model_id, rank=4)
    data = random_data(51)
    forward = kept_forward(stubs, tc.model_id, 3, data)
    graph = kept_graph(server, tc.model_id)
    other.forward_backward(random_data(59), "cross_entropy").result()
    sampler = service.create_sampling_client(base_model="tiny-random")  # switches adapters too
    sampler.sample(gradwire.ModelInput.from_ints([1, 2, 3]), 2, gradwire.SamplingParams(max_tokens=4)).result()
    backward = raw_request(tc.model_id, 4, data)
    backward.reuse_forward = forward
    assert result(operations, training.ForwardBackward(backward).name).reused_datums == len(data)
    assert graph() is None

    expected = sum(-(reference_logprobs(model, d) * d.loss_fn_inputs["weights"].to_torch()).sum()
                   for d in data)
    expected.backward()
    assert relative_error(server_gradients(server, tc.model_id),
                          reference_gradients(model, tc.model_id)) <= TOLERANCE


def test_different_data_reuses_the_matching_prefix_and_stays_exact(server, service, stubs):
    """The backward leg's datums that differ from the forward's are computed afresh:
    the gradient is that of the backward request's own data."""
    training, operations = stubs
    tc = trained_run(service)
    model = reference_model(server, tc.model_id, rank=4)
    data = random_data(52)
    forward = kept_forward(stubs, tc.model_id, 3, data)
    changed = data[:2] + random_data(53, lengths=(7, 11))
    backward = raw_request(tc.model_id, 4, changed)
    backward.reuse_forward = forward
    output = result(operations, training.ForwardBackward(backward).name)
    assert output.reused_datums == 2

    expected = sum(-(reference_logprobs(model, d) * d.loss_fn_inputs["weights"].to_torch()).sum()
                   for d in changed)
    expected.backward()
    assert relative_error(server_gradients(server, tc.model_id),
                          reference_gradients(model, tc.model_id)) <= TOLERANCE
    assert output.metrics["loss:sum"] == pytest.approx(expected.item(), rel=1e-5)


def test_another_request_first_frees_the_graph(server, service, stubs):
    training, operations = stubs
    tc = trained_run(service)
    data = random_data(54)
    forward = kept_forward(stubs, tc.model_id, 3, data)
    graph = kept_graph(server, tc.model_id)
    result(operations, training.Forward(raw_request(tc.model_id, 4, data)).name)
    assert graph() is None and not holds_graph(server, tc.model_id)
    backward = raw_request(tc.model_id, 5, data)
    backward.reuse_forward = forward
    assert result(operations, training.ForwardBackward(backward).name).reused_datums == 0


def test_over_budget_keeps_nothing(server, service, stubs):
    training, operations = stubs
    tc = trained_run(service)
    request = raw_request(tc.model_id, 3, random_data(55))
    request.keep_graph = True
    with keep_graph_budget(server, 1024):
        output = result(operations, training.Forward(request).name)
    assert not output.graph_kept and not holds_graph(server, tc.model_id)


def test_cancelled_backward_frees_the_graph_and_changes_nothing(server, service, stubs):
    training, operations = stubs
    tc = trained_run(service)
    data = random_data(56)
    forward = kept_forward(stubs, tc.model_id, 3, data)
    graph = kept_graph(server, tc.model_id)
    before = run_state(server, tc.model_id)

    with worker_busy(server):  # the backward leg stays queued
        backward = raw_request(tc.model_id, 4, data)
        backward.reuse_forward = forward
        name = training.ForwardBackward(backward).name
        operations.CancelOperation(operations_pb2.CancelOperationRequest(name=name))
    assert finished(operations, name).error.code == grpc.StatusCode.CANCELLED.value[0]
    server.call(lambda: None)  # the worker has passed the cancelled job
    assert graph() is None and not holds_graph(server, tc.model_id)
    assert_state_equal(before, run_state(server, tc.model_id))


def test_graph_of_a_backward_leg_that_never_comes_expires():
    """A client that vanished between the legs: the graph is freed after the timeout."""
    background = BackgroundServer(server_config(keep_graph_timeout_s=0.4))
    try:
        with raw_stubs(background.address) as stubs:
            run_id = new_run(stubs[0])
            kept_forward(stubs, run_id, 1, random_data(57))
            graph = kept_graph(background, run_id)
            deadline = time.monotonic() + 30
            while graph() is not None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert graph() is None and not holds_graph(background, run_id)
    finally:
        background.stop()


def test_unloading_the_run_frees_the_graph(server, service, stubs):
    training, operations = stubs
    tc = trained_run(service)
    kept_forward(stubs, tc.model_id, 3, random_data(58))
    graph = kept_graph(server, tc.model_id)
    assert graph() is not None
    unload = training.UnloadModel(pb.UnloadModelRequest(model_id=tc.model_id, seq_id=4)).name
    succeeded(operations, unload)
    assert graph() is None and not holds_graph(server, tc.model_id)
