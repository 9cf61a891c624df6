"""Client-streamed batches: any size within gRPC's default 4 MiB messages, the
same numbers as one unary call, and all or nothing when a stream breaks."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import grpc
import numpy as np
import pytest
import torch
from google.longrunning import operations_pb2

import gradwire
from gradwire import _convert, client
from gradwire.v1 import training_service_pb2 as pb
from gradwire_server.models import tiny_random_model
from test_custom_loss import variance_loss
from reference import (assert_state_equal, random_data, raw_request, reference_gradients, reference_logprobs,
                       reference_model, relative_error, run_state, sender_held, server_gradients,
                       stream_operations, trained_run, wait_for_stream_operation)

SMALL_BUDGET = 1024  # bytes of datums per message: forces many messages for small data


@pytest.fixture()
def small_messages(monkeypatch):
    """Streams anything larger than 1 KiB, so small test data travels in many messages."""
    monkeypatch.setattr(client, "MESSAGE_BUDGET_BYTES", SMALL_BUDGET)


def many_data(seed: int, count: int = 40) -> list[gradwire.Datum]:
    rng = np.random.default_rng(seed)
    return random_data(seed, lengths=tuple(rng.integers(4, 40, size=count)))


def test_streamed_batch_equals_one_unary_call(server, service, monkeypatch):
    """Same accumulated gradient (≤ 1e-6 relative), logprobs and metrics as a unary call."""
    data = many_data(70)
    unary, streamed = trained_run(service, seed=5), trained_run(service, seed=5)
    expected = unary.forward_backward(data, "cross_entropy").result()  # fits one message
    monkeypatch.setattr(client, "MESSAGE_BUDGET_BYTES", SMALL_BUDGET)
    assert len(list(_convert.datum_pieces(data, None, SMALL_BUDGET))) >= 10  # many messages
    got = streamed.forward_backward(iter(data), "cross_entropy").result()  # a generator, too
    assert relative_error(server_gradients(server, streamed.model_id),
                          {k.replace(unary.model_id, streamed.model_id): v
                           for k, v in server_gradients(server, unary.model_id).items()}) <= 1e-6
    assert got.metrics["loss:sum"] == pytest.approx(expected.metrics["loss:sum"], rel=1e-6)
    assert len(got.loss_fn_outputs) == len(data)
    for a, b in zip(got.loss_fn_outputs, expected.loss_fn_outputs):
        np.testing.assert_allclose(a["logprobs"].to_numpy(), b["logprobs"].to_numpy(), atol=1e-6)


def test_dataset_larger_than_64_mib_with_default_limits(server, service):
    """A forward_backward whose encoding exceeds 64 MiB goes through 4 MiB messages, and its
    32 MiB of logprobs come back streamed (ReadOutputs), not as one oversized message."""
    tc = service.create_lora_training_client("tiny-random", rank=2, seed=0)
    rng = np.random.default_rng(0)
    n, k, count = 1000, 40, 200

    def data():
        for _ in range(count):
            yield gradwire.Datum(model_input=gradwire.ModelInput.from_ints(rng.integers(0, 320, n)),
                                 loss_fn_inputs={"target_tokens": rng.integers(0, 320, (n, k)),
                                                 "weights": np.full((n, k), 1e-3, np.float32)})

    encoded = sum(_convert.datum_to_proto(d).ByteSize() for d in data())
    assert encoded > 64 * 2**20
    rng = np.random.default_rng(0)
    out = tc.forward_backward(data(), "cross_entropy").result()
    assert len(out.loss_fn_outputs) == count
    assert server_gradients(server, tc.model_id)
    # Content and order of what came back through ReadOutputs: each datum's [n, k] logprobs equal
    # in-process log_softmax on the same weights (a fresh adapter is zero: the base model).
    rng = np.random.default_rng(0)
    model = tiny_random_model()
    expected_loss, batch = 0.0, []
    for i, datum in enumerate(data()):
        batch.append(datum)
        if len(batch) < 20 and i < count - 1:
            continue
        with torch.no_grad():
            tokens = torch.tensor(np.stack([d.model_input.to_ints() for d in batch]))
            logprobs = torch.log_softmax(model(input_ids=tokens).logits.float(), dim=-1)
            targets = torch.stack([d.loss_fn_inputs["target_tokens"].to_torch() for d in batch])
            expected = logprobs.gather(-1, targets).numpy()
        for j, want in enumerate(expected):
            got = out.loss_fn_outputs[i - len(batch) + 1 + j]["logprobs"].to_numpy()
            assert got.shape == (n, k)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        expected_loss += float(-(expected * 1e-3).sum())
        batch = []
    assert out.metrics["loss:sum"] == pytest.approx(expected_loss, rel=1e-5)


def test_bad_datum_deep_in_a_stream_applies_nothing(server, service, monkeypatch):
    """Datum 5,000 of a stream (of several 64 KiB messages: 6,000 such datums fit one 3 MiB
    message) is invalid: BadRequestError naming data[5000], no gradient added, and the
    optim_step queued behind it does not run."""
    monkeypatch.setattr(client, "MESSAGE_BUDGET_BYTES", 64 * 1024)
    tc = trained_run(service)
    tc.forward_backward(random_data(71), "cross_entropy").result()
    before = run_state(server, tc.model_id)

    def data():
        rng = np.random.default_rng(1)
        for i in range(6000):
            tokens = rng.integers(0, 320, 6)
            if i == 5000:
                tokens[3] = 4000
            yield gradwire.Datum(model_input=gradwire.ModelInput.from_ints(tokens),
                                 loss_fn_inputs={"target_tokens": rng.integers(0, 320, 6)})

    with sender_held(tc):
        failing = tc.forward_backward(data(), "cross_entropy")
        step = tc.optim_step(gradwire.AdamParams(learning_rate=1e-2))
    with pytest.raises(gradwire.BadRequestError, match=r"data\[5000\]\.model_input"):
        failing.result()
    with pytest.raises(gradwire.AbortedError):
        step.result()
    assert_state_equal(before, run_state(server, tc.model_id))


def test_client_data_failing_mid_stream_applies_nothing(server, service, stubs, small_messages):
    """The client's data source fails mid-stream: the SDK abandons the stream (closes it
    without StreamEnd) and re-raises the original exception; the operation ends
    INVALID_ARGUMENT "abandoned" and nothing is applied."""
    tc = trained_run(service)
    tc.forward_backward(random_data(72), "cross_entropy").result()
    before = run_state(server, tc.model_id)

    def data():
        yield from many_data(73)
        raise OSError("disk went away")

    with pytest.raises(OSError, match="disk went away"):
        tc.forward_backward(data(), "cross_entropy").result()
    _, operations = stubs
    assert "abandoned" in _wait_for_failed_stream(operations, tc.model_id,
                                                  grpc.StatusCode.INVALID_ARGUMENT).error.message
    assert_state_equal(before, run_state(server, tc.model_id))


def test_deadline_passing_mid_stream_applies_nothing(server, service, stubs):
    tc = trained_run(service)
    tc.forward_backward(random_data(74), "cross_entropy").result()
    before = run_state(server, tc.model_id)

    def messages():
        yield pb.ForwardBackwardStreamRequest(header=pb.StreamHeader(model_id=tc.model_id, seq_id=0,
                                                                     loss_fn="cross_entropy"))
        for datum in many_data(75):
            time.sleep(0.05)
            yield pb.ForwardBackwardStreamRequest(batch=pb.DatumBatch(data=[_convert.datum_to_proto(datum)]))

    training, operations = stubs
    with pytest.raises(grpc.RpcError) as raised:
        training.ForwardBackwardStream(messages(), timeout=0.5)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_for_failed_stream(operations, tc.model_id, grpc.StatusCode.CANCELLED)
    assert_state_equal(before, run_state(server, tc.model_id))


KILLED_CLIENT = textwrap.dedent("""
    import sys, time, grpc, numpy as np
    from gradwire import _convert, types
    from gradwire.v1 import training_service_pb2 as pb, training_service_pb2_grpc as pb_grpc
    address, run_id = sys.argv[1:]
    rng = np.random.default_rng(0)
    def messages():
        yield pb.ForwardBackwardStreamRequest(header=pb.StreamHeader(model_id=run_id, loss_fn="cross_entropy"))
        while True:
            seq = rng.integers(0, 320, 9)
            datum = types.Datum(model_input=types.ModelInput.from_ints(seq[:-1]),
                                loss_fn_inputs={"target_tokens": seq[1:]})
            yield pb.ForwardBackwardStreamRequest(batch=pb.DatumBatch(data=[_convert.datum_to_proto(datum)]))
            time.sleep(0.02)
    pb_grpc.TrainingServiceStub(grpc.insecure_channel(address)).ForwardBackwardStream(messages())
