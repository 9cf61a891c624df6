"""tinker.types.cursor: gradwire's Cursor."""
from gradwire.types import Cursor

__all__ = ["Cursor"]
