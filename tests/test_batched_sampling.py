"""The sampler's one decode loop: requests decode together in one batch across
LoRA adapters, each sample's tokens are what it gets alone, logprobs equal the
training side's, the KV cache keeps to its budget (admission waits), and
training and sampling each wait at most one turn of the other."""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
import weakref

import grpc
import numpy as np
import pytest
import torch
from google.longrunning import operations_pb2, operations_pb2_grpc

import gradwire
from gradwire.v1 import codec
from gradwire.v1 import sampling_service_pb2 as pb
from gradwire.v1 import sampling_service_pb2_grpc as pb_grpc
from gradwire.v1 import training_service_pb2 as tpb
from gradwire.v1 import training_service_pb2_grpc as tpb_grpc
from gradwire_server import checkpoints, sampler
from gradwire_server.kv_cache import BLOCK_TOKENS, BlockPool
from gradwire_server.models import tiny_random_model
from gradwire_server.sampling_task import SampleTask
from conftest import server_config
from gradwire_server.server import BackgroundServer
from reference import (arriving_while_decoding, decode_batches, finished, greedy_reference, new_run,
                       operation_metadata, random_data, raw_request, reference_base_model, reference_model,
                       sequence_logprobs, succeeded, trained_run, worker_busy)

PROMPT = [72, 101, 108, 108, 111, 44, 32]
RANK = 4


@pytest.fixture(scope="module")
def adapters(service):
    """Two trained runs saved as sampler weights: [(training client, model_path)]."""
    runs = [trained_run(service, rank=RANK, seed=seed) for seed in (41, 42)]
    return [(tc, tc.save_weights_for_sampler(f"batched-{i}").result().path) for i, tc in enumerate(runs)]


