"""Architecture name (config.json "architectures") -> model class."""

from __future__ import annotations

from typing import Dict, Type

from torch import nn

from sglang.srt.models.llama import LlamaForCausalLM, MistralForCausalLM
from sglang.srt.models.qwen2 import Qwen2ForCausalLM
from sglang.srt.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: Dict[str, Type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def get_model_class(architecture: str) -> Type[nn.Module]:
    if architecture not in MODEL_REGISTRY:
        raise ValueError(f"unsupported model architecture {architecture!r}; supported: {', '.join(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[architecture]
