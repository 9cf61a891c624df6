"""tinker.types.training_runs_response: gradwire's TrainingRunsResponse."""
from gradwire.types import TrainingRunsResponse

__all__ = ["TrainingRunsResponse"]
