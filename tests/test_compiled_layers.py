"""--compile: training runs the decoder layers through torch.compile. Logprobs and
gradients (built-in and custom losses) equal in-process peft on the same weights;
every run shares the compiled graphs (no compile per run or per shape); decode steps,
which stay eager, are unchanged, and the sampler's training passes (--sampler-logprobs
training) run the compiled graphs, so its logprobs are forward's."""
from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch

import gradwire
from conftest import server_config
from gradwire_server import logprobs
from gradwire_server.batch import DatumArrays, LoraSettings
from gradwire_server.engine import Engine
from gradwire_server.models import load_model
from gradwire_server.sampler_weights import AdapterLoadError, SamplerAdapters
from gradwire_server.server import BackgroundServer
from reference import (arriving_while_decoding, cross_entropy_gradient_error, greedy_reference, random_data,
                       reference_base_model, reference_gradients, reference_logprobs, reference_model,
                       relative_error, server_gradients, trained_run)
from test_custom_loss import logprob_squared_loss

PROMPT = [72, 101, 108, 108, 111, 44, 32]
# The engine-level tests compile for the device the server would use (on CPU, inductor needs a C++ compiler).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    background = BackgroundServer(server_config(compile=True, sampler_logprobs="training",
                                                checkpoint_dir=tmp_path_factory.mktemp("compiled")))
    yield background
    background.stop()


@pytest.fixture(scope="module")
def service(server):
    client = gradwire.ServiceClient(base_url=server.address, progress=False)
    yield client
    client.close()


def compiled_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_capabilities_say_the_layers_are_compiled(service):
    assert service.get_server_capabilities().training == {"compiled_layers": True, "activation_checkpointing": False,
                                                            "attention": "auto"}


@pytest.mark.parametrize("custom", [False, True], ids=["cross_entropy", "custom"])
def test_logprobs_and_gradients_equal_the_reference(server, service, custom):
    tc = trained_run(service)
    data = random_data(3)
    model = reference_model(server, tc.model_id, rank=4)
    logprobs = [reference_logprobs(model, d) for d in data]
    if custom:
        result = tc.forward_backward_custom(data, logprob_squared_loss).result()
        loss = logprob_squared_loss(data, logprobs)[0]
    else:
        result = tc.forward_backward(data, "cross_entropy").result()
        loss = sum(-(lp * d.loss_fn_inputs["weights"].to_torch()).sum() for lp, d in zip(logprobs, data))
    for output, expected in zip(result.loss_fn_outputs, logprobs):
        np.testing.assert_allclose(output["logprobs"].to_numpy(), expected.detach().numpy(), atol=1e-5)
    loss.backward()
    assert relative_error(server_gradients(server, tc.model_id),
                          reference_gradients(model, tc.model_id)) <= 1e-5


def test_runs_of_other_ranks_and_shapes_reuse_the_graphs(server, service):
    """After one run of each kind of batch has trained, runs of other ranks and batches of
    other lengths and sizes compile nothing more, and still train exactly; sampling with
    an adapter in between (decode steps with its own hooks, peft's layers switched; the
    finished sample's training pass through the graphs a forward of one datum uses)
    changes nothing either."""
    warm = trained_run(service, rank=4, seed=1)
    warm.forward_backward(random_data(5, lengths=(7,)), "cross_entropy").result()  # batch 1
    warm.forward(random_data(6), "cross_entropy").result()  # no grad
    graphs = compiled_graphs()
    assert graphs > 0, "training compiled nothing"
    warm.save_weights_and_get_sampling_client().sample(
        gradwire.ModelInput.from_ints(PROMPT), 2, gradwire.SamplingParams(max_tokens=4)).result()
    for rank, lengths in [(2, (30, 3, 17)), (16, (11, 40)), (8, (60,))]:
        tc = trained_run(service, rank=rank, seed=rank)
        data = random_data(rank, lengths=lengths)
        model = reference_model(server, tc.model_id, rank=rank)
        tc.forward_backward(data, "cross_entropy").result()
        assert cross_entropy_gradient_error(server, tc.model_id, model, data) <= 1e-5
    assert compiled_graphs() == graphs


