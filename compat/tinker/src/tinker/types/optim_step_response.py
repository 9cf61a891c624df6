"""tinker.types.optim_step_response: gradwire's OptimStepResponse."""
from gradwire.types import OptimStepResponse

__all__ = ["OptimStepResponse"]
