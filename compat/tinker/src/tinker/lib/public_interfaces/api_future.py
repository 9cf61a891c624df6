"""tinker.lib.public_interfaces.api_future: gradwire's APIFuture."""
from gradwire.futures import APIFuture

__all__ = ["APIFuture"]
