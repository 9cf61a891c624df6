"""Built-in losses: pure functions over target-token logprobs, summed over tokens.

Every loss takes `logprobs` [B, L, K] (the learner's logprobs of the target
tokens, K candidates per position, padded), the request's `inputs` padded to
the same shape (padding slots hold 0, and `mask` is 1 on real slots), and the
loss config; it returns (scalar loss, metrics).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor
LossFn = Callable[[Tensor, dict[str, Tensor], dict[str, float]], tuple[Tensor, dict[str, float]]]


@dataclass(frozen=True)
class LossSpec:
    fn: LossFn
    required_inputs: frozenset[str]
    optional_inputs: frozenset[str] = frozenset()
    config_defaults: dict[str, float] = field(default_factory=dict)


def cross_entropy(logprobs: Tensor, inputs: dict[str, Tensor],
                  config: dict[str, float]) -> tuple[Tensor, dict[str, float]]:
    """Σ -logprob · weight (weights default to 1 on every real token)."""
    weights = inputs.get("weights", inputs["mask"])
    loss = -(logprobs * weights).sum()
    return loss, {"loss:sum": loss.item()}


LOSSES: dict[str, LossSpec] = {
    "cross_entropy": LossSpec(cross_entropy, frozenset({"target_tokens"}), frozenset({"weights"})),
}
