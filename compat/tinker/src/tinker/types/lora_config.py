"""tinker.types.lora_config: gradwire's LoraConfig."""
from gradwire.types import LoraConfig

__all__ = ["LoraConfig"]