def test_sampling_a_trained_run_is_unchanged(server, service):
    """Decode steps add LoRA through hooks of their own and never run the compiled layers."""
    tc = trained_run(service, rank=4, seed=2)
    expected = greedy_reference(reference_model(server, tc.model_id, 4), PROMPT, 16)
    sampler = tc.save_weights_and_get_sampling_client()
    response = sampler.sample(gradwire.ModelInput.from_ints(PROMPT), 1,
                              gradwire.SamplingParams(max_tokens=16, temperature=0.0)).result()
    assert response.sequences[0].tokens == expected


def test_the_samplers_training_logprobs_are_the_compiled_forwards(server, service):
    """With --sampler-logprobs training the sampler's passes run through training's compiled
    layers: sampled, top-k and prompt logprobs are forward's of the datum alone, bit for bit
    (the eager layers round apart from the compiled ones), for a trained adapter of an
    odd rank."""
    tc = trained_run(service, rank=3, seed=4)
    sampler = tc.save_weights_and_get_sampling_client()
    response = sampler.sample(gradwire.ModelInput.from_ints(PROMPT), 3,
                              gradwire.SamplingParams(max_tokens=20, seed=5, stop=list(range(0, 320, 7))),
                              include_prompt_logprobs=True, topk_sample_logprobs=2).result()

    def forward_alone(tokens: list[int]) -> list[float]:
        datum = gradwire.Datum(model_input=gradwire.ModelInput.from_ints(tokens[:-1]),
                               loss_fn_inputs={"target_tokens": np.array(tokens[1:])})
        return tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy().tolist()

    assert len({len(s.tokens) for s in response.sequences}) > 1  # samples ended at different steps
    for sequence in response.sequences:
        training = forward_alone(PROMPT + sequence.tokens)[len(PROMPT) - 1:]
        assert sequence.logprobs == training
        assert [dict(row)[token] for row, token in zip(sequence.topk_logprobs, sequence.tokens)
                if token in dict(row)] == [lp for row, token, lp in zip(sequence.topk_logprobs, sequence.tokens,
                                                                          training) if token in dict(row)]
    assert response.prompt_logprobs == [None] + forward_alone(PROMPT)


def test_rows_decoded_after_a_samples_compiled_pass_keep_their_own_weights(server, service):
    """A sample's training pass (compiled) in the middle of a turn leaves the peft layers as
    the decode loop had them (off): the base model's greedy row decoded after it is still
    the base model's, not the trained run's."""
    tc = trained_run(service, rank=4, seed=6)
    base = reference_base_model(server)
    expected = greedy_reference(base, PROMPT, 16)
    assert greedy_reference(reference_model(server, tc.model_id, 4), PROMPT, 16) != expected  # (else moot)
    trained = tc.save_weights_and_get_sampling_client()
    base_sampler = service.create_sampling_client(base_model="tiny-random")
    greedy = gradwire.SamplingParams(max_tokens=16, temperature=0.0)
    with arriving_while_decoding(server, lambda: trained.sample(gradwire.ModelInput.from_ints(PROMPT), 1,
                                                                gradwire.SamplingParams(max_tokens=1))) as short:
        row = base_sampler.sample(gradwire.ModelInput.from_ints(PROMPT), 1, greedy).result()
        short[0].result()
    assert row.sequences[0].tokens == expected


def batches(seed: int) -> list[list[DatumArrays]]:
    rng = np.random.default_rng(seed)

    def batch(lengths):
        return [DatumArrays(rng.integers(0, 320, n), {"target_tokens": rng.integers(0, 320, n),
                                                      "weights": rng.uniform(size=n).astype(np.float32)})
                for n in lengths]
    return [batch(lengths) for lengths in [(20, 19, 3), (33, 40), (50,), (9, 8, 7, 6)]]


