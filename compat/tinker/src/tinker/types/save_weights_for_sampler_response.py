"""tinker.types.save_weights_for_sampler_response: gradwire's SaveWeightsForSamplerResponse."""
from gradwire.types import SaveWeightsForSamplerResponse

__all__ = ["SaveWeightsForSamplerResponse"]
