#!/usr/bin/env python3
"""Sampling benchmark: gradwire `sample` tokens/s vs in-process transformers
`generate` on the same model, batch 1 and num_samples 8; prints one table.

The model is a random ~10M-parameter Llama written to a temporary Hugging Face
folder and served by a `gradwire-server --model DIR` subprocess (so client and
server do not share a GIL). Both sides sample at temperature 1 with no stop,
so every run generates exactly max_tokens per sample; gradwire's time is end
to end (request, queue, generation, polling the operation). Goal: ratio >= 0.9.

Usage: .venv/bin/python scripts/bench_sampling.py [--max-tokens 128] [--repeats 5] [--threads N]
(--threads sets torch's CPU threads on both sides; on a small shared CPU box,
1 avoids the two processes' thread pools fighting over the cores.)
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gradwire  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from gradwire_server.models import tiny_random_tokenizer  # noqa: E402

PROMPT = list(range(40, 72))  # 32 tokens


def build_model_dir(folder: str) -> int:
    """Writes a random Llama (about 10M parameters) and a tokenizer to `folder`; returns its parameter count."""
    config = LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=256, eos_token_id=257, pad_token_id=256)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tiny_random_tokenizer().save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def start_server(model_dir: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "gradwire_server", "--model", model_dir, "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        match = re.search(r"listening on (\S+)", line)
        if match:
            return process, match.group(1)
    raise RuntimeError("server did not start")


def gradwire_tokens_per_s(sampler: gradwire.SamplingClient, num_samples: int, max_tokens: int,
                          seed: int = 0) -> float:
    """Generated tokens/s of one `sample` call, end to end."""
    params = gradwire.SamplingParams(max_tokens=max_tokens, seed=seed, temperature=1.0)
    start = time.perf_counter()
    response = sampler.sample(gradwire.ModelInput.from_ints(PROMPT), num_samples, params).result()
    elapsed = time.perf_counter() - start
    assert sum(len(s.tokens) for s in response.sequences) == num_samples * max_tokens
    return num_samples * max_tokens / elapsed


def transformers_tokens_per_s(model: LlamaForCausalLM, num_samples: int, max_tokens: int) -> float:
    """Generated tokens/s of one transformers `generate` call, with the server's
    numerics: float32 weights, bf16 autocast on CUDA."""
    device = model.device
    prompt = torch.tensor([PROMPT], device=device)
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = model.generate(prompt, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             num_return_sequences=num_samples, pad_token_id=256)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    assert out.shape == (num_samples, len(PROMPT) + max_tokens)
    return num_samples * max_tokens / elapsed


def compare(sampler: gradwire.SamplingClient, model: LlamaForCausalLM, num_samples: int, max_tokens: int,
            repeats: int) -> tuple[float, float]:
    """Median tokens/s (gradwire, transformers) after one warm-up each; the two
    alternate, so load from other processes hits both alike."""
    gradwire_tokens_per_s(sampler, num_samples, max_tokens)
    transformers_tokens_per_s(model, num_samples, max_tokens)
    served, local = [], []
    for seed in range(1, repeats + 1):
        served.append(gradwire_tokens_per_s(sampler, num_samples, max_tokens, seed))
        local.append(transformers_tokens_per_s(model, num_samples, max_tokens))
    return statistics.median(served), statistics.median(local)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads, both processes")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the server
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as model_dir:
        parameters = build_model_dir(model_dir)
        model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
        process, address = start_server(model_dir)
        try:
            sampler = gradwire.ServiceClient(address).create_sampling_client(base_model=model_dir)
            rows = [(n, *compare(sampler, model, n, args.max_tokens, args.repeats)) for n in (1, 8)]
        finally:
            process.terminate()
            process.wait(timeout=30)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(f"random Llama, {parameters / 1e6:.1f}M parameters, {device.type} ({device_name}), "
          f"prompt {len(PROMPT)} tokens, max_tokens {args.max_tokens}, median of {args.repeats}")
    print(f"{'num_samples':>11} | {'gradwire tok/s':>14} | {'transformers tok/s':>18} | {'ratio':>5}")
    for num_samples, served, local in rows:
        print(f"{num_samples:>11} | {served:>14.1f} | {local:>18.1f} | {served / local:>5.2f}")


if __name__ == "__main__":
    main()
