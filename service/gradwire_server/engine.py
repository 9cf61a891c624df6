"""The compute engine: one base model, one LoRA adapter and AdamW per training run.

Everything here runs on the single worker thread that owns the device; it knows
nothing about gRPC. Logprobs are log_softmax(logits) gathered at the target
tokens; every loss is summed over tokens and datums.
"""
from __future__ import annotations

import contextlib
import secrets
from dataclasses import dataclass

import numpy as np
import peft
import torch

from gradwire_server.batch import AdamSettings, DatumArrays, LoraSettings
from gradwire_server.losses import LOSSES
from gradwire_server.models import LoadedModel

LORA_ALPHA = 32
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
UNEMBED_MODULES = ("lm_head",)
MICRO_BATCH_TOKENS = 16384  # padded tokens per forward pass; bounds activation memory


class RunNotFound(KeyError):
    """No training run has this id."""


@dataclass
class Run:
    run_id: str
    lora: LoraSettings
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.AdamW
    step: int = 0


class LossPass:
    """One forward(-backward) over a batch that arrives in pieces.

    Pieces run in micro-batches of at most `MICRO_BATCH_TOKENS` padded tokens.
    Their gradients are staged apart from the run's accumulated gradients and
    added to them exactly once, by commit(); discard() (or never committing)
    leaves the run exactly as it was.
    """

    def __init__(self, engine: Engine, run: Run, loss_fn: str, config: dict[str, float], backward: bool):
        self.engine, self.run = engine, run
        self.loss_fn, self.config, self.backward = loss_fn, config, backward
        self.staged: list[torch.Tensor | None] = [None] * len(run.params)
        self.metrics: dict[str, float] = {}
        self.num_datums = 0

    def feed(self, data: list[DatumArrays]) -> list[np.ndarray]:
        """Computes the datums' losses (and staged gradients); returns their logprobs."""
        outputs: list[np.ndarray] = []
        for micro_batch in _micro_batches(data, MICRO_BATCH_TOKENS):
            with torch.set_grad_enabled(self.backward):
                loss, logprobs, metrics = self.engine.micro_batch_loss(
                    self.run, micro_batch, self.loss_fn, self.config)
                if self.backward:
                    self._stage(loss)
            self.metrics = merge_metrics(self.metrics, self.num_datums, metrics, len(micro_batch))
            self.num_datums += len(micro_batch)
            outputs.extend(logprobs)
        return outputs

    def _stage(self, loss: torch.Tensor) -> None:
        params = self.run.params
        accumulated = [p.grad for p in params]
        for p, staged in zip(params, self.staged):
            p.grad = staged
        try:
            loss.backward()
            self.staged = [p.grad for p in params]
        finally:
            for p, grad in zip(params, accumulated):
                p.grad = grad

    def commit(self) -> dict[str, float]:
        """Adds the staged gradients to the run's; returns the merged metrics."""
        for p, staged in zip(self.run.params, self.staged):
            if staged is None:
                continue
            if p.grad is None:
                p.grad = staged
            else:
                p.grad.add_(staged)
        self.staged = [None] * len(self.run.params)
        return self.metrics


def merge_metrics(merged: dict[str, float], merged_count: int,
                  metrics: dict[str, float], count: int) -> dict[str, float]:
    """Combines the metrics of two parts of a batch by each key's reduction suffix."""
    out = dict(merged)
    for key, value in metrics.items():
        if key not in out:
            out[key] = value
            continue
        reduction = key.rsplit(":", 1)[-1]
        if reduction == "sum":
            out[key] += value
        elif reduction == "max":
            out[key] = max(out[key], value)
        elif reduction == "min":
            out[key] = min(out[key], value)
        else:  # mean, weighted by datums
            out[key] = (out[key] * merged_count + value * count) / (merged_count + count)
    return out


def _micro_batches(data: list[DatumArrays], max_tokens: int):
    """Consecutive slices whose padded size (datums x longest) stays within max_tokens."""
    start, longest = 0, 0
    for i, datum in enumerate(data):
        longest_with = max(longest, len(datum.tokens))
        if i > start and longest_with * (i - start + 1) > max_tokens:
            yield data[start:i]
            start, longest_with = i, len(datum.tokens)
        longest = longest_with
    if start < len(data):
        yield data[start:]


