#!/usr/bin/env python3
"""gradwire's main benchmark: prints one table of ratios, each measured in this run.

A ~10M-parameter random Llama is written to a temporary Hugging Face folder and
served with `gradwire-server --model DIR` (CPU float32 here, bf16 autocast on a
GPU); batches are 8 datums x 128 tokens, LoRA rank 8.

1. forward_backward_custom (the seed's logprob_squared_loss) vs forward_backward,
   wall time per call (goal <= 1.10), and the same with the fast path off
   (`--keep-graph-budget-mb 0`: the forward is recomputed; expected ~1.33-1.5).
2. gradwire training loop (forward_backward + optim_step submitted back to
   back) vs the identical loop in-process with transformers + peft + torch
   AdamW, tokens/s, median of 3 alternating rounds (goal >= 0.95).
3. 4 runs training at once vs 1 alone, aggregate tokens/s (goal >= 0.9), and
   the slowest run's share of the steps done while all 4 were running, as a
   fraction of a fair share (goal >= 0.8).
4. The SDK's wire codec vs JSON lists: encode + decode of a 256 MiB Datum batch
   (tokens, target_tokens, weights, logprobs), MB/s of in-memory array data.
5. Sampling: gradwire `sample` vs in-process `generate` on the same model,
   tokens/s, one prompt of 32 tokens, 128 new tokens at temperature 1,
   num_samples 1 and 8 (goal >= 0.9).

With --size 1b|8b (for a GPU) it benchmarks a random Llama of that size built on
the server's device (`--load-format dummy`, default memory settings and dtype):
6. custom / forward_backward at default settings over --calls calls each, with the
   memory in use along the way (goal <= 1.05, memory flat); for 1b also
7. the gradwire loop vs the naive in-process loop (float32 base, bf16 autocast on
   CUDA, full log_softmax, AdamW) on the same device, tokens/s (goal >= 1.5), and
8. sampled vs training logprobs of the same tokens, max and mean abs difference
   (goal <= 0.02 in bf16; the sampled ones from the server's --sampler-logprobs), and
   where a difference comes from (compute_logprobs; the training forward at another
   batch shape).
(`--size tiny` runs the same sections on tiny-random, to try them on a CPU.)

Usage: .venv/bin/python scripts/bench.py [--steps 8] [--codec-mib 256] [--size 1b|8b [--calls 50]]
       [--server-args=--compile]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADWIRE_PROGRESS", "0")

import peft  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

import gradwire  # noqa: E402
from local_server import start_server  # noqa: E402
from gradwire import _convert
from gradwire.v1 import codec  # noqa: E402
from gradwire.v1 import datum_pb2  # noqa: E402
from gradwire.v1 import training_service_pb2 as gradwire_pb  # noqa: E402
from gradwire_server.engine import ATTENTION_MODULES, LORA_ALPHA, MLP_MODULES, UNEMBED_MODULES  # noqa: E402
from gradwire_server.models import dummy_model, tiny_random_tokenizer  # noqa: E402

BATCH, TOKENS, RANK, VOCAB = 8, 128, 8, 8192
ADAM = gradwire.AdamParams(learning_rate=1e-4)


def write_model(folder: str) -> int:
    """A random ~10M-parameter Llama (seed 0) and a byte-level tokenizer; returns the parameter count."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                         tie_word_embeddings=False, bos_token_id=256, eos_token_id=257, pad_token_id=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tiny_random_tokenizer().save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def batch(seed: int, size: int = BATCH, tokens: int = TOKENS, vocab: int = VOCAB) -> list[gradwire.Datum]:
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(size):
        seq = rng.integers(0, vocab, tokens + 1)
        data.append(gradwire.Datum(model_input=gradwire.ModelInput.from_ints(seq[:-1]),
                                   loss_fn_inputs={"target_tokens": seq[1:],
                                                   "weights": np.ones(tokens, np.float32)}))
    return data


def logprob_squared_loss(data, logprobs):
    loss = (torch.cat(logprobs) ** 2).sum()
    return loss, {"logprob_squared_loss": loss.item()}


