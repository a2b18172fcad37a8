"""SiluAndMul: x [..., 2d] = [gate | up] -> silu(gate) * up [..., d]."""

from __future__ import annotations

import torch
from torch import nn


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return nn.functional.silu(x[..., :d]) * x[..., d:]
