"""`gradwire-server --model NAME_OR_PATH [--host H] [--port P] [--checkpoint-dir DIR]
[--keep-graph-budget-mb MB] [--kv-cache-mb MB]`."""
from __future__ import annotations

import argparse
import asyncio
import logging
import pathlib

from gradwire_server.server import (CUDA_KV_CACHE_SHARE, DEFAULT_CHECKPOINT_DIR, DEFAULT_CPU_KV_CACHE_MB,
                                   ServerConfig, serve)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gradwire-server",
                                     description="gradwire training service (gRPC)")
    parser.add_argument("--model", required=True,
                        help="tiny-random, smollm2-135m, a local Hugging Face model folder or a hub id")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    parser.add_argument("--checkpoint-dir", type=pathlib.Path, default=DEFAULT_CHECKPOINT_DIR,
                        help="where checkpoints and the run index are kept "
                             f"(default: ./{DEFAULT_CHECKPOINT_DIR})")
    parser.add_argument("--keep-graph-budget-mb", type=float, default=ServerConfig.keep_graph_budget_mb,
                        help="activation memory a custom loss's forward leg may keep so its backward "
                             "leg needs no second forward pass; 0 always recomputes (default: %(default)g)")
    parser.add_argument("--kv-cache-mb", type=float, default=None,
                        help="memory for the sampler's KV cache; sampling requests wait for room in it "
                             f"(default: {DEFAULT_CPU_KV_CACHE_MB:g} on CPU, "
                             f"{CUDA_KV_CACHE_SHARE:g} of the memory free after loading the model on CUDA)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(ServerConfig(model=args.model, host=args.host, port=args.port,
                                   checkpoint_dir=args.checkpoint_dir,
                                   keep_graph_budget_mb=args.keep_graph_budget_mb,
                                   kv_cache_mb=args.kv_cache_mb)))


if __name__ == "__main__":
    main()
