"""tinker.types: gradwire's types under Tinker's names (one submodule per type, as in Tinker)."""
from gradwire.types import *  # noqa: F403
from gradwire.types import __all__  # noqa: F401
