"""Multi-turn conversations with and without SGLang's session API, under one-off traffic that evicts cache.

    conversations x turns, round robin: each turn adds --new-tokens to its conversation and generates
    --output-tokens (greedy); between rounds, --background one-off requests of --background-tokens
    mode "sessions":  /open_session, each turn sent with session_params (its KV stays pinned where it ran)
    mode "whole":     each turn sent as the whole conversation so far (radix cache + affinity only)

Prints, per mode, the follow-up turns' prompt tokens, the tokens recomputed beyond each turn's new input
(+1: the previous turn's last output token, never fed), and whether both modes produced the same tokens.
In-process Engine on CPU (the random demo model unless --model-path).

    python benchmark/bench_sessions.py --dp-size 2 --background 12
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time


def run(eng, use_sessions: bool, args) -> dict:
    rng = random.Random(args.seed)
    sp = {"temperature": 0, "max_new_tokens": args.output_tokens, "ignore_eos": True}
    assert eng.flush_cache()
    history = [[] for _ in range(args.conversations)]
    last_rid = [None] * args.conversations
    sessions = [eng.open_session(0) for _ in range(args.conversations)] if use_sessions else None
    prompt = extra = 0
    outputs = []
    t0 = time.perf_counter()
    for turn in range(args.turns):
        for c in range(args.conversations):
            new = [rng.randrange(3, args.vocab) for _ in range(args.new_tokens)]
            if use_sessions:
                out = eng.generate(input_ids=new, sampling_params=sp,
                                   session_params={"id": sessions[c], "rid": last_rid[c]})
                last_rid[c] = out["meta_info"]["id"]
            else:
                out = eng.generate(input_ids=history[c] + new, sampling_params=sp)
            history[c] += new + out["output_ids"]
            outputs.append(out["output_ids"])
            if turn:
                meta = out["meta_info"]
                prompt += meta["prompt_tokens"]
                extra += meta["prompt_tokens"] - meta["cached_tokens"] - len(new) - 1
        for _ in range(args.background):
            eng.generate(input_ids=[rng.randrange(3, args.vocab) for _ in range(args.background_tokens)],
                         sampling_params=sp)
    if use_sessions:
        for s in sessions:
            eng.close_session(s)
    return {"prompt": prompt, "extra": extra, "outputs": outputs, "seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help="HF checkpoint (default: a random demo Llama)")
    p.add_argument("--dp-size", type=int, default=2)
    p.add_argument("--page-size", type=int, default=4)
    p.add_argument("--max-total-tokens", type=int, default=512, help="KV tokens per instance")
    p.add_argument("--conversations", type=int, default=4)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=30)
    p.add_argument("--output-tokens", type=int, default=8)
    p.add_argument("--background", type=int, default=12, help="one-off requests between rounds")
    p.add_argument("--background-tokens", type=int, default=60)
    p.add_argument("--vocab", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import sglang

    model = args.model_path
    if model is None:
        from sglang.srt.demo_model import DemoModelSpec, make_demo_model

        model = os.path.join(tempfile.gettempdir(), "sglang-bench-sessions-llama")
        if not os.path.exists(os.path.join(model, "config.json")):
            make_demo_model(model, DemoModelSpec(arch="llama", seed=7, num_key_value_heads=4, intermediate_size=92))
    eng = sglang.Engine(model_path=model, device="cpu", dtype="float32", log_level="warning", dp_size=args.dp_size,
                        page_size=args.page_size, max_total_tokens=args.max_total_tokens)
    try:
        results = {"sessions": run(eng, True, args), "whole": run(eng, False, args)}
    finally:
        eng.shutdown()
    same = results["sessions"]["outputs"] == results["whole"]["outputs"]
    print(f"{args.conversations} conversations x {args.turns} turns, {args.background} background requests per "
          f"round, dp {args.dp_size}, {args.max_total_tokens} KV tokens per instance")
    print(f"{'mode':<10} {'follow-up prompt tokens':>24} {'recomputed beyond new input':>28} {'share':>7} "
          f"{'seconds':>8}")
    for mode, r in results.items():
        print(f"{mode:<10} {r['prompt']:>24} {r['extra']:>28} {r['extra'] / max(1, r['prompt']):>7.1%} "
              f"{r['seconds']:>8.2f}")
    print(f"same greedy tokens in both modes: {same}")


if __name__ == "__main__":
    main()