def nonzero_factors(engine: Engine, run: str, seed: int) -> None:
    """Random B factors too (the same in every engine), so that the adapter counts."""
    generator = torch.Generator().manual_seed(seed)
    for p in engine.run(run).params:
        if not p.any():
            p.data.copy_(torch.randn(p.shape, generator=generator) * 0.05)


def loss_and_gradients(engine: Engine, run: str, data: list[DatumArrays]) -> tuple[float, torch.Tensor]:
    loss_pass = engine.start_pass(run, "cross_entropy", {}, backward=True)
    loss_pass.feed(data)
    loss = loss_pass.commit()["loss:sum"]
    grads = torch.cat([p.grad.reshape(-1) for p in engine.run(run).params])
    engine.run(run).clear_gradient()
    return loss, grads


def assert_same_training(eager: list, compiled: list, loss_rel: float = 1e-5, gradient_rel: float = 1e-5) -> None:
    for (eager_loss, eager_grads), (loss, grads) in zip(eager, compiled, strict=True):
        assert loss == pytest.approx(eager_loss, rel=loss_rel)
        assert float((grads - eager_grads).norm() / eager_grads.norm()) <= gradient_rel


def test_runs_adapting_different_modules_train_as_peft_does(monkeypatch):
    """Runs that adapt only attention, only the MLP, or also the unembedding, interleaved:
    each step's loss and gradients equal the same engine's without --compile (peft's layers).
    A second round of such runs, of other ranks, compiles nothing more. The unembedding runs
    in chunks of a few positions, recomputed in the backward pass."""
    monkeypatch.setattr(logprobs, "LOGITS_CHUNK_ELEMENTS", 8 * 320)
    device = DEVICE
    kinds = [dict(train_mlp=False), dict(train_attn=False), dict(train_unembed=True)]
    results, graphs_after_round = {}, []
    for compiled in (False, True):
        engine = Engine(load_model("tiny-random", device), device, compile_layers=compiled)
        results[compiled] = []
        for round_ in range(2):
            runs = [engine.create_run(LoraSettings(rank=4 * (round_ + 1) * (k + 1), seed=k, **kind))
                    for k, kind in enumerate(kinds)]
            for seed, run in enumerate(runs):
                nonzero_factors(engine, run, seed)
            for step, data in enumerate(batches(round_)):
                results[compiled].append(loss_and_gradients(engine, runs[step % len(runs)], data))
            if compiled:
                graphs_after_round.append(compiled_graphs())
    assert_same_training(results[False], results[True])
    assert graphs_after_round[1] == graphs_after_round[0]


@pytest.mark.parametrize("load", ["loaded", "refused"])
def test_an_adapter_the_sampler_loads_on_modules_no_run_adapts_compiles_nothing_per_run(load):
    """The sampler loads a checkpoint whose adapter wraps the MLP's Linears, which no
    training run adapts (they adapt attention only), or fails to load it (its weights lack
    a factor: peft wrapped the Linears, then the adapter was deleted, the wrapping kept).
    The new peft layers are switched off in the compiled region like the others, so the
    runs trained afterwards share their graphs, and train as the engine without --compile."""
    device = DEVICE
    donor = Engine(load_model("tiny-random", device), device)
    donor_adapters = SamplerAdapters(donor)
    snapshot = donor_adapters.snapshot(donor_adapters.add_snapshot(donor.create_run(LoraSettings(rank=4))))
    if load == "refused":
        snapshot = dataclasses.replace(snapshot, weights=dict(list(snapshot.weights.items())[1:]))
    results, graphs = {}, []
    for compiled in (False, True):
        engine = Engine(load_model("tiny-random", device), device, compile_layers=compiled)
        runs = [engine.create_run(LoraSettings(rank=rank, seed=rank, train_mlp=False)) for rank in (4, 8, 16)]
        for run in runs:
            nonzero_factors(engine, run, 0)
        data = batches(0)
        results[compiled] = [loss_and_gradients(engine, runs[0], data[0])]
        if load == "loaded":
            SamplerAdapters(engine).adapter_for(snapshot)
        else:
            with pytest.raises(AdapterLoadError, match="missing"):
                SamplerAdapters(engine).adapter_for(snapshot)
        for run, batch in zip(runs[1:], (data[1], data[3])):  # not data[2], of batch 1 (a graph of its own)
            results[compiled].append(loss_and_gradients(engine, run, batch))
            if compiled:
                graphs.append(compiled_graphs())
    assert_same_training(results[False], results[True])
    assert graphs[1] == graphs[0], "a run trained after the sampler's adapter compiled again"


