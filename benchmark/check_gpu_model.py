"""The first-principles GPU models (gyges.hardware) against the Gyges paper's measurements, and their numbers for
the models and GPUs of the studies.

    python benchmark/check_gpu_model.py [--prompt-tokens 1024] [--output-tokens 1024] [--out-dir DIR]

Check: Qwen2.5-32B on 4 x H20 serving 1K-token requests (arXiv 2509.19729 v2, as summarized publicly): total
throughput 1,792 tok/s for 4 x TP1, 1,340 for 2 x TP2, 767 for TP4, max context 3.75K / 41.25K / 120.5K tokens.
The model's side: gyges.hardware.serving_estimate (every instance keeps as many requests as its KV holds, serves
their prompts in prefill chunks, then their decode steps) and kv_capacity_tokens, with the one set of efficiency
factors in gyges.hardware.Efficiency (nothing here is fitted to the paper). The paper does not say how long the
outputs of its 1K-token requests were: --output-tokens (default 1,024) sets it; throughput counts prompt and
output tokens.

Prints two markdown tables: the check (model, paper, ratio) and the models' numbers (weights, KV per token,
KV capacity and step times at TP 1/2/4/8) for Llama-3-8B, Qwen2.5-32B and Llama-3-70B on H200 and H20.
"""

from __future__ import annotations

import argparse
import os
from typing import List

from gyges.hardware import (GPUS, H20, MODELS, QWEN25_32B, kv_capacity_tokens, save_gpu_models, serving_estimate,
                            step_time_model)

# Gyges paper (v2): Qwen2.5-32B, 4 x H20, 1K-token requests
PAPER = {1: {"tok_s": 1792, "max_context": 3750}, 2: {"tok_s": 1340, "max_context": 41250},
         4: {"tok_s": 767, "max_context": 120500}}


def check_table(prompt: int, output: int) -> str:
    rows: List[str] = [
        "| shape on 4 x H20 | requests per instance | model tok/s (total) | paper tok/s | model / paper | "
        "model vs 4 x TP1 | paper vs 4 x TP1 | model max context | paper max context | model / paper |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    est = {tp: serving_estimate(H20, QWEN25_32B, 4, tp, prompt, output) for tp in PAPER}
    for tp, e in est.items():
        p = PAPER[tp]
        shape = f"{4 // tp} x TP{tp}" if tp < 4 else "TP4"
        rows.append(f"| {shape} | {e.batch} | {e.total_tokens_per_s:,.0f} | {p['tok_s']:,} | "
                    f"{e.total_tokens_per_s / p['tok_s']:.2f} | "
                    f"{e.total_tokens_per_s / est[1].total_tokens_per_s:.2f} | {p['tok_s'] / PAPER[1]['tok_s']:.2f} | "
                    f"{e.kv_capacity_tokens:,} | {p['max_context']:,} | "
                    f"{e.kv_capacity_tokens / p['max_context']:.1f} |")
    return "\n".join(rows)


def models_table() -> str:
    rows = ["| GPU | model | weights GB | KV KiB/token | TP | KV capacity (max context) | decode step ms (B=64, 1K ctx) "
            "| decode tok/s per GPU (B=64) | prefill ms (8K tokens) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for gpu in GPUS.values():
        for m in MODELS.values():
            step = step_time_model(gpu, m)
            for tp in (1, 2, 4, 8):
                cap = kv_capacity_tokens(gpu, m, tp)
                if cap == 0:
                    rows.append(f"| {gpu.name} | {m.name} | {m.weight_bytes / 1e9:.1f} | "
                                f"{m.kv_bytes_per_token / 1024:.0f} | {tp} | weights do not fit | | | |")
                    continue
                dec = step.step_time(64, 64 * 1024, tp)
                pre = step.step_time(8192, 8192, tp, requests=2)  # 2 prompts of 4K tokens
                rows.append(f"| {gpu.name} | {m.name} | {m.weight_bytes / 1e9:.1f} | {m.kv_bytes_per_token / 1024:.0f} "
                            f"| {tp} | {cap:,} | {dec * 1e3:.2f} | {64 / dec / tp:,.0f} | {pre * 1e3:.1f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--output-tokens", type=int, default=1024)
    p.add_argument("--out-dir", help="also write the model file of every GPU x model here, as <GPU>_<model>.json "
                                     "(what the simulator's --step-model and the server's --gyges-cost-model load)")
    a = p.parse_args(argv)
    print(f"Qwen2.5-32B on 4 x H20, requests of {a.prompt_tokens} prompt + {a.output_tokens} output tokens\n")
    print(check_table(a.prompt_tokens, a.output_tokens))
    print()
    print(models_table())
    if a.out_dir:
        os.makedirs(a.out_dir, exist_ok=True)
        for gpu in GPUS.values():
            for m in MODELS.values():
                path = os.path.join(a.out_dir, f"{gpu.name}_{m.name}.json")
                save_gpu_models(path, gpu, m)
                print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
