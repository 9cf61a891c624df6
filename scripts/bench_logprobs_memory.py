#!/usr/bin/env python3
"""Peak memory of one forward-backward micro-batch: the engine's chunked logprobs vs
the whole [B, L, V] float32 logits and log_softmax, on the same random Llama.

Each way runs in a fresh child process; the figure is the rise of the process's
peak resident memory (CPU) or of PyTorch's peak allocation (CUDA) over what the
loaded model and a warm-up pass already needed.

Usage: python scripts/bench_logprobs_memory.py [--vocab 32000] [--batch 8] [--tokens 512]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from gradwire_server.batch import DatumArrays, LoraSettings  # noqa: E402
from gradwire_server.engine import Engine  # noqa: E402
from gradwire_server.logprobs import logprobs_from_logits  # noqa: E402
from gradwire_server.models import LoadedModel, tiny_random_tokenizer  # noqa: E402


def engine_for(vocab: int, device: torch.device) -> Engine:
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]), device:
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).requires_grad_(False)
    return Engine(LoadedModel("bench", model, tiny_random_tokenizer(), 2048), device)


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(way: str, vocab: int, batch: int, tokens: int) -> int:
    """Peak rise of one forward-backward of `batch` x `tokens` tokens, computed `way`."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    engine = engine_for(vocab, device)
    run = engine.run(engine.create_run(LoraSettings(rank=8, seed=0)))
    rng = np.random.default_rng(0)

    def datum(n: int) -> DatumArrays:
        return DatumArrays(rng.integers(0, vocab, n), {"target_tokens": rng.integers(0, vocab, n)})

    def forward_backward(data: list[DatumArrays]) -> None:
        if way == "chunked":
            logprobs, inputs = engine.micro_batch_logprobs(run, data)
        else:
            tokens_, inputs = engine.pad(data)
            logits = engine.peft_model(input_ids=tokens_).logits
            logprobs = logprobs_from_logits(logits, inputs["target_tokens"]) * inputs["mask"]
        engine.loss(logprobs, inputs, "cross_entropy", {})[0].backward()
        for p in run.params:
            p.grad = None

    forward_backward([datum(16)])  # warm up
    before = peak_bytes(device)
    forward_backward([datum(tokens) for _ in range(batch)])
    return peak_bytes(device) - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--way", choices=["whole", "chunked"], help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.way:
        print(json.dumps(measure(args.way, args.vocab, args.batch, args.tokens)))
        return
    rises = {}
    for way in ("whole", "chunked"):
        child = subprocess.run([sys.executable, __file__, "--way", way, "--vocab", str(args.vocab),
                                "--batch", str(args.batch), "--tokens", str(args.tokens)],
                               check=True, capture_output=True, text=True)
        rises[way] = json.loads(child.stdout.strip().splitlines()[-1])
    logits_mib = args.batch * args.tokens * args.vocab * 4 / 2**20
    print(f"batch {args.batch} x {args.tokens} tokens, vocabulary {args.vocab} "
          f"([B, L, V] float32 = {logits_mib:,.0f} MiB), LoRA rank 8, "
          f"{'CUDA' if torch.cuda.is_available() else 'CPU'}")
    for way, rise in rises.items():
        print(f"  peak memory rise, {way:>7} logprobs: {rise / 2**20:8,.0f} MiB")
    print(f"  chunked / whole: {rises['chunked'] / rises['whole']:.3f}")


if __name__ == "__main__":
    main()
