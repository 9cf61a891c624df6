"""Which attention kernel the model runs (`--attention`), the same for training and sampling.

With `auto` PyTorch's SDPA picks a kernel per call: training's causal pass (no mask) and a
decode step (one query, a padding mask) may then take different kernels, whose bf16
roundings differ, and a sampled token's logprob parts from the training logprob of the
same token (`scripts/bench_bf16_invariance.py` shows where on a given device). Forcing one
SDPA backend for both, or transformers' eager attention, is what can make them agree, at
the kernel's own speed and memory (math and eager keep [B, heads, L, L] attention weights,
which the startup probe measures at its own length only). On the CPU in bf16, eager makes
them equal exactly; math does for the rows of one length (over a padded row of a mixed
decode batch it may round differently).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ATTENTIONS = ("auto", "efficient", "math", "eager")
_SDPA_BACKENDS = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}

AttentionKernel = Callable[[], contextlib.AbstractContextManager]


def use_attention(model: torch.nn.Module, choice: str, dtype: torch.dtype) -> AttentionKernel:
    """Sets the model's attention implementation for `choice` and returns the context every
    forward (and backward: activation checkpointing recomputes) of training and sampling
    runs in. ValueError if that kernel cannot run the model's attention on this device in
    `dtype` (the base's)."""
    if choice not in ATTENTIONS:
        raise ValueError(f"no attention {choice!r} (one of {', '.join(ATTENTIONS)})")
    if choice == "eager":
        model.set_attn_implementation("eager")
        return contextlib.nullcontext
    if choice == "auto":
        return contextlib.nullcontext
    model.set_attn_implementation("sdpa")
    backend = _SDPA_BACKENDS[choice]
    _check_runs(backend, model.config, next(model.parameters()).device, dtype)
    return lambda: sdpa_kernel(backend)


def _check_runs(backend: SDPBackend, config, device: torch.device, dtype: torch.dtype) -> None:
    """The two calls transformers makes with the model's heads: training's causal pass over
    grouped key/value heads (and its backward), and a decode step's masked one, which takes
    a token's query heads as rows of their key/value head. (PyTorch documents grouped heads
    for its flash and math kernels only.)"""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    query = torch.zeros(1, heads, 4, head_dim, dtype=dtype, device=device, requires_grad=True)
    keys = torch.zeros(1, kv_heads, 4, head_dim, dtype=dtype, device=device)
    mask = torch.ones(1, 1, 1, 4, dtype=torch.bool, device=device)
    try:
        with sdpa_kernel(backend):
            F.scaled_dot_product_attention(query, keys, keys, is_causal=True,
                                           enable_gqa=heads != kv_heads).sum().backward()
            token = query.detach()[:, :, -1].reshape(1, kv_heads, heads // kv_heads, head_dim)
            F.scaled_dot_product_attention(token, keys, keys, attn_mask=mask)
    except RuntimeError as error:
        raise ValueError(f"SDPA's {backend.name.lower()} kernel does not run this model's attention on this "
                         f"device ({device.type}, {heads} query and {kv_heads} key/value heads of {head_dim}): "
                         f"{str(error).splitlines()[0]}") from None
