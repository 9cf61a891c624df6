"""tinker.lib.public_interfaces.rest_client: gradwire's RestClient."""
from gradwire.rest_client import RestClient

__all__ = ["RestClient"]