@pytest.fixture()
def raw(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.SamplingServiceStub(channel), operations_pb2_grpc.OperationsStub(channel)


def request(weights: dict, num_samples: int, prompt=PROMPT, **params) -> pb.SampleRequest:
    stop = params.pop("stop", None)
    sampling = pb.SamplingParams(**params)
    if isinstance(stop, str):
        sampling.stop_strs.strings.append(stop)
    elif stop:
        sampling.stop_tokens.tokens.extend(stop)
    return pb.SampleRequest(prompt=[codec.tokens_to_chunk(np.array(prompt))], num_samples=num_samples,
                            sampling_params=sampling, **weights)


def outcome(operations, name: str) -> list[tuple[list[int], np.ndarray, int]]:
    """(tokens, logprobs, stop_reason) per sequence of a finished Sample operation."""
    response = pb.SampleResponse()
    succeeded(operations, name).response.Unpack(response)
    operations.DeleteOperation(operations_pb2.DeleteOperationRequest(name=name))
    return [(np.frombuffer(s.tokens, "<i4").tolist(), np.frombuffer(s.logprobs, "<f4"), s.stop_reason)
            for s in response.sequences]


def sample_alone(raw, sample_request: pb.SampleRequest):
    stub, operations = raw
    return outcome(operations, stub.Sample(sample_request).name)


def mixed_requests(adapters) -> list[pb.SampleRequest]:
    """Requests on the base model and two adapters, with every kind of setting."""
    base = dict(base_model="tiny-random")
    first, second = (dict(model_path=path) for _, path in adapters)
    return [request(base, 3, max_tokens=40, seed=1),
            request(first, 2, max_tokens=40, seed=2, temperature=0.7, top_k=20, top_p=0.9),
            request(second, 4, max_tokens=40, seed=3, stop=list(range(0, 320, 9))),
            request(first, 1, prompt=PROMPT * 3, max_tokens=30, temperature=0.0),
            request(base, 2, max_tokens=35, seed=5, stop=", "),
            request(second, 2, prompt=PROMPT[:3], max_tokens=40, seed=6, top_k=5)]


def test_concurrent_requests_decode_in_one_batch_and_get_their_tokens_alone(server, raw, adapters):
    """Requests queued together (three adapters, mixed settings) share decode
    steps; every sample's tokens are those it gets alone, its logprobs too (up
    to float32 noise: batching changes the matmuls' summation order)."""
    requests = mixed_requests(adapters)
    alone = [sample_alone(raw, r) for r in requests]
    stub, operations = raw
    with decode_batches(server) as sizes:
        with worker_busy(server):
            names = [stub.Sample(r).name for r in requests]
        together = [outcome(operations, name) for name in names]
    # Every sample that outlived its first token was in one decode batch.
    assert max(sizes) == sum(len(t) > 1 for result in together for t, _, _ in result) > 10
    for single, batched in zip(alone, together):
        assert [t for t, _, _ in single] == [t for t, _, _ in batched]
        assert [r for _, _, r in single] == [r for _, _, r in batched]
        for (_, expected, _), (_, got, _) in zip(single, batched):
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert len({len(t) for result in together for t, _, _ in result}) > 1  # samples left at different steps


def test_rows_of_different_adapters_match_their_references(server, raw, adapters):
    """Greedy tokens of one batch mixing the base model and two adapters equal each
    model's full-recompute argmax, and the sampled logprobs equal each training
    run's forward logprobs of the same tokens."""
    stub, operations = raw
    weights = [dict(base_model="tiny-random")] + [dict(model_path=path) for _, path in adapters]
    with worker_busy(server):
        greedy = [stub.Sample(request(w, 1, max_tokens=24, temperature=0.0)).name for w in weights]
        sampled = [stub.Sample(request(w, 3, max_tokens=24, seed=9)).name for w in weights]
    models = [reference_base_model(server)] + [reference_model(server, tc.model_id, RANK) for tc, _ in adapters]
    for name, model in zip(greedy, models):
        assert outcome(operations, name)[0][0] == greedy_reference(model, PROMPT, 24)
    for name, model in zip(sampled, models):
        for tokens, logprobs, _ in outcome(operations, name):
            ids = torch.tensor([PROMPT + tokens])
            expected = sequence_logprobs(model, PROMPT + tokens)
            positions = torch.arange(len(PROMPT) - 1, ids.shape[1] - 1)
            np.testing.assert_allclose(logprobs, expected[positions, ids[0, positions + 1]].numpy(),
                                       rtol=0, atol=1e-4)


def test_an_ephemeral_snapshot_decodes_in_the_batch_like_its_saved_checkpoint(server, raw, service):
    """An in-memory snapshot (save_weights_and_get_sampling_client) and the sampler
    checkpoint of the same weights, sampled in one decode batch beside the base model
    with the same seed: the same tokens and logprobs, and each row's top-k sample
    logprobs equal the in-process peft model's log_softmax top-k at that position."""
    tc = trained_run(service, rank=RANK, seed=43)
    snapshot = tc.save_weights_and_get_sampling_client()  # held: the snapshot lives while it does
    saved = tc.save_weights_for_sampler("snapshot-twin").result().path
    stub, operations = raw
    requests = [request(w, 3, max_tokens=24, seed=9) for w in
                (dict(model_path=snapshot.model_path), dict(model_path=saved), dict(base_model="tiny-random"))]
    for r in requests:
        r.topk_sample_logprobs = 4
    with decode_batches(server) as sizes:
        with worker_busy(server):
            names = [stub.Sample(r).name for r in requests]
        responses = []
        for name in names:
            responses.append(pb.SampleResponse())
            succeeded(operations, name).response.Unpack(responses[-1])
    assert max(sizes) == 9  # every sample of the three requests in one decode step
    ephemeral, checkpoint, base = responses
    model = reference_model(server, tc.model_id, RANK)
    def tokens_of(response):
        return [np.frombuffer(s.tokens, "<i4").tolist() for s in response.sequences]

    assert tokens_of(ephemeral) != tokens_of(base)  # the adapter does change the samples
    for mine, twin in zip(ephemeral.sequences, checkpoint.sequences):
        tokens = np.frombuffer(mine.tokens, "<i4").tolist()
        assert tokens == np.frombuffer(twin.tokens, "<i4").tolist()
        np.testing.assert_allclose(np.frombuffer(mine.logprobs, "<f4"), np.frombuffer(twin.logprobs, "<f4"),
                                   rtol=0, atol=1e-5)
        ids = torch.tensor([PROMPT + tokens])
        expected = sequence_logprobs(model, PROMPT + tokens)[len(PROMPT) - 1:-1]
        top = torch.topk(expected, 4, dim=-1)
        assert mine.topk_logprobs.k == 4
        assert np.frombuffer(mine.topk_logprobs.token_ids, "<i4").reshape(-1, 4).tolist() == top.indices.tolist()
        np.testing.assert_allclose(np.frombuffer(mine.topk_logprobs.logprobs, "<f4").reshape(-1, 4),
                                   top.values.numpy(), rtol=0, atol=1e-4)
        np.testing.assert_allclose(np.frombuffer(mine.logprobs, "<f4"),
                                   expected[torch.arange(len(tokens)), ids[0, len(PROMPT):]].numpy(),
                                   rtol=0, atol=1e-4)
    del snapshot


def test_a_released_snapshots_factors_are_freed_once_other_weights_sample(server, service):
    """The loop keeps the stacked factors of the adapters it samples (copies, on the device)
    while requests use them, not after: once a snapshot is released and another one
    samples, nothing holds the released factors."""
    tc = trained_run(service, rank=RANK, seed=45)
    adapters = server.server.sampling.adapters
    params = gradwire.SamplingParams(max_tokens=4, seed=1)
    first = tc.save_weights_and_get_sampling_client()
    first.sample(gradwire.ModelInput.from_ints(PROMPT), 2, params).result()
    weights = server.call(lambda: adapters.weights_for(adapters.snapshot(first.model_path)))
    factor = weakref.ref(next(iter(weights.values()))[0])
    snapshots = adapters.snapshot_count()
    del first, weights
    gc.collect()  # the client's last reference: the SDK releases the snapshot
    deadline = time.monotonic() + 30
    while adapters.snapshot_count() == snapshots and time.monotonic() < deadline:
        time.sleep(0.05)
    tc.forward_backward(random_data(46), "cross_entropy").result()
    tc.optim_step(gradwire.AdamParams(learning_rate=1e-2)).result()
    second = tc.save_weights_and_get_sampling_client()
    second.sample(gradwire.ModelInput.from_ints(PROMPT), 2, params).result()
    gc.collect()
    assert factor() is None


def test_long_prompt_is_prefilled_in_chunks_exactly(server, service):
    """A prompt longer than one prefill chunk, ending mid-block, sampled 3 ways:
    prompt logprobs, their top-k rows (scored chunk by chunk) and greedy tokens
    equal the in-process model's."""
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 256, size=2 * sampler.PREFILL_CHUNK_TOKENS + BLOCK_TOKENS // 2).tolist()
    client = service.create_sampling_client(base_model="tiny-random")
    response = client.sample(gradwire.ModelInput.from_ints(prompt), 3, gradwire.SamplingParams(
        max_tokens=12, temperature=0.0), include_prompt_logprobs=True, topk_prompt_logprobs=3).result()
    model = reference_base_model(server)
    logprobs = sequence_logprobs(model, prompt)
    expected = logprobs[:-1].gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0].numpy()
    np.testing.assert_allclose(response.prompt_logprobs[1:], expected, rtol=0, atol=1e-5)
    top = torch.topk(logprobs[:-1], 3, dim=-1)
    assert response.topk_prompt_logprobs[0] is None
    assert [[t for t, _ in row] for row in response.topk_prompt_logprobs[1:]] == top.indices.tolist()
    np.testing.assert_allclose([[v for _, v in row] for row in response.topk_prompt_logprobs[1:]],
                               top.values.numpy(), rtol=0, atol=1e-5)
    assert [s.tokens for s in response.sequences] == [greedy_reference(model, prompt, 12)] * 3


