"""Training through compiled decoder layers (`--compile`).

torch.compile specialises a graph on what it reads. peft's LoRA layers read the
active adapter's name and every adapter's requires_grad flag, so a compiled
layer holding them would compile again for each run, and past dynamo's
recompile limit run eagerly (a log warning all that says so). Here the compiled layers see one
model for every run: the run's peft layers are switched off, and a forward hook
on each adaptable Linear adds the run's delta instead,

    y = x @ W.T + ((x @ A.T) @ B.T) * scale

with A [r, in] and B [out, r] the run's own parameters and scale its LoRA scale
(a 0-d tensor), set for the span of its forward and backward (None otherwise).
The factors' rank and the batch and length are dynamic sizes of the graphs, so
all runs share a few graphs, one per variant (a batch, length or rank of 1,
which dynamo specialises, or more; grad or not; the first layer's input, which
needs no grad; which modules carry an adapter), and every decoder layer shares
them (one code object).

Training runs compiled, and so does the sampler's training pass (--sampler-logprobs
training: its logprobs are training's own numbers); decode steps add LoRA through
hooks of their own (lora_batch.py), which a compiled layer would not see, and run eagerly.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from peft.tuners.lora import LoraLayer
from torch.fx.experimental import _config as shape_config

from gradwire_server.lora_batch import adapter_layers_off

# Dynamo's settings while the compiled layers compile, in training()'s thread (they are per
# thread). A checkpointed layer recomputed in the backward pass (on CUDA in autograd's thread)
# runs the graph its forward compiled, with the same inputs: it compiles nothing there.
DYNAMO_CONFIG = {
    # LoRA factors (parameters, held by modules) of any rank: their rank dims are marked dynamic.
    "force_parameter_static_shapes": False,
    "force_nn_module_property_static_shapes": False,
    # Graphs the layers (one code object) may compile in all before dynamo gives up and
    # runs them eagerly: the variants (module docstring) multiply to 72 at most.
    "recompile_limit": 128,
}
# A rank equal to the batch size must not tie the two sizes in a graph.
SHAPE_CONFIG = {"use_duck_shape": False}
# Inductor's settings for the layers' graphs. A fused kernel would keep a bf16 op's result in
# float32 until the kernel's end; rounded after every op instead, as eager rounds, training's
# logprobs stay closer to the eager decode steps' (on the H100 without this: 0.078 apart, 0.035 eager).
INDUCTOR_OPTIONS = {"emulate_precision_casts": True}

# (A [r, in], B [out, r], scale []) of one adapted Linear.
RunLora = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def run_lora(linear: torch.nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float
             ) -> tuple[torch.nn.Linear, RunLora]:
    """A hooked Linear and the factors its hook adds while computing() runs: any rank
    without a compile of its own (dynamic), the scale a tensor (a float would be a constant)."""
    torch._dynamo.maybe_mark_dynamic(a, 0)  # the rank
    torch._dynamo.maybe_mark_dynamic(b, 1)
    return linear, (a, b, torch.tensor(scale, device=a.device))


def _add_run_lora(linear: torch.nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
                  ) -> torch.Tensor | None:
    if linear.run_lora is None:
        return None
    a, b, scale = linear.run_lora
    return output + ((inputs[0].to(a.dtype) @ a.T) @ b.T) * scale


class CompiledLayers:
    """The model's decoder layers, run compiled inside `training()` or `computing()` and
    eagerly elsewhere."""

    def __init__(self, model: torch.nn.Module, adaptable: tuple[str, ...]):
        layers = getattr(model.get_decoder(), "layers", None)
        if not isinstance(layers, torch.nn.ModuleList):
            raise ValueError(f"--compile needs the decoder layers at .layers of {type(model.get_decoder()).__name__}")
        # Hooked before peft wraps them: a wrapped Linear stays its LoraLayer's base_layer.
        linears = [module for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in adaptable]
        for linear in linears:
            linear.run_lora = None  # a module's tensor, not an int or a closure: one graph serves every layer
            linear.register_forward_hook(_add_run_lora)
        self.lora_layers: list[LoraLayer] = []  # peft's, once it wraps the Linears
        # adapter -> (a hooked Linear, the adapter's factors there), found once per run.
        self.adapted: dict[str, list[tuple[torch.nn.Linear, RunLora]]] = {}
        self.active = False
        for layer in layers:
            layer.forward = self._compiled_when_active(layer.forward)

    def _compiled_when_active(self, eager: Callable) -> Callable:
        compiled = torch.compile(eager, options=INDUCTOR_OPTIONS)

        def forward(hidden_states: torch.Tensor, *args, **kwargs):
            if not self.active:
                return eager(hidden_states, *args, **kwargs)
            torch._dynamo.maybe_mark_dynamic(hidden_states, 0)  # batch
            torch._dynamo.maybe_mark_dynamic(hidden_states, 1)  # length
            for position_part in kwargs.get("position_embeddings") or ():
                torch._dynamo.maybe_mark_dynamic(position_part, 1)
            if isinstance(kwargs.get("position_ids"), torch.Tensor):  # [1, length]; read on CUDA when checkpointed
                torch._dynamo.maybe_mark_dynamic(kwargs["position_ids"], 1)
            return compiled(hidden_states, *args, **kwargs)
        return forward

    def adapters_changed(self, lora_layers: list[LoraLayer]) -> None:
        """Takes the model's LoRA layers as they are now (Engine.adapters_changed: an
        adapter was added or deleted, by a run or the sampler, or the model unwrapped)."""
        self.lora_layers = lora_layers
        present = {name for layer in self.lora_layers for name in layer.lora_A}
        self.adapted = {name: found for name, found in self.adapted.items() if name in present}

    def _adapted_layers(self, adapter: str) -> list[tuple[torch.nn.Linear, RunLora]]:
        if adapter not in self.adapted:
            self.adapted[adapter] = [run_lora(layer.get_base_layer(), layer.lora_A[adapter].weight,
                                              layer.lora_B[adapter].weight, layer.scaling[adapter])
                                     for layer in self.lora_layers if adapter in layer.lora_A]
        return self.adapted[adapter]

    @contextlib.contextmanager
    def training(self, adapter: str) -> Iterator[None]:
        """While the block runs, the model computes `adapter`'s run (the active, trainable
        one) through the compiled layers: its forward, and its backward (which may
        recompute the unembedding). Afterwards the peft layers are on again."""
        with self.computing(self._adapted_layers(adapter)):
            yield

    @contextlib.contextmanager
    def computing(self, adapted: list[tuple[torch.nn.Linear, RunLora]]) -> Iterator[None]:
        """While the block runs, the model computes through the compiled layers with these
        Linears' LoRA factors (run_lora; none: the base model), peft's layers off."""
        assert not self.active, "the compiled layers compute one pass at a time"
        # Every LoRA layer off, not only the run's: one that holds only other runs' adapters
        # would still read the active adapter's name, and the graph would be compiled per run.
        with adapter_layers_off(self.lora_layers):
            try:
                for linear, factors in adapted:
                    linear.run_lora = factors
                self.active = True
                with torch._dynamo.config.patch(DYNAMO_CONFIG), shape_config.patch(SHAPE_CONFIG):
                    yield
            finally:
                self.active = False
                for linear, _ in adapted:
                    linear.run_lora = None
