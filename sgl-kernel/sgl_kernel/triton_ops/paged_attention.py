"""Triton paged attention over the head-centric KV pool, read in place through strides (imports triton).

Pool (sglang.srt.mem_cache.kv_pool.HeadCentricKVPool.kv_buffer):
    kv_buffer [num_pages, kv_heads, num_layers, 2 (K|V), page_size, head_dim]
One layer's K (or V) is the strided view kv_buffer[:, :, layer, 0 (or 1)]:
    k_cache [num_pages, kv_heads, page_size, head_dim], strides (stride_p, stride_h, stride_s, 1)
The kernels take that view as a base pointer plus those three strides, so they never copy or gather the pool:
key position j of request b is page page_table[b, j // page_size], slot j % page_size; within one page one KV head's
page_size x head_dim block is contiguous, so consecutive keys of a tile are consecutive rows of memory.
Page ids are cast to int64 before any multiplication (a pool may exceed 2**31 elements).

Tokens (the model's projections; rows may be strided views of one fused QKV output, last dim contiguous):
    q [T, Hq, D], k / v [T, Hkv, D], out [T, Hq, D]      T = new tokens of the batch, requests back to back
    Hq = Hkv * G (GQA group G >= 1); query head h reads KV head h // G
Batch metadata (int32 / int64 tensors on the device, built once per batch by the backend):
    page_table [B, max_pages], prefix_lens [B], extend_lens [B], q_start [B] (first row of request b in q)

Kernels and launchers (data flow of one attention layer):
    store_kv(k, v, k_cache, v_cache, write_pages [T], write_slots [T])
        grid (T, Hkv): the new tokens' K/V into their page slots (the pool is then the single source of keys)
    decode_attention(q, k_cache, v_cache, out, page_table, prefix_lens, extend_lens, q_start, decode_reqs [Bd], ..)
        requests with one new token; flash-decoding in two stages:
        stage 1 grid (Bd, Hkv * head_blocks, num_splits): one program = one request, up to BLOCK_H (>= 16, the
                smallest tl.dot tile) query heads of one KV head, one contiguous range of its keys; every K/V tile
                loaded once for all heads of the group; partial output and log2-sum-exp into
                mid_o float32 [Bd, Hq, num_splits, D], mid_lse float32 [Bd, Hq, num_splits]
        stage 2 grid (Bd, Hq): the splits' partials combined by their sums of exponentials -> out rows
        (the split count is a runtime argument, <= MAX_KV_SPLITS: batches of other lengths reuse the compiled kernels)
    extend_attention(q, k_cache, v_cache, out, page_table, prefix_lens, extend_lens, q_start, block_req [NB],
                     block_start [NB], ..)
        requests with more than one new token (prefill, chunk over a cached prefix): one program = BLOCK_M new
        tokens of one request x one query head, causal over prefix + new tokens (key j visible to the query at
        position p iff j <= p); the q blocks are listed per request (block_req, block_start), so no request is
        padded to another's length and decodes never ride in extend tiles
Softmax is online (running max and sum), in float32, in base 2 (scale folded with log2(e)); float32 pools use
IEEE dot products (no TF32), 16-bit pools multiply in their dtype with float32 accumulators.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MIN_BLOCK = 16  # smallest tl.dot dimension on NVIDIA GPUs
MAX_KV_SPLITS = 16
TARGET_DECODE_PROGRAMS = 512  # enough stage-1 programs to fill an H100/H200 (132 SMs) a few times over
MIN_KEYS_PER_SPLIT = 256


@triton.jit
def _dot(a, b, UPCAST_DOT: tl.constexpr):
    """a @ b with a float32 result; IEEE products for float32 operands (no TF32; 16-bit operands go to the tensor
    cores whatever the precision setting). UPCAST_DOT: operands in float32 first, for Triton's interpreter, whose
    tl.dot multiplies bfloat16 operands as their raw uint16 bits (triton 3.9; triton-lang/triton#11584: bfloat16
    arithmetic is not supported by the interpreter, only casts); exact for bfloat16 values, so the result is the
    GPU's bfloat16 MMA with float32 accumulation up to summation order. The kernels do no other bfloat16 arithmetic
    (loads, casts and stores only)."""
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _attend_keys(q, acc, m_i, l_i, q_pos, lo, hi, table_row, k_cache, v_cache, kv_head, d, mask_d, sm_scale_log2,
                 stride_kp, stride_kh, stride_ks, stride_vp, stride_vh, stride_vs,
                 CAUSAL: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 UPCAST_DOT: tl.constexpr):
    """Online softmax of the rows of q [R, BLOCK_D] over the keys at positions lo .. hi-1 of one request (table_row:
    its page-table row), read from the pages of KV head kv_head; CAUSAL: key j only for rows with q_pos [R] >= j.
    -> the updated (acc [R, BLOCK_D], running max m_i [R], running sum l_i [R]) in float32, base 2."""
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
        mask_n = offs_n < hi
        page = tl.load(table_row + offs_n // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
        slot = (offs_n % PAGE_SIZE).to(tl.int64)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_cache + page[:, None] * stride_kp + kv_head * stride_kh + slot[:, None] * stride_ks + d[None, :],
                    mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        qk = _dot(q, tl.trans(k), UPCAST_DOT) * sm_scale_log2  # [R, BLOCK_N]
        if CAUSAL:
            visible = (offs_n[None, :] <= q_pos[:, None]) & mask_n[None, :]
        else:
            visible = mask_n[None, :]
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache + page[:, None] * stride_vp + kv_head * stride_vh + slot[:, None] * stride_vs + d[None, :],
                    mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST_DOT)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache, v_cache, write_pages, write_slots,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cp, stride_ch, stride_cs, stride_vp, stride_vch, stride_vs,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    mask_d = d < HEAD_DIM
    page = tl.load(write_pages + t).to(tl.int64)
    slot = tl.load(write_slots + t).to(tl.int64)
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask_d)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask_d)
    tl.store(k_cache + page * stride_cp + h * stride_ch + slot * stride_cs + d, k.to(k_cache.dtype.element_ty),
             mask=mask_d)
    tl.store(v_cache + page * stride_vp + h * stride_vch + slot * stride_vs + d, v.to(v_cache.dtype.element_ty),
             mask=mask_d)


@triton.jit
def _decode_stage1_kernel(q_ptr, k_cache, v_cache, mid_o, mid_lse,
                          page_table, prefix_lens, extend_lens, q_start, decode_reqs,
                          sm_scale_log2, num_splits,
                          stride_qt, stride_qh,
                          stride_kp, stride_kh, stride_ks, stride_vp, stride_vh, stride_vs,
                          stride_tb,
                          stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
                          GROUP: tl.constexpr, HEAD_BLOCKS: tl.constexpr, PAGE_SIZE: tl.constexpr,
                          HEAD_DIM: tl.constexpr,
                          BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          UPCAST_DOT: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    split = tl.program_id(2)
    kv_head = (pid_h // HEAD_BLOCKS).to(tl.int64)
    group_off = (pid_h % HEAD_BLOCKS) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H] head index within the group
    mask_h = group_off < GROUP
    heads = kv_head * GROUP + group_off  # [BLOCK_H] query heads

    b = tl.load(decode_reqs + pid_b).to(tl.int64)
    seq_len = tl.load(prefix_lens + b) + tl.load(extend_lens + b)
    row = tl.load(q_start + b).to(tl.int64)
    keys_per_split = tl.cdiv(seq_len, num_splits)
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, seq_len)

    d = tl.arange(0, BLOCK_D)
    mask_d = d < HEAD_DIM
    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=mask_h[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_H, BLOCK_D]

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    acc, m_i, l_i = _attend_keys(q, acc, m_i, l_i, row, lo, hi, page_table + b * stride_tb, k_cache, v_cache, kv_head,
                                 d, mask_d, sm_scale_log2, stride_kp, stride_kh, stride_ks, stride_vp, stride_vh,
                                 stride_vs, False, PAGE_SIZE, BLOCK_N, UPCAST_DOT)

    nonempty = hi > lo
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    o = tl.where(nonempty, acc / safe_l[:, None], 0.0)
    lse = tl.where(nonempty, m_i + tl.log2(safe_l), float("-inf"))  # log2 of the split's sum of exponentials
    tl.store(mid_o + pid_b * stride_mb + heads[:, None] * stride_mh + split * stride_ms + d[None, :], o,
             mask=mask_h[:, None] & mask_d[None, :])
    tl.store(mid_lse + pid_b * stride_lb + heads * stride_lh + split, lse, mask=mask_h)


@triton.jit
def _decode_stage2_kernel(mid_o, mid_lse, out_ptr, q_start, decode_reqs, num_splits,
                          stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, stride_ot, stride_oh,
                          HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    pid_b = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    mask_s = s < num_splits
    d = tl.arange(0, BLOCK_D)
    mask_d = d < HEAD_DIM
    lse = tl.load(mid_lse + pid_b * stride_lb + h * stride_lh + s, mask=mask_s, other=float("-inf"))  # [BLOCK_S]
    m = tl.max(lse, 0)  # finite: split 0 always holds key 0
    w = tl.exp2(lse - m)  # 0 for empty splits
    o = tl.load(mid_o + pid_b * stride_mb + h * stride_mh + s[:, None] * stride_ms + d[None, :],
                mask=mask_s[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
    res = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    b = tl.load(decode_reqs + pid_b).to(tl.int64)
    row = tl.load(q_start + b).to(tl.int64)
    tl.store(out_ptr + row * stride_ot + h * stride_oh + d, res.to(out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _extend_kernel(q_ptr, k_cache, v_cache, out_ptr,
                   page_table, prefix_lens, extend_lens, q_start, block_req, block_start,
                   sm_scale_log2,
                   stride_qt, stride_qh, stride_ot, stride_oh,
                   stride_kp, stride_kh, stride_ks, stride_vp, stride_vh, stride_vs,
                   stride_tb,
                   GROUP: tl.constexpr, PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   UPCAST_DOT: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    kv_head = h // GROUP
    b = tl.load(block_req + pid_m).to(tl.int64)
    m0 = tl.load(block_start + pid_m)
    prefix = tl.load(prefix_lens + b)
    extend = tl.load(extend_lens + b)
    seq_len = prefix + extend
    row0 = tl.load(q_start + b).to(tl.int64)

    offs_m = m0 + tl.arange(0, BLOCK_M)  # [BLOCK_M] index among the request's new tokens
    mask_m = offs_m < extend
    q_pos = prefix + offs_m  # absolute positions of the queries
    rows = row0 + offs_m.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    mask_d = d < HEAD_DIM
    q = tl.load(q_ptr + rows[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table_row = page_table + b * stride_tb
    hi = tl.minimum(seq_len, prefix + m0 + BLOCK_M)  # the block's last query sees keys < hi
    # keys of the cached prefix are visible to every query of the block; the new tokens' keys causally
    acc, m_i, l_i = _attend_keys(q, acc, m_i, l_i, q_pos, 0, prefix, table_row, k_cache, v_cache, kv_head, d, mask_d,
                                 sm_scale_log2, stride_kp, stride_kh, stride_ks, stride_vp, stride_vh, stride_vs,
                                 False, PAGE_SIZE, BLOCK_N, UPCAST_DOT)
    acc, m_i, l_i = _attend_keys(q, acc, m_i, l_i, q_pos, prefix, hi, table_row, k_cache, v_cache, kv_head, d, mask_d,
                                 sm_scale_log2, stride_kp, stride_kh, stride_ks, stride_vp, stride_vh, stride_vs,
                                 True, PAGE_SIZE, BLOCK_N, UPCAST_DOT)

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + h * stride_oh + d[None, :], o.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])


# True when this module's kernels were defined under TRITON_INTERPRET=1 (triton decides at definition time)
INTERPRETED = type(_store_kv_kernel).__name__ == "InterpretedFunction"


# ---- launchers ---------------------------------------------------------------------------------------------------
def _block_d(head_dim: int) -> int:
    return max(MIN_BLOCK, triton.next_power_of_2(head_dim))


def _upcast_dot(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and INTERPRETED


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache / v_cache must be [num_pages, kv_heads, page_size, head_dim] views of one shape, "
                         f"got {tuple(k_cache.shape)} / {tuple(v_cache.shape)}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the pool's head_dim must be contiguous")


def _check_q(q: torch.Tensor, k_cache: torch.Tensor, out: torch.Tensor) -> None:
    if q.dim() != 3 or q.shape[2] != k_cache.shape[3] or q.shape[1] % k_cache.shape[1]:
        raise ValueError(f"q [T, Hq, D] must have head_dim {k_cache.shape[3]} and a multiple of the pool's "
                         f"{k_cache.shape[1]} KV heads, got {tuple(q.shape)}")
    if q.dtype != k_cache.dtype:
        raise ValueError(f"q is {q.dtype}, the pool {k_cache.dtype}: cast q to the pool's dtype")
    if out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out must be [T, Hq, D] like q {tuple(q.shape)} with a contiguous last dim")


def _checked_q(q, k_cache, v_cache, out):
    """-> (q with a contiguous last dim, (Hq, D, Hkv, page_size)) after checking every operand's shape."""
    _check_cache(k_cache, v_cache)
    _check_q(q, k_cache, out)
    return _rows(q), (q.shape[1], q.shape[2], k_cache.shape[1], k_cache.shape[2])


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] with a contiguous last dim (strided rows allowed, as split from a fused QKV projection)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             write_pages: torch.Tensor, write_slots: torch.Tensor) -> None:
    """k, v [T, Hkv, D] -> k_cache / v_cache [P, Hkv, page_size, D] at (write_pages[t], write_slots[t])."""
    _check_cache(k_cache, v_cache)
    k, v = _rows(k), _rows(v)
    num_tokens, kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if kv_heads != k_cache.shape[1] or head_dim != k_cache.shape[3]:
        raise ValueError(f"k [T, {kv_heads}, {head_dim}] does not match the pool's heads / head_dim "
                         f"{tuple(k_cache.shape)}")
    _store_kv_kernel[(num_tokens, kv_heads)](
        k, v, k_cache, v_cache, write_pages, write_slots,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2),
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), num_warps=1)


