"""One attention layer over the head-centric paged KV pool: sgl_kernel's backend for the device vs `torch_native`.

    --device cpu    the `cpu` backend (C++/OpenMP) vs torch_native
    --device cuda   the `triton` backend (Triton kernels) vs torch_native, CUDA-synchronized wall clock. On CPU the
                    Triton kernels only run in Triton's interpreter (TRITON_INTERPRET=1, one Python step per program
                    instance: seconds per call, a correctness tool with no speed to report), so they are not timed
                    there; they are tested in test/test_triton_attention.py

    pool      HeadCentricKVPool with random K/V (the cached prefixes), pages handed out in shuffled order
    batch     per scenario a list of (prefix, extend) requests: decodes, prefills, chunks over a cached prefix,
              and the mixed batch of the issue (64 decodes + one 512-token chunk over a 512-token prefix)
    timed     backend.prepare + backend.forward of one layer (K/V store included), best of --repeats rounds of
              --iters calls each, both backends alternating (same machine load); torch threads = --threads;
              --clock wall (elapsed) or cpu (the process's CPU time)
    useful    attention FLOPs the batch needs (4 * D * Hq * visible keys per query, no padding) / time
    KV GB/s   K/V bytes the batch must read at least once (every request's prefix + new tokens, all KV heads) / time:
              against the memory bandwidth (HBM roofline on a GPU) for decode
    checked   before timing, both backends' outputs agree (float32 1e-4, 16-bit 5e-2)

Prints a markdown table; --result-dir (default benchmark/results/) gets bench_attention.json / .md.

    python benchmark/bench_attention.py                  # demo model's attention: 8 heads / 4 KV heads, head_dim 64
    python benchmark/bench_attention.py --threads 1 --clock cpu   # on a loaded machine
    python benchmark/bench_attention.py --head-dim 128 --heads 32 --kv-heads 8 --dtype bfloat16
    python benchmark/bench_attention.py --device cuda --head-dim 128 --heads 32 --kv-heads 8 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Dict, List, Tuple

import torch

from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.kv_pool import HeadCentricKVPool
from sglang.srt.model_executor.forward_batch import ForwardBatch

SCENARIOS: Dict[str, List[Tuple[int, int]]] = {
    "decode B=1 ctx 160": [(160, 1)],
    "decode B=16 ctx 160": [(160, 1)] * 16,
    "decode B=64 ctx 160": [(160, 1)] * 64,
    "decode B=16 ctx 2048": [(2048, 1)] * 16,
    "prefill 1 x 128": [(0, 128)],
    "prefill 16 x 128": [(0, 128)] * 16,
    "prefill 1 x 512": [(0, 512)],
    "chunk 512 over prefix 1536": [(1536, 512)],
    "mixed: 64 decodes + 512 chunk": [(160, 1)] * 64 + [(512, 512)],
}
# larger batches for a GPU (part of the default scenarios with --device cuda)
CUDA_SCENARIOS: Dict[str, List[Tuple[int, int]]] = {
    "decode B=64 ctx 4096": [(4096, 1)] * 64,
    "decode B=256 ctx 2048": [(2048, 1)] * 256,
    "prefill 4 x 4096": [(0, 4096)] * 4,
}
KERNEL_BACKEND = {"cpu": "cpu", "cuda": "triton"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=8, help="query heads of the layer (one rank's)")
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", choices=list(KERNEL_BACKEND),
                   help="cpu: the cpu backend vs torch_native; cuda: the triton backend vs torch_native")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall: elapsed time; cpu: the process's CPU time (with --threads 1 the work itself, robust on "
                        "a machine other processes load)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scenarios", nargs="+", default=None, choices=list(SCENARIOS) + list(CUDA_SCENARIOS),
                   metavar="NAME", help="default: every scenario (the larger GPU ones too with --device cuda)")
    p.add_argument("--result-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    if args.scenarios is None:
        args.scenarios = list(SCENARIOS) + (list(CUDA_SCENARIOS) if args.device == "cuda" else [])
    if args.device == "cuda" and args.clock == "cpu":
        p.error("--clock cpu measures the host process, not the GPU; use --clock wall with --device cuda")
    return args


def make_case(reqs, args):
    """-> (ForwardBatch, pool, q [T, Hq, D], k, v [T, Hkv, D]) for one scenario."""
    dtype = getattr(torch, args.dtype)
    ps = args.page_size
    num_pages = sum(math.ceil(max(p + e, 1) / ps) for p, e in reqs) + 1
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(num_pages, generator=g).tolist()
    tables = [[perm.pop() for _ in range(math.ceil(max(p + e, 1) / ps))] for p, e in reqs]
    fb = ForwardBatch.build([[1] * e for _, e in reqs], [p for p, _ in reqs], tables)
    pool = HeadCentricKVPool(num_pages, ps, args.kv_heads, 1, args.head_dim, dtype, args.device)
    pool.kv_buffer.copy_(torch.randn(pool.kv_buffer.shape, generator=g))
    tokens = sum(e for _, e in reqs)
    q = torch.randn(tokens, args.heads, args.head_dim, generator=g).to(dtype).to(args.device)  # [T, Hq, D]
    k = torch.randn(tokens, args.kv_heads, args.head_dim, generator=g).to(dtype).to(args.device)  # [T, Hkv, D]
    v = torch.randn(tokens, args.kv_heads, args.head_dim, generator=g).to(dtype).to(args.device)
    return fb, pool, q, k, v


def useful_flops(reqs, args) -> float:
    visible = sum(e * p + e * (e + 1) / 2 for p, e in reqs)  # keys each new token attends to
    return 4.0 * args.head_dim * args.heads * visible


def kv_bytes(reqs, args) -> float:
    elem = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    return sum(p + e for p, e in reqs) * args.kv_heads * args.head_dim * 2 * elem  # K and V of every key, once


def make_backends(args):
    """{"torch_native": reference, <kernel backend of the device>: sgl_kernel's}"""
    kernel = KERNEL_BACKEND[args.device]
    if kernel == "cpu":
        from sglang.srt.layers.attention.cpu_backend import CpuPagedAttnBackend

        return {"torch_native": TorchNativeAttnBackend(), "cpu": CpuPagedAttnBackend()}
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    return {"torch_native": TorchNativeAttnBackend(), "triton": TritonAttnBackend()}


def check_agree(backends, fb, pool, q, k, v, args) -> None:
    """Both backends' outputs for the batch (on copies of the pool) agree before anything is timed."""
    outs = []
    for be in backends.values():
        saved = pool.kv_buffer.clone()
        be.prepare(fb, pool, args.device)
        outs.append(be.forward(q, k, v, 0, fb, pool).float())
        pool.kv_buffer.copy_(saved)
    tol = 1e-4 if args.dtype == "float32" else 5e-2
    torch.testing.assert_close(outs[1], outs[0], rtol=tol, atol=tol)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    base_clock = time.perf_counter if args.clock == "wall" else time.process_time
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def clock():
        sync()
        return base_clock()

    backends = make_backends(args)
    kernel = KERNEL_BACKEND[args.device]
    rows = []
    for name in args.scenarios:
        reqs = SCENARIOS[name]
        fb, pool, q, k, v = make_case(reqs, args)
        best = {b: float("inf") for b in backends}
        with torch.inference_mode():
            check_agree(backends, fb, pool, q, k, v, args)
            for be in backends.values():  # warm-up (and Triton's compilation)
                be.prepare(fb, pool, args.device)
                be.forward(q, k, v, 0, fb, pool)
            for _ in range(args.repeats):
                for b, be in backends.items():
                    t = clock()
                    for _ in range(args.iters):
                        be.prepare(fb, pool, args.device)
                        be.forward(q, k, v, 0, fb, pool)
                    best[b] = min(best[b], (clock() - t) / args.iters)
        flops = useful_flops(reqs, args)
        row = {"scenario": name, "tokens": fb.num_tokens, "useful_gflop": flops / 1e9,
               **{f"{b}_ms": 1e3 * s for b, s in best.items()},
               **{f"{b}_gflop_s": flops / s / 1e9 for b, s in best.items()}}
        row["speedup"] = best["torch_native"] / best[kernel]
        row[f"{kernel}_kv_gb_s"] = kv_bytes(reqs, args) / best[kernel] / 1e9
        rows.append(row)
        print(f"  {name}: torch_native {row['torch_native_ms']:.2f} ms, {kernel} {row[f'{kernel}_ms']:.2f} ms "
              f"({row['speedup']:.1f}x)", flush=True)
        del fb, pool, q, k, v
    head = (f"| batch | new tokens | torch_native ms | {kernel} ms | speed-up | {kernel} useful GFLOP/s "
            f"| {kernel} KV GB/s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['scenario']} | {r['tokens']} | {r['torch_native_ms']:.2f} | {r[f'{kernel}_ms']:.2f} | "
                     f"{r['speedup']:.1f}x | {r[f'{kernel}_gflop_s']:.1f} | {r[f'{kernel}_kv_gb_s']:.1f} |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.result_dir, exist_ok=True)
    suffix = "" if args.device == "cpu" else f"_{args.device}"
    with open(os.path.join(args.result_dir, f"bench_attention{suffix}.json"), "w") as f:
        json.dump({"args": vars(args), "load_avg": os.getloadavg(), "rows": rows}, f, indent=1)
    with open(os.path.join(args.result_dir, f"bench_attention{suffix}.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
