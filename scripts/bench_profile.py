#!/usr/bin/env python3
"""Where a training step's time goes: the engine as the server builds it (random weights,
`--dtype auto`, the startup memory plan, `--compile` when asked), in-process on this
machine's device, one forward_backward (cross-entropy) + optim_step per step on batches
of `bench.py --size`'s shape, under torch.profiler.

Prints the step's wall time and its two parts, the time the device ran kernels (on CUDA;
the rest of a step the device waits for the host: launches, Python, a sync), and the
kernels and host ops that took the most. Against `bench.py --size`'s loop tokens/s (the
same step through the server), the difference is the server's own cost: gRPC, the
scheduler, the codec.

With --plain it first times the same math written as a plain peft loop, without the
engine (eager): what the engine's own bookkeeping costs.

With --custom each step's forward_backward is instead the two legs of a custom loss (the
seed's logprob_squared_loss, the SDK's own client-side step between them), as the
server runs them minus the round trip: what the legs cost beside a forward_backward.

With --narrow the model keeps the size's depth, modules and vocabulary but is 64 wide, with
LoRA rank 1 and 16 tokens a datum: its kernels cost next to nothing, so a step's time is
its host cost (Python, dispatch, launches), which a launch-bound GPU waits on. That part of
the GPU's step the CPU can measure.

Usage: python scripts/bench_profile.py [--size 1b] [--compile] [--plain] [--custom] [--narrow] [--steps 3] [--rows 12]
"""
from __future__ import annotations

import argparse
import atexit
import gc
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import peft  # noqa: E402
import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from gradwire import custom_loss  # noqa: E402
from gradwire_server.batch import AdamSettings, DatumArrays, LoraSettings  # noqa: E402
from gradwire_server.engine import ATTENTION_MODULES, LORA_ALPHA, MLP_MODULES, UNEMBED_MODULES, Engine  # noqa: E402
from gradwire_server.logprobs import model_target_logprobs  # noqa: E402
from gradwire_server.models import load_model, preset_configs, resolve_dtype  # noqa: E402
from bench import SIZES  # noqa: E402



def random_batch(rng: np.random.Generator, datums: int, tokens: int, vocab: int) -> list[DatumArrays]:
    return [DatumArrays(sequence[:-1], {"target_tokens": sequence[1:]})
            for sequence in rng.integers(0, vocab, (datums, tokens + 1))]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_backward(engine: Engine, run: str, data: list[DatumArrays]) -> None:
    loss_pass = engine.start_pass(run, "cross_entropy", {}, backward=True)
    loss_pass.feed(data)
    loss_pass.commit()


def custom_legs(engine: Engine, run: str, data: list[DatumArrays]) -> None:
    """A custom loss's forward leg (its graph kept), the client's step (loss_fn over the
    logprobs, backpropagated to them: the SDK's own code), and the backward leg (cross
    entropy weighted by -dLoss/dlogprobs, on the kept graph)."""
    forward_leg = engine.start_pass(run, "cross_entropy", {}, backward=False, keep_graph=True)
    logprobs = forward_leg.feed(data)
    forward_leg.commit("forward-leg")
    _, _, grads = custom_loss.logprob_gradients(
        data, logprobs, lambda _, leaves: ((torch.cat(leaves) ** 2).sum(), {}))
    backward_leg = engine.start_pass(run, "cross_entropy", {}, backward=True, reuse_forward="forward-leg")
    backward_leg.feed([DatumArrays(d.tokens, {"target_tokens": d.loss_fn_inputs["target_tokens"], "weights": -g})
                       for d, g in zip(data, grads)])
    backward_leg.commit()


def timed_step(engine: Engine, run: str, data: list[DatumArrays],
               gradient: Callable[[Engine, str, list[DatumArrays]], None] = forward_backward) -> tuple[float, float]:
    """(forward_backward or custom_legs, optim_step) wall seconds, each until the device is done."""
    started = time.perf_counter()
    gradient(engine, run, data)
    synchronize(engine.device)
    gradient_s = time.perf_counter() - started
    engine.optim_step(run, AdamSettings())
    synchronize(engine.device)
    return gradient_s, time.perf_counter() - started - gradient_s


def narrow_config_folder(preset: str) -> str:
    """A folder holding the preset's config at width 64 (--narrow), for --load-format dummy."""
    config = preset_configs()[preset]
    config.hidden_size, config.intermediate_size = 64, 64
    config.head_dim = 64 // config.num_attention_heads
    folder = tempfile.mkdtemp(prefix="narrow-")
    atexit.register(shutil.rmtree, folder, True)
    config.save_pretrained(folder)
    return folder


