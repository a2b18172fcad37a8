"""Llama 2 / 3 / 3.1 (incl. rope scaling) and Mistral, tensor-parallel over the padded weight layout.

Data flow (one rank of TP t):
    input_ids [T] --VocabParallelEmbedding--> h [T, hidden]
    per layer:  RMSNorm -> QKVParallelLinear -> (optional per-head q/k RMSNorm) -> rotary(positions)
                -> attention backend (writes K/V to the paged pool, attends over prefix + new tokens)
                -> RowParallelLinear o_proj (all-reduce) -> + residual
                -> RMSNorm -> gate_up (MergedColumnParallelLinear) -> SiluAndMul -> down (all-reduce) -> + residual
    final RMSNorm -> hidden [T, hidden]; compute_logits: rows logits_indices -> lm head -> float32 [N, vocab]

Heads are those of ModelConfig.heads (gyges.heads.HeadLayout): padding query heads have zero q rows and
zero o_proj columns, replicated KV heads are copies, so the output equals the unpadded model's.
Qwen2 (QKV bias) and Qwen3 (q/k norm, explicit head_dim) reuse these classes with flags.
`weight_targets()` maps every HF tensor name to the rows of the local parameter it fills.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.distributed.parallel_state import TPGroup
from sglang.srt.layers.activation import SiluAndMul
from sglang.srt.layers.attention.base import AttentionBackend
from sglang.srt.layers.layernorm import RMSNorm
from sglang.srt.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from sglang.srt.layers.logits_processor import LogitsProcessor
from sglang.srt.layers.rotary_embedding import RotaryEmbedding
from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from sglang.srt.mem_cache.kv_pool import HeadCentricKVPool
from sglang.srt.model_executor.forward_batch import ForwardBatch
from sglang.srt.model_executor.weight_layout import WeightTarget, replicated_target


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, tp_group: TPGroup, rotary: RotaryEmbedding,
                 qkv_bias: bool, o_bias: bool, qk_norm: bool, device):
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = cfg.head_dim
        heads = cfg.heads  # padded for every TP degree dividing G (gyges.heads; identity when G | Hkv)
        self.local_heads = heads.heads_per_rank(tp_group.size)
        self.local_kv_heads = heads.kv_heads_per_rank(tp_group.size)
        g, dt = cfg.weight_granularity, cfg.dtype
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, heads, tp_group, g, qkv_bias, dt, device)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, tp_group, g,
                                        o_bias, dt, device, head_sources=heads.q_source, head_dim=cfg.head_dim)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dt, device) if qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dt, device) if qk_norm else None
        self.rotary = rotary

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, forward_batch: ForwardBatch,
                attn_backend: AttentionBackend, kv_pool: HeadCentricKVPool) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden)  # [T, H'/t*D], [T, Hkv'/t*D] x2 (padded heads)
        t = hidden.shape[0]
        q = q.view(t, self.local_heads, self.head_dim)
        k = k.view(t, self.local_kv_heads, self.head_dim)
        v = v.view(t, self.local_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        out = attn_backend.forward(q, k, v, self.layer_id, forward_batch, kv_pool)  # [T, H'/t, D]
        return self.o_proj(out.reshape(t, self.local_heads * self.head_dim))

    def weight_targets(self, prefix: str) -> Dict[str, WeightTarget]:
        names = [f"{prefix}.{p}_proj" for p in "qkv"]
        out = self.qkv_proj.weight_targets([n + ".weight" for n in names], [n + ".bias" for n in names])
        out.update(self.o_proj.weight_targets(f"{prefix}.o_proj.weight", f"{prefix}.o_proj.bias"))
        if self.q_norm is not None:
            out[f"{prefix}.q_norm.weight"] = replicated_target(self.q_norm.weight)
            out[f"{prefix}.k_norm.weight"] = replicated_target(self.k_norm.weight)
        return out


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_group: TPGroup, bias: bool, device):
        super().__init__()
        g, dt = cfg.weight_granularity, cfg.dtype
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, tp_group, g, bias,
                                                       dt, device)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, tp_group, g, bias, dt, device)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.gate_up_proj(x))  # [T, G/t, i_f]
        return self.down_proj(y.reshape(x.shape[0], -1))  # [T, hidden]

    def weight_targets(self, prefix: str) -> Dict[str, WeightTarget]:
        out = self.gate_up_proj.weight_targets([f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight"],
                                               [f"{prefix}.gate_proj.bias", f"{prefix}.up_proj.bias"])
        out.update(self.down_proj.weight_targets(f"{prefix}.down_proj.weight", f"{prefix}.down_proj.bias"))
        return out


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, tp_group: TPGroup, rotary: RotaryEmbedding, flags: dict,
                 device):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_id, tp_group, rotary, flags["qkv_bias"], flags["o_bias"],
                                        flags["qk_norm"], device)
        self.mlp = LlamaMLP(cfg, tp_group, flags["mlp_bias"], device)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype, device)

    def forward(self, positions, hidden, forward_batch, attn_backend, kv_pool) -> torch.Tensor:
        h = hidden + self.self_attn(positions, self.input_layernorm(hidden), forward_batch, attn_backend, kv_pool)
        return h + self.mlp(self.post_attention_layernorm(h))

    def weight_targets(self, prefix: str) -> Dict[str, WeightTarget]:
        out = self.self_attn.weight_targets(prefix + ".self_attn")
        out.update(self.mlp.weight_targets(prefix + ".mlp"))
        out[prefix + ".input_layernorm.weight"] = replicated_target(self.input_layernorm.weight)
        out[prefix + ".post_attention_layernorm.weight"] = replicated_target(self.post_attention_layernorm.weight)
        return out


class LlamaForCausalLM(nn.Module):
    """Also serves MistralForCausalLM (same tensors; sliding window handled by ModelConfig.context_len)."""

    def __init__(self, cfg: ModelConfig, tp_group: TPGroup, device):
        super().__init__()
        self.config = cfg
        self.tp_group = tp_group
        flags = self.layer_flags(cfg)
        g = cfg.weight_granularity
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp_group, g, cfg.dtype, device)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.context_len, cfg.rope, device)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i, tp_group, self.rotary, flags, device)
                                    for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.dtype, device)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp_group, g, cfg.dtype, device)
        if cfg.tie_word_embeddings:
            self.lm_head.tie_to(self.embed_tokens)
        self.logits_processor = LogitsProcessor(cfg.vocab_size, tp_group)

    @staticmethod
    def layer_flags(cfg: ModelConfig) -> dict:
        bias = bool(getattr(cfg.hf_config, "attention_bias", False))
        return {"qkv_bias": bias, "o_bias": bias, "qk_norm": False,
                "mlp_bias": bool(getattr(cfg.hf_config, "mlp_bias", False))}

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch,
                attn_backend: AttentionBackend, kv_pool: HeadCentricKVPool) -> torch.Tensor:
        """-> final hidden states [T, hidden]."""
        h = self.embed_tokens(input_ids)  # [T, hidden]
        for layer in self.layers:
            h = layer(positions, h, forward_batch, attn_backend, kv_pool)
        return self.norm(h)

    def compute_logits(self, hidden: torch.Tensor, logits_indices: torch.Tensor) -> torch.Tensor:
        """-> float32 [N, vocab_size], identical on every rank."""
        return self.logits_processor(hidden, logits_indices, self.lm_head)

    def weight_targets(self) -> Dict[str, WeightTarget]:
        out = self.embed_tokens.weight_targets("model.embed_tokens.weight")
        for i, layer in enumerate(self.layers):
            out.update(layer.weight_targets(f"model.layers.{i}"))
        out["model.norm.weight"] = replicated_target(self.norm.weight)
        if not self.config.tie_word_embeddings:
            out.update(self.lm_head.weight_targets("lm_head.weight"))
        return out


class MistralForCausalLM(LlamaForCausalLM):
    pass
