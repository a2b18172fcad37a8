"""AttentionBackend: the interface between the model's attention layers and the paged KV pool.

Data flow per forward pass:
    ModelRunner: backend.prepare(host_batch, kv_pool, device)   once per batch: index tensors, masks
    every attention layer: backend.forward(q, k, v, layer_id, forward_batch, kv_pool)
        -> writes the new tokens' K/V into the pool, attends over prefix + new tokens, returns the output
A kernel backend (e.g. Triton paged attention over the head-centric layout) implements the same two calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from sglang.srt.mem_cache.kv_pool import HeadCentricKVPool
from sglang.srt.model_executor.forward_batch import ForwardBatch


class AttentionBackend(ABC):
    @abstractmethod
    def prepare(self, forward_batch: ForwardBatch, kv_pool: HeadCentricKVPool, device) -> None:
        """Build the per-batch metadata every layer reuses. forward_batch holds host (CPU) tensors."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                forward_batch: ForwardBatch, kv_pool: HeadCentricKVPool) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] of the new tokens -> attention output [T, Hq, D]."""
