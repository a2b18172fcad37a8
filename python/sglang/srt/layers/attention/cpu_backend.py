"""CPU attention backend: sgl_kernel's paged attention (C++/OpenMP) over the head-centric KV pool, read in place.

Data flow:
    prepare (once per batch, host tensors):
        page_table int64 [B, max_pages], prefix_lens int64 [B], extend_lens int64 [B]   (contiguous, kept)
    forward (each layer):
        sgl_kernel paged_attention(q [T, Hq, D], k/v [T, Hkv, D], pool.kv_buffer, layer, ...)
            1. writes every new token's K/V into its page slot of the layer
            2. causal attention of each request's new tokens over its prefix + new tokens, straight from the
               pages (no gathered copy, no padding: decodes and prefill chunks of one batch each cost their own)
        -> [T, Hq, D]
TorchNativeAttnBackend (torch_native_backend.py) is the reference it is tested against
(test/test_cpu_attention.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sglang.srt.layers.attention.base import AttentionBackend
from sglang.srt.mem_cache.kv_pool import HeadCentricKVPool
from sglang.srt.model_executor.forward_batch import ForwardBatch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


@dataclass
class _Metadata:
    page_table: torch.Tensor  # int64 [B, max_pages]
    prefix_lens: torch.Tensor  # int64 [B]
    extend_lens: torch.Tensor  # int64 [B]


class CpuPagedAttnBackend(AttentionBackend):
    def __init__(self):
        from sgl_kernel import paged_attention_ext

        self._kernel = paged_attention_ext().paged_attention
        self.meta: _Metadata | None = None

    def prepare(self, forward_batch: ForwardBatch, kv_pool: HeadCentricKVPool, device) -> None:
        if torch.device(device).type != "cpu":
            raise ValueError("the cpu attention backend runs on CPU workers only")
        if kv_pool.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"the cpu attention backend supports {SUPPORTED_DTYPES}, the KV pool is {kv_pool.dtype}")
        fb = forward_batch
        self.meta = _Metadata(fb.page_table.to(torch.int64).contiguous(), fb.prefix_lens.to(torch.int64).contiguous(),
                              fb.extend_lens.to(torch.int64).contiguous())

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                forward_batch: ForwardBatch, kv_pool: HeadCentricKVPool) -> torch.Tensor:
        m = self.meta
        dtype = kv_pool.dtype
        out = self._kernel(q.to(dtype), k.to(dtype), v.to(dtype), kv_pool.kv_buffer, layer_id, m.page_table,
                           m.prefix_lens, m.extend_lens, 1.0 / math.sqrt(q.shape[-1]))  # [T, Hq, D]
        return out.to(q.dtype)