# ---- turns: training and sampling each wait a bounded number of the other's turns ----------------------

def test_pending_training_waits_at_most_one_loop_turn_however_many_requests_sample(server, raw, service):
    """Twelve long generations are running; a Forward submitted meanwhile runs
    after at most the loop turn in progress and one more, not a turn per
    request. Counted in decode steps (each turn decodes at most
    DECODE_STEPS_PER_TURN), read when a worker call queued after it runs."""
    tc = service.create_lora_training_client("tiny-random", rank=RANK, seed=7)
    loop = server.server.sampling.loop
    stub, operations = raw
    names = [stub.Sample(request(dict(base_model="tiny-random"), 2, max_tokens=1000, seed=s)).name
             for s in range(12)]
    deadline = time.monotonic() + 60
    while loop.usage().running_sequences < 24 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert loop.usage().running_sequences == 24
    before = loop.steps
    tc.forward(random_data(3), "cross_entropy").result()
    after = server.call(lambda: loop.steps)
    # The Forward waits <= 2 turns; the call after it <= 2 more.
    assert after - before <= 4 * sampler.DECODE_STEPS_PER_TURN
    for name in names:
        operations.CancelOperation(operations_pb2.CancelOperationRequest(name=name))
        operations.DeleteOperation(operations_pb2.DeleteOperationRequest(name=name))


