"""tinker.types.unload_model_response: gradwire's UnloadModelResponse."""
from gradwire.types import UnloadModelResponse

__all__ = ["UnloadModelResponse"]
