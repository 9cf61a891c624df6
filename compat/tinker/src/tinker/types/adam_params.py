"""tinker.types.adam_params: gradwire's AdamParams."""
from gradwire.types import AdamParams

__all__ = ["AdamParams"]
