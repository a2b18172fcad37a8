"""Torch references of the Triton kernels (any device; no triton): what test/test_triton_attention.py checks against.

    store_kv_ref(k, v, k_cache, v_cache, write_pages, write_slots)     k/v [T, Hkv, D] into [P, Hkv, page_size, D]
    paged_attention_ref(q, k_cache, v_cache, page_table, prefix_lens, extend_lens) -> out [T, Hq, D]
        per request: its keys gathered from the pages (prefix + new, already stored), causal softmax in float32,
        GQA by repeating KV heads; one request at a time (slow, obviously right)
    copy_runs_ref(src, src_offsets, dst, dst_offsets, sizes)            byte runs, one slice copy each
"""

from __future__ import annotations

from typing import Sequence

import torch


def store_kv_ref(k, v, k_cache, v_cache, write_pages, write_slots) -> None:
    k_cache[write_pages.long(), :, write_slots.long()] = k.to(k_cache.dtype)
    v_cache[write_pages.long(), :, write_slots.long()] = v.to(v_cache.dtype)


def paged_attention_ref(q, k_cache, v_cache, page_table, prefix_lens, extend_lens, sm_scale=None) -> torch.Tensor:
    num_tokens, heads, head_dim = q.shape
    kv_heads, page_size = k_cache.shape[1], k_cache.shape[2]
    scale = sm_scale if sm_scale is not None else head_dim ** -0.5
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)  # [T, Hq, D]
    row = 0
    for b in range(len(extend_lens)):
        prefix, extend = int(prefix_lens[b]), int(extend_lens[b])
        seq = prefix + extend
        pos = torch.arange(seq, device=q.device)
        pages = page_table[b].long()[pos // page_size]  # [L]
        keys = k_cache[pages, :, pos % page_size].float()  # [L, Hkv, D]
        values = v_cache[pages, :, pos % page_size].float()
        keys = keys.repeat_interleave(heads // kv_heads, dim=1)  # [L, Hq, D]
        values = values.repeat_interleave(heads // kv_heads, dim=1)
        qb = q[row:row + extend].float()  # [E, Hq, D]
        scores = torch.einsum("ehd,lhd->hel", qb, keys) * scale  # [Hq, E, L]
        visible = pos.view(1, -1) <= (prefix + torch.arange(extend, device=q.device)).view(-1, 1)  # [E, L]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[row:row + extend] = torch.einsum("hel,lhd->ehd", scores.softmax(-1), values)
        row += extend
    return out


def copy_runs_ref(src: torch.Tensor, src_offsets: Sequence[int], dst: torch.Tensor, dst_offsets: Sequence[int],
                  sizes: Sequence[int]) -> None:
    for s, d, n in zip(src_offsets, dst_offsets, sizes):
        dst[int(d):int(d) + int(n)].copy_(src[int(s):int(s) + int(n)])
