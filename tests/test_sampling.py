"""SamplingService and SamplingClient: determinism, exactness against in-process
PyTorch on the same weights, agreement with training-side logprobs, stops,
streaming, and bad input that is rejected without touching any training run."""
from __future__ import annotations

import asyncio
import base64
import json
import multiprocessing
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from google.longrunning import operations_pb2, operations_pb2_grpc

import gradwire
from gradwire.v1 import codec
from gradwire.v1 import sampling_service_pb2 as pb
from gradwire.v1 import sampling_service_pb2_grpc as pb_grpc
from gradwire_server import checkpoints
from gradwire_server.models import tiny_random_tokenizer
from reference import (assert_state_equal, greedy_reference, random_data, reference_base_model, reference_model,
                       run_state, sequence_logprobs, trained_run)
from test_grpcurl import grpcurl

PROMPT = [72, 101, 108, 108, 111, 44, 32]
RANK = 4


def prompt_input(tokens=PROMPT) -> gradwire.ModelInput:
    return gradwire.ModelInput.from_ints(tokens)


@pytest.fixture(scope="module")
def trained(server, service):
    """(training client, model_path) of a trained run saved as sampler weights."""
    tc = trained_run(service, rank=RANK, seed=1)
    return tc, tc.save_weights_for_sampler("step1").result().path


@pytest.fixture(scope="module")
def base_sampler(service):
    return service.create_sampling_client(base_model="tiny-random")


@pytest.fixture(scope="module")
def base_model(server):
    """The server's base model, rebuilt in-process on its device and in its dtype."""
    return reference_base_model(server)


def sample(client, num_samples=1, prompt=PROMPT, **params) -> gradwire.SampleResponse:
    return client.sample(prompt_input(prompt), num_samples, gradwire.SamplingParams(**params)).result()


# ---- determinism and exactness --------------------------------------------------------------------

def test_same_seed_same_tokens_and_other_seeds_differ(base_sampler):
    first = sample(base_sampler, 3, max_tokens=12, seed=7)
    again = sample(base_sampler, 3, max_tokens=12, seed=7)
    other = sample(base_sampler, 3, max_tokens=12, seed=8)
    assert [s.tokens for s in first.sequences] == [s.tokens for s in again.sequences]
    assert [s.logprobs for s in first.sequences] == [s.logprobs for s in again.sequences]
    assert [s.tokens for s in first.sequences] != [s.tokens for s in other.sequences]
    assert len({tuple(s.tokens) for s in first.sequences}) == 3  # the samples of one request differ
    assert all(len(s.tokens) == 12 and s.stop_reason == "length" for s in first.sequences)


def test_greedy_and_top_k_1_equal_reference_argmax(base_sampler, base_model):
    expected = greedy_reference(base_model, PROMPT, 20)
    greedy = sample(base_sampler, 2, max_tokens=20, temperature=0.0)
    top1 = sample(base_sampler, 1, max_tokens=20, seed=3, top_k=1)
    assert [s.tokens for s in greedy.sequences] == [expected, expected]
    assert top1.sequences[0].tokens == expected


def test_greedy_with_trained_adapter_equals_reference(server, service, trained):
    tc, model_path = trained
    expected = greedy_reference(reference_model(server, tc.model_id, RANK), PROMPT, 20)
    sampler = service.create_sampling_client(model_path=model_path)
    assert sample(sampler, 1, max_tokens=20, temperature=0.0).sequences[0].tokens == expected


@pytest.mark.parametrize("adapter", ["base", "trained"])
@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.7, top_k=20, top_p=0.9),
                                    dict(temperature=1.0, stop=list(range(0, 320, 6)))],
                         ids=["plain", "tempered", "early stops"])
