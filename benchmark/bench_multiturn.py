"""Multi-turn replay of the Mooncake trace: conversations with and without SGLang's session API (and hints).

Data flow:

    ../shared/traces/mooncake_synthetic.jsonl  (timestamp ms, input_length, output_length, hash_ids: one id per
        |                                        512-token prompt block; equal leading ids = shared prefix)
        v  build_workload: prompts whose first hash_id is equal are the turns of one conversation; the first
        |  --conversations multi-turn conversations (by first arrival) keep all their turns, every
        |  --one-off-every-th single-turn prompt of the same span is background traffic; arrival times are
        |  multiplied by --time-scale
        v  scaling: one 512-token block -> --block-tokens token ids (default 16: lengths / 32), drawn from a
        |  generator seeded by the block's hash id, so shared blocks are identical token ids in every prompt;
        |  output lengths / --output-scale (at least 1, at most --max-output-tokens); prompts longer than
        |  --max-prompt-tokens after scaling are left out (with their conversation)
        v  replay (one thread per conversation, in-process Engine, dp 2 CPU devices, --max-total-tokens KV
        |  tokens per instance, small enough that background traffic evicts the conversations' prefixes):
        |  a turn is sent at max(its scaled arrival, the end of the conversation's previous turn), streamed
        |    mode "no-sessions": the whole prompt as input_ids (radix cache + affinity placement only)
        |    mode "sessions":    /open_session per conversation; a turn appends to the earlier turn it shares
        |                        most blocks with: session_params {id, rid, offset = shared tokens}, input_ids =
        |                        its other blocks; closed after the last turn
        |    suffix "+hicache":  the server has a host KV tier (--enable-hierarchical-cache --hicache-size):
        |                        evicted KV is copied to host memory and reloaded on a hit (mem_cache/host_tier.py)
        |    suffix "+hints":    (implies +hicache) each turn but the last says when the next one comes:
        |                        session_params.next_turn_in_s = the trace's scaled gap; "hints" is short for
        |                        "sessions+hints"
        |    suffix "+automove": (implies +hicache) --session-auto-move: the controller moves idle sessions
        |                        between instances by itself (hinted turns due soon, hot -> cold)
        v  per turn: prompt / cached tokens (meta_info), TTFT (first streamed token), output ids; per mode:
           KV bytes to / from host memory and between instances (the schedulers' internal state)

Report (table + PNG): prompt tokens recomputed (tokens of a follow-up turn that an earlier turn of its
conversation had computed, page-aligned, but that were not found cached), cache hit rate (cached / prompt
tokens over all requests), TTFT p50/p99 of follow-up turns, throughput, KV bytes moved, and whether every
mode produced the same greedy tokens for every turn.

    cd /tmp && python /work/main/benchmark/bench_multiturn.py                       # ~3 min on 2 CPU cores
    python benchmark/bench_multiturn.py --modes no-sessions,sessions --conversations 24
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import textwrap
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import cpu_model_name, pct  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRACE = REPO.parent / "shared" / "traces" / "mooncake_synthetic.jsonl"
TRACE_BLOCK_TOKENS = 512  # Mooncake's hash_ids block size


# ---------------------------------------------------------------------------------------------------------
# workload
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Turn:
    conv: int  # conversation index
    index: int  # turn number within the conversation
    arrival_s: float  # scaled arrival (seconds since the replay start)
    hash_ids: List[int]
    input_ids: List[int]  # the whole prompt
    output_tokens: int
    parent: Optional[int] = None  # index of the earlier turn sharing the most leading blocks
    shared_tokens: int = 0  # leading prompt tokens identical to the parent's prompt (whole blocks)
    next_gap_s: Optional[float] = None  # scaled time to the conversation's next turn (None: last turn)


def block_token_ids(hash_id: int, n: int, seed: int, vocab: int) -> List[int]:
    """The first n token ids of block hash_id (the same ids wherever the block occurs)."""
    rng = random.Random(seed * 1_000_003 + hash_id)
    return [rng.randrange(3, vocab) for _ in range(n)]


def prompt_of(row: dict, a) -> tuple:
    """(token ids, number of whole blocks) of a trace row at the benchmark's scale."""
    hashes = row["hash_ids"]
    last_len = row["input_length"] - TRACE_BLOCK_TOKENS * (len(hashes) - 1)
    last_scaled = max(1, round(last_len * a.block_tokens / TRACE_BLOCK_TOKENS))
    ids: List[int] = []
    for i, h in enumerate(hashes):
        n = a.block_tokens if i < len(hashes) - 1 else min(a.block_tokens, last_scaled)
        ids += block_token_ids(h, n, a.seed, a.vocab)
    whole = len(hashes) if last_scaled >= a.block_tokens else len(hashes) - 1
    return ids, whole


