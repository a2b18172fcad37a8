"""RMSNorm (computed in float32, cast back, then scaled: the same order as HF Llama/Qwen)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from sglang.srt.layers.linear import new_param


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device):
        super().__init__()
        self.eps = eps
        self.weight = new_param((hidden_size,), dtype, device)  # [hidden]

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        """x [..., hidden]. With residual: returns (norm(x + residual), x + residual)."""
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(dtype)
        return out if residual is None else (out, residual)
