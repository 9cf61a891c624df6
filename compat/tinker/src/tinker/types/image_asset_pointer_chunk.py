"""tinker.types.image_asset_pointer_chunk: gradwire's ImageAssetPointerChunk."""
from gradwire.types import ImageAssetPointerChunk

__all__ = ["ImageAssetPointerChunk"]
