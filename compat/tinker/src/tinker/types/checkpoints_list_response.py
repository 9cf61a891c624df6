"""tinker.types.checkpoints_list_response: gradwire's CheckpointsListResponse."""
from gradwire.types import CheckpointsListResponse

__all__ = ["CheckpointsListResponse"]