def test_sampling_waits_at_most_one_request_per_training_run(server, raw, stubs):
    """Three runs have three Forward requests queued each and a short sample is
    queued after them: it is done before any run's third request starts
    (one turn to join the loop, one to decode), not after every queued request."""
    training, _ = stubs
    stub, operations = raw
    runs = [new_run(training, seed=s) for s in range(3)]
    with worker_busy(server):
        forwards = [[training.Forward(raw_request(run, seq, random_data(80 + seq))).name for seq in (1, 2, 3)]
                    for run in runs]
        sample = stub.Sample(request(dict(base_model="tiny-random"), 2,
                                     max_tokens=sampler.DECODE_STEPS_PER_TURN - 1, seed=0)).name
    sample_end = operation_metadata(finished(operations, sample)).end_time.ToNanoseconds()
    for run in forwards:
        assert sample_end <= operation_metadata(succeeded(operations, run[2])).start_time.ToNanoseconds()


# ---- the KV cache budget -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_cache_server(tmp_path_factory):
    """A server whose KV cache holds 20 blocks (one is the zero block)."""
    block_bytes = 2 * 2 * 2 * 16 * 4 * BLOCK_TOKENS  # k+v, layers, kv heads, head dim, float32
    background = BackgroundServer(server_config(kv_cache_mb=20 * block_bytes / 2**20,
                                               checkpoint_dir=tmp_path_factory.mktemp("small-cache")))
    yield background
    background.stop()


def capabilities(server) -> tpb.GetServerCapabilitiesResponse:
    with grpc.insecure_channel(server.address) as channel:
        return tpb_grpc.TrainingServiceStub(channel).GetServerCapabilities(tpb.GetServerCapabilitiesRequest())


def test_admission_waits_for_room_in_the_kv_cache(small_cache_server):
    """Three requests that fit only one at a time: they run one after another
    (never more than one request's samples in a batch), each with the tokens it
    gets alone; afterwards every block is free again."""
    server = small_cache_server
    budget = capabilities(server).kv_cache
    assert budget.budget_bytes == 20 * 2 * 2 * 2 * 16 * 4 * BLOCK_TOKENS and budget.block_tokens == BLOCK_TOKENS
    with grpc.insecure_channel(server.address) as channel:
        raw = pb_grpc.SamplingServiceStub(channel), operations_pb2_grpc.OperationsStub(channel)
        # 2 samples x blocks_for(7 + 100) = 14 blocks each: two never fit together.
        requests = [request(dict(base_model="tiny-random"), 2, max_tokens=100, seed=s) for s in range(3)]
        alone = [sample_alone(raw, r) for r in requests]
        with decode_batches(server) as sizes:
            with worker_busy(server):
                names = [raw[0].Sample(r).name for r in requests]
            together = [outcome(raw[1], name) for name in names]
    assert max(sizes) == 2
    assert [[t for t, _, _ in r] for r in together] == [[t for t, _, _ in r] for r in alone]
    usage = capabilities(server).kv_cache
    assert (usage.used_bytes, usage.reserved_bytes, usage.running_sequences) == (0, 0, 0)


