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

from gradwire_server.batch import AdamSettings, DatumArrays, LoraSettings, LossRequest
from gradwire_server.losses import LOSSES
from gradwire_server.models import LoadedModel

LORA_ALPHA = 32
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
UNEMBED_MODULES = ("lm_head",)


class RunNotFound(KeyError):
    """No training run has this id."""


@dataclass
class ForwardResult:
    logprobs: list[np.ndarray]  # per datum, shaped like its target_tokens
    metrics: dict[str, float]


@dataclass
class Run:
    run_id: str
    lora: LoraSettings
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.AdamW
    step: int = 0


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

    def forward(self, run_id: str, request: LossRequest) -> ForwardResult:
        """Loss and logprobs; no gradient is recorded."""
        with torch.no_grad():
            loss, result = self._loss(run_id, request)
        return result

    def forward_backward(self, run_id: str, request: LossRequest) -> ForwardResult:
        """Loss and logprobs; the loss's gradient accumulates into the run's adapter."""
        loss, result = self._loss(run_id, request)
        loss.backward()
        return result

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

    def _loss(self, run_id: str, request: LossRequest) -> tuple[torch.Tensor, ForwardResult]:
        self._activate(run_id)
        spec = LOSSES[request.loss_fn]
        tokens, inputs, lengths, widths = self._pad(request.data)
        with self._autocast():
            logits = self.peft_model(input_ids=tokens).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)            # [B, L, V]
        target_logprobs = logprobs.gather(-1, inputs["target_tokens"])    # [B, L, K]
        target_logprobs = target_logprobs * inputs["mask"]               # padding -> 0
        config = {**spec.config_defaults, **request.loss_fn_config}
        loss, metrics = spec.fn(target_logprobs, inputs, config)
        per_datum = target_logprobs.detach().cpu().numpy()
        outputs = [per_datum[i, :n, :k] if request.data[i].loss_fn_inputs["target_tokens"].ndim == 2
                   else per_datum[i, :n, 0]
                   for i, (n, k) in enumerate(zip(lengths, widths))]
        return loss, ForwardResult(outputs, metrics)

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

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()
