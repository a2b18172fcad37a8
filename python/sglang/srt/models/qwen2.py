"""Qwen2: the Llama architecture with bias on q/k/v (not on o_proj)."""

from __future__ import annotations

from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def layer_flags(cfg: ModelConfig) -> dict:
        return {"qkv_bias": True, "o_bias": False, "qk_norm": False, "mlp_bias": False}
