"""No request can wedge a run: however a stream breaks (a message that does not
parse, a stream closed without StreamEnd, a message of no kind, a client whose
data raises, a cancelled call, a deadline, a job aborted underneath a live
stream), the RPC answers promptly, nothing is applied, and a request sent right
after succeeds. "Queued behind a failure" is judged from the caller's side."""
from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
import torch
from google.longrunning import operations_pb2

import gradwire
from gradwire import _convert, client
from gradwire.v1 import training_service_pb2 as pb
from reference import (assert_state_equal, random_data, raw_request, run_state, succeeded,
                       trained_run, wait_for_stream_operation, wait_operation)

STREAM = "/gradwire.v1.TrainingService/ForwardBackwardStream"
ANSWER_S = 30  # every call below must be answered well within this (a wedge would hit it)


@pytest.fixture()
def small_messages(monkeypatch):
    monkeypatch.setattr(client, "MESSAGE_BUDGET_BYTES", 1024)


def raw_stream(channel: grpc.Channel, frames, timeout: float = ANSWER_S):
    """Sends already-serialized stream messages, as a client in any language could."""
    call = channel.stream_unary(STREAM, request_serializer=None,
                                response_deserializer=operations_pb2.Operation.FromString)
    return call(iter(frames), timeout=timeout)


def header(run_id: str, seq_id: int = 0, request_id: str = "") -> bytes:
    return pb.ForwardBackwardStreamRequest(header=pb.StreamHeader(
        model_id=run_id, seq_id=seq_id, loss_fn="cross_entropy", request_id=request_id)).SerializeToString()


def batch(data: list[gradwire.Datum]) -> bytes:
    return pb.ForwardBackwardStreamRequest(
        batch=pb.DatumBatch(data=[_convert.datum_to_proto(d) for d in data])).SerializeToString()


def next_request_succeeds(server, stubs, run_id: str) -> None:
    """A ForwardBackward sent right after (seq_id 0: after everything submitted) succeeds."""
    training, operations = stubs
    name = training.ForwardBackward(raw_request(run_id, 0, random_data(1)), timeout=ANSWER_S).name
    succeeded(operations, name)


@pytest.mark.parametrize("broken", [
    pytest.param([b"\xff"], id="undecodable-message"),
    pytest.param([batch(random_data(2)), b"\xff"], id="undecodable-after-a-batch"),
    pytest.param([], id="header-then-half-close"),
    pytest.param([batch(random_data(3))], id="batch-then-half-close"),
    pytest.param([pb.ForwardBackwardStreamRequest().SerializeToString()], id="message-of-no-kind"),
])
def test_broken_stream_answers_invalid_argument_and_run_stays_usable(server, service, stubs, broken):
    tc = trained_run(service)
    before = run_state(server, tc.model_id)
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            raw_stream(channel, [header(tc.model_id), *broken])
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    if b"\xff" in broken:
        assert "gradwire.v1.ForwardBackwardStreamRequest" in raised.value.details()
    assert_state_equal(before, run_state(server, tc.model_id))
    next_request_succeeds(server, stubs, tc.model_id)


def test_undecodable_first_message_is_invalid_argument(server, service, stubs):
    tc = trained_run(service)
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            raw_stream(channel, [b"\xff"])
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    next_request_succeeds(server, stubs, tc.model_id)


def _cut_stream(server, run_id: str, seq_id: int, request_id: str, cut) -> None:
    """Starts a stream that keeps sending slowly and cuts it on the client side with `cut`."""
    sending = threading.Event()

    def frames():
        yield header(run_id, seq_id, request_id)
        for seed in range(1000):
            sending.set()
            yield batch(random_data(seed, lengths=(5,)))
            threading.Event().wait(0.05)

    with grpc.insecure_channel(server.address) as channel:
        call = channel.stream_unary(STREAM, request_serializer=None,
                                    response_deserializer=operations_pb2.Operation.FromString)
        future = call.future(frames(), timeout=cut.get("timeout"))
        sending.wait(ANSWER_S)
        if cut.get("cancel"):
            future.cancel()
        with pytest.raises((grpc.RpcError, grpc.FutureCancelledError)):
            future.result(ANSWER_S)


@pytest.mark.parametrize("cut", [pytest.param({"cancel": True}, id="cancelled"),
                                 pytest.param({"timeout": 0.5}, id="deadline")])
