"""Built-in losses: pure functions over target-token logprobs, summed over tokens.

Every loss takes `logprobs` [B, L, K] (the learner's logprobs of the target
tokens, K candidates per position, padded), the request's `inputs` padded to
the same shape (padding slots hold 0, and `mask` is 1 on real slots), and the
loss config (defaults filled in); it returns (scalar loss, metrics).

The RL losses follow Tinker's hosted service: with lp the learner's logprob,
q = inputs["logprobs"] (the sampler's), A = inputs["advantages"] and
r = exp(lp - q), each sums a per-token objective over every real slot (never
averaged). Padding is masked explicitly: there lp = q = A = 0, so r = 1.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor
LossFn = Callable[[Tensor, dict[str, Tensor], dict[str, float]], tuple[Tensor, dict[str, Tensor]]]
# (config key, what is wrong with its value) for each bad value of a full config.
ConfigCheck = Callable[[dict[str, float]], list[tuple[str, str]]]


@dataclass(frozen=True)
class LossSpec:
    fn: LossFn
    required_inputs: frozenset[str]
    optional_inputs: frozenset[str] = frozenset()
    config_defaults: dict[str, float] = field(default_factory=dict)
    required_config: frozenset[str] = frozenset()
    multi_target: bool = True               # accepts [N, K] inputs, not only [N]
    check_config: ConfigCheck | None = None

    @property
    def config_keys(self) -> frozenset[str]:
        return frozenset(self.config_defaults) | self.required_config


def cross_entropy(logprobs: Tensor, inputs: dict[str, Tensor],
                  config: dict[str, float]) -> tuple[Tensor, dict[str, Tensor]]:
    """Σ -logprob · weight (weights default to 1 on every real token)."""
    weights = inputs.get("weights", inputs["mask"])
    loss = -(logprobs * weights).sum()
    return loss, {"loss:sum": loss.detach()}


def importance_sampling(logprobs: Tensor, inputs: dict[str, Tensor],
                        config: dict[str, float]) -> tuple[Tensor, dict[str, Tensor]]:
    """-Σ r·A: REINFORCE corrected for sampling from q, [N] or [N, K]."""
    ratio = torch.exp(logprobs - inputs["logprobs"])
    loss = -(ratio * inputs["advantages"] * inputs["mask"]).sum()
    return loss, {"loss:sum": loss.detach()}


def ppo(logprobs: Tensor, inputs: dict[str, Tensor],
        config: dict[str, float]) -> tuple[Tensor, dict[str, Tensor]]:
    """-Σ min(r·A, clip(r, lo, hi)·A), lo/hi = clip_low/high_threshold (0.8, 1.2).

    clip_fraction:mean is the mean over datums of the fraction of a datum's
    tokens whose ratio lies outside [lo, hi]."""
    lo, hi = config["clip_low_threshold"], config["clip_high_threshold"]
    ratio = torch.exp(logprobs - inputs["logprobs"])
    advantages, mask = inputs["advantages"], inputs["mask"]
    objective = torch.minimum(ratio * advantages, ratio.clamp(lo, hi) * advantages)
    loss = -(objective * mask).sum()
    return loss, {"loss:sum": loss.detach(), "clip_fraction:mean": _clip_fraction(ratio, inputs, lo, hi)}


def cispo(logprobs: Tensor, inputs: dict[str, Tensor],
          config: dict[str, float]) -> tuple[Tensor, dict[str, Tensor]]:
    """-Σ stopgrad(clip(r, lo, hi))·lp·A, lo/hi = clip_low/high_threshold (0, 4).

    The clipped ratio only weighs each token's policy gradient, so no token's
    gradient is dropped. clip_fraction:mean as for ppo."""
    lo, hi = config["clip_low_threshold"], config["clip_high_threshold"]
    ratio = torch.exp(logprobs - inputs["logprobs"])
    mask = inputs["mask"]
    loss = -(ratio.clamp(lo, hi).detach() * logprobs * inputs["advantages"] * mask).sum()
    return loss, {"loss:sum": loss.detach(), "clip_fraction:mean": _clip_fraction(ratio, inputs, lo, hi)}


def dro(logprobs: Tensor, inputs: dict[str, Tensor],
        config: dict[str, float]) -> tuple[Tensor, dict[str, Tensor]]:
    """-Σ [lp·A - ½·beta·(lp - q)²].

    `beta` (>= 0) is required: Tinker documents no default, and a guessed one
    would silently train differently from the hosted service."""
    penalty = 0.5 * config["beta"] * (logprobs - inputs["logprobs"]) ** 2
    loss = -((logprobs * inputs["advantages"] - penalty) * inputs["mask"]).sum()
    return loss, {"loss:sum": loss.detach()}


def gspo(logprobs: Tensor, inputs: dict[str, Tensor],
         config: dict[str, float]) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (Zheng et al. 2025, arXiv 2507.18071): one importance ratio per sequence,
    s = exp(mean over the sequence's ratio tokens of (lp - q)), clipped like PPO:
    -Σ min(s·A, clip(s, lo, hi)·A) over every real token.

    The ratio tokens are those where `sequence_ratio_mask` is 1 (default, and for a datum
    whose mask is all zero: every real token; pass it to leave out prompt positions, whose
    q is no sampler logprob).
    lo/hi = clip_low/high_threshold, defaults 1 - 3e-4 and 1 + 4e-4 (the paper's ranges).
    clip_fraction:mean is the fraction of datums whose s lies outside [lo, hi]."""
    lo, hi = config["clip_low_threshold"], config["clip_high_threshold"]
    mask = inputs["mask"]
    ratio_mask = inputs.get("sequence_ratio_mask", mask) * mask
    ratio_mask = torch.where(ratio_mask.sum(dim=(1, 2), keepdim=True) > 0, ratio_mask, mask)
    tokens = ratio_mask.sum(dim=(1, 2), keepdim=True)                        # [B, 1, 1]
    sequence_ratio = torch.exp(((logprobs - inputs["logprobs"]) * ratio_mask).sum(
        dim=(1, 2), keepdim=True) / tokens)                                   # [B, 1, 1]
    advantages = inputs["advantages"]
    objective = torch.minimum(sequence_ratio * advantages, sequence_ratio.clamp(lo, hi) * advantages)
    loss = -(objective * mask).sum()
    clipped = ((sequence_ratio < lo) | (sequence_ratio > hi)).float()
    return loss, {"loss:sum": loss.detach(), "clip_fraction:mean": clipped.mean()}


