"""tinker.types.model_id: gradwire's ModelID."""
from gradwire.types import ModelID

__all__ = ["ModelID"]
