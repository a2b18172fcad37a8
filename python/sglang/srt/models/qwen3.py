"""Qwen3: the Llama architecture with per-head RMSNorm on q and k (before rotary) and an explicit head_dim
(ModelConfig.head_dim, which may differ from hidden_size / num_heads)."""

from __future__ import annotations

from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def layer_flags(cfg: ModelConfig) -> dict:
        bias = bool(getattr(cfg.hf_config, "attention_bias", False))
        return {"qkv_bias": bias, "o_bias": bias, "qk_norm": True, "mlp_bias": False}