@pytest.mark.parametrize("too_big, field", [
    (request(dict(base_model="tiny-random"), 4, max_tokens=200, seed=4), "num_samples"),  # one would fit
    (request(dict(base_model="tiny-random"), 1, max_tokens=400, seed=4), "sampling_params.max_tokens"),
    (pb.ComputeLogprobsRequest(base_model="tiny-random", prompt=[codec.tokens_to_chunk(np.array(PROMPT * 60))]),
     "prompt"),
    (request(dict(base_model="tiny-random"), 1, prompt=PROMPT * 60, max_tokens=1, seed=4), "prompt"),
], ids=["samples", "max_tokens", "prompt-only", "prompt-of-a-sample"])
def test_a_request_larger_than_the_whole_cache_is_refused_and_changes_nothing(small_cache_server, too_big, field):
    """Refused when it arrives (it could never be admitted), INVALID_ARGUMENT naming what to
    cut and the budget; no operation starts, and a request running beside it is unaffected."""
    server = small_cache_server
    with grpc.insecure_channel(server.address) as channel:
        stub, operations = pb_grpc.SamplingServiceStub(channel), operations_pb2_grpc.OperationsStub(channel)
        fits = request(dict(base_model="tiny-random"), 1, max_tokens=60, seed=4)
        alone = outcome(operations, stub.Sample(fits).name)
        started = server.server.store.names("operations/sampling/")
        with worker_busy(server):
            beside = stub.Sample(fits).name
            with pytest.raises(grpc.RpcError) as refused:
                getattr(stub, type(too_big).__name__.removesuffix("Request"))(too_big)
            assert server.server.store.names("operations/sampling/") == [*started, beside]
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details().startswith(f"{field}: the prompt") and "whole budget" in refused.value.details()
        assert [t for t, _, _ in outcome(operations, beside)] == [t for t, _, _ in alone]
    usage = capabilities(server).kv_cache
    assert (usage.used_bytes, usage.reserved_bytes) == (0, 0)


def test_kv_use_is_visible_and_freed_on_cancel(server, raw):
    """While a long generation runs its blocks show as used; cancelling it frees them."""
    stub, operations = raw
    idle = capabilities(server).kv_cache
    name = stub.Sample(request(dict(base_model="tiny-random"), 4, max_tokens=1000, seed=2)).name
    deadline = time.monotonic() + 60
    while capabilities(server).kv_cache.running_sequences < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    running = capabilities(server).kv_cache
    assert running.used_bytes > idle.used_bytes and running.reserved_bytes > 0 and running.running_sequences >= 4
    operations.CancelOperation(operations_pb2.CancelOperationRequest(name=name))
    while capabilities(server).kv_cache.used_bytes != idle.used_bytes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert capabilities(server).kv_cache.used_bytes == idle.used_bytes
    operations.DeleteOperation(operations_pb2.DeleteOperationRequest(name=name))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_loop_on_either_attention_implementation_equals_the_reference(attention):
    """The decode loop in-process on tiny-random with sdpa (bool mask) or eager
    attention (additive mask): greedy tokens of requests of different prompt
    lengths decoded together equal the full-recompute argmax."""
    model = tiny_random_model().eval()
    model.set_attn_implementation(attention)
    pool = BlockPool(model.config, 2**20, torch.float32, torch.device("cpu"))
    loop = sampler.DecodeLoop(model, pool, torch.device("cpu"), contextlib.nullcontext)
    prompts = [PROMPT, PROMPT * 4, PROMPT[:2]]
    generations = [sampler.Generation(sampler.SampleSpec(np.array(p), 2, sampler.SamplingSettings(
        max_tokens=20, seed=0, temperature=0.0)), str) for p in prompts]
    for generation in generations:
        loop.add(generation)
    while not all(g.done for g in generations):
        loop.turn()
    reference = tiny_random_model()
    for prompt, generation in zip(prompts, generations):
        assert [s.tokens for s in generation.sequences] == [greedy_reference(reference, prompt, 20)] * 2
    assert pool.used_bytes == 0 and pool.reserved == 0


