"""tinker.types.request_error_category: gradwire's RequestErrorCategory."""
from gradwire.types import RequestErrorCategory

__all__ = ["RequestErrorCategory"]
