"""tinker.types.parsed_checkpoint_tinker_path: gradwire's ParsedCheckpointTinkerPath."""
from gradwire.types import ParsedCheckpointTinkerPath

__all__ = ["ParsedCheckpointTinkerPath"]
