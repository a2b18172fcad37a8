"""Model configuration read from a HF checkpoint directory."""

from sglang.srt.configs.model_config import ModelConfig, rope_parameters

__all__ = ["ModelConfig", "rope_parameters"]
