"""tinker.types.get_info_response: gradwire's GetInfoResponse."""
from gradwire.types import GetInfoResponse, ModelData

__all__ = ["GetInfoResponse", "ModelData"]
