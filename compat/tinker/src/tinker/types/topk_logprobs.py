"""tinker.types.topk_logprobs: gradwire's TopkLogprobs."""
from gradwire.types import TopkLogprobs

__all__ = ["TopkLogprobs"]