def plain_loop_step_seconds(preset: str, device: torch.device, rank: int,
                            batches: list[list[DatumArrays]]) -> float:
    """Median seconds a step of the engine's math takes written as a plain loop, without the
    engine: the same model and dtype, peft's LoRA on the same modules, the same chunked
    logprobs under the same autocast, AdamW fused on CUDA. The first two steps warm up."""
    loaded = load_model(preset, device, resolve_dtype("auto", device), "dummy")
    peft.get_peft_model(loaded.model, peft.LoraConfig(r=rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=[
        *ATTENTION_MODULES, *MLP_MODULES, *UNEMBED_MODULES]))  # wraps the model's Linears in place
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, weight_decay=0.0, fused=device.type == "cuda")
    seconds = []
    for data in batches:
        tokens = torch.as_tensor(np.stack([d.tokens for d in data]), device=device)
        targets = torch.as_tensor(np.stack([d.loss_fn_inputs["target_tokens"] for d in data]), device=device)
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=loaded.dtype == torch.bfloat16):
            loss = -model_target_logprobs(loaded.model, tokens, targets[..., None]).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    del loaded, params, optimizer, loss
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the engine then plans its memory with the card to itself
    return statistics.median(seconds[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="1b")
    parser.add_argument("--compile", action="store_true", help="as the server's --compile")
    parser.add_argument("--steps", type=int, default=3, help="steps timed, then as many profiled (after 2 to warm up)")
    parser.add_argument("--rows", type=int, default=12, help="kernels and host ops listed")
    parser.add_argument("--plain", action="store_true",
                        help="first time the same math as a plain peft loop (eager), without the engine")
    parser.add_argument("--custom", action="store_true",
                        help="a custom loss's two legs instead of each forward_backward (also timed beside it)")
    parser.add_argument("--narrow", action="store_true",
                        help="the size's depth and vocabulary at width 64, rank 1, 16 tokens: host cost alone")
    args = parser.parse_args()
    preset, datums, tokens, rank = SIZES[args.size]
    label = f"{preset} at width 64" if args.narrow else preset
    if args.narrow:
        preset, tokens, rank = narrow_config_folder(preset), 16, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rng = np.random.default_rng(0)
    vocab = load_model(preset, torch.device("meta"), torch.float32, "dummy").vocab_size
    plain_s = (plain_loop_step_seconds(preset, device, rank, [random_batch(rng, datums, tokens, vocab)
                                                              for _ in range(args.steps + 2)])
               if args.plain else None)

    started = time.perf_counter()
    engine = Engine(load_model(preset, device, resolve_dtype("auto", device), "dummy"), device,
                    compile_layers=args.compile)
    plan = engine.plan_memory()
    if args.compile:
        engine.warm_up_compiled_layers()
    print(f"{label} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'the CPU'}, torch "
          f"{torch.__version__}, {engine.dtype}, --compile {args.compile}; {datums} x {tokens} tokens, rank {rank}; "
          f"micro-batch {plan.micro_batch_tokens} tokens; built in {time.perf_counter() - started:.1f} s")
    run = engine.create_run(LoraSettings(rank=rank, seed=0))
    for _ in range(2):  # allocator, cuBLAS handles, graphs of this batch's kind
        timed_step(engine, run, random_batch(rng, datums, tokens, vocab))
    parts = [timed_step(engine, run, random_batch(rng, datums, tokens, vocab)) for _ in range(args.steps)]
    fb_s, optim_step = (statistics.median(part) for part in zip(*parts))
    step = fb_s + optim_step
    print(f"step {step * 1e3:.1f} ms (median of {args.steps}): forward_backward {fb_s * 1e3:.1f} ms, "
          f"optim_step {optim_step * 1e3:.1f} ms; {datums * tokens / step:,.0f} tokens/s")
    gradient = custom_legs if args.custom else forward_backward
    if args.custom:  # alternated with forward_backward, after two custom steps to warm up
        for _ in range(2):
            timed_step(engine, run, random_batch(rng, datums, tokens, vocab), custom_legs)
        pairs = [(timed_step(engine, run, random_batch(rng, datums, tokens, vocab), custom_legs)[0],
                  timed_step(engine, run, random_batch(rng, datums, tokens, vocab))[0]) for _ in range(args.steps)]
        custom_s, fb_s = (statistics.median(part) for part in zip(*pairs))
        print(f"step's custom loss legs {custom_s * 1e3:.1f} ms, forward_backward {fb_s * 1e3:.1f} ms "
              f"(medians of {args.steps} alternated): custom / forward_backward {custom_s / fb_s:.3f}")
    if plain_s is not None:
        print(f"step of the same math as a plain peft loop, eager: {plain_s * 1e3:.1f} ms "
              f"(engine / plain: {step / plain_s:.3f})")
    batches = [random_batch(rng, datums, tokens, vocab) for _ in range(args.steps)]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        profiled = sum(sum(timed_step(engine, run, data, gradient)) for data in batches) / args.steps
    events = profiler.key_averages()
    if device.type == "cuda":
        # Kernels of one stream run one at a time: their summed time is the time the device was busy
        # (host ops' rows and annotated regions repeat their kernels' time, so only the kernels' rows count).
        kernel_us = sum(event.self_device_time_total for event in events
                        if event.device_type == DeviceType.CUDA and not event.is_user_annotation) / args.steps
        print(f"device busy {kernel_us / 1e3:.1f} ms of a profiled step's {profiled * 1e3:.1f} ms "
              f"({kernel_us / 1e6 / profiled:.0%}); idle, waiting for the host, {profiled * 1e3 - kernel_us / 1e3:.1f} ms")
        print(events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
