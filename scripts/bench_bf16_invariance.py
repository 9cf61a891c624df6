#!/usr/bin/env python3
"""Where bf16 sampled and training logprobs part: does a kernel's rounding depend on
the sequence length or on the number of rows? In-process, on this machine's device,
on a random model loaded as the server loads it (`--dtype bfloat16 --load-format dummy`).

1. the training function (decoder + chunked logprobs, under the engine's autocast):
   the logprobs of a sequence's first positions alone vs with more tokens after them
   (what padding to a longer datum does), with SDPA and with eager attention, and alone vs
   among other sequences in one batch;
2. a matmul's rows computed among few rows (a decode step of few sequences) or among many
   (a micro-batch of several sequences) vs among those of one sequence, for each shape of
   weight a layer and the unembedding have, and of a run's LoRA factors;
3. one query's attention over its past, with an explicit mask (how the sampler's
   decode step calls it) vs its row of a causal pass over the same keys; then the same
   with each SDPA backend forced on both sides, and what each costs a training-sized pass;
4. the whole chain, for each candidate fix: the sampler's decode loop (in-process, its
   static decode steps, with a rank-32 LoRA adapter, two requests of different prompt
   lengths decoded together) vs the training function on the sampled tokens, with cuBLAS's bf16 GEMMs as they are, with float32 reductions only,
   and without split-K; and with each attention (SDPA as it chooses, SDPA's backends
   forced on both sides, eager); then what each cuBLAS setting and attention costs a
   LoRA forward + backward of 4 x 1024 tokens.

0 everywhere means training and sampling can agree exactly; on the CPU (torch 2.13)
SDPA changes with the length and a one-row matmul takes another kernel. The cuBLAS
settings act on CUDA only.

Usage: python scripts/bench_bf16_invariance.py [--preset llama-1b] [--length 159] [--rank 32]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from gradwire_server import sampler  # noqa: E402
from gradwire_server.engine import ATTENTION_MODULES, LORA_ALPHA, MLP_MODULES, UNEMBED_MODULES  # noqa: E402
from gradwire_server.kv_cache import BlockPool  # noqa: E402
from gradwire_server.logprobs import model_target_logprobs  # noqa: E402
from gradwire_server.lora_batch import adapter_weights  # noqa: E402
from gradwire_server.models import load_model  # noqa: E402

# torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction: (reduced-precision
# reductions allowed, split-K allowed); torch's default allows both.
CUBLAS_SETTINGS = {"cuBLAS default": (True, True), "no split-K": (False, False),
                   "float32 reductions": (False, True)}


def max_and_mean(a: torch.Tensor, b: torch.Tensor) -> str:
    diff = (a.float() - b.float()).abs()
    return f"{diff.max().item():.4f} / {diff.mean().item():.5f}"


def set_attention(model: torch.nn.Module, attention: str) -> None:
    model.config._attn_implementation = attention
    for module in model.modules():
        if hasattr(module, "config") and hasattr(module.config, "_attn_implementation"):
            module.config._attn_implementation = attention


def training_logprobs_vs_length(model, tokens: torch.Tensor, length: int) -> list[tuple[str, str]]:
    rows = []
    for attention in ("sdpa", "eager"):
        set_attention(model, attention)
        with torch.no_grad(), torch.autocast(tokens.device.type, dtype=torch.bfloat16):
            alone = model_target_logprobs(model, tokens[:, :length], tokens[:, 1:length + 1, None])[0, :, 0]
            for more in (1, 7, 64):
                longer = model_target_logprobs(model, tokens[:, :length + more],
                                               tokens[:, 1:length + more + 1, None])[0, :length, 0]
                rows.append((f"1. training, {attention}: {length} positions alone vs with {more} more after them",
                             max_and_mean(alone, longer)))
    set_attention(model, "sdpa")
    return rows


def training_logprobs_vs_batch(model, tokens: torch.Tensor, length: int,
                               generator: torch.Generator) -> list[tuple[str, str]]:
    """A sequence's logprobs alone vs as the first of 4 sequences in one micro-batch (the
    others as long, so no padding: only the batch's size changes)."""
    others = torch.randint(0, model.config.vocab_size, (3, length + 1), generator=generator).to(tokens.device)
    batch = torch.cat([tokens[:, :length + 1], others])
    with torch.no_grad(), torch.autocast(tokens.device.type, dtype=torch.bfloat16):
        alone = model_target_logprobs(model, batch[:1, :-1], batch[:1, 1:, None])[0, :, 0]
        among = model_target_logprobs(model, batch[:, :-1], batch[:, 1:, None])[0, :, 0]
    return [(f"1. training, sdpa: {length} positions alone vs as one of 4 sequences in a batch",
             max_and_mean(alone, among))]


