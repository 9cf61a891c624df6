"""The compute engine: one base model, one LoRA adapter and AdamW per training run.

Everything here runs on the single worker thread that owns the device; it knows
nothing about gRPC. Logprobs are log_softmax(logits) gathered at the target
tokens; every loss is summed over tokens and datums.
"""
from __future__ import annotations

import contextlib
import copy
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import peft
import torch
from peft.tuners.lora import LoraLayer

from gradwire_server import memory
from gradwire_server.attention import AttentionKernel
from gradwire_server.batch import AdamSettings, DatumArrays, LoraSettings
from gradwire_server.compiled_layers import CompiledLayers
from gradwire_server.logprobs import model_target_logprobs
from gradwire_server.losses import LOSSES
from gradwire_server.memory import MemoryPlan, OutOfMemory
from gradwire_server.models import LoadedModel

LORA_ALPHA = 32
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
UNEMBED_MODULES = ("lm_head",)
KEEP_GRAPH_TIMEOUT_S = 60.0
PROBE_LORA_RANK = 32
WARM_UP_TOKENS = 64  # per sequence of the warm-up batch: lengths share graphs, so any short one does


class NonFiniteStep(ArithmeticError):
    """An optimizer step would have written a non-finite weight (and was undone)."""


class NonFiniteGradient(ArithmeticError):
    """A pass's loss gave a gradient whose norm is not finite (which was not added)."""


class RunNotFound(LookupError):
    """No training run with this id is loaded."""

    def __init__(self, run_id: str):
        super().__init__(f"training run {run_id!r} is not loaded")
        self.run_id = run_id


@dataclass
class Run:
    """A training run's LoRA parameters and AdamW. Its accumulated gradient is one flat
    buffer (the .grad of each parameter the passes reached is a view of it; the others'
    stay None, which AdamW skips), and so is each kind of AdamW state of the parameters
    that have state: a step's bookkeeping (its undo copy, its finiteness check) is then a
    few whole-buffer ops, not a few per parameter, which a GPU's host would launch one
    at a time while the device waits."""

    run_id: str
    lora: LoraSettings
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.AdamW
    step: int = 0
    grad: torch.Tensor | None = None  # flat, in parameter order; None: no gradient since the last step
    optimizer_state: dict[str, torch.Tensor] = field(default_factory=dict)  # "exp_avg", ... -> flat
    homed: list[torch.nn.Parameter] = field(default_factory=list)  # whose state optimizer_state holds
    weight_views: list[torch.Tensor] = field(init=False)  # each parameter, flattened (a view)

    def __post_init__(self) -> None:
        self.weight_views = [p.detach().reshape(-1) for p in self.params]

    def weights(self) -> torch.Tensor:
        """A copy of every parameter's values, flat."""
        return torch.cat(self.weight_views)

    def add_gradient(self, grad: torch.Tensor, views: list[torch.Tensor], reached: list[bool]) -> None:
        """Adds a pass's flat gradient (`views`: its parts shaped like the parameters;
        `reached`: which parameters it has a gradient for) to the accumulated one."""
        if self.grad is None:
            self.grad = grad
        else:
            self.grad.add_(grad)
            views = []  # the pass's, not the run's: made below if a parameter is reached for the first time
        for i, p in enumerate(self.params):
            if reached[i] and p.grad is None:
                views = views or _views(self.grad, self.params)
                p.grad = views[i]

    def clear_gradient(self) -> None:
        self.grad = None
        for p in self.params:
            p.grad = None

    def unhomed_state(self) -> list[torch.Tensor]:
        """AdamW state tensors not yet in optimizer_state (those a first step made)."""
        if len(self.optimizer.state) == len(self.homed):
            return []
        homed = set(self.homed)
        return [value for p in self.params if p in self.optimizer.state and p not in homed
                for value in self.optimizer.state[p].values()]

    def drop_unhomed_state(self) -> None:
        homed = set(self.homed)
        for p in [p for p in self.optimizer.state if p not in homed]:
            del self.optimizer.state[p]

    def home_optimizer_state(self) -> None:
        """Moves AdamW's state of every parameter that has some into one flat buffer per key
        (again when more parameters have state than last time); AdamW goes on updating views
        of them in place."""
        if len(self.optimizer.state) == len(self.homed):
            return
        self.homed = [p for p in self.params if p in self.optimizer.state]
        states = [self.optimizer.state[p] for p in self.homed]
        self.optimizer_state = {}
        for key in states[0]:
            values = [state[key] for state in states]
            flat = _flat_copy(values)
            for state, view in zip(states, _views(flat, values)):
                state[key] = view
            self.optimizer_state[key] = flat

    def reset_optimizer_state(self) -> None:
        """To be called after the optimizer or its state was replaced."""
        self.optimizer_state, self.homed = {}, []
        self.home_optimizer_state()