def test_sampled_logprobs_equal_training_forward(service, trained, adapter, params):
    """The sampler's logprob of each token equals forward's logprob of the same
    tokens on a run with the same weights (a fresh run's adapter is zero: the base)."""
    if adapter == "base":
        tc = service.create_lora_training_client("tiny-random", rank=RANK, seed=5)
        sampler = service.create_sampling_client(base_model="tiny-random")
    else:
        tc, model_path = trained
        sampler = service.create_sampling_client(model_path=model_path)
    response = sample(sampler, 4, max_tokens=12, seed=11, **params)
    if "stop" in params:  # samples leave the batch at different steps
        assert len({len(s.tokens) for s in response.sequences}) > 1
    data = []
    for sequence in response.sequences:
        ids = PROMPT + sequence.tokens
        data.append(gradwire.Datum(model_input=prompt_input(ids[:-1]),
                                   loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)}))
    out = tc.forward(data, "cross_entropy").result()
    for sequence, output in zip(response.sequences, out.loss_fn_outputs):
        trained_side = output["logprobs"].to_numpy()[len(PROMPT) - 1:]
        np.testing.assert_allclose(sequence.logprobs, trained_side, rtol=0, atol=1e-4)


def test_prompt_logprobs_and_topk_equal_reference(server, service, trained):
    tc, model_path = trained
    sampler = service.create_sampling_client(model_path=model_path)
    response = sampler.sample(prompt_input(), 1, gradwire.SamplingParams(max_tokens=1, seed=0),
                              include_prompt_logprobs=True, topk_prompt_logprobs=3).result()
    logprobs = sequence_logprobs(reference_model(server, tc.model_id, RANK), PROMPT)[:-1]
    expected = logprobs.gather(-1, torch.tensor(PROMPT[1:])[:, None])[:, 0].numpy()
    assert response.prompt_logprobs[0] is None
    np.testing.assert_allclose(response.prompt_logprobs[1:], expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(sampler.compute_logprobs(prompt_input()).result()[1:], expected, rtol=0, atol=1e-5)
    top = torch.topk(logprobs, 3, dim=-1)
    assert response.topk_prompt_logprobs[0] is None
    assert [[t for t, _ in row] for row in response.topk_prompt_logprobs[1:]] == top.indices.tolist()
    np.testing.assert_allclose([[v for _, v in row] for row in response.topk_prompt_logprobs[1:]],
                               top.values.numpy(), rtol=0, atol=1e-5)


# ---- stops ------------------------------------------------------------------------------------------

def test_stop_token_stop_string_and_length(base_sampler, base_model):
    greedy = greedy_reference(base_model, PROMPT, 24)
    stop_token = greedy[5]
    by_token = sample(base_sampler, 1, max_tokens=24, temperature=0.0, stop=[stop_token]).sequences[0]
    assert by_token.stop_reason == "stop"
    assert by_token.tokens == greedy[:greedy.index(stop_token) + 1]
    assert sample(base_sampler, 1, max_tokens=24, temperature=0.0,
                  stop=np.array([stop_token])).sequences[0] == by_token  # a numpy array of ids, too

    tokenizer = tiny_random_tokenizer()
    text = tokenizer.decode(greedy)
    stop_string = text[len(text) // 2:len(text) // 2 + 2]
    assert len(stop_string) == 2
    end = next(j for j in range(len(greedy)) if stop_string in tokenizer.decode(greedy[:j + 1]))
    by_string = sample(base_sampler, 1, max_tokens=24, temperature=0.0, stop=stop_string).sequences[0]
    assert by_string.stop_reason == "stop"
    assert by_string.tokens == greedy[:end + 1]

    never = sample(base_sampler, 1, max_tokens=6, temperature=0.0, stop=["\x00never\x00"]).sequences[0]
    assert never.stop_reason == "length" and never.tokens == greedy[:6]


def test_stop_strings_are_matched_in_the_text_without_special_tokens(base_sampler):
    """As vLLM's samplers: "<|im_end|>" and "<|im_start|>", special tokens these samples
    draw, hold none of the stop strings' characters. Each sample ends at the first token whose
    completion, decoded without special tokens, holds a stop string (the same seed draws the
    same tokens up to there). A stop string that is a special token's text stops at that
    token (one that holds a special token among other text, which could never match, is
    refused: BAD_PARAMS)."""
    tokenizer = tiny_random_tokenizer()
    prompt = tokenizer.encode("Hello")
    free = sample(base_sampler, 4, prompt, max_tokens=30, seed=7).sequences
    stops = ["|", "<", "e"]
    stopped = sample(base_sampler, 4, prompt, max_tokens=30, seed=7, stop=stops).sequences
    special_before_the_end = False
    for free_sequence, sequence in zip(free, stopped):
        tokens = free_sequence.tokens
        end = next((j + 1 for j in range(len(tokens))
                    if any(stop in tokenizer.decode(tokens[:j + 1], skip_special_tokens=True) for stop in stops)),
                   None)
        assert sequence.tokens == tokens[:end]
        assert sequence.stop_reason == ("length" if end is None else "stop")
        special_before_the_end |= bool(set(tokens[:end]) & set(tokenizer.all_special_ids))
    assert special_before_the_end  # (else this test tests nothing)

    # A stop string that is a special token's text ends a sample at that token, as its id does.
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    by_text = sample(base_sampler, 4, prompt, max_tokens=30, seed=7, stop=["<|im_end|>", "\x00never"]).sequences
    assert [s.tokens for s in by_text] == [
        s.tokens[:s.tokens.index(im_end) + 1] if im_end in s.tokens else s.tokens for s in free]
    assert any(s.stop_reason == "stop" for s in by_text)


# ---- streaming ----------------------------------------------------------------------------------------

def test_stream_yields_the_tokens_of_sample(service, trained):
    _, model_path = trained
    sampler = service.create_sampling_client(model_path=model_path)
    params = gradwire.SamplingParams(max_tokens=150, seed=21, stop=[7, 9, 11])
    expected = sampler.sample(prompt_input(), 3, params).result().sequences
    tokens, logprobs, reasons, pieces = [[], [], []], [[], [], []], [None] * 3, 0
    for piece in sampler.sample_stream(prompt_input(), 3, params):
        assert reasons[piece.sequence_index] is None  # nothing after a sample's last piece
        tokens[piece.sequence_index] += piece.tokens
        logprobs[piece.sequence_index] += piece.logprobs
        reasons[piece.sequence_index] = piece.stop_reason
        pieces += 1
    assert tokens == [s.tokens for s in expected]
    assert logprobs == [s.logprobs for s in expected]
    assert reasons == [s.stop_reason for s in expected]
    assert pieces > 3  # several decode turns, not one final message


def test_stream_sends_prompt_scores_first(server):
    channel = grpc.insecure_channel(server.address)
    stub = pb_grpc.SamplingServiceStub(channel)
    request = pb.SampleRequest(base_model="tiny-random", prompt=[codec.tokens_to_chunk(np.array(PROMPT))],
                               sampling_params=pb.SamplingParams(max_tokens=20, seed=3),
                               include_prompt_logprobs=True, topk_prompt_logprobs=2)
    messages = list(stub.SampleStream(request))
    operations = operations_pb2_grpc.OperationsStub(channel)
    done = operations.WaitOperation(operations_pb2.WaitOperationRequest(name=stub.Sample(request).name))
    operations.DeleteOperation(operations_pb2.DeleteOperationRequest(name=done.name))
    unary = pb.SampleResponse()
    done.response.Unpack(unary)
    assert messages[0].prompt_logprobs == unary.prompt_logprobs
    assert messages[0].topk_prompt_logprobs == unary.topk_prompt_logprobs
    assert not any(m.HasField("prompt_logprobs") for m in messages[1:])
    assert b"".join(p.tokens for m in messages for p in m.samples) == unary.sequences[0].tokens
    channel.close()


def assert_sampling_dropped(server, operations_before: list[str]) -> None:
    """Waits (30 s at most) until no sampling job is queued and only `operations_before` remain."""
    def sampling_left():
        queued = [key for key in server.server.scheduler._ready if key.startswith("operations/sampling/")]
        return queued, server.server.store.names("operations/sampling/")

    deadline = time.monotonic() + 30
    while sampling_left() != ([], operations_before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sampling_left() == ([], operations_before)


def test_leaving_a_stream_ends_it_on_the_server(server, base_sampler):
    """Closing the iterator cancels the call; the server drops the job and its operation."""
    operations_before = server.server.store.names("operations/sampling/")
    pieces = base_sampler.sample_stream(prompt_input(), 2, gradwire.SamplingParams(max_tokens=1000, seed=1))
    first = next(pieces)
    assert first.tokens and first.stop_reason is None
    pieces.close()
    assert_sampling_dropped(server, operations_before)


def test_cancelling_an_async_stream_ends_it_on_the_server(server, base_sampler):
    """A task reading sample_stream_async that is cancelled while its thread waits inside the
    stream ends with the cancellation, not an error of its own, and the server drops the job and
    its operation; the sampler serves the next request."""
    operations_before = server.server.store.names("operations/sampling/")
    first_piece, hold = asyncio.Event(), threading.Event()

    async def read_all() -> None:
        async for _ in base_sampler.sample_stream_async(prompt_input(), 2,
                                                        gradwire.SamplingParams(max_tokens=1000, seed=1)):
            first_piece.set()

    async def impatient() -> None:
        reading = asyncio.create_task(read_all())
        await first_piece.wait()
        # The worker held: no piece comes, so the reader's thread waits inside the stream.
        threading.Thread(target=server.call, args=(lambda: hold.wait(30),), daemon=True).start()
        await asyncio.sleep(1.0)
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
    try:
        asyncio.run(impatient())
    finally:
        hold.set()
    assert_sampling_dropped(server, operations_before)
    assert sample(base_sampler, 1, max_tokens=4).sequences[0].tokens


def test_async_twins_and_client_futures(service, base_sampler):
    async def run():
        sampler = await service.create_sampling_client_async(base_model="tiny-random")
        assert await sampler is sampler and sampler.result() is sampler
        # One await gives the value, as in Tinker (training twins give the future: double await).
        response = await sampler.sample_async(prompt_input(), 2, gradwire.SamplingParams(max_tokens=5, seed=4))
        logprobs = await sampler.compute_logprobs_async(prompt_input())
        streamed = [piece async for piece in sampler.sample_stream_async(
            prompt_input(), 2, gradwire.SamplingParams(max_tokens=5, seed=4))]
        return response, logprobs, streamed

    response, logprobs, streamed = asyncio.run(run())
    assert response == sample(base_sampler, 2, max_tokens=5, seed=4)
    assert logprobs == base_sampler.compute_logprobs(prompt_input()).result()
    assert [[t for piece in streamed if piece.sequence_index == i for t in piece.tokens] for i in (0, 1)] \
        == [s.tokens for s in response.sequences]
    assert base_sampler.get_tokenizer().decode([72, 105]) == "Hi"


def test_sample_is_a_long_running_operation(server):
    """Sample answers with an Operation that Operations.Get / Wait / Delete serve; a retry
    (the same request_id) gets it again, the request_id with other fields is refused."""
    channel = grpc.insecure_channel(server.address)
    operations = operations_pb2_grpc.OperationsStub(channel)
    request = pb.SampleRequest(base_model="tiny-random", prompt=[codec.tokens_to_chunk(np.array(PROMPT))],
                               sampling_params=pb.SamplingParams(max_tokens=4, temperature=0.0),
                               request_id="retried-sample")
    operation = pb_grpc.SamplingServiceStub(channel).Sample(request)
    assert operation.name.startswith("operations/sampling/")
    assert pb_grpc.SamplingServiceStub(channel).Sample(request).name == operation.name  # a retry (AIP-155)
    done = operations.WaitOperation(operations_pb2.WaitOperationRequest(name=operation.name))
    assert done.done and operations.GetOperation(operations_pb2.GetOperationRequest(name=operation.name)).done
    response = pb.SampleResponse()
    done.response.Unpack(response)
    assert np.frombuffer(response.sequences[0].tokens, "<i4").tolist() == greedy_reference(
        reference_base_model(server), PROMPT, 4)
    sampling_operations = server.server.store.names("operations/sampling/")
    for other in (pb.SampleRequest(base_model="tiny-random", prompt=request.prompt, request_id="retried-sample",
                                   sampling_params=pb.SamplingParams(max_tokens=5, temperature=0.0)),
                  pb.ComputeLogprobsRequest(base_model="tiny-random", prompt=request.prompt,
                                            request_id="retried-sample")):
        rpc = getattr(pb_grpc.SamplingServiceStub(channel), type(other).__name__.removesuffix("Request"))
        with pytest.raises(grpc.RpcError) as reused:  # not a retry: it would get the first one's result
            rpc(other)
        assert reused.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert f"request_id 'retried-sample' was sent before with other fields ({operation.name})" \
            in reused.value.details()
    assert server.server.store.names("operations/sampling/") == sampling_operations  # nothing was started
    operations.DeleteOperation(operations_pb2.DeleteOperationRequest(name=operation.name))
    with pytest.raises(grpc.RpcError) as raised:
        operations.GetOperation(operations_pb2.GetOperationRequest(name=operation.name))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    # Its operation is gone: the request_id is free again.
    assert pb_grpc.SamplingServiceStub(channel).ComputeLogprobs(other).name != operation.name
    channel.close()


def test_sample_stream_typed_into_grpcurl(cli_server, base_model):
    """Reflection lists SamplingService, and a hand-typed SampleStream streams the greedy tokens."""
    assert "gradwire.v1.SamplingService" in grpcurl(cli_server, "list").stdout.split()
    result = grpcurl(cli_server, "gradwire.v1.SamplingService/SampleStream", data={
        "base_model": "tiny-random", "prompt": [{"encoded_text": {"token_ids": PROMPT}}], "num_samples": 2,
        "sampling_params": {"max_tokens": 100, "temperature": 0}})
    assert result.returncode == 0, result.stderr
    decoder, text, messages = json.JSONDecoder(), result.stdout.strip(), []
    while text:
        message, end = decoder.raw_decode(text)
        messages.append(message)
        text = text[end:].strip()
    assert len(messages) > 1
    tokens = {0: [], 1: []}
    for message in messages:
        for piece in message["samples"]:
            tokens[piece.get("sequenceIndex", piece.get("sequence_index", 0))] += np.frombuffer(
                base64.b64decode(piece.get("tokens", "")), "<i4").tolist()
    expected = greedy_reference(base_model, PROMPT, 100)
    assert tokens == {0: expected, 1: expected}


def test_training_interleaves_with_a_long_sample_which_can_be_cancelled(server, service):
    """A training request submitted during a long generation runs between its
    decode turns instead of waiting for it; CancelOperation stops the generation."""
    tc = service.create_lora_training_client("tiny-random", rank=RANK, seed=6)
    channel = grpc.insecure_channel(server.address)
    operations = operations_pb2_grpc.OperationsStub(channel)
    request = pb.SampleRequest(base_model="tiny-random", prompt=[codec.tokens_to_chunk(np.array(PROMPT))],
                               num_samples=8, sampling_params=pb.SamplingParams(max_tokens=1000, seed=0))
    name = pb_grpc.SamplingServiceStub(channel).Sample(request).name
    tc.forward(random_data(7), "cross_entropy").result()
    assert not operations.GetOperation(operations_pb2.GetOperationRequest(name=name)).done
    operations.CancelOperation(operations_pb2.CancelOperationRequest(name=name))
    done = operations.WaitOperation(operations_pb2.WaitOperationRequest(name=name))
    assert done.done and done.error.code == grpc.StatusCode.CANCELLED.value[0]
    operations.DeleteOperation(operations_pb2.DeleteOperationRequest(name=name))
    channel.close()


# ---- training is left alone -----------------------------------------------------------------------------

def _training_view(server, run_id: str):
    """The run's weights/grads, the active adapter, every requires_grad flag and the global RNG."""
    def read():
        model = server.engine.peft_model
        return (model.active_adapter, {n: p.requires_grad for n, p in model.named_parameters()},
                torch.get_rng_state())
    return run_state(server, run_id), *server.call(read)


def _assert_training_view_equal(before, after) -> None:
    assert_state_equal(before[0], after[0])
    assert before[1] == after[1], "active adapter changed"
    # Sampler adapters come and go (loaded, or evicted from the adapter cache) meanwhile.
    both = before[2].keys() & after[2].keys()
    assert {n: after[2][n] for n in both} == {n: before[2][n] for n in both}, "requires_grad changed"
    assert torch.equal(before[3], after[3]), "global RNG changed"


def test_sampling_leaves_training_runs_untouched(server, service, trained):
    _, model_path = trained
    tc = trained_run(service, rank=RANK, seed=2)
    tc.forward_backward(random_data(3), "cross_entropy").result()  # accumulated gradients to protect
    other_path = tc.save_weights_for_sampler("untouched").result().path
    # A run created after the active one: its parameters require grad while inactive.
    service.create_lora_training_client("tiny-random", rank=RANK, seed=3)
    before = _training_view(server, tc.model_id)
    for path in (model_path, other_path):
        sample(service.create_sampling_client(model_path=path), 2, max_tokens=20, seed=1)
    sample(service.create_sampling_client(base_model="tiny-random"), 2, max_tokens=20, seed=1)
    _assert_training_view_equal(before, _training_view(server, tc.model_id))


def test_adapter_cache_evicts_least_recently_used(server, service):
    """Six checkpoints of different weights through a cache of four, while a long
    generation from the first one is running: it survives its adapter's eviction
    and gives the tokens it gives alone, and every sampler scores with its own
    checkpoint's weights (the run's forward logprobs when it was saved)."""
    tc = trained_run(service, rank=RANK, seed=5)
    tokens = PROMPT + [5, 9, 33]
    datum = gradwire.Datum(model_input=gradwire.ModelInput.from_ints(tokens[:-1]),
                           loss_fn_inputs={"target_tokens": tokens[1:]})
    paths, expected = [], []
    for i in range(6):
        paths.append(tc.save_weights_for_sampler(f"lru{i}").result().path)
        expected.append(tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy())
        tc.forward_backward(random_data(20 + i), "cross_entropy")
        tc.optim_step(gradwire.AdamParams(learning_rate=1e-2))
    samplers = [service.create_sampling_client(model_path=path) for path in paths]
    params = gradwire.SamplingParams(max_tokens=150, seed=2)
    alone = samplers[0].sample(prompt_input(), 1, params).result()
    long_one = samplers[0].sample(prompt_input(), 1, params)
    scored = [s.compute_logprobs(prompt_input(tokens)) for s in samplers[1:]]
    assert long_one.result() == alone
    for i, future in enumerate(scored, start=1):
        assert np.abs(expected[i] - expected[i - 1]).max() > 1e-3  # the checkpoints differ
        np.testing.assert_allclose(np.array(future.result()[1:]), expected[i], atol=1e-4)
    loaded = server.call(lambda: [n for n in server.engine.peft_model.peft_config if n.startswith("sampler-")])
    assert len(loaded) == server.server.sampling.adapters.capacity


# ---- bad input -------------------------------------------------------------------------------------------

BAD_PARAMS = [
    ("max_tokens zero", 1, PROMPT, dict(max_tokens=0), "sampling_params.max_tokens", "must be >= 1"),
    ("top_p zero", 1, PROMPT, dict(max_tokens=4, top_p=0.0), "sampling_params.top_p", "(0, 1]"),
    ("top_p above one", 1, PROMPT, dict(max_tokens=4, top_p=1.5), "sampling_params.top_p", "(0, 1]"),
    ("negative temperature", 1, PROMPT, dict(max_tokens=4, temperature=-0.5), "sampling_params.temperature",
     ">= 0"),
    ("no samples", 0, PROMPT, dict(max_tokens=4), "num_samples", "must be in [1, 256]"),
    ("too many samples", 257, PROMPT, dict(max_tokens=1), "num_samples", "must be in [1, 256]"),
    ("past the context", 1, [1] * 1000, dict(max_tokens=25), "sampling_params.max_tokens", "context of 1024"),
    ("prompt fills the context", 1, [1] * 1024, dict(max_tokens=1), "prompt", "no room"),
    ("prompt token outside vocab", 1, [1, 320, 2], dict(max_tokens=4), "prompt", "outside the vocabulary"),
    ("stop token outside vocab", 1, PROMPT, dict(max_tokens=4, stop=[5, -1]), "sampling_params.stop_tokens.tokens",
     "outside the vocabulary"),
    ("empty prompt", 1, [], dict(max_tokens=4), "prompt", "empty"),
    ("stop string holding a special token", 1, PROMPT, dict(max_tokens=4, stop=["e", "ok<|im_end|>"]),
     "sampling_params.stop_strs.strings[1]", "holds the special token '<|im_end|>' among other text"),
    ("too many stop strings", 1, PROMPT, dict(max_tokens=4, stop=[f"s{i}" for i in range(65)]),
     "sampling_params.stop_strs.strings", "has 65 stop strings, at most 64"),
    ("stop string too long", 1, PROMPT, dict(max_tokens=4, stop=["e", "x" * 257]),
     "sampling_params.stop_strs.strings[1]", "has 257 characters, at most 256"),
]


@pytest.mark.parametrize("case, num_samples, prompt, params, field, words", BAD_PARAMS,
                         ids=[c[0] for c in BAD_PARAMS])
def test_bad_sample_is_rejected_and_changes_nothing(server, service, trained, case, num_samples, prompt,
                                                    params, field, words):
    tc, model_path = trained
    tc.forward_backward(random_data(4), "cross_entropy").result()
    before = _training_view(server, tc.model_id)
    sampler = service.create_sampling_client(model_path=model_path)
    with pytest.raises(gradwire.BadRequestError) as raised:
        sample(sampler, num_samples, prompt, **params)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in str(raised.value) and words in str(raised.value)
    _assert_training_view_equal(before, _training_view(server, tc.model_id))
    tc.optim_step(gradwire.AdamParams(learning_rate=1e-3)).result()  # clears the gradients for the next case


@pytest.mark.parametrize("model, error, field", [
    (dict(model_path="gradwire://run-nope/sampler_weights/missing"), gradwire.NotFoundError, "model_path"),
    (dict(model_path="gradwire://../sampler_weights/x"), gradwire.BadRequestError, "model_path"),
    (dict(model_path="gradwire://run-1/weights/x"), gradwire.BadRequestError, "model_path"),
    (dict(base_model="no-such-model"), gradwire.NotFoundError, "base_model"),
], ids=["missing checkpoint", "path escape", "not sampler weights", "unknown base model"])
def test_unknown_weights_are_rejected(service, model, error, field):
    sampler = service.create_sampling_client(**model)
    with pytest.raises(error) as raised:
        sample(sampler, 1, max_tokens=4)
    assert field in str(raised.value)
    if "base_model" in model:
        assert str(raised.value).endswith("base_model 'no-such-model' not found (this server serves 'tiny-random')")
    with pytest.raises(error):
        sampler.compute_logprobs(prompt_input()).result()


@pytest.mark.parametrize("prompt, words", [([], "empty"), ([1] * 1025, "context of 1024"),
                                           ([3, 400], "outside the vocabulary")])
def test_bad_compute_logprobs_prompt(base_sampler, prompt, words):
    with pytest.raises(gradwire.BadRequestError) as raised:
        base_sampler.compute_logprobs(prompt_input(prompt)).result()
    assert "prompt" in str(raised.value) and words in str(raised.value)


def test_damaged_adapter_file_fails_the_operation(server, service, trained):
    tc, _ = trained
    path = tc.save_weights_for_sampler("broken").result().path
    adapter = checkpoints.checkpoint_directory(server.server.checkpoint_root, path) / "adapter_model.safetensors"
    before = _training_view(server, tc.model_id)
    adapter.write_bytes(adapter.read_bytes()[:100])
    with pytest.raises(gradwire.GradwireError) as raised:
        sample(service.create_sampling_client(model_path=path), 1, max_tokens=4)
    assert path in str(raised.value) and "adapter_model.safetensors" in str(raised.value)
    _assert_training_view_equal(before, _training_view(server, tc.model_id))


def test_prompt_logprobs_last_n_without_prompt_scores_is_refused_and_changes_nothing(server, service, trained):
    """It would be ignored: the response has no prompt scores to cut (with them:
    test_tinker_surface.py). As BAD_PARAMS: no sampling operation, the run untouched."""
    tc, model_path = trained
    tc.forward_backward(random_data(4), "cross_entropy").result()
    before, operations = _training_view(server, tc.model_id), server.server.store.names("operations/sampling/")
    with pytest.raises(gradwire.BadRequestError, match="prompt_logprobs_last_n: scores nothing without"):
        service.create_sampling_client(model_path=model_path).sample(
            prompt_input(PROMPT), 1, gradwire.SamplingParams(max_tokens=2), prompt_logprobs_last_n=2).result()
    assert server.server.store.names("operations/sampling/") == operations
    _assert_training_view_equal(before, _training_view(server, tc.model_id))
    tc.optim_step(gradwire.AdamParams(learning_rate=1e-3)).result()  # clears the gradients


def test_topk_prompt_logprobs_limit(base_sampler):
    with pytest.raises(gradwire.BadRequestError, match="topk_prompt_logprobs"):
        base_sampler.sample(prompt_input(), 1, gradwire.SamplingParams(max_tokens=1),
                            topk_prompt_logprobs=21).result()


def test_save_weights_and_get_sampling_client_samples_the_current_weights(service):
    """The sampler sees the run's weights at the moment of saving: its prompt logprobs
    equal the run's forward logprobs then, and no longer after another step."""
    tc = trained_run(service, rank=RANK, seed=4)
    tokens = PROMPT + [5, 9, 33]
    datum = gradwire.Datum(model_input=gradwire.ModelInput.from_ints(tokens[:-1]),
                           loss_fn_inputs={"target_tokens": tokens[1:]})
    sampler = tc.save_weights_and_get_sampling_client()
    training = tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    tc.forward_backward([datum], "cross_entropy")
    tc.optim_step(gradwire.AdamParams(learning_rate=1e-2)).result()
    sampled = np.array(sampler.compute_logprobs(prompt_input(tokens)).result()[1:])
    np.testing.assert_allclose(sampled, training, atol=1e-4)
    stepped = tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    assert np.abs(stepped - training).max() > 1e-3
    assert sample(sampler, 2, max_tokens=5, seed=0).sequences[1].tokens


def test_a_path_saved_again_after_delete_serves_the_new_weights(service):
    """The adapter cache is keyed by the checkpoint file's sha256: a path deleted and
    saved again with other weights is never served from the stale cached adapter."""
    tc = trained_run(service, rank=RANK, seed=6)
    tokens = PROMPT + [5, 9, 33]
    datum = gradwire.Datum(model_input=gradwire.ModelInput.from_ints(tokens[:-1]),
                           loss_fn_inputs={"target_tokens": tokens[1:]})
    path = tc.save_weights_for_sampler("again").result().path
    sampler = service.create_sampling_client(model_path=path)
    first = np.array(sampler.compute_logprobs(prompt_input(tokens)).result()[1:])
    service.create_rest_client().delete_checkpoint_from_tinker_path(path).result()
    tc.forward_backward(random_data(30), "cross_entropy")
    tc.optim_step(gradwire.AdamParams(learning_rate=1e-2))
    assert tc.save_weights_for_sampler("again").result().path == path
    expected = tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    assert np.abs(expected - first).max() > 1e-3
    np.testing.assert_allclose(np.array(sampler.compute_logprobs(prompt_input(tokens)).result()[1:]),
                               expected, atol=1e-4)


def seeded_tokens(sampler: gradwire.SamplingClient) -> list[list[int]]:
    """Two seeded samples of PROMPT (module level: a spawned process calls it too)."""
    response = sampler.sample(prompt_input(), 2, gradwire.SamplingParams(max_tokens=6, seed=3)).result(60)
    return [sequence.tokens for sequence in response.sequences]


def test_a_sampling_client_pickles_into_another_process(service, base_sampler, trained):
    """As Tinker's, a SamplingClient pickles, to hand to worker processes: in a spawned process
    the copies of a base-model client, a checkpoint's and an ephemeral snapshot's (its original
    alive here) sample exactly what the originals do."""
    tc, path = trained
    samplers = [base_sampler, service.create_sampling_client(model_path=path),
                tc.save_weights_and_get_sampling_client()]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        elsewhere = pool.map(seeded_tokens, samplers)
    assert elsewhere == [seeded_tokens(sampler) for sampler in samplers]
    assert elsewhere[0] != elsewhere[1]  # the adapter is there