def test_a_generation_larger_than_the_cache_given_to_the_loop_fails_and_blocks_nothing():
    """The servicer refuses such a request; a caller of DecodeLoop (a benchmark, a test) that
    adds one anyway gets its error instead of every request behind it waiting forever."""
    model = tiny_random_model().eval()
    pool = BlockPool(model.config, 2**16, torch.float32, torch.device("cpu"))
    loop = sampler.DecodeLoop(model, pool, torch.device("cpu"), contextlib.nullcontext)
    settings = sampler.SamplingSettings(max_tokens=4, seed=0, temperature=0.0)
    too_big = sampler.Generation(sampler.SampleSpec(np.array(PROMPT), 1, dataclasses.replace(
        settings, max_tokens=BLOCK_TOKENS * pool.usable_blocks)), str)
    behind = sampler.Generation(sampler.SampleSpec(np.array(PROMPT), 1, settings), str)
    loop.add(too_big)
    loop.add(behind)
    loop.turn()
    assert isinstance(too_big.error, ValueError) and "KV blocks" in str(too_big.error)
    assert behind.done and behind.sequences[0].tokens == greedy_reference(tiny_random_model(), PROMPT, 4)


def test_a_request_arriving_mid_turn_joins_at_the_next_decode_step():
    """A request that arrives (DecodeLoop.arrive, as the servicer calls it from its
    thread) while the loop decodes another joins the running batch at the next step:
    both finish within the one turn, each with its full-recompute argmax."""
    model = tiny_random_model().eval()
    pool = BlockPool(model.config, 2**20, torch.float32, torch.device("cpu"))
    loop = sampler.DecodeLoop(model, pool, torch.device("cpu"), contextlib.nullcontext)
    settings = sampler.SamplingSettings(max_tokens=14, seed=0, temperature=0.0)
    first = sampler.Generation(sampler.SampleSpec(np.array(PROMPT), 1, settings), str)
    later = sampler.Generation(sampler.SampleSpec(np.array(PROMPT[:3]), 1, dataclasses.replace(settings, max_tokens=8)),
                               str)
    loop.add(first)
    rows, decode_logits = [], loop._decode_logits

    def decode_and_arrive(tokens):
        rows.append(tokens.shape[0])
        if len(rows) == 3:
            loop.arrive(lambda: loop.add(later))
        return decode_logits(tokens)

    loop._decode_logits = decode_and_arrive
    loop.turn()
    assert first.done and later.done and loop.turns == 1
    assert rows[:4] == [1, 1, 1, 2]  # the step after the arrival decodes both
    reference = tiny_random_model()
    assert first.sequences[0].tokens == greedy_reference(reference, PROMPT, 14)
    assert later.sequences[0].tokens == greedy_reference(reference, PROMPT[:3], 8)


def test_a_sample_task_joins_the_loop_once():
    """SampleTask.join runs once, whoever calls it: an arrival handled after the task
    finished, or after it was discarded (cancelled), adds nothing to the loop."""
    model = tiny_random_model().eval()
    pool = BlockPool(model.config, 2**20, torch.float32, torch.device("cpu"))
    loop = sampler.DecodeLoop(model, pool, torch.device("cpu"), contextlib.nullcontext)
    spec = sampler.SampleSpec(np.array(PROMPT), 2, sampler.SamplingSettings(max_tokens=5, seed=0, temperature=0.0))
    finished_task = SampleTask(loop, None, None, spec, str)
    while not finished_task.step().done:
        pass
    discarded_task = SampleTask(loop, None, None, spec, str)
    discarded_task.discard()
    for task in (finished_task, discarded_task):
        loop.arrive(task.join)  # late arrivals, as the servicer may queue them
    steps = loop.steps
    loop.turn()
    assert loop.steps == steps  # nothing was decoded
    assert loop.usage().running_sequences == 0 and not loop.waiting and not loop.prefilling
    assert pool.used_bytes == 0 and pool.reserved == 0


