"""tinker.types.encoded_text_chunk: gradwire's EncodedTextChunk."""
from gradwire.types import EncodedTextChunk

__all__ = ["EncodedTextChunk"]
