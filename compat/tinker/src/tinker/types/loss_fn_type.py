"""tinker.types.loss_fn_type: gradwire's LossFnType."""
from gradwire.types import LossFnType

__all__ = ["LossFnType"]
