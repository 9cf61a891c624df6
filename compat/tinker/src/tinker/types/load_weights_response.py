"""tinker.types.load_weights_response: gradwire's LoadWeightsResponse."""
from gradwire.types import LoadWeightsResponse

__all__ = ["LoadWeightsResponse"]
