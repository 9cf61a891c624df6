"""Which attention kernel the model runs (`--attention`), the same for training and sampling.

With `auto` PyTorch's SDPA picks a kernel per call: training's causal pass (no mask) and a
decode step (one query, a padding mask) may then take different kernels, whose bf16
roundings differ, and a sampled token's logprob parts from the training logprob of the
same token (`scripts/bench_bf16_invariance.py` shows where on a given device). Forcing one
SDPA backend for both, or transformers' eager attention, is what can make them agree, at
the kernel's own speed and memory (math and eager keep [B, heads, L, L] attention weights).
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
    runs in. ValueError if this device has no such kernel for `dtype` (the base's)."""
    if choice not in ATTENTIONS:
        raise ValueError(f"no attention {choice!r} (one of {', '.join(ATTENTIONS)})")
    if choice == "eager":
        model.set_attn_implementation("eager")
        return contextlib.nullcontext
    if choice == "auto":
        return contextlib.nullcontext
    backend = _SDPA_BACKENDS[choice]
    _check_runs(backend, next(model.parameters()).device, dtype)
    return lambda: sdpa_kernel(backend)


def _check_runs(backend: SDPBackend, device: torch.device, dtype: torch.dtype) -> None:
    """Both calls the model makes: training's causal pass and a decode step's masked one."""
    query = torch.zeros(1, 1, 4, 8, dtype=dtype, device=device)
    mask = torch.ones(1, 1, 1, 4, dtype=torch.bool, device=device)
    try:
        with sdpa_kernel(backend):
            F.scaled_dot_product_attention(query, query, query, is_causal=True)
            F.scaled_dot_product_attention(query[:, :, -1:], query, query, attn_mask=mask)
    except RuntimeError as error:
        raise ValueError(f"SDPA's {backend.name.lower()} kernel does not run on this device "
                         f"({device.type}): {str(error).splitlines()[0]}") from None
