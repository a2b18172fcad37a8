"""ModelConfig: what the runtime needs to know about a checkpoint, read once from config.json.

Data flow:
    ServerArgs.model_path --transformers.AutoConfig--> hf_config
    hf_config + generation_config.json + ServerArgs (dtype, context_length, tp_size, weight granularity G)
        --> ModelConfig (validated: supported architecture, tp_size divides G)
    ModelConfig.heads = gyges.heads.pad_heads(H, Hkv, G): the padded query / KV heads every TP degree
        dividing G shards evenly (identity when G divides Hkv; otherwise zero query heads and replicated
        KV heads, see gyges/heads.py). The KV pool holds heads.padded_kv_heads / tp heads per rank.

Both rope conventions are accepted: transformers >= 5 `rope_parameters` and the legacy
`rope_theta` / `rope_scaling` keys (see `rope_parameters`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Set

import torch

from gyges.heads import HeadLayout, pad_heads

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "half": torch.float16,
           "float": torch.float32}


def _resolve_dtype(value: Any) -> Optional[torch.dtype]:
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        return value
    name = str(value).replace("torch.", "")
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {value!r}; allowed: float32, float16, bfloat16")
    return _DTYPES[name]


def rope_parameters(hf_config) -> Dict[str, Any]:
    """Rope settings as one dict {rope_type, rope_theta, factor, ...} for either config convention."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        out = dict(params)
    else:
        out = dict(getattr(hf_config, "rope_scaling", None) or {})
        theta = getattr(hf_config, "rope_theta", None)
        if theta is not None:
            out["rope_theta"] = theta
    if "rope_type" not in out:
        out["rope_type"] = out.pop("type", "default")
    out.setdefault("rope_theta", 10000.0)
    return out


@dataclass
class ModelConfig:
    hf_config: Any
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    context_len: int
    dtype: torch.dtype
    rms_norm_eps: float
    tie_word_embeddings: bool
    rope: Dict[str, Any]
    tp_size: int = 1
    weight_granularity: int = 1  # G of CONTRACTS.md: weights are laid out for every TP degree dividing G
    eos_token_ids: Set[int] = field(default_factory=set)

    # ---------------------------------------------------------------------------------------------
    @classmethod
    def from_server_args(cls, server_args) -> "ModelConfig":
        from transformers import AutoConfig

        path = server_args.model_path
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"--model-path {path!r} has no config.json (expected a HF checkpoint directory)")
        hf = AutoConfig.from_pretrained(path)
        archs = list(getattr(hf, "architectures", None) or [])
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(f"unsupported model architecture {archs or '(none in config.json)'} in {path}; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")

        nh = int(hf.num_attention_heads)
        nkv = int(getattr(hf, "num_key_value_heads", None) or nh)
        head_dim = int(getattr(hf, "head_dim", None) or hf.hidden_size // nh)
        context_len = int(server_args.context_length or getattr(hf, "max_position_embeddings", 2048))
        sliding = getattr(hf, "sliding_window", None)
        if sliding and getattr(hf, "use_sliding_window", True) and sliding < context_len:
            # Sliding-window attention is not implemented: cap the context where full attention is exact.
            context_len = int(sliding)

        if server_args.dtype == "auto":
            dtype = _resolve_dtype(getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None)) or torch.float32
        else:
            dtype = _resolve_dtype(server_args.dtype)

        cfg = cls(
            hf_config=hf,
            architecture=arch,
            vocab_size=int(hf.vocab_size),
            hidden_size=int(hf.hidden_size),
            intermediate_size=int(hf.intermediate_size),
            num_layers=int(hf.num_hidden_layers),
            num_attention_heads=nh,
            num_kv_heads=nkv,
            head_dim=head_dim,
            context_len=context_len,
            dtype=dtype,
            rms_norm_eps=float(getattr(hf, "rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            rope=rope_parameters(hf),
            tp_size=int(server_args.tp_size),
            weight_granularity=int(server_args.weight_shard_granularity),
            eos_token_ids=_eos_token_ids(hf, path),
        )
        cfg.check_parallelism()
        return cfg

    def check_parallelism(self) -> None:
        """Any head counts work at any TP degree dividing G (heads are padded, KV heads replicated as
        needed); tp_size must divide G and the query heads must be a multiple of the KV heads."""
        if self.weight_granularity % self.tp_size:
            raise ValueError(f"tp_size={self.tp_size} must divide the weight shard granularity "
                             f"{self.weight_granularity}")
        try:
            self.heads
        except ValueError as e:
            raise ValueError(f"{self.architecture}: {e}") from None

    @property
    def heads(self) -> HeadLayout:
        """The padded heads of this model for weight granularity G (cached, the same for every TP)."""
        return pad_heads(self.num_attention_heads, self.num_kv_heads, self.weight_granularity)

    def kv_heads_per_rank(self, tp: int) -> int:
        """KV heads one rank of TP `tp` stores per token (padded: replicas included)."""
        return self.heads.kv_heads_per_rank(tp)

    @property
    def local_kv_heads(self) -> int:
        return self.kv_heads_per_rank(self.tp_size)

    @property
    def local_attention_heads(self) -> int:
        return self.heads.heads_per_rank(self.tp_size)


def _as_id_set(value) -> Set[int]:
    if value is None:
        return set()
    if isinstance(value, (list, tuple, set)):
        return {int(v) for v in value}
    return {int(value)}


def _eos_token_ids(hf_config, path: str) -> Set[int]:
    ids = _as_id_set(getattr(hf_config, "eos_token_id", None))
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            ids |= _as_id_set(json.load(f).get("eos_token_id"))
    return ids
