"""--sampler-logprobs training: every logprob the sampler returns (a sampled token's,
its top-k rows, the prompt's, compute_logprobs's) is the training forward's number for
that sequence as one datum, bit for bit, and the top-k rows are the in-process
reference's. (The float32 server of the other tests takes them from its decode steps:
test_sampling.py; bf16 servers: test_bfloat16.py.)"""
from __future__ import annotations

import contextlib

import grpc
import numpy as np
import pytest
import torch

import gradwire
from conftest import server_config
from gradwire_server.kv_cache import BLOCK_TOKENS
from gradwire_server.server import BackgroundServer
from reference import arriving_while_decoding, decode_batches, reference_model, sequence_logprobs, trained_run

PROMPT = [72, 101, 108, 108, 111, 44, 32]
RANK = 4
EARLY_STOPS = list(range(0, 320, 6))  # samples of one request end at different steps
LONG_PROMPT = np.random.default_rng(3).integers(0, 256, 300).tolist()  # prefilled in two chunks


@pytest.fixture(scope="module")
def training_server(tmp_path_factory):
    background = BackgroundServer(server_config(sampler_logprobs="training",
                                                checkpoint_dir=tmp_path_factory.mktemp("training-logprobs")))
    yield background
    background.stop()


@pytest.fixture(scope="module")
def training_service(training_server):
    client = gradwire.ServiceClient(base_url=training_server.address)
    yield client
    client.close()


@pytest.fixture(scope="module")
def trained(training_service):
    """(training client, its sampler weights' path) of a trained run."""
    tc = trained_run(training_service, rank=RANK, seed=1)
    return tc, tc.save_weights_for_sampler("trained").result().path


def forward_alone(tc, tokens: list[int]) -> np.ndarray:
    """The training forward's logprobs of tokens[1:], the sequence as one datum alone."""
    datum = gradwire.Datum(model_input=gradwire.ModelInput.from_ints(tokens[:-1]),
                           loss_fn_inputs={"target_tokens": np.array(tokens[1:])})
    return tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()


def test_capabilities_say_where_sampler_logprobs_come_from(service, training_service):
    assert training_service.get_server_capabilities().sampler_logprobs == "training"
    assert service.get_server_capabilities().sampler_logprobs == "decode"  # auto over float32


@pytest.mark.parametrize("adapter", ["base", "trained", "trained rank 3"])
def test_sampled_logprobs_and_their_top_k_are_the_training_forwards(training_server, training_service, trained,
                                                                    adapter):
    """(Rank 3: a LoRA scale, 32 / 3, that rounds the delta differently unless applied last, as peft does.)"""
    rank = 3 if adapter == "trained rank 3" else RANK
    if adapter == "base":  # a fresh run's adapter is zero: the base model
        tc = training_service.create_lora_training_client("tiny-random", rank=RANK, seed=5)
        sampler = training_service.create_sampling_client(base_model="tiny-random")
    elif adapter == "trained":
        tc, model_path = trained
        sampler = training_service.create_sampling_client(model_path=model_path)
    else:
        tc = trained_run(training_service, rank=rank, seed=2)
        sampler = training_service.create_sampling_client(model_path=tc.save_weights_for_sampler("rank3").result().path)
    model = reference_model(training_server, tc.model_id, rank)
    requests = [sampler.sample(gradwire.ModelInput.from_ints(prompt), 4,
                               gradwire.SamplingParams(max_tokens=12, seed=11, stop=EARLY_STOPS),
                               topk_sample_logprobs=3) for prompt in (PROMPT, PROMPT[:2])]
    for prompt, request in zip((PROMPT, PROMPT[:2]), requests):  # decoded together: rows of one batch
        sequences = request.result().sequences
        assert len({len(s.tokens) for s in sequences}) > 1
        for sequence in sequences:
            tokens = prompt + sequence.tokens
            np.testing.assert_array_equal(sequence.logprobs, forward_alone(tc, tokens)[len(prompt) - 1:])
            reference = sequence_logprobs(model, tokens)[len(prompt) - 1:-1]  # in-process PyTorch, same weights
            np.testing.assert_allclose(sequence.logprobs, reference.gather(-1, torch.tensor(sequence.tokens)[:, None])
                                       [:, 0].numpy(), rtol=0, atol=1e-5)
            expected = torch.topk(reference, 3, dim=-1)
            assert [[t for t, _ in row] for row in sequence.topk_logprobs] == expected.indices.tolist()
            np.testing.assert_allclose([[v for _, v in row] for row in sequence.topk_logprobs],
                                       expected.values.numpy(), rtol=0, atol=1e-5)