def test_with_activation_checkpointing_a_backward_in_another_thread_recomputes_through_the_graphs():
    """With --activation-checkpointing the backward pass recomputes each decoder layer, on
    CUDA in autograd's own thread, where the training thread's dynamo settings (per thread)
    do not apply: the recompute must run the graphs the forward compiled. Here each backward
    runs in a thread of its own: gradients equal the engine's without --compile, runs of
    other ranks compile nothing more, and a token of activations still costs a fraction of
    what it costs without checkpointing."""
    device = DEVICE
    results, graphs = {}, []
    for compiled in (False, True):
        engine = Engine(load_model("tiny-random", device), device, compile_layers=compiled,
                        activation_checkpointing=True)
        results[compiled] = []
        for rank, data in zip((4, 8, 16), (batches(0)[0], batches(0)[1], batches(1)[3])):
            run = engine.create_run(LoraSettings(rank=rank, seed=rank))
            nonzero_factors(engine, run, rank)
            logprobs, inputs = engine.micro_batch_logprobs(engine.run(run), data)
            loss = engine.loss(logprobs, inputs, "cross_entropy", {})[0]
            with engine.computing(run):
                backward = threading.Thread(target=loss.backward)
                backward.start()
                backward.join()
            results[compiled].append((float(loss), torch.cat([p.grad.reshape(-1) for p in engine.run(run).params])))
            if compiled:
                graphs.append(compiled_graphs())
    assert_same_training(results[False], results[True])
    assert graphs[2] == graphs[1] == graphs[0], "a layer recomputed in the backward thread compiled again"
    plain = Engine(load_model("tiny-random", device), device, compile_layers=True).activation_bytes_per_token(64)
    checkpointed = Engine(load_model("tiny-random", device), device, compile_layers=True,
                          activation_checkpointing=True).activation_bytes_per_token(64)
    assert checkpointed < plain / 2


def test_a_kept_forward_used_after_another_runs_pass_trains_as_peft_does(monkeypatch):
    """A forward keeps its graph (as a custom loss's forward leg does); another run trains;
    then the kept graph's backward runs, recomputing the chunked unembedding of a run that
    adapts it: the gradients equal the engine's without --compile."""
    monkeypatch.setattr(logprobs, "LOGITS_CHUNK_ELEMENTS", 8 * 320)
    device = DEVICE
    data = batches(2)
    results = {}
    for compiled in (False, True):
        engine = Engine(load_model("tiny-random", device), device, compile_layers=compiled)
        kept_run, other_run = (engine.create_run(LoraSettings(rank=4, seed=0, train_unembed=True)),
                               engine.create_run(LoraSettings(rank=8, seed=1)))
        nonzero_factors(engine, kept_run, 0)
        nonzero_factors(engine, other_run, 1)
        forward = engine.start_pass(kept_run, "cross_entropy", {}, backward=False, keep_graph=True)
        forward.feed(data[0])
        forward.commit(forward_op="forward-1")
        results[compiled] = [loss_and_gradients(engine, other_run, data[1])]
        backward = engine.start_pass(kept_run, "cross_entropy", {}, backward=True, reuse_forward="forward-1")
        backward.feed(data[0])
        loss = backward.commit()["loss:sum"]
        assert backward.reused_datums == len(data[0]), "the kept graph was not used"
        results[compiled].append((loss, torch.cat([p.grad.reshape(-1) for p in engine.run(kept_run).params])))
    assert_same_training(results[False], results[True])


