"""tinker.types.forward_backward_output: gradwire's ForwardBackwardOutput."""
from gradwire.types import ForwardBackwardOutput

__all__ = ["ForwardBackwardOutput"]