def test_prompt_logprobs_and_compute_logprobs_are_the_training_forwards(training_server, training_service, trained):
    """(In float32 this prompt's prefill, two chunks, rounds apart from one training pass.)"""
    tc, model_path = trained
    sampler = training_service.create_sampling_client(model_path=model_path)
    prompt = gradwire.ModelInput.from_ints(LONG_PROMPT)
    response = sampler.sample(prompt, 2, gradwire.SamplingParams(max_tokens=3, seed=0),
                              include_prompt_logprobs=True, topk_prompt_logprobs=4).result()
    training = forward_alone(tc, LONG_PROMPT).tolist()
    assert response.prompt_logprobs == [None] + training
    assert sampler.compute_logprobs(prompt).result() == [None] + training
    assert sampler.compute_logprobs(prompt, prompt_logprobs_last_n=2).result() \
        == [None] * (len(LONG_PROMPT) - 2) + training[-2:]
    assert sampler.compute_logprobs(gradwire.ModelInput.from_ints(PROMPT[:1])).result() == [None]
    model = reference_model(training_server, tc.model_id, RANK)
    expected = torch.topk(sequence_logprobs(model, LONG_PROMPT)[:-1], 4, dim=-1)
    assert response.topk_prompt_logprobs[0] is None
    assert [[t for t, _ in row] for row in response.topk_prompt_logprobs[1:]] == expected.indices.tolist()
    np.testing.assert_allclose([[v for _, v in row] for row in response.topk_prompt_logprobs[1:]],
                               expected.values.numpy(), rtol=0, atol=1e-5)


def test_compute_logprobs_needs_no_kv_cache(tmp_path):
    """A prompt longer than the whole KV cache holds is scored (a training pass keeps no
    keys and values), where scoring it by its prefill is refused."""
    block_bytes = 2 * 2 * 2 * 16 * 4 * BLOCK_TOKENS  # k+v, layers, kv heads, head dim, float32
    prompt = gradwire.ModelInput.from_ints(LONG_PROMPT)  # 19 blocks of the cache's 8
    for source in ("training", "decode"):
        background = BackgroundServer(server_config(sampler_logprobs=source, kv_cache_mb=8 * block_bytes / 2**20,
                                                    checkpoint_dir=tmp_path / source))
        service = gradwire.ServiceClient(base_url=background.address)
        try:
            sampler = service.create_sampling_client(base_model="tiny-random")
            if source == "training":
                tc = service.create_lora_training_client("tiny-random", rank=RANK, seed=5)  # zero adapter: the base
                assert sampler.compute_logprobs(prompt).result() == [None] + forward_alone(tc, LONG_PROMPT).tolist()
            else:
                with pytest.raises(gradwire.BadRequestError, match="KV cache"):
                    sampler.compute_logprobs(prompt).result()
        finally:
            service.close()
            background.stop()


