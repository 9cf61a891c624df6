"""tinker.types.checkpoint: gradwire's Checkpoint, CheckpointType, ParsedCheckpointTinkerPath."""
from gradwire.types import Checkpoint, CheckpointType, ParsedCheckpointTinkerPath

__all__ = ["Checkpoint", "CheckpointType", "ParsedCheckpointTinkerPath"]
