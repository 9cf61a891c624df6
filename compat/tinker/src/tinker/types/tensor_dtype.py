"""tinker.types.tensor_dtype: gradwire's TensorDtype."""
from gradwire.types import TensorDtype

__all__ = ["TensorDtype"]