def build_workload(a) -> List[List[Turn]]:
    rows = [json.loads(line) for line in open(a.trace)]
    rows = [r for r in rows if r.get("hash_ids")]
    groups: "OrderedDict[int, List[dict]]" = OrderedDict()
    for r in rows:
        groups.setdefault(r["hash_ids"][0], []).append(r)
    multi = [g for g in groups.values() if len(g) > 1]
    single = [g for g in groups.values() if len(g) == 1]
    chosen = []
    for g in multi:
        if len(chosen) == a.conversations:
            break
        if all(len(prompt_of(r, a)[0]) <= a.max_prompt_tokens for r in g):
            chosen.append(g)
    end_ms = max(r["timestamp"] for g in chosen for r in g)
    start_ms = min(g[0]["timestamp"] for g in chosen)
    background = [g for g in single[:: a.one_off_every]
                  if start_ms <= g[0]["timestamp"] <= end_ms
                  and len(prompt_of(g[0], a)[0]) <= a.max_prompt_tokens]
    convs: List[List[Turn]] = []
    for g in chosen + background:
        turns: List[Turn] = []
        whole_blocks = []
        for k, r in enumerate(g):
            ids, whole = prompt_of(r, a)
            out = max(1, min(a.max_output_tokens, round(r["output_length"] / a.output_scale)))
            t = Turn(len(convs), k, (r["timestamp"] - start_ms) / 1000.0 * a.time_scale, r["hash_ids"], ids, out)
            best = 0
            for j, prev in enumerate(turns):  # the earlier turn sharing the most whole leading blocks
                n = 0
                limit = min(whole, whole_blocks[j])
                while n < limit and prev.hash_ids[n] == r["hash_ids"][n]:
                    n += 1
                if n > best:
                    best, t.parent = n, j
            t.shared_tokens = best * a.block_tokens
            if turns:
                turns[-1].next_gap_s = t.arrival_s - turns[-1].arrival_s
            turns.append(t)
            whole_blocks.append(whole)
        convs.append(turns)
    return convs


# ---------------------------------------------------------------------------------------------------------
# replay
# ---------------------------------------------------------------------------------------------------------
@dataclass
class TurnResult:
    conv: int
    index: int
    sent_s: float
    ttft_s: Optional[float]
    end_s: float
    prompt_tokens: int
    cached_tokens: int
    reusable_tokens: int  # tokens an earlier turn of the conversation computed (page-aligned)
    output_ids: List[int] = field(default_factory=list)
    error: str = ""

    @property
    def recomputed(self) -> int:
        return max(0, self.reusable_tokens - self.cached_tokens)


def run_conversation(eng, turns: List[Turn], mode: str, t0: float, a, out: List[TurnResult],
                     lock: threading.Lock) -> None:
    sp = {"temperature": 0, "ignore_eos": True}
    sessions, hints = mode_features(mode)[:2]
    sid = eng.open_session(0) if sessions and len(turns) > 1 else None
    rids: List[Optional[str]] = []
    ready = t0
    for t in turns:
        delay = max(t0 + t.arrival_s, ready) - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        kwargs = {"sampling_params": dict(sp, max_new_tokens=t.output_tokens), "stream": True}
        if sid is None:
            kwargs["input_ids"] = t.input_ids
        else:
            params = {"id": sid}
            if t.parent is not None and t.shared_tokens and rids[t.parent] is not None:
                params.update(rid=rids[t.parent], offset=t.shared_tokens)
                kwargs["input_ids"] = t.input_ids[t.shared_tokens:]
            else:
                kwargs["input_ids"] = t.input_ids
            if hints and t.next_gap_s is not None:
                params["next_turn_in_s"] = round(t.next_gap_s, 3)
            kwargs["session_params"] = params
        sent = time.perf_counter()
        first = None
        last: Dict = {}
        err = ""
        try:
            for chunk in eng.generate(**kwargs):
                if first is None and chunk["meta_info"].get("completion_tokens", 0) > 0:
                    first = time.perf_counter()
                last = chunk
        except Exception as e:  # noqa: BLE001 - counted as a lost turn
            err = f"{type(e).__name__}: {e}"
        end = time.perf_counter()
        meta = last.get("meta_info", {})
        reusable = min(t.shared_tokens, len(t.input_ids) - 1) // a.page_size * a.page_size if t.index else 0
        fr = meta.get("finish_reason") or {}
        if isinstance(fr, dict) and fr.get("type") == "abort":
            err = err or str(fr.get("message"))
        rids.append(meta.get("id") if not err else None)
        res = TurnResult(t.conv, t.index, sent - t0, None if first is None else first - sent, end - t0,
                         meta.get("prompt_tokens", len(t.input_ids)), meta.get("cached_tokens", 0), reusable,
                         list(last.get("output_ids", [])), err)
        with lock:
            out.append(res)
        ready = end
    if sid is not None:
        eng.close_session(sid)


