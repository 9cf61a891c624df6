"""tinker.types.optimizer: gradwire's AdamOptimizerConfig, AdamParams, OptimizerConfig."""
from gradwire.types import AdamOptimizerConfig, AdamParams, OptimizerConfig

__all__ = ["AdamOptimizerConfig", "AdamParams", "OptimizerConfig"]
