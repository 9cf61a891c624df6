#!/usr/bin/env python3
"""Streaming benchmark on tiny-random (CPU): prints one table.

1. Server peak resident memory (VmHWM) after streaming a dataset 8x larger vs
   1x, each into a freshly started server (goal: ratio <= 1.15, and growth 8x - 1x
   at most the encoded size of the 7 extra parts). With --k > 1 the targets (and
   weights) are [tokens, k], so the outputs are as large as the input: e.g.
   --datums 200 --tokens 1000 --k 40.
2. Streamed vs unary forward_backward tokens/s on the same data, same server
   (goal: >= 0.9).

Usage: .venv/bin/python scripts/bench_stream.py [--datums 2000] [--tokens 128] [--k 1]
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADWIRE_PROGRESS", "0")

import gradwire  # noqa: E402
from local_server import start_server  # noqa: E402
from gradwire import _convert, client  # noqa: E402


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
    return kib / 1024


def datums(count: int, tokens: int, seed: int = 0, k: int = 1):
    rng = np.random.default_rng(seed)
    shape = (tokens,) if k == 1 else (tokens, k)
    for _ in range(count):
        yield gradwire.Datum(model_input=gradwire.ModelInput.from_ints(rng.integers(0, 320, tokens)),
                             loss_fn_inputs={"target_tokens": rng.integers(0, 320, shape),
                                             "weights": np.ones(shape, np.float32)})


def encoded_mib(count: int, tokens: int, k: int) -> float:
    return sum(_convert.datum_to_proto(d).ByteSize() for d in datums(count, tokens, k=k)) / 2**20


def streamed_peak(count: int, tokens: int, k: int) -> tuple[float, float]:
    """(peak RSS after loading, peak RSS after streaming `count` datums) of a fresh server."""
    process, address = start_server("tiny-random", "--checkpoint-dir", tempfile.mkdtemp(prefix="bench-stream-"))
    try:
        tc = gradwire.ServiceClient(base_url=address).create_lora_training_client("tiny-random", rank=8, seed=0)
        tc.forward_backward(list(datums(4, tokens, k=k)), "cross_entropy").result()  # warm up
        baseline = peak_rss_mib(process.pid)
        tc.forward_backward(datums(count, tokens, k=k), "cross_entropy").result()
        return baseline, peak_rss_mib(process.pid)
    finally:
        process.terminate()
        process.wait()


def tokens_per_second(tc, data: list, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        tc.forward_backward(data, "cross_entropy").result()
    return repeats * sum(d.model_input.length for d in data) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datums", type=int, default=2000, help="datums in the 1x dataset")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per datum")
    parser.add_argument("--k", type=int, default=1, help="targets per position ([tokens, k] when > 1)")
    parser.add_argument("--memory-only", action="store_true", help="skip the throughput measure")
    args = parser.parse_args()

    base_1x, peak_1x = streamed_peak(args.datums, args.tokens, args.k)
    base_8x, peak_8x = streamed_peak(8 * args.datums, args.tokens, args.k)
    extra_mib = 7 * encoded_mib(args.datums, args.tokens, args.k)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, CPU float32")
    print(f"{'measure':<58} {'value':>12}")
    print(f"{'server peak RSS, 1x stream (' + str(args.datums) + ' datums), MiB':<58} {peak_1x:>12.1f}")
    print(f"{'server peak RSS, 8x stream (' + str(8 * args.datums) + ' datums), MiB':<58} {peak_8x:>12.1f}")
    print(f"{'  (after warm-up, before streaming: 1x / 8x), MiB':<58} {base_1x:>5.1f} / {base_8x:>4.1f}")
    print(f"{'peak growth 8x - 1x, MiB':<58} {peak_8x - peak_1x:>12.1f}")
    print(f"{'encoded size of the 7 extra parts, MiB':<58} {extra_mib:>12.1f}")
    print(f"{'peak RSS ratio 8x / 1x (goal <= 1.15)':<58} {peak_8x / peak_1x:>12.3f}")
    if args.memory_only:
        return

    process, address = start_server("tiny-random")
    try:
        tc = gradwire.ServiceClient(base_url=address).create_lora_training_client("tiny-random", rank=8, seed=0)
        data = list(datums(96, args.tokens, seed=1))  # ~2.5 MiB: fits one unary message
        tokens_per_second(tc, data, 1)  # warm up
        unary = tokens_per_second(tc, data, 5)
        client.MESSAGE_BUDGET_BYTES = 256 * 1024  # the same data in ~10 streamed messages
        streamed = tokens_per_second(tc, data, 5)
    finally:
        process.terminate()
        process.wait()

    print(f"{'unary forward_backward, tokens/s':<58} {unary:>12.0f}")
    print(f"{'streamed forward_backward, tokens/s':<58} {streamed:>12.0f}")
    print(f"{'streamed / unary (goal >= 0.9)':<58} {streamed / unary:>12.3f}")


if __name__ == "__main__":
    main()
