"""Futures as google.longrunning Operations: per-run seq_id order, long-polls that
never lose a result, idempotent retries, cancel, delete, list — over raw stubs,
as a client in another language would use them."""
from __future__ import annotations

import contextlib
import pathlib
import threading
import time

import grpc
import pytest
import torch
from google.longrunning import operations_pb2
from google.protobuf import duration_pb2

import gradwire
from gradwire import _convert
from conftest import free_port, server_config
from gradwire.v1 import training_service_pb2 as pb
from gradwire_server import checkpoints
from gradwire_server.server import BackgroundServer
from reference import (assert_state_equal, forwards_held, new_run, operation_metadata, random_data, raw_request,
                       response_or_error, run_state, server_gradients, wait_for_stream_operation, wait_operation,
                       worker_busy)


@pytest.fixture()
def run_id(stubs):
    training, _ = stubs
    return new_run(training)


def fb_request(run_id: str, seq_id: int, seed: int = 60, request_id: str = "") -> pb.ForwardBackwardRequest:
    request = raw_request(run_id, seq_id, random_data(seed))
    request.request_id = request_id
    return request


def test_requests_run_in_seq_id_order_even_when_they_arrive_out_of_order(stubs, run_id):
    training, operations = stubs
    late = training.ForwardBackward(fb_request(run_id, 2))
    # seq_id 2 waits for 1: it must not run yet.
    assert not wait_operation(operations, late.name, 0.3).done
    assert operation_metadata(operations.GetOperation(operations_pb2.GetOperationRequest(name=late.name))).state \
        == pb.OperationMetadata.QUEUED
    early = training.ForwardBackward(fb_request(run_id, 1))
    first, second = wait_operation(operations, early.name), wait_operation(operations, late.name)
    assert first.done and second.done and not first.HasField("error") and not second.HasField("error")
    first_meta, second_meta = operation_metadata(first), operation_metadata(second)
    assert first_meta.end_time.ToNanoseconds() <= second_meta.start_time.ToNanoseconds()
    assert (first_meta.seq_id, second_meta.seq_id) == (1, 2)


def test_result_survives_a_waiter_that_timed_out(stubs, run_id):
    training, operations = stubs
    name = training.ForwardBackward(fb_request(run_id, 1)).name
    wait_operation(operations, name, 0.0)  # a poll that gives up at once
    done = wait_operation(operations, name)
    again = operations.GetOperation(operations_pb2.GetOperationRequest(name=name))
    assert done.done and again.done and again.response == done.response
    output = pb.ForwardBackwardOutput()
    assert again.response.Unpack(output) and output.metrics["loss:sum"] > 0


def test_a_taken_seq_id_without_its_request_id_is_already_exists(server, stubs, run_id):
    """Without a request_id a request is never taken for a retry: an OptimStep (or another
    batch) sent with a seq_id a ForwardBackward took is ALREADY_EXISTS naming that operation,
    and does not run (answered with the ForwardBackward's operation, it would silently not)."""
    training, operations = stubs
    first = training.ForwardBackward(fb_request(run_id, 1))
    assert not wait_operation(operations, first.name).HasField("error")
    before = run_state(server, run_id)
    reused = [lambda: training.OptimStep(pb.OptimStepRequest(model_id=run_id, seq_id=1,
                                                             adam_params=pb.AdamParams(learning_rate=1e-3))),
              lambda: training.ForwardBackward(fb_request(run_id, 1, seed=61)),
              lambda: training.ForwardBackward(fb_request(run_id, 1, request_id="req-other"))]
    for call in reused:
        with pytest.raises(grpc.RpcError) as raised:
            call()
        assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert raised.value.details().startswith(f"seq_id 1 is already taken by {first.name}")
    assert_state_equal(before, run_state(server, run_id))
    assert training.GetInfo(pb.GetInfoRequest(model_id=run_id)).step == 0