@dataclass
class KeptMicroBatch:
    """A forward micro-batch held with its autograd graph for the backward leg."""

    target_logprobs: torch.Tensor     # [B, L, K], still attached to the graph
    data: list[DatumArrays]           # the datums it was computed from
    outputs: list[np.ndarray]         # their per-datum logprobs
    arrived: list[DatumArrays] = field(default_factory=list)  # backward datums matched so far

    def matches_next(self, datum: DatumArrays) -> bool:
        kept = self.data[len(self.arrived)]
        return (np.array_equal(kept.tokens, datum.tokens)
                and np.array_equal(kept.loss_fn_inputs["target_tokens"],
                                   datum.loss_fn_inputs["target_tokens"]))


@dataclass
class KeptForward:
    """A Forward's graph, kept for the run's next request (custom-loss fast path)."""

    forward_op: str
    micro_batches: deque[KeptMicroBatch]
    nbytes: int
    expires_at: float


class _SavedTensorBytes:
    """Counts the bytes autograd saves for backward (activations), leaving out
    the model's parameters, which are held anyway."""

    def __init__(self, parameter_storages: set[int]):
        self.excluded = parameter_storages
        self.seen: set[int] = set()
        self.nbytes = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in self.seen and pointer not in self.excluded:
            self.seen.add(pointer)
            self.nbytes += storage.nbytes()
        # Detached: a saved output that packed itself would hold its own grad_fn
        # (a reference cycle through C++ that no garbage collector sees), so a
        # graph never backpropagated would never be freed.
        return tensor.detach()

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)


@dataclass
class RunState:
    """A run's training state, detached from the device (what a checkpoint holds)."""

    lora: LoraSettings
    adapter_config: dict[str, Any]          # peft LoraConfig.to_dict()
    adapter: dict[str, torch.Tensor]        # CPU; peft state-dict names (no adapter name)
    optimizer: dict[str, Any] | None        # CPU copy of AdamW.state_dict(), if asked for
    step: int