def mode_features(mode: str) -> tuple:
    """(sessions, hints, host tier) of a mode name such as "sessions+hicache" (see the module docstring)."""
    base, *extras = ("sessions+" + mode if mode.split("+")[0] == "hints" else mode).split("+")
    if base not in ("no-sessions", "sessions") or set(extras) - {"hicache", "hints", "automove"}:
        raise SystemExit(f"unknown mode {mode!r}: no-sessions or sessions, optionally +hicache / +hints")
    if base == "no-sessions" and "hints" in extras:
        raise SystemExit("hints are sent as session_params.next_turn_in_s: use sessions+hints")
    return base == "sessions", "hints" in extras, bool(set(extras) - {"automove"}) or "automove" in extras


def kv_movement(eng) -> Dict[str, int]:
    """Sum over instances of the KV-movement counters the schedulers report (absent ones count 0)."""
    totals = {"host_offloaded_bytes": 0, "host_loaded_bytes": 0, "kv_moved_bytes": 0, "host_reload_cut_pages": 0}
    for state in eng.get_internal_state():
        for k in totals:
            totals[k] += int(state.get(k, 0) or 0)
    return totals


def demo_model() -> str:
    from sglang.srt.demo_model import DemoModelSpec, make_demo_model

    model = os.path.join(tempfile.gettempdir(), "sglang-bench-multiturn-llama")
    if not os.path.exists(os.path.join(model, "config.json")):
        make_demo_model(model, DemoModelSpec(arch="llama", seed=7, num_key_value_heads=4, intermediate_size=92))
    return model


def run_mode(mode: str, convs: List[List[Turn]], a, model: str) -> dict:
    import sglang

    kwargs = dict(model_path=model, device="cpu", dtype="float32", log_level="warning", dp_size=a.dp_size,
                  page_size=a.page_size, max_total_tokens=a.max_total_tokens, session_kv_budget=a.session_kv_budget)
    if mode_features(mode)[2]:
        kwargs.update(enable_hierarchical_cache=True, hicache_size=a.hicache_size)
    if "automove" in mode.split("+"):
        kwargs.update(session_auto_move=True)  # the controller moves idle sessions by itself
    eng = sglang.Engine(**kwargs)
    results: List[TurnResult] = []
    lock = threading.Lock()
    try:
        before = kv_movement(eng)
        t0 = time.perf_counter() + 0.5
        threads = [threading.Thread(target=run_conversation, args=(eng, c, mode, t0, a, results, lock), daemon=True)
                   for c in convs]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        makespan = time.perf_counter() - t0
        after = kv_movement(eng)
    finally:
        eng.shutdown()
    moved = {k: after[k] - before[k] for k in after}
    return summarize(mode, results, makespan, moved)


def summarize(mode: str, results: List[TurnResult], makespan: float, moved: Dict[str, int]) -> dict:
    follow = [r for r in results if r.index > 0 and not r.error]
    ok = [r for r in results if not r.error]
    ttfts = [r.ttft_s for r in follow if r.ttft_s is not None]
    prompt = sum(r.prompt_tokens for r in ok)
    return {
        "mode": mode, "requests": len(results), "failed": len(results) - len(ok), "follow_ups": len(follow),
        "reusable": sum(r.reusable_tokens for r in follow), "recomputed": sum(r.recomputed for r in follow),
        "prompt_tokens": prompt, "cached_tokens": sum(r.cached_tokens for r in ok),
        "hit_rate": sum(r.cached_tokens for r in ok) / max(1, prompt),
        "ttft_p50": pct(ttfts, 50), "ttft_p99": pct(ttfts, 99), "makespan_s": makespan,
        "req_per_s": len(ok) / makespan, "out_tok_per_s": sum(len(r.output_ids) for r in ok) / makespan,
        **moved, "results": results,
    }


# ---------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------
def fmt_ms(x: Optional[float]) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def table(runs: List[dict]) -> str:
    head = (f"{'mode':<17} {'reqs':>5} {'lost':>4} {'follow-ups':>10} {'reusable tok':>12} {'recomputed':>10} "
            f"{'share':>6} {'hit rate':>8} {'TTFT p50 ms':>11} {'TTFT p99 ms':>11} {'req/s':>6} {'out tok/s':>9} "
            f"{'to host MB':>10} {'from host MB':>12} {'moved MB':>8}")
    lines = [head]
    for r in runs:
        lines.append(
            f"{r['mode']:<17} {r['requests']:>5} {r['failed']:>4} {r['follow_ups']:>10} {r['reusable']:>12} "
            f"{r['recomputed']:>10} {r['recomputed'] / max(1, r['reusable']):>6.1%} {r['hit_rate']:>8.1%} "
            f"{fmt_ms(r['ttft_p50']):>11} {fmt_ms(r['ttft_p99']):>11} {r['req_per_s']:>6.2f} "
            f"{r['out_tok_per_s']:>9.1f} {r['host_offloaded_bytes'] / 2**20:>10.2f} "
            f"{r['host_loaded_bytes'] / 2**20:>12.2f} {r['kv_moved_bytes'] / 2**20:>8.2f}")
    return "\n".join(lines)


