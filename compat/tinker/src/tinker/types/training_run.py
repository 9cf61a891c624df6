"""tinker.types.training_run: gradwire's TrainingRun."""
from gradwire.types import TrainingRun

__all__ = ["TrainingRun"]