def test_stream_cut_on_the_client_then_settled_then_next_request_runs(server, service, stubs, cut):
    """A client whose stream broke on its side re-sends the header with the same seq_id and
    request_id and closes it (what the SDK does): the answer comes once the server has
    settled the broken stream, so a request sent right after it runs."""
    tc = trained_run(service)
    before = run_state(server, tc.model_id)
    seq_id = tc._seq + 1  # the run's next place: the stream, then the ForwardBackward below
    _cut_stream(server, tc.model_id, seq_id, "cut-stream", cut)
    with grpc.insecure_channel(server.address) as channel:
        try:
            operation = raw_stream(channel, [header(tc.model_id, seq_id, "cut-stream")])
        except grpc.RpcError as answered:  # the header had not arrived: abandoned now
            assert answered.code() == grpc.StatusCode.INVALID_ARGUMENT
        else:
            assert wait_operation(stubs[1], operation.name).error.code in (
                grpc.StatusCode.CANCELLED.value[0], grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert_state_equal(before, run_state(server, tc.model_id))
    training, operations = stubs
    name = training.ForwardBackward(raw_request(tc.model_id, seq_id + 1, random_data(4)), timeout=ANSWER_S).name
    succeeded(operations, name)


def test_job_aborted_underneath_a_live_stream_ends_its_rpc(server, service, stubs):
    """seq 2 is a stream still uploading (its client then stalls) when seq 1, an earlier stream,
    fails on a bad datum: seq 2's job is aborted, and its RPC answers ABORTED at once instead
    of waiting for a client that will never send again."""
    tc = trained_run(service)
    first_seq = tc._seq + 1
    before = run_state(server, tc.model_id)
    first_sent, release = threading.Event(), threading.Event()
    answers: dict[str, grpc.RpcError] = {}
    second_data = random_data(5)

    def second_frames():
        yield header(tc.model_id, first_seq + 1, "second")
        yield batch(second_data)
        release.wait(3 * ANSWER_S)  # the client stalls with the stream open, longer than the test waits

    def second():
        with grpc.insecure_channel(server.address) as channel:
            try:
                raw_stream(channel, second_frames(), timeout=3 * ANSWER_S)
            except grpc.RpcError as error:
                answers["second"] = error

    def first_frames():
        yield header(tc.model_id, first_seq, "first")
        first_sent.set()
        # seq 2 queued behind it on the server, not only handed to gRPC: had the bad batch
        # failed first, seq 2 would be accepted as a later request and wait for its client.
        wait_for_stream_operation(stubs[1], tc.model_id, received=len(second_data), seconds=ANSWER_S)
        bad = random_data(6)
        bad[0].loss_fn_inputs["target_tokens"].data[0] = 10**6
        yield batch(bad)

    thread = threading.Thread(target=second)
    with grpc.insecure_channel(server.address) as channel:
        call = channel.stream_unary(STREAM, request_serializer=None,
                                    response_deserializer=operations_pb2.Operation.FromString)
        future = call.future(first_frames(), timeout=ANSWER_S)
        first_sent.wait(ANSWER_S)
        thread.start()
        with pytest.raises(grpc.RpcError) as raised:
            future.result(ANSWER_S)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        thread.join(ANSWER_S)
    release.set()
    assert not thread.is_alive(), "the aborted stream's RPC never answered"
    assert answers["second"].code() == grpc.StatusCode.ABORTED
    assert f"seq_id {first_seq})" in answers["second"].details()
    assert_state_equal(before, run_state(server, tc.model_id))
    next_request_succeeds(server, stubs, tc.model_id)


# ---- through the SDK: a failure the caller has seen never aborts what it sends next ------

def _twin_after_warm_up(service, warm_up, adam):
    twin = service.create_lora_training_client("tiny-random", rank=4, seed=11)
    twin.forward_backward(warm_up, "cross_entropy").result()
    twin.optim_step(adam).result()
    return twin


def _weights(server, run_id: str) -> dict[str, torch.Tensor]:
    return {name.replace(run_id, "RUN"): weight for name, (weight, _) in run_state(server, run_id).items()}


def wide_data(count: int, length: int, k: int, seed: int, bad_at: int | None = None):
    """Datums of `length` tokens with [length, k] target_tokens and weights (as in the issue)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        targets = rng.integers(0, 320, size=(length, k))
        if i == bad_at:
            targets[0, 0] = 10**6
        yield gradwire.Datum(model_input=gradwire.ModelInput.from_ints(rng.integers(0, 320, size=length)),
                             loss_fn_inputs={"target_tokens": targets,
                                             "weights": np.ones((length, k), np.float32)})


def test_issue_sequence_completes_and_the_step_is_applied(server, service, monkeypatch):
    """The issue's sequence on one run: warm-up forward_backward; a streamed forward_backward of
    300 datums with [L, K] targets and weights rejected at datum 250; a streamed forward_backward
    from a generator raising at datum 120; optim_step(...).result() completes and applies exactly
    the warm-up's gradient (same weights as a twin run that only did that). The issue's datums
    were 256 tokens with K = 96 in 3 MiB messages (about 10 datums each); here they are 64 tokens
    with K = 24 in 192 KiB messages (10 datums each): the same counts and messages
    in flight, a sixteenth of the compute."""
    monkeypatch.setattr(client, "MESSAGE_BUDGET_BYTES", 192 * 1024)
    warm_up = random_data(7)
    adam = gradwire.AdamParams(learning_rate=1e-2)
    tc = service.create_lora_training_client("tiny-random", rank=4, seed=11)
    tc.forward_backward(warm_up, "cross_entropy").result()
    warmed_up = run_state(server, tc.model_id)
    with pytest.raises(gradwire.BadRequestError, match=r"data\[250\]"):
        tc.forward_backward(list(wide_data(300, 64, 24, seed=8, bad_at=250)), "cross_entropy"
                            ).result(timeout=ANSWER_S)
    assert_state_equal(warmed_up, run_state(server, tc.model_id))

    def raising():
        for i, datum in enumerate(wide_data(300, 64, 24, seed=9)):
            if i == 120:
                raise OSError("the data source failed at datum 120")
            yield datum

    with pytest.raises(OSError, match="datum 120"):
        tc.forward_backward(raising(), "cross_entropy").result(timeout=ANSWER_S)
    assert_state_equal(warmed_up, run_state(server, tc.model_id))  # exactly the warm-up's gradient
    tc.optim_step(adam).result(timeout=ANSWER_S)
    assert tc.get_info().step == 1
    twin = _twin_after_warm_up(service, warm_up, adam)
    torch.testing.assert_close(_weights(server, tc.model_id), _weights(server, twin.model_id))


def _raising_stream(tc):
    def data():
        yield from random_data(20, lengths=(30,) * 20)
        raise OSError("data source failed")
    return tc.forward_backward(data(), "cross_entropy")


def _bad_deep_stream(tc):
    data = random_data(21, lengths=(30,) * 40)
    data[35].loss_fn_inputs["target_tokens"].data[0] = 10**6
    return tc.forward_backward(data, "cross_entropy")


@pytest.mark.parametrize("failing", [_raising_stream, _bad_deep_stream], ids=["raising-generator", "bad-datum-deep"])
def test_request_after_a_seen_failure_runs(server, service, small_messages, failing):
    """Once the caller has seen a stream fail, the optim_step it sends at once runs, with
    exactly the gradient of what succeeded before (a twin run's weights)."""
    warm_up = random_data(22)
    adam = gradwire.AdamParams(learning_rate=1e-2)
    tc = service.create_lora_training_client("tiny-random", rank=4, seed=11)
    tc.forward_backward(warm_up, "cross_entropy").result()
    warmed_up = run_state(server, tc.model_id)
    with pytest.raises((OSError, gradwire.BadRequestError)):
        failing(tc).result(timeout=ANSWER_S)
    assert_state_equal(warmed_up, run_state(server, tc.model_id))  # exactly the warm-up's gradient
    tc.optim_step(adam).result(timeout=ANSWER_S)
    twin = _twin_after_warm_up(service, warm_up, adam)
    torch.testing.assert_close(_weights(server, tc.model_id), _weights(server, twin.model_id))


def test_request_queued_before_the_failure_is_aborted_naming_it(server, service, small_messages):
    """Submitted before the caller could see the failure: the optim_step is ABORTED, naming the
    failed request, and nothing is applied."""
    tc = trained_run(service)
    before = run_state(server, tc.model_id)
    failing = _bad_deep_stream(tc)
    step = tc.optim_step(gradwire.AdamParams(learning_rate=1e-2))
    with pytest.raises(gradwire.BadRequestError):
        failing.result()
    with pytest.raises(gradwire.AbortedError, match=r"seq_id|forward_backward"):
        step.result()
    assert_state_equal(before, run_state(server, tc.model_id))


def test_broken_stream_held_for_a_gap_answers_at_once(server, service, stubs):
    """A stream whose seq_id waits for a missing lower one, then gets a bad batch: the RPC
    answers INVALID_ARGUMENT at once (not after the 60 s gap timeout)."""
    tc = trained_run(service)
    before = run_state(server, tc.model_id)
    bad = random_data(8)
    bad[0].loss_fn_inputs["target_tokens"].data[0] = 10**6
    with grpc.insecure_channel(server.address) as channel:
        with pytest.raises(grpc.RpcError) as raised:
            raw_stream(channel, [header(tc.model_id, tc._seq + 2, "after-a-gap"), batch(bad)])
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    assert "data[0]" in raised.value.details()
    assert_state_equal(before, run_state(server, tc.model_id))
