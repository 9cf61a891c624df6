"""tinker.types.optimizer: gradwire's AdamOptimizerConfig, AdamParams, OptimizerConfig, OptimParams."""
from gradwire.types import AdamOptimizerConfig, AdamParams, OptimizerConfig, OptimParams

__all__ = ["AdamOptimizerConfig", "AdamParams", "OptimParams", "OptimizerConfig"]
