#!/usr/bin/env python3
"""Sampling at RL scale: aggregate generated tokens/s of concurrent requests
through one `gradwire-server`, against the same work done one request at a
time with transformers `generate` in-process.

The model is scripts/bench.py's ~10M-parameter random Llama (CPU float32).
Every request samples num_samples=4 completions of exactly 128 tokens at
temperature 1 from its own 16-token prompt. Measured:

1. 1, 8 and 64 concurrent requests on the base model, aggregate tokens/s, and
   the ratio to sequential in-process `generate` (goal at 64: >= 4).
2. 64 concurrent requests spread over 8 different sampler adapters vs 64 on one
   adapter (timed before and after), aggregate tokens/s (goal >= 0.8).

Sequential `generate` runs a few requests just before and just after each
concurrent measurement and reports its mean rate: one request at a time, its
tokens/s does not depend on how many there are.

Both sides use the same number of torch threads (--threads, default 1, set
before torch loads: on a shared 2-core machine more threads mostly spin).

With --size 1b (for a GPU) the model is a random 1.1B Llama (`--load-format dummy`)
on the server's device in its default dtype, and `generate` runs the same model on
the same device in the same dtype (bf16 on CUDA).

Usage: .venv/bin/python scripts/bench_sampling.py [--threads 1] [--generate-requests 4] [--size 1b]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

THREADS = "--threads"
if THREADS in sys.argv:  # before torch is imported, here and in the server subprocess
    os.environ["OMP_NUM_THREADS"] = sys.argv[sys.argv.index(THREADS) + 1]
else:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADWIRE_PROGRESS", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import gradwire  # noqa: E402
from bench import RANK, write_model  # noqa: E402
from gradwire_server.models import dummy_model, resolve_dtype  # noqa: E402
from local_server import start_server  # noqa: E402

NUM_SAMPLES, MAX_TOKENS, PROMPT_TOKENS = 4, 128, 16


def prompts(count: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, PROMPT_TOKENS).tolist() for _ in range(count)]


def concurrent_tokens_per_s(samplers: list, count: int, seed: int) -> float:
    """Aggregate generated tokens/s of `count` requests submitted at once, request
    i to samplers[i % len(samplers)], end to end (submission to the last result)."""
    start = time.perf_counter()
    futures = [samplers[i % len(samplers)].sample(
        gradwire.ModelInput.from_ints(prompt), NUM_SAMPLES,
        gradwire.SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=seed + i))
        for i, prompt in enumerate(prompts(count, seed))]
    tokens = sum(len(s.tokens) for f in futures for s in f.result().sequences)
    elapsed = time.perf_counter() - start
    assert tokens == count * NUM_SAMPLES * MAX_TOKENS
    return tokens / elapsed


def generate_tokens_per_s(model, count: int) -> float:
    """Generated tokens/s of `count` requests run one at a time with in-process `generate`."""
    start = time.perf_counter()
    tokens = 0
    with torch.no_grad():
        for prompt in prompts(count, 99):
            out = model.generate(torch.tensor([prompt], device=model.device), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                                 num_return_sequences=NUM_SAMPLES, pad_token_id=256)
            tokens += out.shape[0] * (out.shape[1] - PROMPT_TOKENS)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(THREADS, type=int, default=1, help="torch threads, both sides")
    parser.add_argument("--generate-requests", type=int, default=4, help="requests timed with generate")
    parser.add_argument("--size", choices=["small", "1b"], default="small",
                        help="the ~10M random Llama (CPU), or a random 1.1B one on the device")
    parser.add_argument("--counts", default="1,8,64", help="numbers of concurrent base-model requests")
    parser.add_argument("--skip-adapters", action="store_true", help="leave out the 8-adapter measurement")
    parser.add_argument("--server-args", default="", help="extra gradwire-server flags, one string")
    args = parser.parse_args()
    server_args = args.server_args.split()

    rows: list[tuple[str, str]] = []
    device = torch.device("cuda" if args.size == "1b" and torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype("auto", device)
    with tempfile.TemporaryDirectory() as folder:
        checkpoints = ("--checkpoint-dir", os.path.join(folder, "checkpoints"))
        if args.size == "1b":
            model = dummy_model("llama-1b", device, dtype)[0].eval()
            name, parameters = "llama-1b", sum(p.numel() for p in model.parameters())
            server, address = start_server(name, "--load-format", "dummy", *checkpoints, *server_args)
        else:
            name, parameters = folder, write_model(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            server, address = start_server(name, *checkpoints, *server_args)
        try:
            service = gradwire.ServiceClient(base_url=address)
            base = service.create_sampling_client(base_model=name)
            concurrent_tokens_per_s([base], 2, 0)  # warm up
            generate_tokens_per_s(model, 1)  # warm up
            for count in map(int, args.counts.split(",")):
                # generate is timed just before and just after, so load drifting on a shared
                # machine moves both sides of the ratio alike.
                before = generate_tokens_per_s(model, args.generate_requests)
                served = concurrent_tokens_per_s([base], count, 1000 * count)
                local = (before + generate_tokens_per_s(model, args.generate_requests)) / 2
                rows += [(f"{count} concurrent requests, base model, aggregate tokens/s", f"{served:,.0f}"),
                         ("  sequential generate around it, tokens/s", f"{local:,.0f}"),
                         (f"  ratio{' (goal >= 4)' if count == 64 else ''}", f"{served / local:.2f}")]

            if args.skip_adapters:
                return print_rows(rows, device, dtype, model, parameters, server_args)
            # Eight runs, one optimizer step each (non-zero LoRA factors), saved as sampler weights.
            adapters = []
            for seed in range(8):
                tc = service.create_lora_training_client(name, rank=RANK, seed=seed)
                data = [gradwire.Datum(model_input=gradwire.ModelInput.from_ints(p[:-1]),
                                       loss_fn_inputs={"target_tokens": p[1:]}) for p in prompts(4, seed)]
                tc.forward_backward(data, "cross_entropy")
                tc.optim_step(gradwire.AdamParams(learning_rate=1e-3)).result()
                adapters.append(service.create_sampling_client(
                    model_path=tc.save_weights_for_sampler(f"bench-{seed}").result().path))
            concurrent_tokens_per_s(adapters, 8, 5)  # loads every adapter
            one = concurrent_tokens_per_s(adapters[:1], 64, 7)
            eight = concurrent_tokens_per_s(adapters, 64, 7)
            one = (one + concurrent_tokens_per_s(adapters[:1], 64, 7)) / 2  # before and after, as above
            rows += [("64 concurrent requests, one sampler adapter, aggregate tokens/s", f"{one:,.0f}"),
                     ("64 concurrent requests, 8 sampler adapters, aggregate tokens/s", f"{eight:,.0f}"),
                     ("  8 adapters / one adapter (goal >= 0.8)", f"{eight / one:.2f}")]
        finally:
            server.terminate()
            server.wait()
    print_rows(rows, device, dtype, model, parameters, server_args)


def print_rows(rows: list[tuple[str, str]], device: torch.device, dtype: torch.dtype, model, parameters: int,
               server_args: list[str]) -> None:
    card = f"{torch.cuda.get_device_name()} " if device.type == "cuda" else ""
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"{card}{device.type} {str(dtype).removeprefix('torch.')}; model: random Llama, "
          f"{parameters / 1e6:.1f}M parameters, vocab {model.config.vocab_size}, LoRA rank {RANK}; "
          f"requests of {NUM_SAMPLES} samples x {MAX_TOKENS} tokens, {PROMPT_TOKENS}-token prompts"
          + (f"; server flags: {' '.join(server_args)}" if server_args else ""))
    width = max(len(name) for name, _ in rows) + 2
    for name, value in rows:
        print(f"{name:<{width}}{value:>12}")


if __name__ == "__main__":
    main()
