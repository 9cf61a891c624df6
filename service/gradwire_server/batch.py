"""The engine's view of a validated request: plain numpy arrays, no protobuf."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class DatumArrays:
    """One datum: model input tokens [N] and loss inputs, each [N] or [N, K]."""

    tokens: np.ndarray
    loss_fn_inputs: dict[str, np.ndarray]


@dataclass
class LossRequest:
    """A validated Forward/ForwardBackward batch."""

    data: list[DatumArrays]
    loss_fn: str
    loss_fn_config: dict[str, float] = field(default_factory=dict)


@dataclass
class AdamSettings:
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


@dataclass
class LoraSettings:
    rank: int = 32
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True
