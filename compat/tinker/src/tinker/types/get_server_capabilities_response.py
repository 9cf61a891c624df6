"""tinker.types.get_server_capabilities_response: gradwire's GetServerCapabilitiesResponse, SupportedModel."""
from gradwire.types import GetServerCapabilitiesResponse, SupportedModel

__all__ = ["GetServerCapabilitiesResponse", "SupportedModel"]
