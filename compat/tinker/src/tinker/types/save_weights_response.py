"""tinker.types.save_weights_response: gradwire's SaveWeightsResponse."""
from gradwire.types import SaveWeightsResponse

__all__ = ["SaveWeightsResponse"]