def median_seconds(call: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---- 1. custom loss vs forward_backward ------------------------------------------

def custom_vs_forward_backward(tc, repeats: int, data: list[gradwire.Datum] | None = None
                               ) -> tuple[float, float]:
    """Median seconds per call of (forward_backward, forward_backward_custom) on one
    run, the two interleaved so that drift in machine load hits both alike."""
    data = data or batch(1)
    calls = [lambda: tc.forward_backward(data, "cross_entropy").result(),
             lambda: tc.forward_backward_custom(data, logprob_squared_loss).result()]
    for call in calls:
        call()  # warm up
    times: list[list[float]] = [[], []]
    for _ in range(repeats):
        for call, measured in zip(calls, times):
            measured.append(median_seconds(call, 1))
    return statistics.median(times[0]), statistics.median(times[1])


# ---- 2. SDK loop vs in-process loop -------------------------------------------------

def loop_tokens_per_s(step: Callable[[list[gradwire.Datum]], Callable[[], object]], steps: int,
                      make_batch: Callable[[int], list[gradwire.Datum]] = batch) -> float:
    """Tokens/s of `steps` training steps; step(data) submits one and returns what
    waits for it, so a remote loop submits everything before waiting (pipelined)."""
    data = [make_batch(10 + i) for i in range(steps)]
    start = time.perf_counter()
    waits = [step(step_data) for step_data in data]
    for wait in waits:
        wait()
    return sum(len(d.model_input.to_ints()) for step_data in data for d in step_data) / (
        time.perf_counter() - start)


def sdk_step(tc) -> Callable[[list[gradwire.Datum]], Callable[[], object]]:
    def step(data: list[gradwire.Datum]) -> Callable[[], object]:
        tc.forward_backward(data, "cross_entropy")
        return tc.optim_step(ADAM).result
    return step


def in_process_step(folder: str, model=None, rank: int = RANK
                    ) -> Callable[[list[gradwire.Datum]], Callable[[], object]]:
    """The same loop written in-process, as a user would: transformers + peft + torch
    AdamW, a float32 base (the folder's model, or `model`), bf16 autocast on CUDA."""
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.requires_grad_(False)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
        target_modules=[*ATTENTION_MODULES, *MLP_MODULES, *UNEMBED_MODULES]))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=ADAM.learning_rate, betas=(ADAM.beta1, ADAM.beta2),
                                  eps=ADAM.eps, weight_decay=0.0)
    device = params[0].device

    def step(data: list[gradwire.Datum]) -> Callable[[], object]:
        tokens = torch.tensor(np.stack([d.model_input.to_ints() for d in data]), device=device)
        targets = torch.stack([d.loss_fn_inputs["target_tokens"].to_torch() for d in data]).to(device)
        weights = torch.stack([d.loss_fn_inputs["weights"].to_torch() for d in data]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=tokens).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        loss = -(logprobs.gather(-1, targets[..., None])[..., 0] * weights).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    return step


def remote_vs_in_process(tc, folder: str, steps: int, rounds: int) -> tuple[float, float]:
    """Median tokens/s (gradwire, in-process) over rounds that alternate the two."""
    remote, local = sdk_step(tc), in_process_step(folder)
    loop_tokens_per_s(remote, 1)  # warm up
    loop_tokens_per_s(local, 1)
    measured: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        measured[0].append(loop_tokens_per_s(remote, steps))
        measured[1].append(loop_tokens_per_s(local, steps))
    return statistics.median(measured[0]), statistics.median(measured[1])


# ---- 3. concurrent runs ---------------------------------------------------------------