def matmul_rows(name: str, weight: torch.Tensor, generator: torch.Generator) -> list[tuple[str, str]]:
    """64 rows of float32 activations times the weight under autocast (as in a layer),
    computed 1 or 4 at a time (a decode step of that many sequences), or within a product
    of 1024 rows (a micro-batch of several sequences), vs within one of 256 rows (a sequence)."""
    inputs = torch.randn(1024, weight.shape[1], generator=generator).to(weight.device)
    shape = f"{name} [{weight.shape[1]}] x [{weight.shape[1]}, {weight.shape[0]}]"
    with torch.autocast(weight.device.type, dtype=torch.bfloat16):
        among_256 = F.linear(inputs[:256], weight)[:64]
        rows = [(f"2. matmul {shape}, 64 rows {rows} at a time vs among 256",
                 max_and_mean(torch.cat([F.linear(part, weight) for part in inputs[:64].split(rows)]), among_256))
                for rows in (1, 4)]
        rows.append((f"2. matmul {shape}, 64 rows among 1024 vs among 256",
                     max_and_mean(F.linear(inputs, weight)[:64], among_256)))
    return rows


def projections(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """One weight of each shape a decode step multiplies by: the first layer's and the unembedding's."""
    by_shape = {}
    for name, module in [*model.get_decoder().layers[0].named_modules(), ("lm_head", model.get_output_embeddings())]:
        if isinstance(module, torch.nn.Linear):
            by_shape.setdefault(tuple(module.weight.shape), (name.rsplit(".", 1)[-1], module.weight))
    return dict(by_shape.values())


def lora_factors(model: torch.nn.Module, rank: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """float32 LoRA factors of each shape a run of `rank` multiplies by (A [rank, in], B [out, rank]):
    their narrow side is where a GEMM library splits the reduction by the row count."""
    shapes = {tuple(weight.shape) for weight in projections(model).values()}
    factors = {f"lora_A (in {n_in})": (rank, n_in) for _, n_in in shapes}
    factors |= {f"lora_B (out {n_out})": (n_out, rank) for n_out, _ in shapes}
    device = next(model.parameters()).device
    return {name: (torch.randn(*shape, generator=generator) * 0.02).to(device) for name, shape in factors.items()}


def one_query_attention(heads: int, head_dim: int, keys: int, device: torch.device,
                        generator: torch.Generator) -> list[tuple[str, str]]:
    """The last query's attention alone (a decode step's call: a bool mask, or for flash,
    which takes none, no mask: the last query sees every key) vs its row of a causal pass
    (training's call), each backend on both sides; and a training-sized forward + backward
    in each backend, to price making it training's."""
    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device, torch.bfloat16)
    query, key, value = normal(1, heads, keys, head_dim), normal(1, heads, keys, head_dim), normal(1, heads, keys, head_dim)
    mask = torch.ones(1, 1, 1, keys, dtype=torch.bool, device=device)
    causal = F.scaled_dot_product_attention(query, key, value, is_causal=True)[:, :, -1:]
    masked = F.scaled_dot_product_attention(query[:, :, -1:], key, value, attn_mask=mask)
    rows = [(f"3. SDPA, the last of {keys} queries: alone with a mask vs in a causal pass", max_and_mean(masked, causal))]
    training = [normal(8, heads, 1024, head_dim).requires_grad_() for _ in range(3)]
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        name = f"3. SDPA {backend.name.lower()} on both sides: the last query alone vs in a causal pass"
        try:
            with sdpa_kernel(backend):
                causal = F.scaled_dot_product_attention(query, key, value, is_causal=True)[:, :, -1:]
                alone = F.scaled_dot_product_attention(query[:, :, -1:], key, value,
                                                       attn_mask=None if backend == SDPBackend.FLASH_ATTENTION else mask)
                seconds = training_attention_seconds(training, device)
        except RuntimeError:  # this backend does not run here
            rows.append((name, "not available"))
            continue
        rows.append((name, f"{max_and_mean(alone, causal)}; training-sized fwd + bwd {seconds * 1e3:.2f} ms"))
    return rows


def training_attention_seconds(qkv: list[torch.Tensor], device: torch.device, repeats: int = 5) -> float:
    """Median seconds of a causal attention forward + backward over [8, heads, 1024, head_dim]."""
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        F.scaled_dot_product_attention(*qkv, is_causal=True).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


@contextlib.contextmanager
def cublas_bf16(setting: tuple[bool, bool]):
    """cuBLAS's bf16 GEMMs with this (reduced-precision, split-K) setting while the block runs."""
    matmul = torch.backends.cuda.matmul
    before = (matmul.allow_bf16_reduced_precision_reduction, matmul.allow_bf16_reduced_precision_reduction_split_k)
    matmul.allow_bf16_reduced_precision_reduction = setting
    try:
        yield
    finally:
        matmul.allow_bf16_reduced_precision_reduction = before


def attention_choice(model: torch.nn.Module, choice: str):
    """"eager", or SDPA ("sdpa": as it chooses; else that backend forced) for the block."""
    set_attention(model, "eager" if choice == "eager" else "sdpa")
    if choice in ("sdpa", "eager"):
        return contextlib.nullcontext()
    return sdpa_kernel(getattr(SDPBackend, choice.upper()))


def with_adapter(model: torch.nn.Module, rank: int) -> peft.PeftModel:
    """The model wrapped in place with one rank-`rank` LoRA adapter on every module a run
    trains, float32, its B factors non-zero (a trained run's)."""
    torch.manual_seed(1)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(
        r=rank, lora_alpha=LORA_ALPHA, target_modules=[*ATTENTION_MODULES, *MLP_MODULES, *UNEMBED_MODULES]),
        adapter_name="run")
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    return wrapped


