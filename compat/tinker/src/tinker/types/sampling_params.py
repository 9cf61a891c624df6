"""tinker.types.sampling_params: gradwire's SamplingParams."""
from gradwire.types import SamplingParams

__all__ = ["SamplingParams"]
