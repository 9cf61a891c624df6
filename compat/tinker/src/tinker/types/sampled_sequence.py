"""tinker.types.sampled_sequence: gradwire's SampledSequence."""
from gradwire.types import SampledSequence

__all__ = ["SampledSequence"]