def test_a_stream_sends_a_samples_logprobs_with_its_last_piece(training_service, trained):
    """Tokens stream as they are drawn; a sample's logprobs (computed once it ends) come
    in its last piece, so the pieces still add up to sample()'s response."""
    _, model_path = trained
    sampler = training_service.create_sampling_client(model_path=model_path)
    params = gradwire.SamplingParams(max_tokens=60, seed=21, stop=[7, 9, 11])
    expected = sampler.sample(gradwire.ModelInput.from_ints(PROMPT), 3, params).result().sequences
    tokens, logprobs, pieces = [[], [], []], [[], [], []], 0
    for piece in sampler.sample_stream(gradwire.ModelInput.from_ints(PROMPT), 3, params):
        assert len(piece.logprobs) == (len(tokens[piece.sequence_index]) + len(piece.tokens)
                                       if piece.stop_reason is not None else 0)
        tokens[piece.sequence_index] += piece.tokens
        logprobs[piece.sequence_index] += piece.logprobs
        pieces += 1
    assert pieces > 3  # several decode turns, not one final message
    assert tokens == [s.tokens for s in expected]
    assert logprobs == [s.logprobs for s in expected]


@contextlib.contextmanager
def raising_in_a_training_pass(server, length: int | None, error: Exception):
    """While the block runs, the first training pass (a forward without a KV cache) over
    `length` input tokens (None: any) raises `error`, where CUDA's allocator raises out of
    memory; yields the list that gets (its input length, the rows decoding at that moment)."""
    failures, loop = [], server.server.sampling.loop

    def fail(module, args, kwargs):
        inputs = kwargs["input_ids"].shape[1]
        if kwargs.get("use_cache") is False and length in (None, inputs) and not failures:
            failures.append((inputs, len(loop._rows)))
            raise error

    decoder = server.engine.base.model.get_decoder()
    handle = server.call(lambda: decoder.register_forward_pre_hook(fail, with_kwargs=True))
    try:
        yield failures
    finally:
        server.call(handle.remove)


def test_a_sample_whose_training_pass_runs_out_of_memory_fails_its_request_alone(training_server, training_service,
                                                                                trained):
    """The out-of-memory is injected where CUDA's allocator raises it, in the first training
    pass over a finished sample: one of the victim request's four samples, which end at
    different steps. Its other samples leave the batch with it; the bystander, decoded in
    the same batch, goes on and is exact; the KV cache is all free."""
    tc, model_path = trained
    sampler = training_service.create_sampling_client(model_path=model_path)
    prompt = gradwire.ModelInput.from_ints([1, 2, 3])
    victim_params = gradwire.SamplingParams(max_tokens=30, seed=4, stop=EARLY_STOPS)
    with raising_in_a_training_pass(training_server, None, torch.OutOfMemoryError("injected")) as failures:
        bystander = sampler.sample(prompt, 2, gradwire.SamplingParams(max_tokens=40, seed=1))
        victim = sampler.sample(prompt, 4, victim_params)
        with pytest.raises(gradwire.APIStatusError) as raised:
            victim.result()
        sequences = bystander.result().sequences
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"scoring a sample ({failures[0][0] + 1} tokens with its prompt)" in str(raised.value)
    for sequence in sequences:
        assert len(sequence.tokens) == 40
        np.testing.assert_array_equal(sequence.logprobs, forward_alone(tc, [1, 2, 3] + sequence.tokens)[2:])
    usage = training_service.get_server_capabilities().kv_cache
    assert (usage["used_bytes"], usage["reserved_bytes"], usage["running_sequences"]) == (0, 0, 0)
    again = sampler.sample(prompt, 4, victim_params).result().sequences  # the same tokens: the victim's
    assert len({len(s.tokens) for s in again}) > 1 and min(len(s.tokens) for s in again) < 40
    assert all(len(s.logprobs) == len(s.tokens) for s in again)


def scoring_the_long_prompt(sampler, scored_by: str) -> gradwire.APIFuture:
    """A request that scores LONG_PROMPT: compute_logprobs, or a sample's prompt logprobs."""
    prompt = gradwire.ModelInput.from_ints(LONG_PROMPT)
    if scored_by == "compute_logprobs":
        return sampler.compute_logprobs(prompt)
    return sampler.sample(prompt, 2, gradwire.SamplingParams(max_tokens=5, seed=2), include_prompt_logprobs=True)


