"""forward_backward_custom's client half: run the user's loss on logprobs and
turn its gradient into cross-entropy weights.

With lp = target logprobs and g = dLoss/dlp, the surrogate Σ lp·g (cross_entropy
with weights = -g, since cross_entropy is Σ -lp·w) has the same gradient with
respect to the model's parameters as the user's loss.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from gradwire import types
from gradwire.errors import CustomLossError

CustomLossFn = Callable[[list[types.Datum], list[torch.Tensor]],
                        tuple[torch.Tensor, dict[str, float]]]


def logprob_gradients(data: Sequence[types.Datum], logprobs: Sequence[np.ndarray],
                      loss_fn: CustomLossFn) -> tuple[float, dict[str, float], list[np.ndarray]]:
    """Calls loss_fn(data, logprobs) and backpropagates to the logprobs.

    Returns (loss value, the user's metrics, dLoss/dlogprobs per datum).
    """
    leaves = [torch.tensor(np.asarray(lp), dtype=torch.float32, requires_grad=True) for lp in logprobs]
    try:
        result = loss_fn(list(data), leaves)
    except Exception as error:
        raise CustomLossError(f"custom loss function {_name(loss_fn)} raised "
                              f"{type(error).__name__}: {error}; nothing was applied") from error
    if not (isinstance(result, tuple) and len(result) == 2):
        raise CustomLossError(f"custom loss function {_name(loss_fn)} must return (loss, metrics), "
                              f"got {type(result).__name__}")
    loss, metrics = result
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or loss.is_complex():
        got = f"{loss.dtype} {list(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise CustomLossError(f"custom loss function {_name(loss_fn)} must return a real scalar tensor "
                              f"loss, got {got}; nothing was applied")
    if not loss.requires_grad:
        raise CustomLossError(f"the loss of {_name(loss_fn)} does not depend on the logprobs "
                              "(no gradient); nothing was applied")
    value = float(loss.detach())
    if not np.isfinite(value):
        raise CustomLossError(f"custom loss function {_name(loss_fn)} returned {value}; nothing was applied")
    loss.reshape(()).backward()
    if all(leaf.grad is None for leaf in leaves):  # a tensor that requires grad, made without them
        raise CustomLossError(f"the loss of {_name(loss_fn)} does not depend on the logprobs "
                              "(no gradient reaches them); nothing was applied")
    grads = [leaf.grad.numpy() if leaf.grad is not None else np.zeros(leaf.shape, np.float32)
             for leaf in leaves]
    for i, grad in enumerate(grads):
        if not np.isfinite(grad).all():
            raise CustomLossError(f"the gradient of {_name(loss_fn)} with respect to datum {i}'s "
                                  "logprobs is not finite; nothing was applied")
    return value, _metrics(metrics, loss_fn), grads


def _metrics(metrics: Any, loss_fn: CustomLossFn) -> dict[str, float]:
    """The user's metrics as floats (a scalar tensor or numpy number is one); CustomLossError
    naming the one that is not."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise CustomLossError(f"custom loss function {_name(loss_fn)} must return its metrics as a dict, "
                              f"got {type(metrics).__name__}; nothing was applied")
    converted = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise CustomLossError(f"custom loss function {_name(loss_fn)}: metric name {key!r} is not a str; "
                                  "nothing was applied")
        try:
            converted[key] = float(value)
        except (TypeError, ValueError, RuntimeError):
            raise CustomLossError(f"custom loss function {_name(loss_fn)}: metric {key!r} = {value!r:.60} is not "
                                  "a number; nothing was applied") from None
    return converted


def surrogate_data(data: Sequence[types.Datum], grads: Sequence[np.ndarray]) -> list[types.Datum]:
    """Datums for cross_entropy whose gradient equals the custom loss's gradient."""
    return [types.Datum(model_input=d.model_input,
                        loss_fn_inputs={"target_tokens": d.loss_fn_inputs["target_tokens"],
                                        "weights": -g})
            for d, g in zip(data, grads)]


def _name(fn: Callable) -> str:
    return getattr(fn, "__name__", repr(fn))
