"""Torch-native attention over the head-centric paged KV pool (reference backend, runs anywhere).

Data flow:
    prepare (once per batch, from host tensors):
        write_pages/write_slots [T]          where each new token's K/V goes
        key_pages/key_slots [B, L]           page and slot of key position j < L = max(prefix + extend)
        q_rows [T]                           row of each new token in the padded query [B * E]
        mask [B, 1, E, L] bool               key j visible to query i of request b iff
                                             j <= position of that query and j < seq_len[b]
    forward (each layer):
        pool.write(new K/V) -> pool.gather(key_pages, key_slots) -> padded q [B, Hq, E, D]
        -> SDPA (GQA, boolean mask) -> unpad -> [T, Hq, D]
K/V are read straight from the pool through the page table: prefix and new tokens alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sglang.srt.layers.attention.base import AttentionBackend
from sglang.srt.mem_cache.kv_pool import HeadCentricKVPool
from sglang.srt.model_executor.forward_batch import ForwardBatch


@dataclass
class _Metadata:
    batch_size: int
    max_extend: int  # E
    max_seq_len: int  # L
    write_pages: torch.Tensor  # int64 [T]
    write_slots: torch.Tensor  # int64 [T]
    key_pages: torch.Tensor  # int64 [B, L]
    key_slots: torch.Tensor  # int64 [B, L]
    q_rows: torch.Tensor  # int64 [T]
    mask: torch.Tensor  # bool [B, 1, E, L]


class TorchNativeAttnBackend(AttentionBackend):
    def __init__(self):
        self.meta: _Metadata | None = None

    def prepare(self, forward_batch: ForwardBatch, kv_pool: HeadCentricKVPool, device) -> None:
        fb = forward_batch
        ps = kv_pool.page_size
        batch = fb.batch_size
        extend = fb.extend_lens.to(torch.int64)
        seq_lens = fb.prefix_lens.to(torch.int64) + extend
        max_extend = int(extend.max()) if batch else 0  # host ints: no device sync
        max_seq = int(seq_lens.max()) if batch else 0
        num_tokens = fb.num_tokens

        table = fb.page_table.to(device=device, dtype=torch.int64)  # [B, max_pages]
        positions = fb.positions.to(device=device, dtype=torch.int64)  # [T]
        extend_d = extend.to(device)
        seq_lens_d = seq_lens.to(device)

        req = torch.repeat_interleave(torch.arange(batch, device=device), extend_d, output_size=num_tokens)  # [T]
        starts = torch.cumsum(extend_d, 0) - extend_d  # [B] first token index of each request
        offset = torch.arange(num_tokens, device=device) - starts[req]  # [T] index within the request
        write_pages = table[req, positions // ps]  # [T]
        write_slots = positions % ps  # [T]

        key_pos = torch.arange(max_seq, device=device)  # [L]
        page_col = (key_pos // ps).clamp(max=table.shape[1] - 1)  # [L]
        key_pages = table[:, page_col]  # [B, L]
        key_slots = (key_pos % ps).unsqueeze(0).expand(batch, max_seq)  # [B, L]

        q_rows = req * max_extend + offset  # [T]
        q_pos = torch.zeros(batch * max_extend, dtype=torch.int64, device=device)
        q_pos[q_rows] = positions
        q_pos = q_pos.view(batch, max_extend, 1)  # [B, E, 1]; padded rows see key 0 only (no NaN)
        mask = (key_pos.view(1, 1, -1) <= q_pos) & (key_pos.view(1, 1, -1) < seq_lens_d.view(-1, 1, 1))
        self.meta = _Metadata(batch, max_extend, max_seq, write_pages, write_slots, key_pages, key_slots, q_rows,
                              mask.unsqueeze(1))  # [B, 1, E, L]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                forward_batch: ForwardBatch, kv_pool: HeadCentricKVPool) -> torch.Tensor:
        m = self.meta
        num_tokens, num_heads, head_dim = q.shape
        kv_pool.write(layer_id, k, v, m.write_pages, m.write_slots)
        keys, values = kv_pool.gather(layer_id, m.key_pages, m.key_slots)  # [B, L, Hkv, D] each

        q_pad = q.new_zeros((m.batch_size * m.max_extend, num_heads, head_dim))  # [B*E, Hq, D]
        q_pad[m.q_rows] = q
        q_pad = q_pad.view(m.batch_size, m.max_extend, num_heads, head_dim).transpose(1, 2)  # [B, Hq, E, D]
        keys = keys.transpose(1, 2).to(q.dtype)  # [B, Hkv, L, D]
        values = values.transpose(1, 2).to(q.dtype)
        out = F.scaled_dot_product_attention(q_pad, keys, values, attn_mask=m.mask,
                                             enable_gqa=num_heads != keys.shape[1])  # [B, Hq, E, D]
        out = out.transpose(1, 2).reshape(m.batch_size * m.max_extend, num_heads, head_dim)
        return out[m.q_rows]  # [T, Hq, D]
