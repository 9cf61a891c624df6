"""tinker.lib.public_interfaces.training_client: gradwire's TrainingClient."""
from gradwire.client import TrainingClient

__all__ = ["TrainingClient"]
