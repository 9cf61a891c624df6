"""tinker.types.stop_reason: gradwire's StopReason."""
from gradwire.types import StopReason

__all__ = ["StopReason"]
