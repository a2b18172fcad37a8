"""Triton attention backend (`--attention-backend triton`): sgl_kernel's Triton paged attention over the head-centric
KV pool, read in place through strides (CUDA; on CPU only under TRITON_INTERPRET=1, which the tests use).

Data flow:
    prepare (once per batch, from the host ForwardBatch; no device sync):
        split the requests by their new tokens: decodes (exactly 1) and extends (more than 1; 0: nothing to do),
        so neither kind is padded to the other
        int64 meta, one host->device copy, views of it:
            prefix_lens [B], extend_lens [B], q_start [B]          per request; q_start = its first row of q
            write_pages [T], write_slots [T]                       where each new token's K/V goes
            decode_reqs [Bd]                                       requests run by the decode kernel
            block_req [NB], block_start [NB]                       BLOCK_M-row query blocks of the extends
        page_table int32 [B, max_pages] (a second copy)
    forward (each layer):
        k_cache / v_cache = kv_buffer[:, :, layer, 0 / 1]          [P, Hkv, page_size, D] views, no copy
        store_kv(k, v)                  the new tokens' K/V into their page slots
        decode_attention(q) -> out      flash-decoding (split keys + combine) for the decodes' rows
        extend_attention(q) -> out      causal flash attention over prefix + new tokens for the extends' rows
        -> out [T, Hq, D]
TorchNativeAttnBackend is the reference it is tested against (test/test_triton_attention.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sglang.srt.layers.attention.base import AttentionBackend
from sglang.srt.mem_cache.kv_pool import HeadCentricKVPool
from sglang.srt.model_executor.forward_batch import ForwardBatch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class _Metadata:
    page_table: torch.Tensor  # int32 [B, max_pages] on the device
    prefix_lens: torch.Tensor  # int64 [B]
    extend_lens: torch.Tensor  # int64 [B]
    q_start: torch.Tensor  # int64 [B] first row of request b among the new tokens
    write_pages: torch.Tensor  # int64 [T]
    write_slots: torch.Tensor  # int64 [T]
    decode_reqs: torch.Tensor  # int64 [Bd] requests with one new token
    block_req: torch.Tensor  # int64 [NB] request of each extend query block
    block_start: torch.Tensor  # int64 [NB] first new token of the block within its request
    decode_max_seq_len: int  # longest prefix + 1 among the decodes (host int)
    block_m: int


class TritonAttnBackend(AttentionBackend):
    def __init__(self):
        from sgl_kernel.triton_ops import attention_kernels

        self._kernels = attention_kernels()
        self.meta: _Metadata | None = None

    def prepare(self, forward_batch: ForwardBatch, kv_pool: HeadCentricKVPool, device) -> None:
        from sgl_kernel.triton_ops import usable_on

        if not usable_on(device):
            raise ValueError(f"the triton attention backend runs on CUDA devices (or anywhere under TRITON_INTERPRET=1); "
                             f"this worker is on {device}")
        if kv_pool.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"the triton attention backend supports {SUPPORTED_DTYPES}, the KV pool is {kv_pool.dtype}")
        fb = forward_batch
        ps = kv_pool.page_size
        batch = fb.batch_size
        extend = fb.extend_lens.to(torch.int64)  # [B] host
        prefix = fb.prefix_lens.to(torch.int64)
        positions = fb.positions.to(torch.int64)  # [T]
        table = fb.page_table.to(torch.int32)  # [B, max_pages]
        q_start = torch.cumsum(extend, 0) - extend  # [B]
        req = torch.repeat_interleave(torch.arange(batch), extend, output_size=fb.num_tokens)  # [T]
        write_pages = table[req, positions // ps].to(torch.int64)  # [T]
        write_slots = positions % ps  # [T]
        is_decode = extend == 1
        decode_reqs = torch.nonzero(is_decode).flatten()  # [Bd]
        extend_reqs = torch.nonzero(extend > 1).flatten()  # [Be]
        block_m = self._kernels.extend_block_m(kv_pool.head_dim)
        block_req, block_start = self._kernels.extend_blocks(extend, extend_reqs, block_m)  # [NB] each
        decode_max = int((prefix[is_decode] + 1).max()) if len(decode_reqs) else 0

        parts = [prefix, extend, q_start, write_pages, write_slots, decode_reqs, block_req, block_start]
        flat = torch.cat(parts).to(device=device, non_blocking=True)  # int64 [sum of the parts' lengths]
        views = torch.split(flat, [len(p) for p in parts])
        self.meta = _Metadata(table.to(device=device, non_blocking=True), *views, decode_max, block_m)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                forward_batch: ForwardBatch, kv_pool: HeadCentricKVPool) -> torch.Tensor:
        m = self.meta
        dtype = kv_pool.dtype
        kern = self._kernels
        layer_kv = kv_pool.kv_buffer[:, :, layer_id]  # [P, Hkv, 2, page_size, D] view
        k_cache, v_cache = layer_kv[:, :, 0], layer_kv[:, :, 1]  # [P, Hkv, page_size, D] views
        out_dtype = q.dtype
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        kern.store_kv(k, v, k_cache, v_cache, m.write_pages, m.write_slots)
        out = torch.empty(q.shape, dtype=dtype, device=q.device)  # [T, Hq, D]; every row written below
        scale = 1.0 / math.sqrt(q.shape[-1])
        kern.decode_attention(q, k_cache, v_cache, out, m.page_table, m.prefix_lens, m.extend_lens, m.q_start,
                              m.decode_reqs, m.decode_max_seq_len, scale)
        kern.extend_attention(q, k_cache, v_cache, out, m.page_table, m.prefix_lens, m.extend_lens, m.q_start,
                              m.block_req, m.block_start, scale, block_m=m.block_m)
        return out.to(out_dtype)
