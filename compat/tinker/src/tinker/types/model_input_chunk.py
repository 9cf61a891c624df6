"""tinker.types.model_input_chunk: gradwire's ModelInputChunk."""
from gradwire.types import ModelInputChunk

__all__ = ["ModelInputChunk"]