def num_kv_splits_for(num_decodes: int, kv_heads: int, head_blocks: int, max_seq_len: int) -> int:
    """Splits of each decode's keys: enough stage-1 programs to fill the GPU, >= MIN_KEYS_PER_SPLIT keys each."""
    programs = max(1, num_decodes * kv_heads * head_blocks)
    by_len = -(-max_seq_len // MIN_KEYS_PER_SPLIT)
    by_occupancy = -(-TARGET_DECODE_PROGRAMS // programs)
    return max(1, min(MAX_KV_SPLITS, by_len, by_occupancy))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                     page_table: torch.Tensor, prefix_lens: torch.Tensor, extend_lens: torch.Tensor,
                     q_start: torch.Tensor, decode_reqs: torch.Tensor, max_seq_len: int, sm_scale: float,
                     num_kv_splits: Optional[int] = None, block_n: int = 32) -> None:
    """Rows q_start[b] of out [T, Hq, D] for each b in decode_reqs [Bd] (requests with one new token, whose K/V is
    already in the pool); max_seq_len: the longest of their prefix + 1 (host int, sizes the split count)."""
    q, (heads, head_dim, kv_heads, page_size) = _checked_q(q, k_cache, v_cache, out)
    num_decodes = decode_reqs.shape[0]
    if num_decodes == 0:
        return
    group = heads // kv_heads
    block_h = max(MIN_BLOCK, min(64, triton.next_power_of_2(group)))
    head_blocks = -(-group // block_h)
    splits = num_kv_splits or num_kv_splits_for(num_decodes, kv_heads, head_blocks, max_seq_len)
    if not 1 <= splits <= MAX_KV_SPLITS:
        raise ValueError(f"num_kv_splits must be within 1..{MAX_KV_SPLITS}, got {splits}")
    block_d = _block_d(head_dim)
    # partial outputs of each split: float32 [Bd, Hq, splits, D] and log2-sum-exp [Bd, Hq, splits]
    mid_o = torch.empty((num_decodes, heads, splits, head_dim), dtype=torch.float32, device=q.device)
    mid_lse = torch.empty((num_decodes, heads, splits), dtype=torch.float32, device=q.device)
    _decode_stage1_kernel[(num_decodes, kv_heads * head_blocks, splits)](
        q, k_cache, v_cache, mid_o, mid_lse, page_table, prefix_lens, extend_lens, q_start, decode_reqs,
        sm_scale * LOG2E, splits, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), page_table.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        GROUP=group, HEAD_BLOCKS=head_blocks, PAGE_SIZE=page_size, HEAD_DIM=head_dim,
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=block_d,
        UPCAST_DOT=_upcast_dot(k_cache.dtype),
        num_warps=4, num_stages=2)
    _decode_stage2_kernel[(num_decodes, heads)](
        mid_o, mid_lse, out, q_start, decode_reqs, splits,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(MAX_KV_SPLITS), BLOCK_D=block_d,
        num_warps=4)


def extend_blocks(extend_lens: torch.Tensor, extend_reqs: torch.Tensor, block_m: int):
    """Host int64 extend_lens [B] and the requests to run, extend_reqs [Be] -> (block_req, block_start) [NB]: one
    entry per BLOCK_M new tokens of each listed request (no request padded to another)."""
    n = (extend_lens[extend_reqs] + block_m - 1) // block_m  # [Be] blocks per request
    block_req = torch.repeat_interleave(extend_reqs, n)  # [NB]
    first = torch.cumsum(n, 0) - n
    block_start = (torch.arange(int(n.sum())) - torch.repeat_interleave(first, n)) * block_m  # [NB]
    return block_req, block_start


def extend_block_m(head_dim: int) -> int:
    return 64 if head_dim <= 128 else 32


def extend_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                     page_table: torch.Tensor, prefix_lens: torch.Tensor, extend_lens: torch.Tensor,
                     q_start: torch.Tensor, block_req: torch.Tensor, block_start: torch.Tensor, sm_scale: float,
                     block_m: Optional[int] = None, block_n: Optional[int] = None) -> None:
    """Causal attention of the new tokens of the requests listed by (block_req, block_start) (from extend_blocks
    with the same block_m) over their prefix + new tokens, whose K/V is already in the pool -> their rows of out."""
    q, (heads, head_dim, kv_heads, page_size) = _checked_q(q, k_cache, v_cache, out)
    num_blocks = block_req.shape[0]
    if num_blocks == 0:
        return
    block_m = block_m or extend_block_m(head_dim)
    block_n = block_n or (64 if head_dim <= 64 else 32)
    _extend_kernel[(num_blocks, heads)](
        q, k_cache, v_cache, out, page_table, prefix_lens, extend_lens, q_start, block_req, block_start,
        sm_scale * LOG2E, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), page_table.stride(0),
        GROUP=heads // kv_heads, PAGE_SIZE=page_size, HEAD_DIM=head_dim,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(head_dim),
        UPCAST_DOT=_upcast_dot(k_cache.dtype),
        num_warps=4 if head_dim <= 64 else 8, num_stages=2)
