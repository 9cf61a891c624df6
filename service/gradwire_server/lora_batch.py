"""Per-row LoRA for a batch whose rows use different adapters (the Punica /
S-LoRA idea, in plain torch).

The model runs with its peft adapter layers switched off (the base weights);
a forward hook on each adapted Linear adds every row's own low-rank delta.
The factors of the batch's adapters are stacked along the rank: A [R, in] and
B [out, R], R the sum of their ranks. One matmul takes every row into the
stacked rank space, a per-row 0/1 mask keeps the columns of the row's own
adapter (none for a base-model row), one matmul takes it back, and the row's
adapter's scale multiplies the result:

    delta = (((x @ A.T) * mask[row]) @ B.T) * scale[row]

so N adapters cost two matmuls per module, not N. The scale comes last, in
float32, as in peft's own `lora_B(lora_A(x)) * scaling`: a row's delta rounds
as training's does (scaling B first rounds differently unless the scale is a
power of two).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from peft.tuners.lora import LoraLayer

# module name -> (A [r, in], B [out, r], scaling) of one adapter.
AdapterWeights = dict[str, tuple[torch.Tensor, torch.Tensor, float]]


def adapter_weights(model: torch.nn.Module, adapter: str) -> AdapterWeights:
    """The factors of a peft adapter loaded in `model`, as plain tensors that stay
    valid if the adapter is deleted from the model later."""
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            if module.use_dora.get(adapter) or not isinstance(module.lora_A[adapter], torch.nn.Linear):
                raise ValueError(f"{name}: only plain LoRA on Linear layers can be sampled")
            weights[name] = (module.lora_A[adapter].weight.detach(), module.lora_B[adapter].weight.detach(),
                             float(module.scaling[adapter]))
    return weights


class StackedAdapters:
    """Some adapters' factors stacked along the rank, per module: A [R, in] and
    B [out, R], in the model's dtype, and their scales. Adapter k owns the same columns
    in every module (zeros in a module it leaves alone), so one per-row mask [B, 1, R]
    serves every module."""

    def __init__(self, adapters: list[AdapterWeights], device: torch.device, dtype: torch.dtype):
        self.adapters = adapters  # held: the stack is found again by the adapters' identities
        self.dtype = dtype
        ranks = [max((a.shape[0] for a, _, _ in weights.values()), default=0) for weights in adapters]
        self.rank = sum(ranks)
        self.owner = torch.cat([torch.full((r,), k) for k, r in enumerate(ranks)]).to(device)  # [R]
        shapes = {name: (a.shape[1], b.shape[0]) for weights in adapters for name, (a, b, _) in weights.items()}
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for module, (fan_in, fan_out) in sorted(shapes.items()):
            a_stack = torch.zeros(self.rank, fan_in, dtype=dtype, device=device)
            b_stack = torch.zeros(fan_out, self.rank, dtype=dtype, device=device)
            column = 0
            for weights, rank in zip(adapters, ranks):
                if module in weights:
                    a, b, _ = weights[module]
                    a_stack[column:column + a.shape[0]] = a
                    b_stack[:, column:column + a.shape[0]] = b
                column += rank
            self.factors[module] = (a_stack, b_stack)
        # [modules, adapters + 1] float32, in the factors' order; the last column (0) is a base-model row's.
        self.scales = torch.tensor([[weights[module][2] if module in weights else 0.0 for weights in adapters] + [0.0]
                                    for module in self.factors], dtype=torch.float32, device=device)

    def mask(self, rows: list[AdapterWeights | None]) -> torch.Tensor:
        """[B, 1, R]: 1 where row i keeps the column (its adapter rows[i]'s; None: no adapter)."""
        return (self._row_ids(rows)[:, None] == self.owner[None, :]).to(self.dtype)[:, None, :]

    def row_scales(self, rows: list[AdapterWeights | None]) -> torch.Tensor:
        """[modules, B, 1, 1] float32, in the factors' order: row i's adapter's scale in each module."""
        return self.scales[:, self._row_ids(rows)][:, :, None, None]

    def _row_ids(self, rows: list[AdapterWeights | None]) -> torch.Tensor:
        """[B]: each row's adapter's index among the stacked ones (-1: no adapter)."""
        index = {id(weights): k for k, weights in enumerate(self.adapters)}
        return torch.tensor([index[id(w)] if w is not None else -1 for w in rows]).to(self.owner.device)


def adaptable_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """`model`'s Linears under the names its adapters' weights use. peft wraps a Linear in
    a LoraLayer of the same name and keeps it as the layer's base_layer, and unwrapping
    puts it back, so the map stays valid as adapters come and go: found once, not per
    pass (walking a 1.1B Llama's 1,843 modules takes a millisecond)."""
    linears = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    linears.update({name: module.get_base_layer() for name, module in model.named_modules()
                    if isinstance(module, LoraLayer)})
    return linears


@contextlib.contextmanager
def applied(linears: dict[str, torch.nn.Linear], factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
            mask: torch.Tensor, scales: torch.Tensor) -> Iterator[None]:
    """Adds each row's LoRA delta (factors per module, mask [B, 1, R], scales
    [modules, B, 1, 1] in the factors' order) to the adapted Linears' outputs
    (adaptable_linears) while the block runs. The caller switches the peft adapter
    layers off (their outputs are their base Linears')."""
    handles = []
    for (name, (a, b)), scale in zip(factors.items(), scales, strict=True):
        def add_delta(module, inputs, output, a=a, b=b, scale=scale):
            # The activation takes the factors' dtype, not the (larger) factors the activation's.
            low_rank = (inputs[0].to(a.dtype) @ a.T) * mask
            return output + ((low_rank @ b.T) * scale).to(output.dtype)
        handles.append(linears[name].register_forward_hook(add_delta))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def adapter_layers_off(layers: list[LoraLayer]) -> Iterator[None]:
    """peft's LoRA layers compute only their base layer while the block runs (and as
    before afterwards: blocks nest). Their own switch, set directly: peft's enable_adapters()
    also resets every adapter's requires_grad, and its model-wide switches walk every module
    (~10 ms a call on a 22-layer model)."""
    before = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, disabled in zip(layers, before):
            layer._disable_adapters = disabled
