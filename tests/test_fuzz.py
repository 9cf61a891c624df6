"""Fuzzing every RPC of every service with hypothesis: random messages of each
method's request type (fields set or not, extreme numbers, NaN, long and
path-like strings, the real run's id so requests get past the first check)
and randomly mutated bytes. No answer may be UNKNOWN or INTERNAL (the server
never blames itself for a malformed request); afterwards health is SERVING
and a training step succeeds.

Bounded for CI: a fixed time per method (FUZZ_SECONDS_PER_METHOD, about a
minute in all) and derandomized examples, so a run is repeatable. Set
GRADWIRE_FUZZ_SECONDS to fuzz longer."""
from __future__ import annotations

import os
import time

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor as descriptor_module
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradwire
from conftest import server_config
from gradwire_server.server import BackgroundServer
from reference import METHODS, random_data

FUZZ_SECONDS_PER_METHOD = float(os.environ.get("GRADWIRE_FUZZ_SECONDS", "1.5"))
CALL_TIMEOUT_S = 20
NEVER = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
FD = descriptor_module.FieldDescriptor


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    """A server of its own (the fuzz saves, loads, unloads and deletes at random), with a
    short WaitOperation cap, and one run whose id the strategies use."""
    background = BackgroundServer(server_config(max_wait_s=0.5,
                                               checkpoint_dir=tmp_path_factory.mktemp("fuzz-checkpoints")))
    client = gradwire.ServiceClient(base_url=background.address, progress=False)
    run = client.create_lora_training_client("tiny-random", rank=2, seed=0)
    run.forward_backward(random_data(1), "cross_entropy").result()
    run.save_state("saved").result()
    yield background, run.model_id
    client.close()
    background.stop()


# ---- strategies over message descriptors -------------------------------------------------

def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    edges = [v for v in (-1, 0, 1, 2, 255, 2**31 - 1, -2**31, 2**32 - 1, 2**63 - 1, -2**63) if low <= v <= high]
    return st.one_of(st.integers(max(low, 0), min(high, 8)), st.sampled_from(edges), st.integers(low, high))


def _strings(field: FD, run_id: str) -> st.SearchStrategy[str]:
    hints = [run_id, "tiny-random", f"gradwire://{run_id}/weights/saved",
             f"gradwire://{run_id}/sampler_weights/saved", f"operations/{run_id}/1", "../../etc/passwd",
             "cross_entropy", "ppo", "", "x" * 20_000]
    return st.one_of(st.sampled_from(hints), st.text(max_size=12))


def _bytes() -> st.SearchStrategy[bytes]:
    tokens = st.lists(st.integers(-2, 400), max_size=12).map(lambda t: np.asarray(t, "<i4").tobytes())
    return st.one_of(tokens, st.binary(max_size=48))


def _scalar(field: FD, run_id: str) -> st.SearchStrategy:
    kind = field.type
    if kind in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return st.one_of(st.sampled_from([0.0, 1.0, -1.0, 1e-45, 1e308, float("nan"), float("inf")]),
                         st.floats(width=32 if kind == FD.TYPE_FLOAT else 64))
    if kind in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
        return _integers(-2**31, 2**31 - 1)
    if kind in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        return _integers(-2**63, 2**63 - 1)
    if kind in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return _integers(0, 2**32 - 1)
    if kind in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return _integers(0, 2**64 - 1)
    if kind == FD.TYPE_BOOL:
        return st.booleans()
    if kind == FD.TYPE_STRING:
        return _strings(field, run_id)
    if kind == FD.TYPE_BYTES:
        return _bytes()
    if kind == FD.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-3, 9))
    raise AssertionError(f"no strategy for field type {kind}")


@st.composite
def messages(draw, descriptor, run_id: str, depth: int = 0):
    """A message of `descriptor` with a random subset of its fields set."""
    message = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if depth > 3 or not draw(st.booleans()):
            continue
        value = getattr(message, field.name)
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
            for _ in range(draw(st.integers(0, 3))):
                key = draw(_scalar(key_field, run_id))
                if value_field.message_type is not None:
                    value[key].CopyFrom(draw(messages(value_field.message_type, run_id, depth + 1)))
                else:
                    value[key] = draw(_scalar(value_field, run_id))
        elif field.is_repeated:
            for _ in range(draw(st.integers(0, 3))):
                if entry is not None:
                    value.add().CopyFrom(draw(messages(entry, run_id, depth + 1)))
                else:
                    value.append(draw(_scalar(field, run_id)))
        elif entry is not None:
            value.CopyFrom(draw(messages(entry, run_id, depth + 1)))
        else:
            setattr(message, field.name, draw(_scalar(field, run_id)))
    return message


@st.composite
def wire_messages(draw, descriptor, run_id: str) -> bytes:
    """A random message's bytes, sometimes with some bytes flipped, cut or appended."""
    raw = bytearray(draw(messages(descriptor, run_id)).SerializeToString())
    mutation = draw(st.sampled_from(["none", "flip", "cut", "append"]))
    if mutation == "flip" and raw:
        for _ in range(draw(st.integers(1, 4))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    elif mutation == "cut" and raw:
        raw = raw[:draw(st.integers(0, len(raw) - 1))]
    elif mutation == "append":
        raw += draw(st.binary(min_size=1, max_size=8))
    return bytes(raw)


# ---- the fuzz ----------------------------------------------------------------------------

def _call(channel: grpc.Channel, service_name: str, method, frames: list[bytes]) -> grpc.StatusCode:
    """Sends the frames; the status code of the answer (OK when it succeeded)."""
    path = f"/{service_name}/{method.name}"
    kinds = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
             (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    call = kinds[method.client_streaming, method.server_streaming](path)
    request = iter(frames) if method.client_streaming else frames[0]
    try:
        answer = call(request, timeout=CALL_TIMEOUT_S)
        if method.server_streaming:
            for _ in answer:
                answer.cancel()  # one answer is enough: e.g. Health/Watch never ends by itself
                break
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("service_name, method", METHODS, ids=[f"{s}/{m.name}" for s, m in METHODS])
def test_fuzz_never_answers_unknown_or_internal(fuzzed, service_name, method):
    background, run_id = fuzzed
    stop_at = time.monotonic() + FUZZ_SECONDS_PER_METHOD
    frame = wire_messages(method.input_type, run_id)
    frames = st.lists(frame, min_size=1, max_size=4) if method.client_streaming else frame.map(lambda f: [f])

    with grpc.insecure_channel(background.address) as channel:
        @settings(max_examples=200, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(frames)
        def fuzz(sent: list[bytes]) -> None:
            if time.monotonic() > stop_at:
                return
            code = _call(channel, service_name, method, sent)
            assert code not in NEVER, f"{service_name}/{method.name} answered {code.name} to {sent!r:.300}"

        fuzz()


def test_after_the_fuzz_health_is_serving_and_training_works(fuzzed):
    background, _ = fuzzed
    with grpc.insecure_channel(background.address) as channel:
        from grpc_health.v1 import health_pb2_grpc
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    with gradwire.ServiceClient(base_url=background.address, progress=False) as client:
        run = client.create_lora_training_client("tiny-random", rank=2, seed=1)
        out = run.forward_backward(random_data(2), "cross_entropy").result(timeout=120)
        assert np.isfinite(out.metrics["loss:sum"])
        run.optim_step(gradwire.AdamParams(learning_rate=1e-3)).result(timeout=120)
        assert run.get_info().step == 1
