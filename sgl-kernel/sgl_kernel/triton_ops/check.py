"""Self-check of the Triton kernels on any device against the torch references (no sglang needed).

    python -m sgl_kernel.triton_ops.check                  # on CUDA (compiled kernels), exit 1 on a mismatch
    TRITON_INTERPRET=1 python -m sgl_kernel.triton_ops.check --device cpu     # in Triton's interpreter (slow)

Each case builds a head-centric pool buffer [pages, kv_heads, 2 layers, 2 (K|V), page_size, head_dim] of random
values (the cached prefixes), hands out its pages in shuffled order, and runs one batch of (prefix, extend)
requests through the kernels as the triton backend does: store_kv, decode_attention for the requests with one new
token, extend_attention for those with more (q, k, v strided views of one fused projection, as the model makes
them). Checks: the pool equals the reference store bit for bit; the output equals reference.paged_attention_ref
(|out - ref| <= tol * (1 + |ref|): float32 2e-5, 16-bit 2e-2); with small tiles (several key tiles, query blocks and key splits, empty splits) too;
copy_runs equals slice copies. test/test_triton_attention.py runs these cases on CPU under the interpreter;
scripts/gpu_check.sh can run this module on a GPU.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import List, Tuple

import torch

from sgl_kernel.triton_ops import attention_kernels, copy_kernels, reference

LAYER = 1


@dataclass(frozen=True)
class Case:
    head_dim: int
    heads: int  # query heads
    kv_heads: int
    page_size: int
    dtype: torch.dtype
    reqs: Tuple[Tuple[int, int], ...]  # (prefix, extend) per request
    small_tiles: bool = False  # block_m = block_n = 16 and 7 key splits instead of the launchers' defaults

    @property
    def name(self) -> str:
        tiles = "-tiles16" if self.small_tiles else ""
        return f"d{self.head_dim}-h{self.heads}/{self.kv_heads}-ps{self.page_size}-{str(self.dtype)[6:]}{tiles}"


CASES: List[Case] = [
    Case(64, 8, 2, 4, torch.float32, ((0, 23), (0, 1), (12, 9), (33, 1), (16, 0))),  # mixed, GQA 4, an empty request
    Case(32, 20, 1, 4, torch.float32, ((0, 1), (3, 1), (69, 1), (40, 0), (130, 1)), True),  # GQA 20:
    # two head blocks of 16; 7 splits of 19 keys, more than a 4-key request has (empty splits)
    Case(32, 20, 1, 4, torch.bfloat16, ((0, 1), (3, 1), (69, 1), (130, 1)), True),
    Case(64, 6, 2, 8, torch.float32, ((0, 37), (21, 19), (50, 1), (5, 16)), True),  # query blocks and key tiles
    # of 16, chunks aligned to neither
    Case(128, 4, 2, 16, torch.bfloat16, ((11, 1), (0, 70))),  # two query blocks of 64
    Case(256, 2, 1, 1, torch.float16, ((31, 5), (20, 1))),
]


def _inputs(case: Case, device, seed: int = 0):
    """-> (buffer [P, Hkv, 2, 2, ps, D], page_table int32 [B, max_pages], prefix/extend int64 [B], q [T, Hq, D],
    k / v [T, Hkv, D]) on the device."""
    g = torch.Generator().manual_seed(seed)
    ps = case.page_size
    pages_per_req = [math.ceil(max(p + e, 1) / ps) for p, e in case.reqs]
    num_pages = sum(pages_per_req) + 3
    perm = torch.randperm(num_pages, generator=g).tolist()
    table = torch.zeros((len(case.reqs), max(pages_per_req)), dtype=torch.int32)  # [B, max_pages]
    for b, n in enumerate(pages_per_req):
        table[b, :n] = torch.tensor([perm.pop() for _ in range(n)], dtype=torch.int32)
    buffer = torch.randn((num_pages, case.kv_heads, 2, 2, ps, case.head_dim), generator=g).to(case.dtype)
    prefix = torch.tensor([p for p, _ in case.reqs], dtype=torch.int64)
    extend = torch.tensor([e for _, e in case.reqs], dtype=torch.int64)
    tokens = int(extend.sum())
    d, hq, hkv = case.head_dim, case.heads, case.kv_heads
    qkv = torch.randn((tokens, (hq + 2 * hkv) * d), generator=g).to(case.dtype).to(device)  # fused projection
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)  # strided rows
    return (buffer.to(device), table.to(device), prefix.to(device), extend.to(device),
            q.view(tokens, hq, d), k.view(tokens, hkv, d), v.view(tokens, hkv, d))


def run_case(case: Case, device) -> dict:
    """Run one case; -> {"store_equal", "max_err", "within_tol" (|out - ref| <= tol * (1 + |ref|) everywhere; NaN
    fails), "tol"}; raises nothing on a mismatch."""
    pa = attention_kernels()
    buffer, table, prefix, extend, q, k, v = _inputs(case, device)
    ref_buffer = buffer.clone()
    k_cache, v_cache = buffer[:, :, LAYER, 0], buffer[:, :, LAYER, 1]  # [P, Hkv, ps, D] strided views
    ref_k, ref_v = ref_buffer[:, :, LAYER, 0], ref_buffer[:, :, LAYER, 1]

    ext_host = extend.cpu()
    positions = torch.cat([torch.arange(p, p + e) for p, e in case.reqs]).to(device)  # [T]
    req = torch.repeat_interleave(torch.arange(len(case.reqs), device=device), extend)  # [T]
    write_pages = table.long()[req, positions // case.page_size]
    write_slots = positions % case.page_size
    pa.store_kv(k, v, k_cache, v_cache, write_pages, write_slots)
    reference.store_kv_ref(k, v, ref_k, ref_v, write_pages, write_slots)
    store_equal = torch.equal(buffer, ref_buffer)

    q_start = torch.cumsum(extend, 0) - extend
    decode_reqs = torch.nonzero(ext_host == 1).flatten()
    extend_reqs = torch.nonzero(ext_host > 1).flatten()
    block_m = 16 if case.small_tiles else pa.extend_block_m(case.head_dim)
    block_req, block_start = pa.extend_blocks(ext_host, extend_reqs, block_m)
    max_seq = max([p + 1 for p, e in case.reqs if e == 1] + [0])
    scale = case.head_dim ** -0.5
    out = torch.full_like(q, float("nan"))  # [T, Hq, D]: every row must be written
    pa.decode_attention(q, k_cache, v_cache, out, table, prefix, extend, q_start, decode_reqs.to(device), max_seq,
                        scale, **(dict(num_kv_splits=7, block_n=16) if case.small_tiles else {}))
    pa.extend_attention(q, k_cache, v_cache, out, table, prefix, extend, q_start, block_req.to(device),
                        block_start.to(device), scale, block_m=block_m, block_n=16 if case.small_tiles else None)
    ref = reference.paged_attention_ref(q, ref_k, ref_v, table, prefix, extend, scale)
    tol = 2e-5 if case.dtype == torch.float32 else 2e-2
    diff = (out.float() - ref).abs()
    excess = (diff - tol * ref.abs()).max().item() if out.numel() else 0.0  # |out - ref| <= tol + tol * |ref|
    return {"store_equal": store_equal, "max_err": diff.max().item() if out.numel() else 0.0,
            "within_tol": excess <= tol, "tol": tol}


def run_copy(device, unit: int, block: int = 16, max_chunk_programs: int = 2) -> bool:
    """copy_runs / gather_runs / scatter_runs on runs that are multiples of `unit` bytes; -> equal to slice copies."""
    bc = copy_kernels()
    g = torch.Generator().manual_seed(unit)
    flat = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=g).to(device)
    src, dst, sizes = [0, 8 * unit, 100 * unit], [2048, 2048 + 40 * unit, 3000], [5 * unit, 37 * unit, unit]
    got, want = flat.clone(), flat.clone()
    bc.copy_runs(got, src, got, dst, sizes, block=block, max_chunk_programs=max_chunk_programs)
    reference.copy_runs_ref(want, src, want, dst, sizes)
    packed = bc.gather_runs(flat, src, sizes, block=block)
    back = torch.zeros_like(flat)
    bc.scatter_runs(back, dst, sizes, packed, block=block)
    restored = all(torch.equal(back[d:d + n], flat[s:s + n]) for s, d, n in zip(src, dst, sizes))
    return (torch.equal(got, want) and restored and int(back.count_nonzero()) <= sum(sizes)
            and torch.equal(packed, torch.cat([flat[o:o + n] for o, n in zip(src, sizes)])))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    failed = 0
    for case in CASES:
        r = run_case(case, args.device)
        ok = r["store_equal"] and r["within_tol"]
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {case.name}: store {'equal' if r['store_equal'] else 'DIFFERS'}, "
              f"max |out - ref| {r['max_err']:.2e} (tol {r['tol']:.0e} * (1 + |ref|))", flush=True)
    for unit in (8, 4, 2, 1):
        ok = run_copy(args.device, unit)
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} copy_runs, {unit}-byte words", flush=True)
    print("all kernels match their references" if not failed else f"{failed} check(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
