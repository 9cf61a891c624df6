"""The client-streaming protocol (one header, datum batches, one end) as any gRPC
client could get it wrong, and token chunks that are not well-formed text: each is
INVALID_ARGUMENT naming what is wrong, and applies nothing (weights and accumulated
gradients exactly as before; a request queued behind a broken stream is aborted)."""
from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from google.longrunning import operations_pb2

from gradwire import _convert
from gradwire.v1 import datum_pb2
from gradwire.v1 import training_service_pb2 as pb
from reference import (assert_state_equal, finished, new_run, random_data, raw_request, response_or_error,
                       run_state, succeeded, trained_run, wait_for_stream_operation)


def header(run_id: str, seq_id: int = 0) -> pb.ForwardBackwardStreamRequest:
    return pb.ForwardBackwardStreamRequest(header=pb.StreamHeader(model_id=run_id, seq_id=seq_id,
                                                                  loss_fn="cross_entropy"))


def batch(seed: int, count: int = 2) -> pb.ForwardBackwardStreamRequest:
    data = random_data(seed, lengths=(6,) * count)
    return pb.ForwardBackwardStreamRequest(batch=pb.DatumBatch(data=[_convert.datum_to_proto(d) for d in data]))


def end(num_datums: int) -> pb.ForwardBackwardStreamRequest:
    return pb.ForwardBackwardStreamRequest(end=pb.StreamEnd(num_datums=num_datums))


@pytest.fixture()
def protected(server, service):
    """A trained run with accumulated gradients, and its exact state."""
    tc = trained_run(service, seed=31)
    tc.forward_backward(random_data(32), "cross_entropy").result()
    return tc.model_id, run_state(server, tc.model_id)


def rejected(stub, messages) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        stub.ForwardBackwardStream(iter(messages))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    return raised.value


def stream_cases(run_id: str):
    """(case, messages, words in the error)"""
    return [
        ("count too high", [header(run_id), batch(1), batch(2), end(5)],
         "end.num_datums: says 5 datums, the server received 4"),
        ("count too low (a lost message)", [header(run_id), batch(1), batch(2), batch(3), end(4)],
         "end.num_datums: says 4 datums, the server received 6"),
        ("batch before the header", [batch(1), header(run_id), end(2)], "the first message must be a StreamHeader"),
        ("no message at all", [], "the first message must be a StreamHeader"),
        ("header and end only", [header(run_id), end(0)], "the stream held no datum"),
        ("batch after the end", [header(run_id), batch(1), end(2), batch(2)],
         "a stream is one header, datum batches, then one end"),
        ("second header", [header(run_id), batch(1), header(run_id), batch(2), end(4)],
         "a stream is one header, datum batches, then one end"),
        ("second end", [header(run_id), batch(1), end(2), end(2)],
         "a stream is one header, datum batches, then one end"),
    ]


CASE_IDS = [case for case, _, _ in stream_cases("")]


@pytest.mark.parametrize("case", CASE_IDS)
def test_protocol_error_is_invalid_and_applies_nothing(server, stubs, protected, case):
    training, _ = stubs
    run_id, before = protected
    messages, words = next((m, w) for c, m, w in stream_cases(run_id) if c == case)
    error = rejected(training, messages)
    assert words in error.details()
    assert_state_equal(before, run_state(server, run_id))
    # The run keeps working (once the failed stream's operation has ended: a request sent
    # before that can still be queued behind it and aborted).
    _wait_until_all_done(stubs[1], run_id)
    succeeded(stubs[1], training.ForwardBackward(raw_request(run_id, 0, random_data(33))).name)


def test_a_count_mismatch_aborts_the_step_queued_behind_the_stream(server, stubs):
    """The optim_step submitted while the stream is still open (queued behind it) is
    ABORTED when the stream's count does not match: no step on a partial gradient."""
    training, operations = stubs
    run_id = new_run(training, rank=4, seed=3)
    succeeded(operations, training.ForwardBackward(raw_request(run_id, 1, random_data(34))).name)
    before = run_state(server, run_id)
    go = threading.Event()

    def messages():
        yield header(run_id, seq_id=2)
        yield batch(5, count=3)
        go.wait(30)
        yield end(4)

    outcome: list = []
    streaming = threading.Thread(
        target=lambda: outcome.append(response_or_error(training.ForwardBackwardStream, messages())))
    streaming.start()
    stream_op = wait_for_stream_operation(operations, run_id, received=3)
    step = training.OptimStep(pb.OptimStepRequest(model_id=run_id, seq_id=3,
                                                  adam_params=pb.AdamParams(learning_rate=1e-2)))
    go.set()
    streaming.join(60)
    assert isinstance(outcome[0], grpc.RpcError) and outcome[0].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "end.num_datums" in outcome[0].details()
    assert finished(operations, stream_op).error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert finished(operations, step.name).error.code == grpc.StatusCode.ABORTED.value[0]
    assert_state_equal(before, run_state(server, run_id))
    assert training.GetInfo(pb.GetInfoRequest(model_id=run_id)).step == 0


