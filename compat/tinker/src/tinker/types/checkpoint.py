"""tinker.types.checkpoint: gradwire's Checkpoint."""
from gradwire.types import Checkpoint

__all__ = ["Checkpoint"]