def same_outputs(runs: List[dict]) -> Dict[str, bool]:
    """Per mode after the first: every turn produced the same greedy tokens as in the first mode."""
    def key(r):
        return {(x.conv, x.index): x.output_ids for x in r["results"]}

    ref = key(runs[0])
    return {r["mode"]: key(r) == ref for r in runs[1:]}


def plot(runs: List[dict], path: Path, title: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        done = sorted((x for x in r["results"] if x.index > 0), key=lambda x: x.end_s)
        total, xs, ys = 0, [], []
        for x in done:
            total += x.recomputed
            xs.append(x.end_s)
            ys.append(total)
        ax1.step(xs, ys, where="post", label=r["mode"])
        pts = [(x.sent_s, x.ttft_s * 1000) for x in done if x.ttft_s is not None]
        ax2.scatter([p[0] for p in pts], [p[1] for p in pts], s=8, label=r["mode"], alpha=0.7)
    ax1.set(xlabel="time (s)", ylabel="prompt tokens recomputed (cumulative)", title="recomputed follow-up tokens")
    ax2.set(xlabel="time sent (s)", ylabel="TTFT (ms)", title="follow-up turns' TTFT", yscale="log")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(textwrap.fill(title, 150), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return str(path)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", default=str(DEFAULT_TRACE))
    p.add_argument("--model-path", default=None, help="HF checkpoint (default: a random demo Llama)")
    p.add_argument("--modes", default="no-sessions,sessions,sessions+hicache,hints",
                   help="comma-separated: no-sessions or sessions, each optionally +hicache or +hints; "
                        "hints = sessions+hints")
    p.add_argument("--dp-size", type=int, default=2)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--max-total-tokens", type=int, default=4096, help="KV tokens per instance")
    p.add_argument("--session-kv-budget", type=float, default=0.5)
    p.add_argument("--hicache-size", default="64MiB", help="host KV tier per device in +hicache / +hints modes")
    p.add_argument("--conversations", type=int, default=40, help="multi-turn conversations replayed")
    p.add_argument("--one-off-every", type=int, default=3, help="every n-th single-turn prompt of the span")
    p.add_argument("--block-tokens", type=int, default=16, help="tokens per 512-token trace block")
    p.add_argument("--output-scale", type=float, default=8.0, help="output lengths divided by this")
    p.add_argument("--max-output-tokens", type=int, default=24)
    p.add_argument("--max-prompt-tokens", type=int, default=2048, help="longer scaled prompts are left out")
    p.add_argument("--time-scale", type=float, default=0.06, help="trace seconds -> replay seconds")
    p.add_argument("--vocab", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(REPO / "benchmark" / "results"))
    return p


def main() -> int:
    a = make_parser().parse_args()
    convs = build_workload(a)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    for m in modes:
        mode_features(m)
    model = a.model_path or demo_model()
    n_turns = sum(len(c) for c in convs)
    multi = sum(1 for c in convs if len(c) > 1)
    span = max(t.arrival_s for c in convs for t in c)
    scale = TRACE_BLOCK_TOKENS / a.block_tokens
    desc = (f"Mooncake synthetic: {multi} conversations ({sum(len(c) for c in convs if len(c) > 1)} turns) + "
            f"{len(convs) - multi} one-off prompts over {span:.0f} s (trace time x{a.time_scale}); lengths / "
            f"{scale:g} ({a.block_tokens} tokens per 512-token block), outputs / {a.output_scale:g} (<= "
            f"{a.max_output_tokens}); dp {a.dp_size} CPU, {a.max_total_tokens} KV tokens per instance, page "
            f"{a.page_size}; {cpu_model_name()}")
    print(desc)
    print(f"{n_turns} requests, {sum(len(t.input_ids) for c in convs for t in c)} prompt tokens")
    runs = []
    for m in modes:
        r = run_mode(m, convs, a, model)
        print(f"  {m}: {r['makespan_s']:.1f} s", flush=True)
        runs.append(r)
    print(table(runs))
    for r in runs:
        if r["host_reload_cut_pages"]:
            print(f"{r['mode']}: {r['host_reload_cut_pages']} host pages not reloaded for lack of device room")
    if len(runs) > 1:
        print(f"same greedy tokens as mode {runs[0]['mode']!r} for every turn: {same_outputs(runs)}")
    png = plot(runs, Path(a.out_dir) / "bench_multiturn.png", desc)
    if png:
        print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
