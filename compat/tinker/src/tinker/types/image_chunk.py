"""tinker.types.image_chunk: gradwire's ImageChunk."""
from gradwire.types import ImageChunk

__all__ = ["ImageChunk"]