def test_a_prefill_pass_costs_at_most_its_budget_padding_included():
    """One 300-token prompt and 40 short ones arrive while a request decodes: every
    prefill pass, counted as rows x longest chunk, stays within the tokens allowed
    between two decode steps, and every request gets its reference tokens."""
    model = tiny_random_model().eval()
    pool = BlockPool(model.config, 2**24, torch.float32, torch.device("cpu"))
    loop = sampler.DecodeLoop(model, pool, torch.device("cpu"), contextlib.nullcontext)
    greedy = sampler.SamplingSettings(max_tokens=6, seed=0, temperature=0.0)
    running = sampler.Generation(sampler.SampleSpec(np.array(PROMPT), 1, dataclasses.replace(greedy, max_tokens=60)),
                                 str)
    loop.add(running)
    loop.turn()
    prompts = [list(range(3, 303))] + [[7 + i, 11, 5, i] for i in range(40)]
    generations = [sampler.Generation(sampler.SampleSpec(np.array(p), 1, greedy), str) for p in prompts]
    for generation in generations:
        loop.add(generation)
    passes, forward = [], loop._forward

    def recorded(tokens, *args, **kwargs):
        if tokens.shape[1] > 1:
            passes.append((tokens.shape[0] * tokens.shape[1], len(loop._rows)))
        return forward(tokens, *args, **kwargs)

    loop._forward = recorded
    while not all(g.done for g in [running, *generations]):
        loop.turn()
    assert passes and all(cost <= sampler.PREFILL_TOKENS_PER_STEP for cost, rows in passes if rows)
    assert all(cost <= sampler.PREFILL_PASS_POSITIONS for cost, _ in passes)
    reference = tiny_random_model()
    for prompt, generation in list(zip(prompts, generations))[:3]:
        assert generation.sequences[0].tokens == greedy_reference(reference, prompt, 6)


@pytest.mark.parametrize("change", ["deleted", "saved again"])
def test_a_sampler_checkpoint_changed_while_its_requests_wait_is_not_called_damaged(server, raw, service, change):
    """A Sample and a ComputeLogprobs of a sampler checkpoint find it when they arrive and
    read its files when their turn comes. The checkpoint deleted in between reads
    NOT_FOUND, saved again ABORTED (CHECKPOINT_REPLACED): not DATA_LOSS, which says a
    stored file is damaged."""
    tc = trained_run(service, rank=RANK, seed=45)
    path = tc.save_weights_for_sampler(f"changed-{change.replace(' ', '-')}").result().path
    checkpoint = checkpoints.find(server.server.checkpoint_root, path)
    tc.forward_backward(random_data(101), "cross_entropy")
    tc.optim_step(gradwire.AdamParams(learning_rate=1e-2)).result()
    newer = server.call(lambda: server.engine.save_state(tc.model_id, with_optimizer=False))
    stub, operations = raw
    with worker_busy(server):
        names = [stub.Sample(request(dict(model_path=path), 1)).name,
                 stub.ComputeLogprobs(pb.ComputeLogprobsRequest(model_path=path, prompt=[
                     codec.tokens_to_chunk(np.array(PROMPT))])).name]
        if change == "deleted":
            checkpoints.delete(checkpoint)
        else:
            checkpoints.write(server.server.checkpoint_root, checkpoint.path, newer, "tiny-random", overwrite=True)
    expected = {"deleted": (grpc.StatusCode.NOT_FOUND, "deleted since this request found it"),
                "saved again": (grpc.StatusCode.ABORTED, "was saved again since this request found it")}[change]
    for name in names:
        error = finished(operations, name).error
        assert (error.code, expected[1] in error.message) == (expected[0].value[0], True), error


def test_a_request_that_fails_to_join_mid_turn_gets_its_own_error(server, raw, service):
    """A request for a damaged sampler checkpoint that arrives while another request
    decodes (so it joins from the loop, between decode steps) fails with the error it
    gets alone; the running request finishes as usual."""
    tc = trained_run(service, rank=RANK, seed=44)
    path = tc.save_weights_for_sampler("damaged-mid-turn").result().path
    weights_file = checkpoints.checkpoint_directory(server.server.checkpoint_root, path) / "adapter_model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:-1] + b"\0")
    stub, operations = raw
    alone = finished(operations, stub.Sample(request(dict(model_path=path), 1)).name).error
    assert alone.code == grpc.StatusCode.DATA_LOSS.value[0]
    # (Submitted on the worker, between decode steps: the servicer queues its join.)
    with arriving_while_decoding(server, lambda: stub.Sample(request(dict(model_path=path), 1)).name) as arrived:
        running = stub.Sample(request(dict(base_model="tiny-random"), 2, max_tokens=20)).name
        assert len(outcome(operations, running)) == 2
        mid_turn = finished(operations, arrived[0]).error
    assert (mid_turn.code, mid_turn.message) == (alone.code, alone.message)


