"""Head-centric paged KV pool (CONTRACTS.md "KV pool layout", DESIGN §4).

A view over the worker's WeightStore arena (model_executor/weight_store.py):
    kv_buffer [num_pages, local_kv_heads, num_layers, 2 (K|V), page_size, head_dim]
so the part of page j that one rank (or one sub-range of heads) owns is one contiguous block.
Token at absolute position p of a request lives in page page_table[p // page_size], slot p % page_size.

Data flow:
    attention backend --write(layer, k, v, page_ids, slots)--> kv_buffer   (new tokens, [T, Hkv, D] each)
    attention backend <--gather(layer, pages, slots)-- kv_buffer           ([B, L] indices -> [B, L, Hkv, D])
    Gyges transformation (model_executor/regroup.py) moves whole page blocks of the flat byte view
"""

from __future__ import annotations

from typing import Tuple

import torch


class HeadCentricKVPool:
    def __init__(self, num_pages: int, page_size: int, local_kv_heads: int, num_layers: int, head_dim: int,
                 dtype: torch.dtype, device):
        self.num_pages = num_pages
        self.page_size = page_size
        self.local_kv_heads = local_kv_heads
        self.num_layers = num_layers
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        # [num_pages, local_kv_heads, num_layers, 2 (K|V), page_size, head_dim]
        self.kv_buffer = torch.zeros((num_pages, local_kv_heads, num_layers, 2, page_size, head_dim), dtype=dtype,
                                     device=self.device)

    @classmethod
    def over_bytes(cls, buffer: torch.Tensor, page_size: int, local_kv_heads: int, num_layers: int, head_dim: int,
                   dtype: torch.dtype) -> "HeadCentricKVPool":
        """A pool viewing an existing uint8 buffer (the WeightStore arena) as pages; no allocation."""
        page_bytes = cls.page_bytes(page_size, local_kv_heads, num_layers, head_dim, dtype)
        pool = cls.__new__(cls)
        pool.num_pages = buffer.numel() // page_bytes
        pool.page_size, pool.local_kv_heads, pool.num_layers = page_size, local_kv_heads, num_layers
        pool.head_dim, pool.dtype, pool.device = head_dim, dtype, buffer.device
        # [num_pages, local_kv_heads, num_layers, 2 (K|V), page_size, head_dim] over the buffer's bytes
        pool.kv_buffer = buffer[:pool.num_pages * page_bytes].view(dtype).view(
            pool.num_pages, local_kv_heads, num_layers, 2, page_size, head_dim)
        return pool

    # ---- sizes -------------------------------------------------------------------------------------
    @staticmethod
    def page_bytes(page_size: int, local_kv_heads: int, num_layers: int, head_dim: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return local_kv_heads * num_layers * 2 * page_size * head_dim * elem

    @property
    def bytes_per_page(self) -> int:
        return self.page_bytes(self.page_size, self.local_kv_heads, self.num_layers, self.head_dim, self.dtype)

    @property
    def total_bytes(self) -> int:
        return self.num_pages * self.bytes_per_page

    @property
    def max_total_num_tokens(self) -> int:
        return self.num_pages * self.page_size

    # ---- token access ------------------------------------------------------------------------------
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, page_ids: torch.Tensor, slots: torch.Tensor) -> None:
        """k, v [T, local_kv_heads, head_dim] -> (page_ids[i], slots[i]) of `layer`, for each token i."""
        self.kv_buffer[page_ids, :, layer, 0, slots] = k.to(self.dtype)
        self.kv_buffer[page_ids, :, layer, 1, slots] = v.to(self.dtype)

    def gather(self, layer: int, pages: torch.Tensor, slots: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """pages, slots [B, L] -> k, v [B, L, local_kv_heads, head_dim] of `layer`."""
        layer_kv = self.kv_buffer[:, :, layer]  # [num_pages, Hkv, 2, page_size, D] view
        return layer_kv[pages, :, 0, slots], layer_kv[pages, :, 1, slots]

    def clear(self) -> None:
        self.kv_buffer.zero_()
