"""tinker.types.get_info_response: gradwire's GetInfoResponse."""
from gradwire.types import GetInfoResponse

__all__ = ["GetInfoResponse"]
