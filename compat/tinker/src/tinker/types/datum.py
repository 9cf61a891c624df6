"""tinker.types.datum: gradwire's Datum."""
from gradwire.types import Datum

__all__ = ["Datum"]
