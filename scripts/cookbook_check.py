#!/usr/bin/env python3
"""Runs tinker-cookbook's sl_loop and rl_loop recipes, unchanged, against a gradwire
server through the `tinker` namespace (compat/tinker), offline; reports what breaks.

    pip install --no-deps --target /tmp/cookbook tinker-cookbook==0.6.1   # + its deps, not `tinker`
    pip install --no-deps --no-build-isolation --target /tmp/tinker-compat compat/tinker
    gradwire-server --model smollm2-135m --port 50051 --checkpoint-dir /tmp/ckpt &
    PYTHONPATH=/tmp/tinker-compat:/tmp/cookbook python scripts/cookbook_check.py \\
        --base-url localhost:50051 --model HuggingFaceTB/SmolLM2-135M-Instruct

The only shim always applied is the offline dataset (datasets.load_dataset answers with a
few local rows). --shim tokenizer registers the server's tokenizer with the cookbook
(it would download it from the hub otherwise); --shim renderer picks `--renderer` for a
model the cookbook's model_info does not know. Each recipe runs --steps steps.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import traceback

import datasets
import pyarrow

SL_ROWS = {"messages": [[{"role": "user", "content": f"Say {word}."},
                         {"role": "assistant", "content": f"{word.capitalize()}!"}]
                        for word in ("hello", "yes", "blue", "seven", "north", "tea", "rain", "ok")]}
RL_ROWS = {"question": [f"What is {a} plus {b}?" for a, b in ((1, 2), (3, 4), (2, 2), (5, 1))],
           "answer": [f"{a} + {b} = {a + b}\n#### {a + b}" for a, b in ((1, 2), (3, 4), (2, 2), (5, 1))]}


def offline_datasets() -> None:
    """The offline dataset shim: load_dataset gives a DatasetDict of a few local rows."""
    def load_dataset(name: str, *args, **kwargs) -> datasets.DatasetDict:
        rows = RL_ROWS if "gsm8k" in name else SL_ROWS
        # Built from an Arrow table with a given fingerprint: from_dict's fingerprinting
        # fails under some datasets/pyarrow/dill version sets.
        split = datasets.Dataset(pyarrow.Table.from_pydict(rows), fingerprint=f"offline-{name}".replace("/", "-"))
        return datasets.DatasetDict({"train": split, "test": split})
    datasets.load_dataset = load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--shim", action="append", default=[], choices=["tokenizer", "renderer"])
    parser.add_argument("--renderer", default="role_colon")
    parser.add_argument("--loss-fn", default="gspo")
    args = parser.parse_args()
    offline_datasets()
    import tinker
    from tinker_cookbook import model_info, tokenizer_utils
    from tinker_cookbook.recipes import rl_loop, sl_loop

    if "tokenizer" in args.shim:
        tokenizer = tinker.ServiceClient(base_url=args.base_url).create_sampling_client(
            base_model=args.model).get_tokenizer()
        tokenizer_utils.register_tokenizer(args.model, lambda: tokenizer)
    if "renderer" in args.shim:
        model_info.get_recommended_renderer_name = lambda name: args.renderer
    logs = tempfile.mkdtemp(prefix="cookbook-")
    recipes = {
        "sl_loop": lambda: sl_loop.main(sl_loop.Config(
            base_url=args.base_url, model_name=args.model, batch_size=4, max_steps=args.steps, lora_rank=4,
            save_every=1, max_length=128, log_path=os.path.join(logs, "sl"))),
        "rl_loop": lambda: rl_loop.main(rl_loop.Config(
            base_url=args.base_url, model_name=args.model, batch_size=2, group_size=4, max_steps=args.steps,
            lora_rank=4, max_tokens=12, save_every=1, loss_fn=args.loss_fn, log_path=os.path.join(logs, "rl"))),
    }
    for name, run in recipes.items():
        try:
            run()
            print(f"== {name}: completed {args.steps} steps")
        except BaseException:  # noqa: BLE001 - the report is the point
            print(f"== {name}: FAILED\n{traceback.format_exc()}")


if __name__ == "__main__":
    main()
