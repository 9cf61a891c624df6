"""tinker.types.model_input: gradwire's ModelInput."""
from gradwire.types import ModelInput

__all__ = ["ModelInput"]