class Engine:
    """Training runs on one device. Not thread-safe: call from one thread."""

    def __init__(self, base: LoadedModel, device: torch.device):
        self.base = base
        self.device = device
        self.peft_model: peft.PeftModel | None = None
        self.runs: dict[str, Run] = {}

    # ---- runs ---------------------------------------------------------------

    def create_run(self, lora: LoraSettings) -> str:
        run_id = f"run-{secrets.token_hex(6)}"
        config = peft.LoraConfig(r=lora.rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                 target_modules=self._target_modules(lora))
        seed = lora.seed if lora.seed is not None else secrets.randbits(63)
        # A run's own RNG: creating it leaves the global RNG alone, and equal
        # seeds give equal adapters.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            if self.peft_model is None:
                self.peft_model = peft.get_peft_model(self.base.model, config, adapter_name=run_id)
            else:
                self.peft_model.add_adapter(run_id, config)
        params = [p for name, p in self.peft_model.named_parameters() if f".{run_id}." in name]
        for p in params:
            p.requires_grad_(True)
        # foreach=False: the same implementation before and after a resume.
        optimizer = torch.optim.AdamW(params, weight_decay=0.0, foreach=False)
        self.runs[run_id] = Run(run_id, lora, params, optimizer)
        return run_id

    def run(self, run_id: str) -> Run:
        try:
            return self.runs[run_id]
        except KeyError:
            raise RunNotFound(run_id) from None

    def _target_modules(self, lora: LoraSettings) -> list[str]:
        wanted = ((ATTENTION_MODULES if lora.train_attn else ())
                  + (MLP_MODULES if lora.train_mlp else ())
                  + (UNEMBED_MODULES if lora.train_unembed else ()))
        present = {name.rsplit(".", 1)[-1] for name, _ in self.base.model.named_modules()}
        targets = [m for m in wanted if m in present]
        if not targets:
            raise ValueError("the LoRA config selects no module of this model: enable at least "
                             "one of train_attn, train_mlp, train_unembed")
        return targets

    # ---- training -------------------------------------------------------------

    def start_pass(self, run_id: str, loss_fn: str, loss_fn_config: dict[str, float],
                   backward: bool) -> LossPass:
        """A forward (or forward-backward) pass over a batch fed in pieces."""
        return LossPass(self, self.run(run_id), loss_fn, loss_fn_config, backward)

    def optim_step(self, run_id: str, adam: AdamSettings) -> dict[str, float]:
        """One AdamW step on the accumulated gradients, which are then cleared."""
        run = self.run(run_id)
        grads = [p.grad for p in run.params if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) \
            if grads else torch.zeros(())
        if adam.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(run.params, adam.grad_clip_norm, foreach=False)
        for group in run.optimizer.param_groups:
            group.update(lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps,
                         weight_decay=adam.weight_decay)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.step += 1
        return {"grad_norm:mean": float(grad_norm), "learning_rate:mean": adam.learning_rate}

    # ---- the math -------------------------------------------------------------

    def micro_batch_loss(self, run: Run, data: list[DatumArrays], loss_fn: str,
                         config: dict[str, float]) -> tuple[torch.Tensor, list[np.ndarray], dict[str, float]]:
        """(loss, per-datum target logprobs, metrics) of one micro-batch."""
        self._activate(run.run_id)
        spec = LOSSES[loss_fn]
        tokens, inputs, lengths, widths = self._pad(data)
        with self.autocast():
            logits = self.peft_model(input_ids=tokens).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)            # [B, L, V]
        target_logprobs = logprobs.gather(-1, inputs["target_tokens"])    # [B, L, K]
        target_logprobs = target_logprobs * inputs["mask"]               # padding -> 0
        loss, metrics = spec.fn(target_logprobs, inputs, {**spec.config_defaults, **config})
        per_datum = target_logprobs.detach().cpu().numpy()
        outputs = [per_datum[i, :n, :k] if d.loss_fn_inputs["target_tokens"].ndim == 2
                   else per_datum[i, :n, 0]
                   for i, (d, n, k) in enumerate(zip(data, lengths, widths))]
        return loss, outputs, metrics

    def _pad(self, data: list[DatumArrays]):
        """Right-pads tokens to [B, L] and loss inputs to [B, L, K]. Causal
        attention keeps real positions blind to the padding after them."""
        lengths = [len(d.tokens) for d in data]
        widths = [d.loss_fn_inputs["target_tokens"].reshape(len(d.tokens), -1).shape[1] for d in data]
        batch, length, width = len(data), max(lengths), max(widths)
        tokens = np.zeros((batch, length), dtype=np.int64)
        keys = set().union(*(d.loss_fn_inputs for d in data))
        padded = {key: np.zeros((batch, length, width),
                                dtype=np.int64 if key == "target_tokens" else np.float32)
                  for key in keys | {"mask"}}
        for i, (d, n, k) in enumerate(zip(data, lengths, widths)):
            tokens[i, :n] = d.tokens
            padded["mask"][i, :n, :k] = 1.0
            for key, value in d.loss_fn_inputs.items():
                padded[key][i, :n, :k] = value.reshape(n, k)
        as_tensor = {key: torch.from_numpy(value).to(self.device) for key, value in padded.items()}
        return torch.from_numpy(tokens).to(self.device), as_tensor, lengths, widths

    def _activate(self, run_id: str) -> None:
        self.run(run_id)
        if self.peft_model.active_adapter != run_id:
            self.peft_model.set_adapter(run_id)

    def autocast(self):
        """bf16 autocast on CUDA; float32 (no-op) on CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()