def sampled_vs_training(wrapped: peft.PeftModel, prompts: list[list[int]], samples: int, tokens: int
                        ) -> tuple[str, str]:
    """The decode loop's logprobs of `samples` x `tokens` sampled tokens after each prompt
    (the requests decoded together: rows of different lengths; the adapter's rows; the
    server's static decode steps) vs the training function's on each sequence alone, and
    that vs all of them in one right-padded batch (the training function's own floor)."""
    model = wrapped.get_base_model()
    device = next(model.parameters()).device
    pool = BlockPool(model.config, 2**30, torch.bfloat16, device)

    @contextlib.contextmanager
    def base_weights():  # as the server's (sampler_weights.py): peft's layers off, the engine's autocast
        with wrapped.disable_adapter(), torch.autocast(device.type, dtype=torch.bfloat16):
            yield

    loop = sampler.DecodeLoop(model, pool, device, base_weights, graphs="uncaptured")
    adapter = adapter_weights(model, "run")
    generations = [sampler.Generation(sampler.SampleSpec(np.array(prompt), samples, sampler.SamplingSettings(
        max_tokens=tokens, seed=0)), str, adapter) for prompt in prompts]
    for generation in generations:
        loop.add(generation)
    while not all(generation.done for generation in generations):
        loop.turn()
    rows = [(prompt, prompt + s.tokens, torch.tensor(s.logprobs))
            for prompt, generation in zip(prompts, generations) for s in generation.sequences]
    longest = max(len(sequence) for _, sequence, _ in rows)
    padded = torch.tensor([sequence + [0] * (longest - len(sequence)) for _, sequence, _ in rows], device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        alone = [model_target_logprobs(model, padded[i:i + 1, :len(sequence) - 1],
                                       padded[i:i + 1, 1:len(sequence), None])[0, len(prompt) - 1:, 0].cpu()
                 for i, (prompt, sequence, _) in enumerate(rows)]
        batch = model_target_logprobs(model, padded[:, :-1], padded[:, 1:, None])[..., 0].cpu()
    batched = [batch[i, len(prompt) - 1:len(sequence) - 1] for i, (prompt, sequence, _) in enumerate(rows)]
    sampled = [logprobs for _, _, logprobs in rows]
    return max_and_mean(torch.cat(sampled), torch.cat(alone)), max_and_mean(torch.cat(batched), torch.cat(alone))


def lora_step_seconds(wrapped: peft.PeftModel, batch: torch.Tensor, repeats: int = 3) -> float:
    """Median seconds of a training forward + backward (bf16 autocast, LoRA gradients) of `batch`."""
    model = wrapped.get_base_model()
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        with torch.autocast(batch.device.type, dtype=torch.bfloat16):
            logprobs = model_target_logprobs(model, batch[:, :-1], batch[:, 1:, None])
        logprobs.sum().backward()
        if batch.device.type == "cuda":
            torch.cuda.synchronize(batch.device)
        times.append(time.perf_counter() - started)
    wrapped.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def candidate_fixes(model: torch.nn.Module, rank: int, samples: int, tokens: int,
                    generator: torch.Generator) -> Iterator[tuple[str, str]]:
    """Section 4's rows, each as it is measured (the slowest section: a run cut short keeps some)."""
    wrapped = with_adapter(model, rank)
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (32,), generator=generator).tolist()
    prompts = [prompt, prompt[:13]]  # rows of two lengths in each decode step
    batch = torch.randint(0, vocab, (4, 1025), generator=generator).to(device)
    attentions = ["sdpa", "efficient_attention", "math", "eager"] + (["flash_attention", "cudnn_attention"]
                                                                     if device.type == "cuda" else [])
    yield (f"4. 2 prompts x {samples} x {tokens} sampled vs training alone; training alone vs in one batch",
           "max / mean; max / mean")
    for setting in CUBLAS_SETTINGS:
        for attention in attentions:
            name = f"4. {setting}, attention {attention}"
            try:
                with cublas_bf16(CUBLAS_SETTINGS[setting]), attention_choice(model, attention):
                    versus_training, training_floor = sampled_vs_training(wrapped, prompts, samples, tokens)
                    seconds = lora_step_seconds(wrapped, batch)
            except (RuntimeError, TypeError, AttributeError) as error:  # a backend that does not run
                # here; a torch without the setting
                yield name, f"not available ({str(error).splitlines()[0][:80]})"
                continue
            yield name, f"{versus_training}; {training_floor}; LoRA fwd + bwd of 4 x 1024: {seconds * 1e3:.1f} ms"
    set_attention(model, "sdpa")
    wrapped.unload()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama-1b")
    parser.add_argument("--length", type=int, default=159)
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank of the factors in 2 and the adapter in 4")
    parser.add_argument("--samples", type=int, default=4, help="samples of the request in 4")
    parser.add_argument("--tokens", type=int, default=64, help="tokens each sample generates in 4")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.preset, device, torch.bfloat16, "dummy").model.eval()
    config = model.config
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (1, args.length + 65), generator=generator).to(device)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rows = [("device, model", f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, "
                              f"{args.preset} (bf16 matmul weights), torch {torch.__version__}"),
            ("max / mean abs diff", "(logprobs in 1; bf16 outputs in 2 and 3)")]
    rows += training_logprobs_vs_length(model, tokens, args.length)
    rows += training_logprobs_vs_batch(model, tokens, args.length, generator)
    for name, weight in {**projections(model), **lora_factors(model, args.rank, generator)}.items():
        rows += matmul_rows(name, weight, generator)
    rows += one_query_attention(config.num_attention_heads, head_dim, args.length, device, generator)
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    for name, value in candidate_fixes(model, args.rank, args.samples, args.tokens, generator):
        print(f"{name:<{width}}  {value}", flush=True)


if __name__ == "__main__":
    main()