class LossPass:
    """One forward(-backward) over a batch that arrives in pieces.

    Pieces run in micro-batches of at most `engine.micro_batch_tokens` padded tokens.
    Their gradients are staged apart from the run's accumulated gradients and
    added to them exactly once, by commit(); discard() (or never committing)
    leaves the run exactly as it was.

    A forward pass with `keep_graph` keeps its micro-batches' graphs (while
    they fit the engine's budget); a backward pass given that `reuse` applies
    its loss to the kept logprobs of matching datums instead of recomputing
    them: one forward and one backward in all.
    """

    def __init__(self, engine: Engine, run: Run, loss_fn: str, config: dict[str, float], backward: bool,
                 keep_graph: bool = False, reuse: KeptForward | None = None):
        self.engine, self.run = engine, run
        self.loss_fn, self.config, self.backward = loss_fn, config, backward
        self.staged: torch.Tensor | None = None  # this pass's gradient, flat like run.grad
        self.staged_views: list[torch.Tensor] = []  # its parts, shaped like the parameters
        self.reached = [False] * len(run.params)  # which parameters it has a gradient for
        self.metrics: dict[str, torch.Tensor] = {}  # on the device, read once by commit()
        self.num_datums = 0
        self.reuse, self.reused_datums = reuse, 0
        self.graph_kept = False
        keeping = keep_graph and not backward and engine.keep_graph_budget_bytes > 0
        self.kept: list[KeptMicroBatch] | None = [] if keeping else None
        self.saved_bytes = _SavedTensorBytes(engine.parameter_storages(run)) if self.kept is not None else None

    def feed(self, data: list[DatumArrays]) -> list[np.ndarray]:
        """Computes the datums' losses (and staged gradients); returns their logprobs."""
        outputs: list[np.ndarray] = []
        if self.reuse is not None:
            reused, reused_outputs = self._feed_reused(data)
            outputs.extend(reused_outputs)
            data = data[reused:]
        for micro_batch in _micro_batches(data, self.engine.micro_batch_tokens):
            keeping = self.kept is not None
            try:
                with torch.set_grad_enabled(self.backward or keeping), \
                        (self.saved_bytes.hooks() if keeping else contextlib.nullcontext()):
                    target_logprobs, inputs = self.engine.micro_batch_logprobs(self.run, micro_batch)
                    loss, metrics = self.engine.loss(target_logprobs, inputs, self.loss_fn, self.config)
                    if self.backward:
                        self._stage(loss)
            except torch.OutOfMemoryError:
                raise OutOfMemory(len(micro_batch), max(len(d.tokens) for d in micro_batch),
                                  memory.free_bytes(self.engine.device), self.engine.device) from None
            micro_outputs = per_datum_outputs(target_logprobs, micro_batch)
            if keeping:
                self._keep(KeptMicroBatch(target_logprobs, micro_batch, micro_outputs))
            self._add_metrics(metrics, len(micro_batch))
            outputs.extend(micro_outputs)
        return outputs

    def _keep(self, micro_batch: KeptMicroBatch) -> None:
        held = sum(kept.nbytes for kept in self.engine.kept.values())  # other runs' kept graphs
        if held + self.saved_bytes.nbytes > self.engine.keep_graph_budget_bytes:
            self.kept = None  # over budget: the backward leg will recompute
        else:
            self.kept.append(micro_batch)

    def _feed_reused(self, data: list[DatumArrays]) -> tuple[int, list[np.ndarray]]:
        """Matches datums to the kept forward, in order; returns how many matched
        and their logprobs. The first mismatch ends reuse: the rest is recomputed."""
        outputs = []
        for i, datum in enumerate(data):
            kept = self.reuse.micro_batches[0] if self.reuse.micro_batches else None
            if kept is None or not kept.matches_next(datum):
                self._finish_reuse()
                return i, outputs
            outputs.append(kept.outputs[len(kept.arrived)])
            kept.arrived.append(datum)
            if len(kept.arrived) == len(kept.data):
                self._backward_kept(self.reuse.micro_batches.popleft())
        return len(data), outputs

    def _backward_kept(self, kept: KeptMicroBatch) -> None:
        """This pass's loss on the kept logprobs of the datums that arrived, backpropagated."""
        count = len(kept.arrived)
        _, inputs = self.engine.pad(kept.arrived)
        length, width = inputs["mask"].shape[1:]
        target_logprobs = kept.target_logprobs[:count, :length, :width]
        loss, metrics = self.engine.loss(target_logprobs, inputs, self.loss_fn, self.config)
        self._stage(loss)
        self._add_metrics(metrics, count)
        self.reused_datums += count

    def _finish_reuse(self) -> None:
        """Applies the partly matched kept micro-batch, then frees the kept graph."""
        if self.reuse is not None and self.reuse.micro_batches and self.reuse.micro_batches[0].arrived:
            self._backward_kept(self.reuse.micro_batches[0])
        self.reuse = None

    def _add_metrics(self, metrics: dict[str, torch.Tensor], count: int) -> None:
        metrics = {key: value.double() for key, value in metrics.items()}  # sums of many micro-batches
        self.metrics = merge_metrics(self.metrics, self.num_datums, metrics, count)
        self.num_datums += count

    def _stage(self, loss: torch.Tensor) -> None:
        params = self.run.params
        accumulated = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            # Another run's request may have run since the forward (a kept graph, a stream's
            # earlier piece), and the backward may recompute parts of it.
            with self.engine.computing(self.run.run_id):
                loss.backward()
            reached = [i for i, p in enumerate(params) if p.grad is not None]
            if reached:
                if self.staged is None:
                    self.staged = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype,
                                              device=params[0].device)
                    self.staged_views = _views(self.staged, params)
                torch._foreach_add_([self.staged_views[i] for i in reached], [params[i].grad for i in reached])
                for i in reached:
                    self.reached[i] = True
        finally:
            for p, grad in zip(params, accumulated):
                p.grad = grad

    def commit(self, forward_op: str = "") -> dict[str, float]:
        """Adds the staged gradients to the run's (and hands a kept graph to the
        engine); returns the merged metrics. NonFiniteGradient, adding nothing, if the
        staged gradient's norm is not finite (an element inf or NaN, or the float32 sum of
        squares overflowing): added, it would make the run's next step fail, or a clipped
        one zero every gradient, and discard the gradients accumulated before it too."""
        self._finish_reuse()
        finite = [] if self.staged is None else [torch.isfinite(torch.linalg.vector_norm(self.staged)).double()]
        # The pass's one host sync: the finiteness check and the metrics together.
        values = torch.stack([*finite, *self.metrics.values()]).tolist() if finite or self.metrics else []
        metrics = dict(zip(self.metrics, values[len(finite):]))
        if finite and not values[0]:
            self.staged, self.staged_views, self.kept = None, [], None
            shown = ", ".join(f"{key} {value:.4g}" for key, value in metrics.items() if key.startswith("loss"))
            raise NonFiniteGradient(f"the gradient of this batch is not finite or too large (its norm overflows "
                                    f"float32; {shown or 'no loss metric'}); it was not added: the run's "
                                    "gradients are as they were")
        if self.staged is not None:
            self.run.add_gradient(self.staged, self.staged_views, self.reached)
        self.staged, self.staged_views = None, []
        self.graph_kept = bool(self.kept)
        if self.kept:
            self.engine.kept[self.run.run_id] = KeptForward(
                forward_op, deque(self.kept), self.saved_bytes.nbytes,
                time.monotonic() + self.engine.keep_graph_timeout_s)
        self.kept = None
        return metrics