""")


def test_client_killed_mid_stream_applies_nothing(server, service, stubs):
    """SIGKILL the client process while it streams: the operation fails, nothing is applied,
    and the run keeps working."""
    tc = trained_run(service)
    tc.forward_backward(random_data(76), "cross_entropy").result()
    before = run_state(server, tc.model_id)
    training, operations = stubs
    process = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, server.address, tc.model_id])
    try:
        wait_for_stream_operation(operations, tc.model_id, received=20, seconds=60)
        process.kill()
        process.wait()
        # The dead connection reaches the server as a cancellation or, when the end of
        # the request stream is read first, as a stream abandoned without StreamEnd.
        _wait_for_failed_stream(operations, tc.model_id, grpc.StatusCode.CANCELLED,
                                grpc.StatusCode.INVALID_ARGUMENT)
        assert_state_equal(before, run_state(server, tc.model_id))
        # The run keeps working (seq_id 0: after the killed client's request).
        name = training.ForwardBackward(raw_request(tc.model_id, 0, random_data(77))).name
        assert not service._transport.wait_operation(name, 30).HasField("error")
    finally:
        process.kill()


def _wait_for_failed_stream(operations, run_id: str, *codes: grpc.StatusCode) -> operations_pb2.Operation:
    deadline = time.monotonic() + 30
    while True:
        done = [op for op in stream_operations(operations, run_id) if op.done]
        if done:
            assert done[0].error.code in [code.value[0] for code in codes], done[0].error
            assert "nothing was applied" in done[0].error.message
            return done[0]
        assert time.monotonic() < deadline, "the broken stream's operation never ended"
        time.sleep(0.05)


def test_streamed_custom_loss_is_exact(server, service, small_messages):
    """forward_backward_custom over data streamed both ways: a loss mixing all sequences
    (variance) still gets its exact gradient (≤ 1e-5 against in-process autograd)."""
    data = many_data(78, count=30)
    tc = trained_run(service)
    model = reference_model(server, tc.model_id, rank=4)
    out = tc.forward_backward_custom(data, variance_loss).result()
    expected, _ = variance_loss(data, [reference_logprobs(model, d) for d in data])
    expected.backward()
    assert relative_error(server_gradients(server, tc.model_id),
                          reference_gradients(model, tc.model_id)) <= 1e-5
    assert out.metrics["loss:sum"] == pytest.approx(expected.item(), rel=1e-5)