def _wait_until_all_done(operations, run_id: str) -> None:
    deadline = time.monotonic() + 30
    while not all(op.done for op in operations.ListOperations(operations_pb2.ListOperationsRequest(
            name=f"operations/{run_id}/")).operations):
        assert time.monotonic() < deadline, "an operation of the run never ended"
        time.sleep(0.02)


# ---- chunks that are not well-formed text ----------------------------------------------------------

def good_datum(seed: int) -> datum_pb2.Datum:
    return _convert.datum_to_proto(random_data(seed, lengths=(4,))[0])


def with_chunk(chunk: datum_pb2.Chunk, seed: int = 40) -> datum_pb2.Datum:
    """A good 4-token datum whose model input gets `chunk` appended as its second chunk
    (whose targets then no longer matter: validation stops at the chunk)."""
    datum = good_datum(seed)
    datum.model_input.append(chunk)
    return datum


CHUNK_CASES = [
    ("image chunk", datum_pb2.Chunk(image=datum_pb2.ImageChunk(data=b"\x89PNG", format="png")),
     "data[1].model_input[1]", "image chunks are not supported by text models"),
    ("empty chunk", datum_pb2.Chunk(), "data[1].model_input[1]", "empty chunks are not supported"),
    ("tokens not a multiple of 4 bytes",
     datum_pb2.Chunk(encoded_text=datum_pb2.EncodedTextChunk(tokens=b"\x01\x00\x00\x00\x02\x00")),
     "data[1].model_input[1].encoded_text", "6 bytes, not a multiple of 4"),
    ("tokens and token_ids both set",
     datum_pb2.Chunk(encoded_text=datum_pb2.EncodedTextChunk(tokens=b"\x01\x00\x00\x00", token_ids=[1])),
     "data[1].model_input[1].encoded_text", "set either tokens or token_ids, not both"),
]


@pytest.mark.parametrize("case, chunk, field, words", CHUNK_CASES, ids=[c[0] for c in CHUNK_CASES])
@pytest.mark.parametrize("streamed", [False, True], ids=["unary", "stream"])
def test_malformed_chunk_is_invalid_and_applies_nothing(server, stubs, protected, case, chunk, field, words,
                                                       streamed):
    """Datum 1 of the request (datum 2 of a stream: the first of its second message) carries the chunk."""
    training, _ = stubs
    run_id, before = protected
    bad = with_chunk(chunk)
    if streamed:
        first = pb.ForwardBackwardStreamRequest(batch=pb.DatumBatch(data=[good_datum(41), good_datum(45)]))
        second = pb.ForwardBackwardStreamRequest(batch=pb.DatumBatch(data=[bad, good_datum(42)]))
        field = field.replace("data[1]", "data[2]")  # its index in the whole stream
        error = rejected(training, [header(run_id), first, second, end(4)])
    else:
        request = pb.ForwardBackwardRequest(model_id=run_id, loss_fn="cross_entropy",
                                            data=[good_datum(41), bad, good_datum(42)])
        with pytest.raises(grpc.RpcError) as raised:
            training.ForwardBackward(request)
        error = raised.value
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{field}: " in error.details() and words in error.details(), error.details()
    assert_state_equal(before, run_state(server, run_id))


def test_readable_token_ids_equal_packed_tokens(server, service, stubs):
    """The hand-typed form (token_ids) and the packed form give the same logprobs."""
    training, operations = stubs
    run_id = trained_run(service, seed=35).model_id
    tokens = np.array([5, 9, 300, 2, 77], dtype=np.int64)
    outputs = []
    for chunk in (datum_pb2.EncodedTextChunk(token_ids=tokens.tolist()),
                  datum_pb2.EncodedTextChunk(tokens=tokens.astype("<i4").tobytes())):
        datum = good_datum(43)
        del datum.model_input[:]
        datum.model_input.append(datum_pb2.Chunk(encoded_text=chunk))
        datum.loss_fn_inputs["target_tokens"].CopyFrom(_convert.datum_to_proto(random_data(44, lengths=(5,))[0])
                                                       .loss_fn_inputs["target_tokens"])
        del datum.loss_fn_inputs["weights"]
        done = succeeded(operations, training.Forward(pb.ForwardBackwardRequest(
            model_id=run_id, loss_fn="cross_entropy", data=[datum])).name)
        output = pb.ForwardBackwardOutput()
        done.response.Unpack(output)
        outputs.append(output.loss_fn_outputs[0])
    assert outputs[0] == outputs[1]