@pytest.mark.parametrize("scored_by", ["compute_logprobs", "sample"])
def test_a_prompt_whose_training_pass_runs_out_of_memory_fails_its_request_alone(training_server, training_service,
                                                                                 trained, scored_by):
    """A prompt's length is the client's to choose, and so is its training pass's memory:
    out of memory there (in the pass over the victim's 300-token prompt, which arrives while
    another request's samples decode) fails that request alone, for compute_logprobs (scored
    as it is admitted) and a sample's prompt logprobs (scored after its prefill)."""
    tc, model_path = trained
    sampler = training_service.create_sampling_client(model_path=model_path)

    def victim() -> gradwire.APIFuture:
        return scoring_the_long_prompt(sampler, scored_by)

    with decode_batches(training_server) as rows, raising_in_a_training_pass(
            training_server, len(LONG_PROMPT) - 1, torch.OutOfMemoryError("injected")) as failures, \
            arriving_while_decoding(training_server, victim) as submitted:
        sequences = sampler.sample(gradwire.ModelInput.from_ints([1, 2, 3]), 2,
                                   gradwire.SamplingParams(max_tokens=60, seed=1)).result(timeout=120).sequences
        with pytest.raises(gradwire.APIStatusError) as raised:
            submitted[0].result(timeout=120)  # (a failure out of the loop's reach waited forever)
    assert max(rows) == 2  # the victim's samples never decoded
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"scoring a prompt ({len(LONG_PROMPT)} tokens) by a training pass" in str(raised.value)
    assert failures[0][1] == 2  # the bystander's samples were decoding
    for sequence in sequences:
        assert len(sequence.tokens) == 60
        np.testing.assert_array_equal(sequence.logprobs, forward_alone(tc, [1, 2, 3] + sequence.tokens)[2:])
    usage = training_service.get_server_capabilities().kv_cache
    assert (usage["used_bytes"], usage["reserved_bytes"], usage["running_sequences"]) == (0, 0, 0)
    training = forward_alone(tc, LONG_PROMPT).tolist()
    again = victim().result()
    assert (again if scored_by == "compute_logprobs" else again.prompt_logprobs) == [None] + training


@pytest.mark.parametrize("scored_by", ["compute_logprobs", "sample"])
def test_any_other_failure_of_a_prompts_training_pass_fails_the_loop_and_waits_for_nothing(training_server,
                                                                                          training_service, trained,
                                                                                          scored_by):
    """Not out of memory (a bug's error, injected): the loop's state is unknown, so every
    request in it fails, the one being scored too. (That one waited forever when its pass ran
    outside every list the loop's failure reaches and another request's task ran the turn:
    the bystander's, here, which decodes when the victim arrives.) Then the loop serves again."""
    _, model_path = trained
    sampler = training_service.create_sampling_client(model_path=model_path)

    def victim() -> gradwire.APIFuture:
        return scoring_the_long_prompt(sampler, scored_by)

    with raising_in_a_training_pass(training_server, len(LONG_PROMPT) - 1, RuntimeError("injected failure")) \
            as failures, arriving_while_decoding(training_server, victim) as submitted:
        bystander = sampler.sample(gradwire.ModelInput.from_ints([1, 2, 3]), 2,
                                   gradwire.SamplingParams(max_tokens=60, seed=1))
        with pytest.raises(gradwire.APIStatusError, match="injected failure"):
            bystander.result(timeout=120)
        with pytest.raises(gradwire.APIStatusError, match="injected failure"):
            submitted[0].result(timeout=120)
    assert failures[0][1] == 2
    assert len(scoring_the_long_prompt(sampler, "compute_logprobs").result(timeout=120)) == len(LONG_PROMPT)