def test_the_memory_probe_compiles_the_graphs_that_training_batches_use():
    """The server measures a pass's memory before it reports SERVING; with --compile that
    pass compiles the graphs a batch of several sequences trains with, so a first request
    of another rank and batch waits for no compile."""
    torch._dynamo.reset()  # no graph of an earlier test's engine to reuse
    device = DEVICE
    engine = Engine(load_model("tiny-random", device), device, compile_layers=True)
    engine.activation_bytes_per_token(64)
    graphs = compiled_graphs()
    run = engine.create_run(LoraSettings(rank=8, seed=0))
    nonzero_factors(engine, run, 0)
    loss_and_gradients(engine, run, batches(3)[0])
    assert compiled_graphs() == graphs


@pytest.mark.parametrize("probe", [True, False])
def test_the_server_compiles_the_usual_graphs_before_it_serves(tmp_path, probe):
    """With --compile the server compiles, before it reports SERVING, the graphs that
    forward_backward and forward of several sequences use, and forward of one, with or
    without a memory probe (skipped when --micro-batch-tokens is set on the CPU): a new
    run's first such requests compile nothing, and train exactly. The model is left
    without peft's wrappers."""
    torch._dynamo.reset()  # no graph of an earlier test's server to reuse
    sizes = {} if probe else {"micro_batch_tokens": 16384}
    background = BackgroundServer(server_config(compile=True, checkpoint_dir=tmp_path, **sizes))
    client = gradwire.ServiceClient(base_url=background.address, progress=False)
    try:
        assert background.engine.peft_model is None
        graphs = compiled_graphs()
        tc = client.create_lora_training_client("tiny-random", rank=8, seed=3)
        model = reference_model(background, tc.model_id, rank=8)
        data = random_data(7)
        tc.forward(data[:2], "cross_entropy").result()
        tc.forward(data[:1], "cross_entropy").result()
        tc.forward_backward(data, "cross_entropy").result()
        assert compiled_graphs() == graphs
        assert cross_entropy_gradient_error(background, tc.model_id, model, data) <= 1e-5
    finally:
        client.close()
        background.stop()


def test_a_bfloat16_base_trains_within_bf16_rounding_of_the_eager_engine():
    """CUDA's default dtype: bf16 base weights under bf16 autocast, LoRA in float32. The fused
    kernels round each op's result to bf16 as eager does, which keeps training's logprobs
    close to the (eager) sampler's: on this CPU, tiny-random's loss and gradients are bit-equal (with
    bf16 results kept in float32 inside a kernel: 1.5e-4 and 0.015 relative). A reduction's
    sum (RMSNorm's) may still be taken in another order, so the bound leaves room; on CUDA it
    is bf16's."""
    device = DEVICE
    results = {}
    for compiled in (False, True):
        engine = Engine(load_model("tiny-random", device, torch.bfloat16), device, compile_layers=compiled)
        results[compiled] = []
        for rank, data in zip((4, 8), (batches(0)[0], batches(0)[3])):
            run = engine.create_run(LoraSettings(rank=rank, seed=rank))
            nonzero_factors(engine, run, rank)
            results[compiled].append(loss_and_gradients(engine, run, data))
    loss_rel, gradient_rel = (1e-3, 0.05) if device.type == "cuda" else (1e-5, 1e-3)
    assert_same_training(results[False], results[True], loss_rel=loss_rel, gradient_rel=gradient_rel)
