"""tinker.types.sample_response: gradwire's SampleResponse."""
from gradwire.types import SampleResponse

__all__ = ["SampleResponse"]