def test_retry_with_same_request_id_is_the_same_operation(server, stubs, run_id):
    """The retry gets the first request's operation and the work runs once: the gradient
    is exactly that of one forward_backward on a run with the same start."""
    training, operations = stubs
    first = training.ForwardBackward(fb_request(run_id, 1, request_id="req-1"))
    retry = training.ForwardBackward(fb_request(run_id, 1, request_id="req-1"))
    assert retry.name == first.name
    with pytest.raises(grpc.RpcError) as raised:
        training.ForwardBackward(fb_request(run_id, 1, request_id="req-other"))
    assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as raised:  # another RPC with its ids is no retry: it would never run
        training.OptimStep(pb.OptimStepRequest(model_id=run_id, seq_id=1, request_id="req-1",
                                               adam_params=pb.AdamParams(learning_rate=1e-2)))
    assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert f"request_id 'req-1' was sent before with another RPC ({first.name}, a ForwardBackward)" \
        in raised.value.details()
    assert not wait_operation(operations, first.name).HasField("error")
    assert training.GetInfo(pb.GetInfoRequest(model_id=run_id)).step == 0
    assert_gradient_of_one_pass(server, stubs, run_id)


def assert_gradient_of_one_pass(server, stubs, run_id: str) -> None:
    """The run's gradient is exactly that of one fb_request(seq 1) on a fresh run."""
    training, operations = stubs
    once = new_run(training)
    assert not wait_operation(operations, training.ForwardBackward(fb_request(once, 1)).name).HasField("error")
    added, single = server_gradients(server, run_id), server_gradients(server, once)
    assert added.keys() == {name.replace(once, run_id) for name in single}
    for name, grad in single.items():
        assert torch.equal(added[name.replace(once, run_id)], grad), name


def test_rejected_request_keeps_the_order_moving(stubs, run_id):
    """A request rejected at validation consumes its seq_id, so the next one runs."""
    training, operations = stubs
    bad = fb_request(run_id, 1)
    bad.loss_fn = "nope"
    with pytest.raises(grpc.RpcError) as raised:
        training.ForwardBackward(bad)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    good = wait_operation(operations, training.ForwardBackward(fb_request(run_id, 2)).name)
    assert good.done and not good.HasField("error")


def test_held_requests_behind_a_rejected_one_are_aborted(stubs, run_id):
    training, operations = stubs
    held = training.OptimStep(pb.OptimStepRequest(model_id=run_id, seq_id=2)).name
    bad = fb_request(run_id, 1)
    bad.loss_fn = "nope"
    with pytest.raises(grpc.RpcError):
        training.ForwardBackward(bad)
    result = wait_operation(operations, held)
    assert result.done and result.error.code == grpc.StatusCode.ABORTED.value[0]
    assert "rejected" in result.error.message
    # The run goes on after the aborted seq_id 2 (taken: it cannot be sent again), which never runs.
    after = wait_operation(operations, training.ForwardBackward(fb_request(run_id, 3)).name)
    assert after.done and not after.HasField("error"), after.error
    assert training.GetInfo(pb.GetInfoRequest(model_id=run_id)).step == 0


def test_a_lower_seq_id_arriving_after_the_requests_held_above_it_were_aborted_runs(stubs, run_id):
    """seq_id 4 is held (2 and 3 have not arrived); 2 is rejected, which aborts 4; 3, sent
    later, runs as it would have without 4 (whether a request runs does not depend on which
    later ones arrived first), and 5 runs after it."""
    training, operations = stubs
    assert not wait_operation(operations, training.ForwardBackward(fb_request(run_id, 1)).name).HasField("error")
    held = training.OptimStep(pb.OptimStepRequest(model_id=run_id, seq_id=4)).name
    bad = fb_request(run_id, 2)
    bad.loss_fn = "nope"
    with pytest.raises(grpc.RpcError):
        training.ForwardBackward(bad)
    assert wait_operation(operations, held).error.code == grpc.StatusCode.ABORTED.value[0]
    for seq_id in (3, 5):
        later = wait_operation(operations, training.ForwardBackward(fb_request(run_id, seq_id)).name)
        assert later.done and not later.HasField("error"), (seq_id, later.error)
    assert training.GetInfo(pb.GetInfoRequest(model_id=run_id)).step == 0


