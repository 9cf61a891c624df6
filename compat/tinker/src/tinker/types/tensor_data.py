"""tinker.types.tensor_data: gradwire's TensorData."""
from gradwire.types import TensorData

__all__ = ["TensorData"]
