"""The sampler's bucketed decode steps (decode_graphs): rows, context and LoRA rank
padded to power-of-two buckets, inputs copied into static tensors. On the CPU the
static path runs eagerly ("uncaptured"); where CUDA is present the same tests also
replay captured CUDA graphs. Both are checked against the full-recompute argmax of
in-process models (base and peft adapters) and against the unpadded eager loop."""
from __future__ import annotations

import contextlib

import numpy as np
import peft
import pytest
import torch

from gradwire_server import sampler
from gradwire_server.decode_graphs import bucket_size
from gradwire_server.kv_cache import SCRATCH_BLOCK, BlockPool
from gradwire_server.lora_batch import adapter_weights
from gradwire_server.models import tiny_random_model
from reference import greedy_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MODES = ["uncaptured"] + (["captured"] if DEVICE.type == "cuda" else [])
PROMPTS = [[3, 17, 4, 99, 12], list(range(40, 90)), [7, 7]]   # the 50-token one crosses the 64-token bucket


def adapted_model() -> tuple[peft.PeftModel, list]:
    """tiny-random (float32, on DEVICE) with two LoRA adapters of different ranks and
    non-zero factors, and their factors as the sampler takes them."""
    model = tiny_random_model().to(DEVICE)
    torch.manual_seed(5)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear"), adapter_name="a")
    model.add_adapter("b", peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    return model.eval(), [adapter_weights(model, "a"), adapter_weights(model, "b")]


def decode(model, adapters: list, graphs: str, settings: sampler.SamplingSettings):
    """Every prompt x adapter (None, a, b) as one request of 2 samples, decoded together."""
    pool = BlockPool(model.config, 2**22, torch.float32, DEVICE)

    @contextlib.contextmanager
    def base_weights():
        with model.disable_adapter():
            yield

    loop = sampler.DecodeLoop(model, pool, DEVICE, base_weights, graphs=graphs)
    generations = [sampler.Generation(sampler.SampleSpec(np.array(prompt), 2, settings), str, adapter)
                   for prompt in PROMPTS for adapter in [None, *adapters]]
    for generation in generations:
        loop.add(generation)
    while not all(g.done for g in generations):
        loop.turn()
    assert pool.used_bytes == 0 and pool.reserved == 0
    return generations, loop


@pytest.mark.parametrize("graphs", MODES)
def test_bucketed_greedy_steps_equal_each_models_reference(graphs):
    """18 rows (bucket 32) of three prompts under the base model and two adapters of
    different ranks and modules: greedy tokens equal each model's full-recompute argmax."""
    model, adapters = adapted_model()
    generations, loop = decode(model, adapters, graphs, sampler.SamplingSettings(max_tokens=30, seed=0,
                                                                                temperature=0.0))
    references, names = {}, {id(adapters[0]): "a", id(adapters[1]): "b"}
    for generation in generations:
        name = names.get(id(generation.adapter))  # None: the base model
        key = (tuple(generation.spec.prompt.tolist()), name)
        if key not in references:
            context = model.disable_adapter() if name is None else contextlib.nullcontext()
            if name is not None:
                model.set_adapter(name)
            with torch.no_grad(), context:
                references[key] = greedy_reference(model, list(key[0]), 30)
        assert [s.tokens for s in generation.sequences] == [references[key]] * 2
    if graphs == "captured":
        assert loop.graphs.enabled and loop.graphs.captured > 0


@pytest.mark.parametrize("graphs", MODES)
def test_bucketed_sampled_steps_equal_the_unpadded_eager_loop(graphs):
    """Sampling with seeds, top-k and top-p: the same tokens as the eager loop, and
    logprobs within float32 rounding (padding changes matmul shapes, not the math)."""
    model, adapters = adapted_model()
    settings = sampler.SamplingSettings(max_tokens=40, seed=11, temperature=0.9, top_k=50, top_p=0.95)
    eager, _ = decode(model, adapters, "off", settings)
    bucketed, _ = decode(model, adapters, graphs, settings)
    for expected, got in zip(eager, bucketed):
        for a, b in zip(expected.sequences, got.sequences):
            assert a.tokens == b.tokens
            np.testing.assert_allclose(b.logprobs, a.logprobs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("graphs", MODES)
def test_the_next_adapter_in_the_same_bucket_gets_its_own_factors(graphs):
    """Two adapters of the same rank and modules, one after the other in one loop (one
    bucket, one set of static factors): each decodes its own model's argmax."""
    model, _ = adapted_model()
    model.add_adapter("c", peft.LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B.c" in name:
                parameter.normal_(0, 0.5)
    pool = BlockPool(model.config, 2**22, torch.float32, DEVICE)
    loop = sampler.DecodeLoop(model, pool, DEVICE, model.disable_adapter, graphs=graphs)
    settings = sampler.SamplingSettings(max_tokens=12, seed=0, temperature=0.0)
    for name in ("a", "c"):
        generation = sampler.Generation(sampler.SampleSpec(np.array(PROMPTS[0]), 1, settings), str,
                                        adapter_weights(model, name))
        loop.add(generation)
        while not generation.done:
            loop.turn()
        model.set_adapter(name)
        with torch.no_grad():
            assert generation.sequences[0].tokens == greedy_reference(model, PROMPTS[0], 12)


def test_the_scratch_block_is_never_handed_out():
    pool = BlockPool(tiny_random_model().config, 2**20, torch.float32, torch.device("cpu"))
    pool.reserve(pool.usable_blocks)
    taken = [pool.take() for _ in range(pool.usable_blocks)]
    assert SCRATCH_BLOCK not in taken and 0 not in taken and len(set(taken)) == len(taken)
    assert pool.used_bytes == pool.usable_blocks * pool.block_bytes


def test_bucket_sizes_are_powers_of_two_at_or_above():
    assert [bucket_size(n) for n in (1, 2, 3, 4, 5, 64, 65)] == [1, 2, 4, 4, 8, 64, 128]
    assert bucket_size(3, 64) == 64 and bucket_size(0, 8) == 8