def test_cancel_list_and_delete(stubs, run_id):
    training, operations = stubs
    held = training.ForwardBackward(fb_request(run_id, 2)).name  # waits for seq_id 1
    operations.CancelOperation(operations_pb2.CancelOperationRequest(name=held))
    cancelled = wait_operation(operations, held)
    assert cancelled.done and cancelled.error.code == grpc.StatusCode.CANCELLED.value[0]
    done = training.ForwardBackward(fb_request(run_id, 1)).name
    assert not wait_operation(operations, done).HasField("error")
    listed = operations.ListOperations(operations_pb2.ListOperationsRequest(name=f"operations/{run_id}"))
    assert {op.name for op in listed.operations} == {held, done}
    running = training.ForwardBackward(fb_request(run_id, 4)).name  # waits for seq_id 3: not done
    for query, expected in (("done=true", {held, done}), ("done = false", {running}), ("", {held, done, running})):
        listed = operations.ListOperations(operations_pb2.ListOperationsRequest(name=f"operations/{run_id}",
                                                                               filter=query))
        assert {op.name for op in listed.operations} == expected, query
    with pytest.raises(grpc.RpcError) as raised:  # a filter it cannot apply is refused, not ignored
        operations.ListOperations(operations_pb2.ListOperationsRequest(name=f"operations/{run_id}",
                                                                       filter="kind=ForwardBackward"))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "filter" in raised.value.details()
    # The name is a collection: a prefix of the run's id lists no run's operations, a bare id is refused.
    assert not operations.ListOperations(operations_pb2.ListOperationsRequest(name=f"operations/{run_id[:-1]}")
                                         ).operations
    assert {held, done, running} <= {op.name for op in operations.ListOperations(
        operations_pb2.ListOperationsRequest(name="operations", page_size=1000)).operations}
    with pytest.raises(grpc.RpcError) as raised:
        operations.ListOperations(operations_pb2.ListOperationsRequest(name=run_id))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "name" in raised.value.details()
    operations.CancelOperation(operations_pb2.CancelOperationRequest(name=running))
    operations.DeleteOperation(operations_pb2.DeleteOperationRequest(name=done))
    with pytest.raises(grpc.RpcError) as raised:
        operations.GetOperation(operations_pb2.GetOperationRequest(name=done))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_cancel_while_the_request_is_computed_leaves_its_result_standing(server, stubs, run_id):
    """CancelOperation is best effort (AIP-151): a ForwardBackward whose pass is being computed
    when the cancel arrives finishes, and reads as done with its result, its gradient added
    once. (Read as CANCELLED with its gradient added anyway, a client that sent it again
    would add it twice.)"""
    training, operations = stubs
    with forwards_held(server) as holding:
        name = training.ForwardBackward(fb_request(run_id, 1)).name
        assert holding.wait(30)
        operations.CancelOperation(operations_pb2.CancelOperationRequest(name=name))
    result = wait_operation(operations, name)
    assert result.done and not result.HasField("error"), result.error
    assert_gradient_of_one_pass(server, stubs, run_id)


def stream_messages(run_id: str, rest: threading.Event):
    """A stream of seq_id 1: its header and 4 datums, then (once `rest` is set) its end."""
    yield pb.ForwardBackwardStreamRequest(header=pb.StreamHeader(model_id=run_id, seq_id=1, loss_fn="cross_entropy"))
    yield pb.ForwardBackwardStreamRequest(batch=pb.DatumBatch(data=[_convert.datum_to_proto(d)
                                                                    for d in random_data(87)]))
    rest.wait(30)
    yield pb.ForwardBackwardStreamRequest(end=pb.StreamEnd(num_datums=4))


@pytest.mark.parametrize("when", ["while a piece is computed", "while it waits for more input"])
def test_a_cancelled_stream_applies_nothing_and_its_run_goes_on(server, stubs, run_id, when):
    """A stream cancelled part-way, while its first piece's pass is computed (the cancel
    takes effect after that turn) or while it waits for its next message: its RPC ends
    CANCELLED, no weight or gradient changed, and the run's next requests (an OptimStep,
    which nothing else would wake) run."""
    training, operations = stubs
    before = run_state(server, run_id)
    rest, outcome = threading.Event(), []
    upload = threading.Thread(target=lambda: outcome.append(
        response_or_error(training.ForwardBackwardStream, stream_messages(run_id, rest))))
    try:
        if when == "while a piece is computed":
            with forwards_held(server) as holding:
                upload.start()
                assert holding.wait(30)
                name = wait_for_stream_operation(operations, run_id, received=4)
                operations.CancelOperation(operations_pb2.CancelOperationRequest(name=name))
        else:
            upload.start()
            name = wait_for_stream_operation(operations, run_id, received=4)
            server.call(lambda: None)  # a turn after the piece's: the stream now waits for input
            operations.CancelOperation(operations_pb2.CancelOperationRequest(name=name))
        upload.join(30)
    finally:
        rest.set()
        upload.join(30)
    assert isinstance(outcome[0], grpc.RpcError) and outcome[0].code() == grpc.StatusCode.CANCELLED, outcome
    assert wait_operation(operations, name).error.code == grpc.StatusCode.CANCELLED.value[0]
    assert_state_equal(before, run_state(server, run_id))
    step = wait_operation(operations, training.OptimStep(pb.OptimStepRequest(
        model_id=run_id, seq_id=2, adam_params=pb.AdamParams(learning_rate=1e-2))).name)
    assert step.done and not step.HasField("error"), step.error
    assert training.GetInfo(pb.GetInfoRequest(model_id=run_id)).step == 1


