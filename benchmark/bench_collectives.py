"""All-reduce / all-gather latency and bandwidth of one TP group on this host: shared memory vs gloo.

    world      torch.multiprocessing.spawn --world ranks (gloo rendezvous over loopback), 1 torch thread each,
               every aligned group created with --tp-collective shm (sglang.srt.distributed.parallel_state)
    shm        TPGroup.all_reduce / all_gather of the group of all ranks (sgl_kernel's shared-memory segment)
    gloo       torch.distributed.all_reduce / all_gather on the same group's gloo communicator
    per size   float32 messages of --sizes bytes; shm and gloo alternate in rounds of --iters calls (same
               machine load); latency = median call time over the rounds on rank 0 (every call ends when the
               last rank has contributed)
    bandwidth  algorithm bandwidth = message bytes / latency (all-gather: the gathered bytes)

Prints a markdown table; --result-dir (default benchmark/results/) gets bench_collectives.json / .md.

    python benchmark/bench_collectives.py                      # 2 ranks, 4 B .. 16 MiB
    python benchmark/bench_collectives.py --world 4 --iters 50
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from typing import Dict, List

import torch

DEFAULT_SIZES = [4, 64, 1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--world", type=int, default=2, help="ranks in the group (a power of two)")
    p.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES, help="message bytes (float32)")
    p.add_argument("--iters", type=int, default=100, help="calls per timing round")
    p.add_argument("--rounds", type=int, default=5, help="timing rounds per (size, method)")
    p.add_argument("--result-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    return p.parse_args(argv)


def _time(fn, iters: int) -> float:
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def _worker(rank: int, world: int, port: int, args, out_file: str) -> None:
    import torch.distributed as dist

    from sglang.srt.distributed import parallel_state as ps

    torch.set_num_threads(1)
    ps.init_distributed(world, rank, f"tcp://127.0.0.1:{port}", "gloo")
    ps.create_aligned_groups(world, "shm")
    group = ps.get_tp_group(list(range(world)))
    rows = []
    for size in args.sizes:
        n = max(1, size // 4)
        x = torch.randn(n)
        g = x.reshape(1, n)
        parts = [torch.empty_like(g) for _ in range(world)]
        calls = {
            ("all_reduce", "shm"): lambda: group.all_reduce(x),
            ("all_reduce", "gloo"): lambda: dist.all_reduce(x, group=group.device_group),
            ("all_gather", "shm"): lambda: group.all_gather(g, dim=-1),
            ("all_gather", "gloo"): lambda: (dist.all_gather(parts, g, group=group.device_group),
                                             torch.cat(parts, dim=-1)),
        }
        iters = max(3, min(args.iters, int(args.iters * (64 << 10) / max(size, 64 << 10))))
        times: Dict = {k: [] for k in calls}
        for fn in calls.values():  # warm-up
            fn()
        for _ in range(args.rounds):
            for key, fn in calls.items():
                group.barrier()
                times[key].append(_time(fn, iters))
        for op in ("all_reduce", "all_gather"):
            row = {"op": op, "bytes": n * 4, "world": world}
            for method in ("shm", "gloo"):
                lat = statistics.median(times[(op, method)])
                moved = n * 4 * (world if op == "all_gather" else 1)
                row[f"{method}_us"] = lat * 1e6
                row[f"{method}_gb_s"] = moved / lat / 1e9
            row["speedup"] = row["gloo_us"] / row["shm_us"]
            rows.append(row)
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(rows, f)
    group.barrier()
    ps.destroy_distributed()


def _human(b: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= scale:
            return f"{b / scale:g} {unit}"
    return f"{b} B"


def markdown_table(rows: List[Dict]) -> str:
    head = "| op | ranks | bytes | shm us | gloo us | shm GB/s | gloo GB/s | shm speed-up |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['op']} | {r['world']} | {_human(r['bytes'])} | {r['shm_us']:.1f} | {r['gloo_us']:.1f} | "
                     f"{r['shm_gb_s']:.2f} | {r['gloo_gb_s']:.2f} | {r['speedup']:.1f}x |")
    return "\n".join(lines)


def main(argv=None) -> None:
    import torch.multiprocessing as mp

    args = parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(args.world, port, args, out_file), nprocs=args.world, join=True)
        with open(out_file) as f:
            rows = json.load(f)
    rows.sort(key=lambda r: (r["op"], r["bytes"]))
    table = markdown_table(rows)
    print(table)
    os.makedirs(args.result_dir, exist_ok=True)
    with open(os.path.join(args.result_dir, "bench_collectives.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(args.result_dir, "bench_collectives.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
