"""tinker.lib.public_interfaces.sampling_client: gradwire's SamplingClient."""
from gradwire.sampling_client import SamplingClient

__all__ = ["SamplingClient"]