def test_deleting_an_operation_ends_its_waiters_and_readers_with_not_found(server, stubs, run_id):
    """DeleteOperation while clients long-poll an operation (WaitOperation) and read its
    outputs (ReadOutputs) as they come: both end NOT_FOUND at once, neither waiting out its
    timeout nor ending as if the outputs were complete."""
    training, operations = stubs
    outcomes: dict[str, object] = {}

    def wait() -> None:
        outcomes["wait"] = response_or_error(operations.WaitOperation, operations_pb2.WaitOperationRequest(
            name=name, timeout=duration_pb2.Duration(seconds=25)))

    def read() -> None:
        try:
            outcomes["read"] = list(training.ReadOutputs(pb.ReadOutputsRequest(name=name), timeout=25))
        except grpc.RpcError as error:
            outcomes["read"] = error

    with worker_busy(server):
        name = training.Forward(fb_request(run_id, 1)).name
        clients = [threading.Thread(target=wait), threading.Thread(target=read)]
        for client in clients:
            client.start()
        time.sleep(0.5)  # both calls wait on the server (the Forward cannot run: the worker is busy)
        operations.DeleteOperation(operations_pb2.DeleteOperationRequest(name=name))
        for client in clients:
            client.join(30)
    for call in ("wait", "read"):
        assert isinstance(outcomes[call], grpc.RpcError), (call, outcomes[call])
        assert outcomes[call].code() == grpc.StatusCode.NOT_FOUND, (call, outcomes[call].details())


@contextlib.contextmanager
def server_starting_soon(port: int, folder: pathlib.Path):
    """A server on `port` and `folder` that starts a second after the block begins (its
    clients meet UNAVAILABLE first); stopped when the block ends."""
    started: list[BackgroundServer] = []
    starter = threading.Timer(1.0, lambda: started.append(
        BackgroundServer(server_config(port=port, checkpoint_dir=folder))))
    starter.start()
    try:
        yield
    finally:
        starter.join()
        for server in started:
            server.stop()


def test_sdk_retries_while_the_server_is_not_up_yet(tmp_path):
    """A loop started before its server (or across a restart) gets through: UNAVAILABLE
    is retried with the same request. A server that never comes raises APIConnectionError."""
    port = free_port()
    with server_starting_soon(port, tmp_path):
        with gradwire.ServiceClient(base_url=f"127.0.0.1:{port}") as service:
            tc = service.create_lora_training_client("tiny-random", rank=2, seed=0)
            assert tc.forward_backward(random_data(61), "cross_entropy").result().metrics["loss:sum"] > 0
    with gradwire.ServiceClient(base_url=f"127.0.0.1:{free_port()}", retry_s=0.5) as service:
        with pytest.raises(gradwire.APIConnectionError):
            service.get_server_capabilities()


def test_a_download_started_while_the_server_restarts_gets_through(tmp_path):
    """download_checkpoint retries UNAVAILABLE as the other calls do: started while the
    server is down, it completes once a server is up again on the same folder."""
    port, folder = free_port(), tmp_path / "checkpoints"
    first = BackgroundServer(server_config(port=port, checkpoint_dir=folder))
    try:
        with gradwire.ServiceClient(base_url=f"127.0.0.1:{port}") as service:
            tc = service.create_lora_training_client("tiny-random", rank=2, seed=0)
            path = tc.save_weights_for_sampler("across-a-restart").result().path
    finally:
        first.stop()
    with server_starting_soon(port, folder):
        with gradwire.ServiceClient(base_url=f"127.0.0.1:{port}") as service:
            copy = service.create_rest_client().download_checkpoint(path, tmp_path / "copy")
    stored = checkpoints.parse_path(path).folder(folder)
    assert {f.name: f.read_bytes() for f in copy.iterdir()} == {
        f.name: f.read_bytes() for f in stored.iterdir() if not f.name.startswith(".")}
