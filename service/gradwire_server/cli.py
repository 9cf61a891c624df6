"""`gradwire-server --model NAME_OR_PATH [--host H] [--port P] [--checkpoint-dir DIR]
[--keep-graph-budget-mb MB]`."""
from __future__ import annotations

import argparse
import asyncio
import logging
import pathlib

from gradwire_server.server import DEFAULT_CHECKPOINT_DIR, ServerConfig, serve


def parse_config(argv: list[str] | None = None) -> ServerConfig:
    """The server's configuration from command-line arguments."""
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
    args = parser.parse_args(argv)
    return ServerConfig(model=args.model, host=args.host, port=args.port, checkpoint_dir=args.checkpoint_dir,
                        keep_graph_budget_mb=args.keep_graph_budget_mb)


def main(argv: list[str] | None = None) -> None:
    config = parse_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