def test_a_prefill_pass_that_runs_out_of_memory_fails_its_requests_alone(server, raw):
    """Out of memory in a prefill pass (injected where CUDA's allocator raises it: the
    pass of the request that arrives while another decodes) fails that pass's request
    with RESOURCE_EXHAUSTED; the decoding request finishes with the tokens it gets alone,
    and the KV cache ends empty."""
    stub, operations = raw
    loop = server.server.sampling.loop
    victim_prompt = PROMPT * 2
    rows_at_failure = []

    def out_of_memory(module, args, kwargs):
        if kwargs["input_ids"].shape[1] == len(victim_prompt) and not rows_at_failure:
            rows_at_failure.append(len(loop._rows))
            raise torch.OutOfMemoryError("injected")

    bystander = request(dict(base_model="tiny-random"), 2, max_tokens=40, seed=7)
    decoder = server.engine.base.model.get_decoder()
    handle = server.call(lambda: decoder.register_forward_pre_hook(out_of_memory, with_kwargs=True))
    try:
        with arriving_while_decoding(server, lambda: stub.Sample(
                request(dict(base_model="tiny-random"), 2, prompt=victim_prompt)).name) as arrived:
            running = outcome(operations, stub.Sample(bystander).name)
            failed = finished(operations, arrived[0]).error
    finally:
        server.call(handle.remove)
    assert failed.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert f"prefilling a pass of 1 prompt chunks x {len(victim_prompt)} tokens" in failed.message
    assert rows_at_failure == [2]  # the bystander's samples were decoding
    alone = sample_alone(raw, bystander)
    assert [tokens for tokens, _, _ in running] == [tokens for tokens, _, _ in alone]
    usage = loop.usage()
    assert (usage.used_bytes, usage.reserved_bytes, usage.running_sequences) == (0, 0, 0)
    assert len(sample_alone(raw, request(dict(base_model="tiny-random"), 2, prompt=victim_prompt))) == 2


def test_scoring_a_prompt_from_its_prefill_out_of_memory_fails_its_request_alone(server, raw, monkeypatch):
    """A prompt is scored chunk by chunk as it is prefilled, each chunk's logits [C, V] in
    float32 a few times over: out of memory there (injected in the scoring of a later
    chunk, for the compute_logprobs that arrives while another request decodes) fails
    that request alone and frees the blocks of the chunks before it."""
    stub, operations = raw
    loop = server.server.sampling.loop
    victim_prompt = PROMPT * 100  # three chunks or more
    assert len(victim_prompt) > 2 * sampler.PREFILL_CHUNK_TOKENS
    score = sampler._chunk_scores
    chunks = []

    def out_of_memory(logits, targets, k):
        chunks.append(len(targets))
        if len(chunks) == 2:
            raise torch.OutOfMemoryError("injected")
        return score(logits, targets, k)

    monkeypatch.setattr(sampler, "_chunk_scores", out_of_memory)
    bystander = request(dict(base_model="tiny-random"), 2, max_tokens=40, seed=8)
    victim = pb.ComputeLogprobsRequest(base_model="tiny-random",
                                       prompt=[codec.tokens_to_chunk(np.array(victim_prompt))])
    with arriving_while_decoding(server, lambda: (stub.ComputeLogprobs(victim).name, len(loop._rows))) as arrived:
        running = outcome(operations, stub.Sample(bystander).name)
        failed = finished(operations, arrived[0][0]).error
    monkeypatch.undo()
    assert failed.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert f"scoring a prompt ({len(victim_prompt)} tokens) from its prefill's logits" in failed.message
    assert len(chunks) == 2  # its prefill stopped there
    assert arrived[0][1] == 2  # the bystander's samples were decoding
    assert [tokens for tokens, _, _ in running] == [tokens for tokens, _, _ in sample_alone(raw, bystander)]
    usage = loop.usage()
    assert (usage.used_bytes, usage.reserved_bytes, usage.running_sequences) == (0, 0, 0)
    assert succeeded(operations, stub.ComputeLogprobs(victim).name).done
