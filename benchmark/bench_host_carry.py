"""The host KV tier across Gyges merges and splits: pause with and without carrying it, side by side.

    for each round, for each --host-carry-bytes value (0 = the new instance starts with an empty host tier):
      an Engine (dp 2, --enable-gyges, --enable-hierarchical-cache) whose host tiers are filled by one-off
      prompts, then a merge [0, 1] -> TP2 and a split back; after each, the time until every instance has
      attached its re-laid tier (host_carry_pending false)

Prints per transformation: the pause (what a running request waits), the index planning and state gather in it,
the host pages / bytes carried, and the background re-layout's time and bytes moved on the leader's thread.
In-process Engine on CPU (the random demo model).

    python benchmark/bench_host_carry.py --rounds 2
"""

from __future__ import annotations

import argparse
import tempfile
import time


def fill(eng, max_rounds: int = 40) -> None:
    for k in range(max_rounds):
        eng.generate(input_ids=[[(k * 101 + i * 13 + j * 7) % 400 + 5 for j in range(480)] for i in range(16)],
                     sampling_params={"max_new_tokens": 1})
        if all(s.get("host_pages_held", 0) >= 0.95 * s.get("host_capacity_pages", 1) for s in eng.get_internal_state()):
            return


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hicache-size", default="16MiB", help="host tier per device")
    ap.add_argument("--host-carry-bytes", type=int, nargs="+", default=[0, 64 << 20])
    ap.add_argument("--max-total-tokens", type=int, default=2048)
    ap.add_argument("--page-size", type=int, default=16)
    args = ap.parse_args()

    import sglang
    from sglang.srt.demo_model import DemoModelSpec, make_demo_model

    model = tempfile.mkdtemp(prefix="bench-host-carry-")
    make_demo_model(model, DemoModelSpec(arch="llama", seed=3, num_key_value_heads=2))
    rows = []
    for rnd in range(args.rounds):
        for carry in args.host_carry_bytes:
            eng = sglang.Engine(model_path=model, device="cpu", dtype="float32", log_level="warning", dp_size=2,
                                enable_gyges=True, page_size=args.page_size, max_total_tokens=args.max_total_tokens,
                                enable_hierarchical_cache=True, hicache_size=args.hicache_size,
                                gyges_host_carry_bytes=carry)
            try:
                fill(eng)
                for devices, tp in (([0, 1], 2), ([0, 1], 1)):
                    d = eng.gyges_transform(devices, tp)
                    t0 = time.perf_counter()
                    while any(s.get("host_carry_pending") for s in eng.get_internal_state()):
                        time.sleep(0.002)
                    attached_ms = (time.perf_counter() - t0) * 1e3
                    lead = eng.get_internal_state()[0]
                    rows.append((rnd, carry, d["kind"], d["pause_ms"], d["planning_ms"], d["state_gather_ms"],
                                 d["host_pages_kept"], d["host_kv_bytes"], lead["host_carry_ms"] if carry else 0.0,
                                 lead["host_carry_bytes_moved"] if carry else 0, attached_ms))
            finally:
                eng.shutdown()
    print("| round | --gyges-host-carry-bytes | op | pause ms | planning ms | state gather ms | host pages kept | "
          "host bytes carried | re-layout ms (thread) | bytes moved (leader) | attached after ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:,} | {r[2]} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.1f} | {r[6]:,} | {r[7]:,} | "
              f"{r[8]:.0f} | {r[9]:,} | {r[10]:.0f} |")


if __name__ == "__main__":
    main()