def merge_metrics(merged: dict[str, torch.Tensor], merged_count: int,
                  metrics: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    """Combines the metrics of two parts of a batch by each key's reduction suffix
    (0-dim tensors, combined on their device)."""
    out = dict(merged)
    for key, value in metrics.items():
        if key not in out:
            out[key] = value
            continue
        reduction = key.rsplit(":", 1)[-1]
        if reduction == "sum":
            out[key] = out[key] + value
        elif reduction == "max":
            out[key] = torch.maximum(out[key], value)
        elif reduction == "min":
            out[key] = torch.minimum(out[key], value)
        else:  # mean, weighted by datums
            out[key] = (out[key] * merged_count + value * count) / (merged_count + count)
    return out


def per_datum_outputs(target_logprobs: torch.Tensor, data: list[DatumArrays]) -> list[np.ndarray]:
    """Each datum's logprobs, shaped like its target_tokens ([N] or [N, K]). Plain
    numpy arrays: on the CPU a tensor's .numpy() would keep the tensor alive for as
    long as the operation keeps its outputs."""
    values = target_logprobs.detach().cpu().numpy().copy()
    return [values[i, :len(d.tokens), :_width(d)] if d.loss_fn_inputs["target_tokens"].ndim == 2
            else values[i, :len(d.tokens), 0]
            for i, d in enumerate(data)]


def _width(datum: DatumArrays) -> int:
    """K: target candidates per position."""
    return datum.loss_fn_inputs["target_tokens"].reshape(len(datum.tokens), -1).shape[1]


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

    def __init__(self, base: LoadedModel, device: torch.device,
                 keep_graph_timeout_s: float = KEEP_GRAPH_TIMEOUT_S, activation_checkpointing: bool = False,
                 compile_layers: bool = False, attention: AttentionKernel = contextlib.nullcontext):
        self.base = base
        self.device = device
        self.attention = attention  # the attention kernel's context (attention.py), sampling's too
        self.activation_checkpointing = activation_checkpointing
        if activation_checkpointing:
            _checkpoint_decoder_layers(base.model)
        # Before peft wraps any module (see compiled_layers.py).
        self.compiled = (CompiledLayers(base.model, ATTENTION_MODULES + MLP_MODULES + UNEMBED_MODULES)
                         if compile_layers else None)
        # Before peft adds any LoRA factor: the base model's own weights.
        self._base_storages = {p.untyped_storage().data_ptr() for p in base.model.parameters()}
        self.peft_model: peft.PeftModel | None = None
        self.lora_layers: list[LoraLayer] = []  # peft's, once it wraps the Linears (adapters_changed)
        self.runs: dict[str, Run] = {}
        # Set by plan_memory(); the CPU's largest until then.
        self.micro_batch_tokens = memory.CPU_MICRO_BATCH_TOKENS               # padded tokens per forward pass
        self.keep_graph_budget_bytes = memory.CPU_KEEP_GRAPH_BUDGET_BYTES     # activations Forwards may keep
        self.keep_graph_timeout_s = keep_graph_timeout_s
        self.kept: dict[str, KeptForward] = {}  # run_id -> its last Forward's graph
        # Fault injection for tests: called with (datums, padded length) just
        # before a micro-batch's forward allocates its activations.
        self.before_forward: Callable[[int, int], None] | None = None

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
        self.runs[run_id] = Run(run_id, lora, params, self._adamw(params))
        self.adapters_changed()
        return run_id

    def save_state(self, run_id: str, with_optimizer: bool) -> RunState:
        """A CPU copy of the run's adapter (and optimizer state), safe to write out later."""
        run = self.run(run_id)
        self.drop_kept_graph(run_id)  # a kept graph serves only the run's very next request
        # save_embedding_layers=False: an adapted lm_head must not drag the base
        # model's unembedding into the adapter file.
        adapter = peft.get_peft_model_state_dict(self.peft_model, adapter_name=run_id,
                                                 save_embedding_layers=False)
        return RunState(
            lora=run.lora, adapter_config=self.peft_model.peft_config[run_id].to_dict(),
            adapter={name: t.detach().to("cpu", copy=True).contiguous() for name, t in adapter.items()},
            optimizer=_cpu_copy(run.optimizer.state_dict()) if with_optimizer else None,
            step=run.step)

    def load_state(self, run_id: str, adapter: dict[str, torch.Tensor],
                   optimizer: dict[str, Any] | None, step: int) -> None:
        """Replaces the run's adapter weights, and its AdamW state when given (else a
        fresh AdamW), and drops accumulated gradients. Everything is checked before
        anything changes: a ValueError leaves the run exactly as it was."""
        run = self.run(run_id)
        params = self._adapter_parameters(run_id)
        if adapter.keys() != params.keys():
            missing, unexpected = sorted(params.keys() - adapter.keys()), sorted(adapter.keys() - params.keys())
            raise ValueError(f"the checkpoint's adapter does not fit this run's LoRA config "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        for name, p in params.items():
            if adapter[name].shape != p.shape:
                raise ValueError(f"the checkpoint's {name} has shape {list(adapter[name].shape)}, "
                                 f"this run's has {list(p.shape)} (another LoRA rank?)")
        if optimizer is not None:
            _check_optimizer_state(optimizer, run.params)
        self.drop_kept_graph(run_id)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(adapter[name])
        run.clear_gradient()
        if optimizer is not None:
            run.optimizer.load_state_dict(optimizer)
        else:
            run.optimizer = self._adamw(run.params)
        run.reset_optimizer_state()
        run.step = step

    def _adamw(self, params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
        """One implementation per device, the same before and after a resume (bit-exact):
        on CUDA fused (one kernel launch per step), on the CPU one parameter at a time."""
        if self.device.type == "cuda":
            return torch.optim.AdamW(params, weight_decay=0.0, fused=True)
        return torch.optim.AdamW(params, weight_decay=0.0, foreach=False)

    def unload(self, run_id: str) -> None:
        """Removes the run's adapter from the model and drops its optimizer state."""
        self.run(run_id)
        self.drop_kept_graph(run_id)
        self.peft_model.delete_adapter(run_id)
        self.adapters_changed()
        del self.runs[run_id]

    def adapters_changed(self) -> None:
        """To be called after any adapter is added to or deleted from peft_model (a run's,
        the sampler's), and after the model is unwrapped: peft's layers are found again
        (adding an adapter may wrap Linears no other adapter has; deleting one leaves them
        wrapped)."""
        model = self.peft_model if self.peft_model is not None else self.base.model
        self.lora_layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
        if self.compiled:
            self.compiled.adapters_changed(self.lora_layers)

    def _adapter_parameters(self, run_id: str) -> dict[str, torch.nn.Parameter]:
        """The run's parameters under peft's state-dict names."""
        return {name.replace(f".{run_id}.", "."): p for name, p in self.peft_model.named_parameters()
                if f".{run_id}." in name}

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
                   backward: bool, keep_graph: bool = False, reuse_forward: str = "") -> LossPass:
        """A forward (or forward-backward) pass over a batch fed in pieces.
        A kept graph serves only the run's very next request, if it asks for it."""
        run = self.run(run_id)
        kept = self.kept.pop(run_id, None)
        reuse = kept if backward and kept is not None and kept.forward_op == reuse_forward else None
        return LossPass(self, run, loss_fn, loss_fn_config, backward, keep_graph, reuse)

    def drop_kept_graph(self, run_id: str) -> None:
        """Frees the run's kept forward graph, if any."""
        self.kept.pop(run_id, None)

    def drop_expired_graphs(self) -> None:
        now = time.monotonic()
        for run_id in [r for r, kept in self.kept.items() if kept.expires_at <= now]:
            del self.kept[run_id]

    def parameter_storages(self, run: Run) -> set[int]:
        """The storages of the weights a pass of `run` computes with: the base model's and the
        run's LoRA factors. (Not every parameter of the peft model: walking its modules for
        them took milliseconds a custom loss's forward leg waited on.)"""
        return self._base_storages | {p.untyped_storage().data_ptr() for p in run.params}

    def optim_step(self, run_id: str, adam: AdamSettings) -> dict[str, float]:
        """One AdamW step on the accumulated gradients, which are then cleared."""
        run = self.run(run_id)
        self.drop_kept_graph(run_id)
        grads = [p.grad for p in run.params if p.grad is not None]
        foreach = self.device.type == "cuda"  # one kernel for all parameters; the CPU keeps its numerics
        grad_norm = torch.nn.utils.get_total_norm(grads, foreach=foreach)
        # Everything the step writes, kept until the step is known finite: a step that would
        # write inf/NaN is undone.
        written = [t for t in (run.grad, *run.optimizer_state.values()) if t is not None]
        weights_before, before = run.weights(), [t.clone() for t in written]
        hyperparameters = [{key: value for key, value in group.items() if key != "params"}
                           for group in run.optimizer.param_groups]
        if adam.grad_clip_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(run.params, adam.grad_clip_norm, grad_norm, foreach=foreach)
        for group in run.optimizer.param_groups:
            group.update(lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps,
                         weight_decay=adam.weight_decay)
        run.optimizer.step()
        # The moments too: a finite weight after an infinite second moment never moves again.
        state = [*run.optimizer_state.values(), *(t.reshape(-1) for t in run.unhomed_state())]
        stepped = torch.isfinite(torch.cat([*run.weight_views, *state])).all()
        if adam.grad_clip_norm > 0:  # clipped by an overflowing norm, every gradient became 0: no step at all
            stepped = stepped & torch.isfinite(grad_norm)
        if not stepped:  # one host sync
            _restore(run.params, weights_before)
            for tensor, values in zip(written, before):
                tensor.copy_(values)
            run.drop_unhomed_state()  # this step made it
            for group, kept in zip(run.optimizer.param_groups, hyperparameters):
                group.update(kept)
            outcome = "nothing was changed"
            overflowed = not torch.isfinite(grad_norm)
            if run.grad is not None and overflowed:
                # The gradient is not finite or an element's square is not (the float32 norm
                # overflows): it makes the second moment infinite at any learning rate, or the clip
                # zero, and forward_backward only adds to it: kept, it would refuse every later step.
                run.clear_gradient()
                outcome = ("its gradients are too large or not finite and were discarded (weights and "
                           "optimizer state are unchanged); run forward_backward again")
            what = ("the gradient overflowed float32 as batches added up, and clipping by its norm "
                    "(grad_clip_norm) would zero every gradient" if overflowed and adam.grad_clip_norm > 0 else
                    "it would make a weight or an AdamW moment infinite or NaN")
            raise NonFiniteStep(f"this step of {run_id} (grad norm {float(grad_norm):.4g}) was not taken: {what}; "
                                f"{outcome}")
        run.home_optimizer_state()
        run.clear_gradient()
        run.step += 1
        return {"grad_norm:mean": float(grad_norm), "learning_rate:mean": adam.learning_rate}

    # ---- the math -------------------------------------------------------------

    def micro_batch_logprobs(self, run: Run, data: list[DatumArrays]
                             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Target-token logprobs [B, L, K] of one micro-batch (0 on padding), and
        its loss inputs padded to the same shape."""
        tokens, inputs = self.pad(data)
        if self.before_forward is not None:
            self.before_forward(*tokens.shape)
        with self.computing(run.run_id), self.autocast():
            logprobs = model_target_logprobs(self.base.model, tokens, inputs["target_tokens"])  # [B, L, K]
        return logprobs * inputs["mask"], inputs

    @staticmethod
    def loss(target_logprobs: torch.Tensor, inputs: dict[str, torch.Tensor], loss_fn: str,
             config: dict[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        spec = LOSSES[loss_fn]
        return spec.fn(target_logprobs, inputs, {**spec.config_defaults, **config})

    def pad(self, data: list[DatumArrays]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Right-pads tokens to [B, L] and loss inputs (plus a 0/1 `mask`) to
        [B, L, K]. Causal attention keeps real positions blind to the padding after them.
        An input that other datums have and one lacks is 1 on its real tokens: the default
        of every optional input (weights, sequence_ratio_mask), as for a batch without it."""
        lengths = [len(d.tokens) for d in data]
        widths = [_width(d) for d in data]
        batch, length, width = len(data), max(lengths), max(widths)
        tokens = np.zeros((batch, length), dtype=np.int64)
        keys = set().union(*(d.loss_fn_inputs for d in data))
        padded = {key: np.zeros((batch, length, width),
                                dtype=np.int64 if key == "target_tokens" else np.float32)
                  for key in keys | {"mask"}}
        for i, (d, n, k) in enumerate(zip(data, lengths, widths)):
            tokens[i, :n] = d.tokens
            padded["mask"][i, :n, :k] = 1.0
            for key in keys:
                value = d.loss_fn_inputs.get(key)
                padded[key][i, :n, :k] = 1.0 if value is None else value.reshape(n, k)
        as_tensor = {key: self._upload(value) for key, value in padded.items()}
        return self._upload(tokens), as_tensor

    def _upload(self, array: np.ndarray) -> torch.Tensor:
        """The array on the device; to CUDA from pinned memory, without waiting for the copy."""
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    @contextlib.contextmanager
    def computing(self, run_id: str) -> Iterator[None]:
        """The model computes with the run's adapter while the block runs: peft's
        layers with it active, or the compiled layers with it hooked in; and with the
        server's attention kernel."""
        self.run(run_id)
        if self.peft_model.active_adapter != run_id:
            self.peft_model.set_adapter(run_id)  # peft leaves only the active adapter trainable
        with self.compiled.training(run_id) if self.compiled else contextlib.nullcontext(), self.attention():
            yield

    @property
    def dtype(self) -> torch.dtype:
        """The frozen base weights' dtype; LoRA weights, gradients and AdamW state are float32."""
        return self.base.dtype

    def autocast(self):
        """bf16 autocast over a bf16 base (the float32 LoRA matmuls run in bf16 too);
        a float32 base runs in float32 throughout."""
        if self.dtype == torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def plan_memory(self, micro_batch_tokens: int | None = None,
                    keep_graph_budget_bytes: int | None = None) -> MemoryPlan:
        """Sets the micro-batch size and keep-graph budget: the given ones, else derived
        from a probe pass's activation bytes per token (memory.py): on CUDA with the free
        memory, on the CPU to a fixed amount of activations. Call it on the thread that
        runs the model (see server.py)."""
        cuda = self.device.type == "cuda"
        per_token = 0
        if micro_batch_tokens is None or (cuda and keep_graph_budget_bytes is None):
            probe_tokens = memory.PROBE_TOKENS if cuda else memory.CPU_PROBE_TOKENS
            per_token = self.activation_bytes_per_token(min(probe_tokens, self.base.max_context_length))
        derived_tokens, derived_budget = (memory.plan_from_free(memory.free_bytes(self.device), per_token) if cuda
                                          else memory.cpu_plan(per_token))
        self.micro_batch_tokens = micro_batch_tokens if micro_batch_tokens is not None else derived_tokens
        self.keep_graph_budget_bytes = (keep_graph_budget_bytes if keep_graph_budget_bytes is not None
                                        else derived_budget)
        return MemoryPlan(self.micro_batch_tokens, self.keep_graph_budget_bytes, per_token)

    def activation_bytes_per_token(self, tokens: int) -> int:
        """Memory one token of a forward-backward pass costs, measured on two sequences
        of `tokens` // 2 through a temporary run: on CUDA the allocator's peak above what
        was allocated before; elsewhere the bytes autograd saves for backward. (Two
        sequences, not one: with --compile this pass compiles the graphs that training
        batches use; a batch of one has graphs of its own. Memory that grows with the
        square of the length is measured at this length only: SDPA's fused kernels have
        none, but --attention math and eager keep attention weights of length².)"""
        data = _two_sequences(tokens // 2)
        with self._temporary_run() as run:
            cuda = self.device.type == "cuda"
            if cuda:
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                allocated = torch.cuda.memory_allocated(self.device)
            saved = _SavedTensorBytes(self.parameter_storages(run))
            with torch.enable_grad(), saved.hooks():
                logprobs, inputs = self.micro_batch_logprobs(run, data)
            with self.computing(run.run_id):
                self.loss(logprobs, inputs, "cross_entropy", {})[0].backward()
            peak = torch.cuda.max_memory_allocated(self.device) - allocated if cuda else 0
            return max(peak, saved.nbytes) // (2 * len(data[0].tokens))

    def warm_up_compiled_layers(self) -> None:
        """With --compile: compiles the graphs most requests use, those of several
        sequences with gradients (forward_backward, a custom loss's forward; a probe pass
        whose measurement goes unused) and without (forward), and of one sequence without
        (a forward of one datum; the sampler's training passes), so that no first request
        waits for them. Graphs the startup probe compiled are reused."""
        length = min(WARM_UP_TOKENS, self.base.max_context_length)
        self.activation_bytes_per_token(2 * length)
        with self._temporary_run() as run, torch.no_grad():
            self.micro_batch_logprobs(run, _two_sequences(length))
            self.micro_batch_logprobs(run, _two_sequences(length)[:1])

    @contextlib.contextmanager
    def _temporary_run(self) -> Iterator[Run]:
        """A rank-32 run on the default modules for the span of the block; afterwards the
        engine is as it was, the model without peft's wrappers if it had none (they
        would slow the base model's sampling)."""
        wrapped = self.peft_model is not None
        run_id = self.create_run(LoraSettings(rank=PROBE_LORA_RANK, seed=0))
        try:
            yield self.run(run_id)
        finally:
            self.unload(run_id)
            if not wrapped:
                self.peft_model.unload()  # every wrapped module's base layer back in its place
                self.peft_model = None
                self.adapters_changed()


def _two_sequences(length: int) -> list[DatumArrays]:
    """Two sequences of `length` tokens, for a startup pass."""
    sequence = np.zeros(length, dtype=np.int64)
    return [DatumArrays(sequence, {"target_tokens": sequence})] * 2


def _checkpoint_decoder_layers(model: torch.nn.Module) -> None:
    """Each decoder layer keeps only its input for the backward pass and recomputes
    the rest there (transformers' activation checkpointing, non-reentrant). Only
    passes with gradients are affected: sampling runs the layers as before."""
    dropout = {key: value for key, value in model.config.to_dict().items()
               if ("dropout" in key or "pdrop" in key) and isinstance(value, float) and value > 0}
    if dropout:
        raise ValueError(f"--activation-checkpointing runs the decoder layers in training mode, and this "
                         f"model has dropout ({dropout}): training would turn random")
    model.activation_checkpointing_enable({"use_reentrant": False})
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            module.train()  # transformers checkpoints a layer only in training mode


def _flat_copy(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors' values (of one dtype) in one new flat tensor: one copy kernel, not one per tensor."""
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _views(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """`flat`'s consecutive parts, each a view shaped like the tensor of `like` in its place."""
    return [part.view_as(tensor) for part, tensor in zip(flat.split([t.numel() for t in like]), like)]


def _restore(tensors: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Writes _flat_copy(tensors)'s values back into the tensors."""
    with torch.no_grad():
        for tensor, values in zip(tensors, _views(flat, tensors)):
            tensor.copy_(values)


def _cpu_copy(state: Any) -> Any:
    """A deep copy of an optimizer state_dict with every tensor cloned to the CPU."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {key: _cpu_copy(value) for key, value in state.items()}
    if isinstance(state, list):
        return [_cpu_copy(value) for value in state]
    return copy.deepcopy(state)


def _check_optimizer_state(state: dict[str, Any], params: list[torch.nn.Parameter]) -> None:
    """Raises ValueError unless `state` is an AdamW state_dict for exactly these parameters."""
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list) or len(groups) != 1 or len(groups[0].get("params", ())) != len(params):
        raise ValueError("the checkpoint's optimizer state is not for this run's parameters")
    for index, per_param in state.get("state", {}).items():
        if not isinstance(index, int) or not 0 <= index < len(params):
            raise ValueError(f"the checkpoint's optimizer state names parameter {index!r}")
        if not isinstance(per_param, dict) or per_param.keys() != {"step", "exp_avg", "exp_avg_sq"}:
            raise ValueError(f"the checkpoint's optimizer state of parameter {index} is not AdamW's "
                             "(step, exp_avg, exp_avg_sq)")
        if not isinstance(per_param["step"], torch.Tensor) or per_param["step"].numel() != 1:
            raise ValueError(f"the checkpoint's optimizer step of parameter {index} is not a count")
        for key in ("exp_avg", "exp_avg_sq"):
            value = per_param[key]
            if not isinstance(value, torch.Tensor) or value.shape != params[index].shape:
                raise ValueError(f"the checkpoint's optimizer {key} of parameter {index} "
                                 f"does not match its shape {list(params[index].shape)}")