def _clip_fraction(ratio: Tensor, inputs: dict[str, Tensor], lo: float, hi: float) -> Tensor:
    """Mean over datums of each datum's fraction of trained tokens (nonzero advantage: not a
    prompt's) with r outside [lo, hi]; 0 for a datum with none (a datum mean, so merge_metrics
    combines micro-batches exactly)."""
    trained = inputs["mask"] * (inputs["advantages"] != 0)
    outside = ((ratio < lo) | (ratio > hi)).float() * trained
    per_datum = outside.sum(dim=(1, 2)) / trained.sum(dim=(1, 2)).clamp(min=1)
    return per_datum.mean().detach()


def _clip_range(config: dict[str, float]) -> list[tuple[str, str]]:
    lo, hi = config["clip_low_threshold"], config["clip_high_threshold"]
    if lo < 0:
        return [("clip_low_threshold", f"must be >= 0, got {lo}")]
    if lo > hi:
        return [("clip_low_threshold", f"{lo} exceeds clip_high_threshold {hi}")]
    return []


def _beta_range(config: dict[str, float]) -> list[tuple[str, str]]:
    beta = config["beta"]
    return [("beta", f"must be >= 0, got {beta}")] if beta < 0 else []


_RL_INPUTS = frozenset({"target_tokens", "logprobs", "advantages"})

LOSSES: dict[str, LossSpec] = {
    "cross_entropy": LossSpec(cross_entropy, frozenset({"target_tokens"}), frozenset({"weights"})),
    "importance_sampling": LossSpec(importance_sampling, _RL_INPUTS),
    "ppo": LossSpec(ppo, _RL_INPUTS, multi_target=False, check_config=_clip_range,
                    config_defaults={"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
    "cispo": LossSpec(cispo, _RL_INPUTS, multi_target=False, check_config=_clip_range,
                      config_defaults={"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}),
    "gspo": LossSpec(gspo, _RL_INPUTS, frozenset({"sequence_ratio_mask"}), multi_target=False,
                     check_config=_clip_range,
                     config_defaults={"clip_low_threshold": 1 - 3e-4, "clip_high_threshold": 1 + 4e-4}),
    "dro": LossSpec(dro, _RL_INPUTS, multi_target=False, required_config=frozenset({"beta"}),
                    check_config=_beta_range),
}

# Losses of the hosted Tinker service that gradwire does not train, with the reason
# the error gives: a guessed formula would silently train differently.
UNAVAILABLE_LOSSES: dict[str, str] = {
    "stable_reinforce": "it is the hosted service's loss (tinker-cookbook's RL default) and Tinker "
                        "has not published its formula, so gradwire cannot reproduce it exactly; "
                        "pass loss_fn='importance_sampling' (or 'ppo', 'cispo', 'gspo'), or write "
                        "the loss with forward_backward_custom",
    "custom": "it names the hosted service's uploaded losses (create_custom_loss), which gradwire does not "
              "implement; forward_backward_custom trains any loss written in PyTorch",
}