def concurrent_runs(service, base_model: str, runs: int, steps: int) -> tuple[float, list[float]]:
    """(aggregate tokens/s, each run's steps finished while all runs were still training)."""
    clients = [service.create_lora_training_client(base_model, rank=RANK, seed=i) for i in range(runs)]
    for tc in clients:
        tc.forward_backward(batch(0), "cross_entropy").result()  # warm up
    finished: list[list[float]] = [[] for _ in clients]
    data = [batch(20 + i) for i in range(steps)]
    barrier = threading.Barrier(runs + 1)

    def train(i: int, tc) -> None:
        barrier.wait()
        pending = []
        for step_data in data:
            tc.forward_backward(step_data, "cross_entropy")
            pending.append(tc.optim_step(ADAM))
        for future in pending:
            future.result()
            finished[i].append(time.perf_counter())

    threads = [threading.Thread(target=train, args=(i, tc)) for i, tc in enumerate(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = max(times[-1] for times in finished) - start
    first_done = min(times[-1] for times in finished)
    steps_while_all_ran = [sum(t <= first_done for t in times) for times in finished]
    return runs * steps * BATCH * TOKENS / elapsed, steps_while_all_ran


# ---- 4. codec vs JSON -------------------------------------------------------------------

def codec_batch(mib: int) -> list[gradwire.Datum]:
    """Datums of 1024 tokens: int64 tokens and target_tokens, float32 weights and logprobs."""
    n, rng = 1024, np.random.default_rng(3)
    per_datum = n * (8 + 8 + 4 + 4)
    data = []
    for _ in range(mib * 2**20 // per_datum):
        data.append(gradwire.Datum(
            model_input=gradwire.ModelInput.from_ints(rng.integers(0, VOCAB, n)),
            loss_fn_inputs={"target_tokens": rng.integers(0, VOCAB, n),
                            "weights": rng.random(n, dtype=np.float32),
                            "logprobs": -rng.random(n, dtype=np.float32)}))
    return data


def codec_mb_per_s(data: list[gradwire.Datum]) -> tuple[float, float, float]:
    """(array MB, SDK codec MB/s, JSON MB/s) for encode to bytes + decode back to numpy."""
    array_bytes = sum(len(d.model_input.to_ints()) * 8
                      + sum(v.to_numpy().nbytes for v in d.loss_fn_inputs.values()) for d in data)

    def proto_round_trip() -> None:
        wire = [_convert.datum_to_proto(d).SerializeToString() for d in data]
        for message in wire:
            datum = datum_pb2.Datum.FromString(message)
            np.concatenate([codec.tokens_from_text_chunk(c.encoded_text) for c in datum.model_input])
            {k: codec.tensor_from_proto(t) for k, t in datum.loss_fn_inputs.items()}

    def json_round_trip() -> None:
        wire = [json.dumps({"model_input": d.model_input.to_ints(),
                            "loss_fn_inputs": {k: v.to_numpy().tolist() for k, v in d.loss_fn_inputs.items()}})
                for d in data]
        for message in wire:
            datum = json.loads(message)
            np.asarray(datum["model_input"], dtype=np.int64)
            {k: np.asarray(v, dtype=np.int64 if k == "target_tokens" else np.float32)
             for k, v in datum["loss_fn_inputs"].items()}

    proto_s = median_seconds(proto_round_trip, 1)
    json_s = median_seconds(json_round_trip, 1)
    mb = array_bytes / 1e6
    return mb, mb / proto_s, mb / json_s


# ---- 5. sampling ---------------------------------------------------------------------------

PROMPT = list(range(40, 72))  # 32 tokens


def sample_tokens_per_s(sampler, num_samples: int, max_tokens: int, seed: int) -> float:
    """Generated tokens/s of one gradwire `sample` call, end to end (request, queue,
    generation, polling the operation)."""
    params = gradwire.SamplingParams(max_tokens=max_tokens, seed=seed, temperature=1.0)
    start = time.perf_counter()
    response = sampler.sample(gradwire.ModelInput.from_ints(PROMPT), num_samples, params).result()
    elapsed = time.perf_counter() - start
    assert sum(len(s.tokens) for s in response.sequences) == num_samples * max_tokens
    return num_samples * max_tokens / elapsed


def generate_tokens_per_s(model, num_samples: int, max_tokens: int) -> float:
    """Generated tokens/s of one in-process transformers `generate` call (no stop,
    so exactly max_tokens per sample, as for gradwire)."""
    prompt = torch.tensor([PROMPT])
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             num_return_sequences=num_samples, pad_token_id=256)
    elapsed = time.perf_counter() - start
    assert out.shape == (num_samples, len(PROMPT) + max_tokens)
    return num_samples * max_tokens / elapsed


def sampling_vs_generate(sampler, folder: str, num_samples: int, max_tokens: int,
                         repeats: int) -> tuple[float, float]:
    """Median tokens/s (gradwire, in-process generate), the two alternating."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    sample_tokens_per_s(sampler, num_samples, max_tokens, 0)  # warm up
    generate_tokens_per_s(model, num_samples, max_tokens)
    served, local = [], []
    for seed in range(1, repeats + 1):
        served.append(sample_tokens_per_s(sampler, num_samples, max_tokens, seed))
        local.append(generate_tokens_per_s(model, num_samples, max_tokens))
    return statistics.median(served), statistics.median(local)


# ---- 6-8. a model of a given size on the server's device ---------------------------------

SIZES = {  # preset, datums, tokens per datum, LoRA rank
    "tiny": ("tiny-random", 8, 128, 8),
    "1b": ("llama-1b", 8, 1024, 32),
    "8b": ("llama-8b", 8, 2048, 32),
}


def memory_in_use(server) -> str:
    """The device memory in use (CUDA: the whole card, this process included) or the
    server's resident memory (CPU), in GiB."""
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return f"{(total - free) / 2**30:.1f}"
    with open(f"/proc/{server.pid}/status") as status:
        rss_kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return f"{rss_kib / 2**20:.2f}"


def sampled_vs_training(service, tc) -> list[tuple[str, float, float]]:
    """(what, max, mean) abs difference of logprobs of the same tokens: sampled (from the
    server's --sampler-logprobs) vs the training forward of each sequence alone, and vs the
    training forward of all four sequences in one padded batch (as an RL step trains them);
    and, to see where a difference comes from, the sampler's compute_logprobs vs the forward
    alone, and the two training forwards (the training function's own floor: the kernels of
    another batch shape). 4 samples of 128 tokens from the run's saved weights."""
    prompt = list(range(40, 72))
    sampler = service.create_sampling_client(model_path=tc.save_weights_for_sampler("bench").result().path)
    response = sampler.sample(gradwire.ModelInput.from_ints(prompt), 4,
                              gradwire.SamplingParams(max_tokens=128, seed=0)).result()
    sequences = [prompt + list(sequence.tokens) for sequence in response.sequences]
    data = [gradwire.Datum(model_input=gradwire.ModelInput.from_ints(tokens[:-1]),
                           loss_fn_inputs={"target_tokens": np.array(tokens[1:])}) for tokens in sequences]
    completion = slice(len(prompt) - 1, None)
    alone = [tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()[completion]
             for datum in data]
    batched = [output["logprobs"].to_numpy()[completion]
               for output in tc.forward(data, "cross_entropy").result().loss_fn_outputs]
    prefilled = [np.array(sampler.compute_logprobs(gradwire.ModelInput.from_ints(tokens)).result()[len(prompt):])
                 for tokens in sequences]
    sampled = [np.array(sequence.logprobs) for sequence in response.sequences]

    def difference(what: str, ours: list[np.ndarray], reference: list[np.ndarray]) -> tuple[str, float, float]:
        every = np.concatenate([np.abs(a - b) for a, b in zip(ours, reference)])
        return what, float(every.max()), float(every.mean())
    source = service.get_server_capabilities().sampler_logprobs
    return [difference(f"sampled ({source}) vs training logprobs, max / mean abs diff (goal <= 0.02)", sampled, alone),
            difference("  sampled vs training of the 4 sequences in one batch", sampled, batched),
            difference("  where from: the sampler's compute_logprobs vs training", prefilled, alone),
            difference("  where from: training, 4 sequences in one batch vs each alone", batched, alone)]


def device_main(size: str, calls: int, steps: int, server_args: list[str]) -> Iterator[tuple[str, str]]:
    """Sections 6-8, each row as soon as it is measured (a run cut short keeps what it had)."""
    preset, datums, tokens, rank = SIZES[size]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vocab = dummy_model(preset, torch.device("meta"), torch.float32)[0].config.vocab_size
    make_batch = lambda seed: batch(seed, datums, tokens, vocab)  # noqa: E731
    if size != "8b":  # first, so the server then plans its memory with the card to itself
        model, _ = dummy_model(preset, device, torch.float32)
        local = in_process_step("", model, rank)
        loop_tokens_per_s(local, 1, make_batch)  # warm up
        in_process = loop_tokens_per_s(local, steps, make_batch)
        del model, local
        if device.type == "cuda":
            torch.cuda.empty_cache()
    started = time.perf_counter()
    server, address = start_server(preset, "--load-format", "dummy", *server_args)
    yield "server start until it listens, s (with --compile, the warm-up compiles)", \
        f"{time.perf_counter() - started:.1f}"
    try:
        service = gradwire.ServiceClient(base_url=address)
        capabilities = service._call("GetServerCapabilities", gradwire_pb.GetServerCapabilitiesRequest())
        limits = capabilities.limits
        training = capabilities.training
        yield ("server: device, base dtype, compiled layers, activation checkpointing, attention",
               f"{capabilities.device}, {capabilities.dtype}, {training.compiled_layers}, "
               f"{training.activation_checkpointing}, {training.attention}")
        yield ("micro-batch tokens / keep-graph budget MiB / activation bytes per token (chosen)",
               f"{limits.micro_batch_tokens} / {limits.keep_graph_budget_bytes / 2**20:,.0f} / "
               f"{limits.activation_bytes_per_token:,}")
        tc = service.create_lora_training_client(preset, rank=rank, seed=0)
        data = make_batch(1)
        memory = [memory_in_use(server)]
        fb_s, custom_s = [], []
        for call in range(calls):
            fb_s.append(median_seconds(lambda: tc.forward_backward(data, "cross_entropy").result(), 1))
            custom_s.append(median_seconds(lambda: tc.forward_backward_custom(data, logprob_squared_loss)
                                           .result(), 1))
            if call in (0, calls // 2, calls - 1):
                memory.append(memory_in_use(server))
        fb, custom = statistics.median(fb_s[1:] or fb_s), statistics.median(custom_s[1:] or custom_s)
        unit = "GiB on the card" if device.type == "cuda" else "GiB server RSS"
        yield (f"{datums} x {tokens} tokens: forward_backward / custom, s per call (median of {calls})",
               f"{fb:.3f} / {custom:.3f}")
        yield "custom / forward_backward, default settings (goal <= 1.05)", f"{custom / fb:.3f}"
        yield ("first call of each, s (with --compile, graphs the warm-up did not compile)",
               f"{fb_s[0]:.3f} / {custom_s[0]:.3f}")
        yield f"memory in use, {unit}: start, after 1, {calls // 2 + 1}, {calls} calls of each", " -> ".join(memory)
        remote = sdk_step(tc)
        loop_tokens_per_s(remote, 1, make_batch)  # warm up
        served = loop_tokens_per_s(remote, steps, make_batch)
        yield "gradwire loop (fb + optim_step, pipelined), tokens/s", f"{served:,.0f}"
        if size != "8b":
            yield "in-process naive loop (float32 base, bf16 autocast on CUDA, AdamW), tokens/s", f"{in_process:,.0f}"
            yield "gradwire / in-process (goal >= 1.5 on CUDA)", f"{served / in_process:.3f}"
            for what, worst, mean in sampled_vs_training(service, tc):
                yield what, f"{worst:.4f} / {mean:.5f}"
        service.close()
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="training steps per loop measurement")
    parser.add_argument("--repeats", type=int, default=7, help="calls per custom-loss measurement")
    parser.add_argument("--codec-mib", type=int, default=256, help="size of the codec batch")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per sample")
    parser.add_argument("--size", choices=list(SIZES), help="a random Llama of this size on the device")
    parser.add_argument("--calls", type=int, default=50, help="--size: calls of each per custom-loss measurement")
    parser.add_argument("--server-args", default="", help="extra gradwire-server flags, one string")
    args = parser.parse_args()
    server_args = args.server_args.split()
    flags = f"; server flags: {args.server_args}" if server_args else ""
    if args.size:
        device = "CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        preset, datums, tokens, rank = SIZES[args.size]
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
              f"torch {torch.__version__}, {device}; model: random {preset} (--load-format dummy), "
              f"batch {datums}x{tokens}, LoRA rank {rank}{flags}", flush=True)
        for row in device_main(args.size, args.calls, args.steps, server_args):
            print_rows([row], width=86)
        return

    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as folder:
        parameters = write_model(folder)
        fast_server, fast_address = start_server(folder, *server_args)
        off_server, off_address = start_server(folder, "--keep-graph-budget-mb", "0", *server_args)
        try:
            service = gradwire.ServiceClient(base_url=fast_address)
            off_service = gradwire.ServiceClient(base_url=off_address)
            fast = service.create_lora_training_client(folder, rank=RANK, seed=0)
            recompute = off_service.create_lora_training_client(folder, rank=RANK, seed=0)

            fb_s, custom_s = custom_vs_forward_backward(fast, args.repeats)
            fb_off_s, custom_off_s = custom_vs_forward_backward(recompute, args.repeats)
            rows += [("forward_backward, s per call", f"{fb_s:.3f}"),
                     ("forward_backward_custom, s per call", f"{custom_s:.3f}"),
                     ("custom / forward_backward wall time (goal <= 1.10)", f"{custom_s / fb_s:.3f}"),
                     ("fast path off (recompute) / forward_backward (expect ~1.33-1.5)",
                      f"{custom_off_s / fb_off_s:.3f}")]
            off_server.terminate()

            remote, local = remote_vs_in_process(
                service.create_lora_training_client(folder, rank=RANK, seed=1), folder, args.steps, 3)
            rows += [("gradwire loop (fb + optim_step, pipelined), tokens/s", f"{remote:,.0f}"),
                     ("in-process loop (transformers + peft + AdamW), tokens/s", f"{local:,.0f}"),
                     ("gradwire / in-process (goal >= 0.95)", f"{remote / local:.3f}")]

            alone, _ = concurrent_runs(service, folder, 1, args.steps)
            together, shares = concurrent_runs(service, folder, 4, args.steps)
            fair = sum(shares) / len(shares)
            rows += [("1 run alone, tokens/s", f"{alone:,.0f}"),
                     ("4 runs at once, aggregate tokens/s", f"{together:,.0f}"),
                     ("4 runs / 1 run aggregate (goal >= 0.9)", f"{together / alone:.3f}"),
                     (f"steps per run while all 4 ran {shares}", ""),
                     ("slowest run / fair share (goal >= 0.8)", f"{min(shares) / fair:.3f}")]

            sampler = service.create_sampling_client(base_model=folder)
            for num_samples in (1, 8):
                served, local = sampling_vs_generate(sampler, folder, num_samples, args.max_tokens, 5)
                rows += [(f"sample, num_samples {num_samples}: gradwire / in-process generate tokens/s",
                          f"{served:,.0f} / {local:,.0f}"),
                         ("  ratio (goal >= 0.9)", f"{served / local:.3f}")]
        finally:
            fast_server.terminate()
            off_server.terminate()

    mb, proto_rate, json_rate = codec_mb_per_s(codec_batch(args.codec_mib))
    rows += [(f"codec encode+decode of {mb:,.0f} MB of arrays, MB/s", f"{proto_rate:,.0f}"),
             ("same data as JSON lists, MB/s", f"{json_rate:,.1f}"),
             ("codec / JSON", f"{proto_rate / json_rate:,.1f}")]

    device = "CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU float32"
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"torch {torch.__version__}, {device}; model: random Llama, {parameters / 1e6:.1f}M parameters, "
          f"batch {BATCH}x{TOKENS}, LoRA rank {RANK}{flags}")
    print_rows(rows)


def print_rows(rows: list[tuple[str, str]], width: int = 0) -> None:
    width = width or max(len(name) for name, _ in rows) + 2
    for name, value in rows:
        print(f"{name:<{width}}{value:>14}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
