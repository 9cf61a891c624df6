"""`gradwire-server --model NAME_OR_PATH [--host H] [--port P] [--checkpoint-dir DIR]
[--dtype auto|float32|bfloat16] [--load-format auto|dummy] [--micro-batch-tokens N]
[--keep-graph-budget-mb MB] [--kv-cache-mb MB] [--activation-checkpointing] [--compile] [--no-cuda-graphs]
[--attention auto|efficient|math|eager] [--sampler-logprobs auto|training|decode]`."""
from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import pathlib
import sys
from collections.abc import Callable

from gradwire_server import memory
from gradwire_server.attention import ATTENTIONS
from gradwire_server.models import DTYPES, LOAD_FORMATS, preset_configs
from gradwire_server.sampler import SAMPLER_LOGPROBS
from gradwire_server.server import (CUDA_KV_CACHE_SHARE, DEFAULT_CHECKPOINT_DIR, DEFAULT_CPU_KV_CACHE_MB,
                                   ServerConfig, StartupError, serve)


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port (0..65535; 0 picks a free one)")
    return int(text)


MAX_MEGABYTES = 2**40  # an exbibyte: a size past this is a typo (and overflows an int64 of bytes)
MAX_MICRO_BATCH_TOKENS = 2**31 - 1


def _megabytes(minimum_exclusive: bool) -> Callable[[str], float]:
    """A finite size in MB, at least 0 (or more than 0), at most MAX_MEGABYTES."""
    def megabytes(text: str) -> float:
        value = float(text)
        if not math.isfinite(value) or value < 0 or (minimum_exclusive and value == 0) or value > MAX_MEGABYTES:
            raise argparse.ArgumentTypeError(f"{text} is not a size in MB (a finite number "
                                             f"{'above' if minimum_exclusive else 'of at least'} 0, "
                                             f"at most {MAX_MEGABYTES})")
        return value
    return megabytes


def parse_config(argv: list[str] | None = None) -> ServerConfig:
    """The server's configuration from command-line arguments."""
    parser = argparse.ArgumentParser(prog="gradwire-server",
                                     description="gradwire training service (gRPC)")
    parser.add_argument("--model", required=True,
                        help="tiny-random, smollm2-135m, a local Hugging Face model folder or a hub id")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=_port, default=50051, help="0 picks a free port")
    parser.add_argument("--checkpoint-dir", type=pathlib.Path, default=DEFAULT_CHECKPOINT_DIR,
                        help="where checkpoints and the run index are kept "
                             f"(default: ./{DEFAULT_CHECKPOINT_DIR})")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="the frozen base weights' dtype; auto: bfloat16 on CUDA, float32 on the CPU. "
                             "LoRA weights, gradients and AdamW state are float32 either way")
    parser.add_argument("--load-format", choices=LOAD_FORMATS, default="auto",
                        help="dummy: random weights from --model's config.json, or a preset "
                             f"({', '.join(preset_configs())}), made on the device (for benchmarks)")
    parser.add_argument("--micro-batch-tokens", type=int, default=None,
                        help="padded tokens per forward pass (default: from a probe pass at startup, on CUDA "
                             f"with the free memory, on the CPU {memory.CPU_ACTIVATION_BYTES // 2**20} MB of "
                             f"activations within {memory.MIN_MICRO_BATCH_TOKENS}-{memory.CPU_MICRO_BATCH_TOKENS} "
                             "tokens)")
    parser.add_argument("--keep-graph-budget-mb", type=_megabytes(minimum_exclusive=False), default=None,
                        help="activation memory a custom loss's forward leg may keep so its backward "
                             "leg needs no second forward pass; 0 always recomputes (default: from the "
                             f"free memory on CUDA, {memory.CPU_KEEP_GRAPH_BUDGET_BYTES // 2**20} on the CPU)")
    parser.add_argument("--kv-cache-mb", type=_megabytes(minimum_exclusive=True), default=None,
                        help="memory for the sampler's KV cache; sampling requests wait for room in it "
                             f"(default: {DEFAULT_CPU_KV_CACHE_MB:g} on CPU, "
                             f"{CUDA_KV_CACHE_SHARE:g} of the memory free after loading the model on CUDA)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="training keeps only each decoder layer's input and recomputes the layer in "
                             "the backward pass: about a third more compute for a fraction of the "
                             "activation memory (larger micro-batches, longer sequences)")
    parser.add_argument("--compile", action="store_true",
                        help="training runs the decoder layers compiled by torch.compile, one set of graphs for "
                             "every run (the usual kinds of batch compile before the server serves, the rarer ones "
                             "on first use: seconds to a minute each); sampling stays eager")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="on CUDA, the sampler replays its decode steps as CUDA graphs, padded to "
                             "power-of-two buckets and captured on first use (no effect on the CPU)")
    parser.add_argument("--attention", choices=ATTENTIONS, default="auto",
                        help="the attention kernel of training and sampling alike: auto lets PyTorch's SDPA "
                             "choose per call (fastest; in bf16 a sampled token's logprob may then part from "
                             "the training logprob of the same token by a kernel's rounding); efficient or "
                             "math forces that SDPA kernel on both; eager is transformers' own attention. "
                             "math and eager hold [batch, heads, length, length] attention weights")
    parser.add_argument("--sampler-logprobs", choices=SAMPLER_LOGPROBS, default="auto",
                        help="where the logprobs the sampler returns come from: training runs the training "
                             "forward on each finished sample (the numbers forward returns for it, bit for bit; "
                             "one forward pass per sample); decode takes them from the decode steps that drew "
                             "the tokens (in bf16 they part from training's by rounding); auto: training over "
                             "bfloat16 base weights, decode over float32")
    args = parser.parse_args(argv)
    if args.micro_batch_tokens is not None and not 1 <= args.micro_batch_tokens <= MAX_MICRO_BATCH_TOKENS:
        parser.error(f"--micro-batch-tokens must be in [1, {MAX_MICRO_BATCH_TOKENS}]")
    return ServerConfig(model=args.model, host=args.host, port=args.port, checkpoint_dir=args.checkpoint_dir,
                        keep_graph_budget_mb=args.keep_graph_budget_mb,
                        micro_batch_tokens=args.micro_batch_tokens, dtype=args.dtype,
                        load_format=args.load_format, kv_cache_mb=args.kv_cache_mb,
                        activation_checkpointing=args.activation_checkpointing, compile=args.compile,
                        cuda_graphs=args.cuda_graphs, attention=args.attention,
                        sampler_logprobs=args.sampler_logprobs)


def main(argv: list[str] | None = None) -> None:
    config = parse_config(argv)
    # Fewer out-of-memory failures from fragmentation when batch shapes vary;
    # read when CUDA first allocates, which is after this.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(config))
    except StartupError as error:
        sys.exit(f"gradwire-server: {str(error).splitlines()[0]}")


if __name__ == "__main__":
    main()
