"""One attention layer over the head-centric paged KV pool: the `cpu` backend (sgl_kernel) vs `torch_native`.

    pool      HeadCentricKVPool with random K/V (the cached prefixes), pages handed out in shuffled order
    batch     per scenario a list of (prefix, extend) requests: decodes, prefills, chunks over a cached prefix,
              and the mixed batch of the issue (64 decodes + one 512-token chunk over a 512-token prefix)
    timed     backend.prepare + backend.forward of one layer (K/V store included), best of --repeats rounds of
              --iters calls each, both backends alternating (same machine load); torch threads = --threads;
              --clock wall (elapsed) or cpu (the process's CPU time)
    useful    attention FLOPs the batch needs (4 * D * Hq * visible keys per query, no padding) / time

Prints a markdown table; --result-dir (default benchmark/results/) gets bench_attention.json / .md.

    python benchmark/bench_attention.py                  # demo model's attention: 8 heads / 4 KV heads, head_dim 64
    python benchmark/bench_attention.py --threads 1 --clock cpu   # on a loaded machine
    python benchmark/bench_attention.py --head-dim 128 --heads 32 --kv-heads 8 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Dict, List, Tuple

import torch

from sglang.srt.layers.attention.cpu_backend import CpuPagedAttnBackend
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=8, help="query heads of the layer (one rank's)")
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall: elapsed time; cpu: the process's CPU time (with --threads 1 the work itself, robust on "
                        "a machine other processes load)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS), metavar="NAME")
    p.add_argument("--result-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    return p.parse_args(argv)


def make_case(reqs, args):
    """-> (ForwardBatch, pool, q [T, Hq, D], k, v [T, Hkv, D]) for one scenario."""
    dtype = getattr(torch, args.dtype)
    ps = args.page_size
    num_pages = sum(math.ceil(max(p + e, 1) / ps) for p, e in reqs) + 1
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(num_pages, generator=g).tolist()
    tables = [[perm.pop() for _ in range(math.ceil(max(p + e, 1) / ps))] for p, e in reqs]
    fb = ForwardBatch.build([[1] * e for _, e in reqs], [p for p, _ in reqs], tables)
    pool = HeadCentricKVPool(num_pages, ps, args.kv_heads, 1, args.head_dim, dtype, "cpu")
    pool.kv_buffer.copy_(torch.randn(pool.kv_buffer.shape, generator=g))
    tokens = sum(e for _, e in reqs)
    q = torch.randn(tokens, args.heads, args.head_dim, generator=g).to(dtype)
    k = torch.randn(tokens, args.kv_heads, args.head_dim, generator=g).to(dtype)
    v = torch.randn(tokens, args.kv_heads, args.head_dim, generator=g).to(dtype)
    return fb, pool, q, k, v


def useful_flops(reqs, args) -> float:
    visible = sum(e * p + e * (e + 1) / 2 for p, e in reqs)  # keys each new token attends to
    return 4.0 * args.head_dim * args.heads * visible


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    backends = {"torch_native": TorchNativeAttnBackend(), "cpu": CpuPagedAttnBackend()}
    rows = []
    for name in args.scenarios:
        reqs = SCENARIOS[name]
        fb, pool, q, k, v = make_case(reqs, args)
        best = {b: float("inf") for b in backends}
        with torch.inference_mode():
            for be in backends.values():  # warm-up
                be.prepare(fb, pool, "cpu")
                be.forward(q, k, v, 0, fb, pool)
            for _ in range(args.repeats):
                for b, be in backends.items():
                    t = clock()
                    for _ in range(args.iters):
                        be.prepare(fb, pool, "cpu")
                        be.forward(q, k, v, 0, fb, pool)
                    best[b] = min(best[b], (clock() - t) / args.iters)
        flops = useful_flops(reqs, args)
        row = {"scenario": name, "tokens": fb.num_tokens, "useful_gflop": flops / 1e9,
               **{f"{b}_ms": 1e3 * s for b, s in best.items()},
               **{f"{b}_gflop_s": flops / s / 1e9 for b, s in best.items()}}
        row["speedup"] = best["torch_native"] / best["cpu"]
        rows.append(row)
        print(f"  {name}: torch_native {row['torch_native_ms']:.2f} ms, cpu {row['cpu_ms']:.2f} ms "
              f"({row['speedup']:.1f}x)", flush=True)
    head = "| batch | new tokens | torch_native ms | cpu ms | speed-up | cpu useful GFLOP/s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['scenario']} | {r['tokens']} | {r['torch_native_ms']:.2f} | {r['cpu_ms']:.2f} | "
                     f"{r['speedup']:.1f}x | {r['cpu_gflop_s']:.1f} |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.result_dir, exist_ok=True)
    with open(os.path.join(args.result_dir, "bench_attention.json"), "w") as f:
        json.dump({"args": vars(args), "load_avg": os.getloadavg(), "rows": rows}, f, indent=1)
    with open(os.path.join(args.result_dir, "bench_attention.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
