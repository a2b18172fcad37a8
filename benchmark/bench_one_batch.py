"""Prefill / decode throughput of one static batch: our ModelRunner (TP1, TP2) vs transformers' generate.

Like SGLang's bench_one_batch, this drives the engine's forward path directly (no HTTP, tokenizer or
scheduler): a ModelRunner gets hand-built ForwardBatches.

    checkpoint  <- sglang.srt.demo_model.make_demo_model (a "small" Llama shape by default) or --model-path
    TP1         ModelRunner in this process, torch threads = --threads (default: all cores); one runner (a row per
                batch size) per --attention-backends entry (cpu: sgl_kernel's paged attention, torch_native: the
                torch reference)
    TP2         torch.multiprocessing.spawn 2 ranks (gloo rendezvous), each a ModelRunner with 1 thread per rank
                (cores / ranks); both run the same batches in lockstep, rank 0 times; the forward pass's
                all-reduce / all-gather over shared memory and/or gloo (--tp-collectives, a row each, for each
                --attention-backends entry)
    baseline    transformers AutoModelForCausalLM on the same directory, same dtype and thread count as TP1

Per batch size B (each measured --repeats times after one warm-up):
    prefill     one ForwardBatch of B requests x input_len tokens on fresh pages, logits of the last tokens
                -> prefill tok/s = B * input_len / time
    decode      output_len steps of B tokens (one per request, greedy argmax of the previous step, page
                tables growing) -> decode tok/s = B / step time
                (timed: ModelRunner.forward + argmax; building the ForwardBatch on the host is timed separately)
    baseline    prefill = model(ids[B, input_len], use_cache=True, logits_to_keep=1);
                decode = generate(max_new_tokens=min_new_tokens=output_len, greedy, use_cache=True) minus its
                prefill, per token: per-step times from a StoppingCriteria callback (generate's first token comes
                from its prefill forward, so output_len - 1 decode steps)
    TP1 and the baseline run interleaved per batch size (same machine load); decode step time = median step
    of a run, best of --repeats runs; prefill = best run. JSON keeps every run.
    roofline    decode is memory bound: bytes read per step = weights (all but the input embedding) [+ the KV
                cache of the batch] ; measured copy bandwidth (a large torch tensor copy, read + write bytes)
                -> max decode steps/s = bandwidth / bytes per step

Outputs: a markdown table on stdout, and under --result-dir (default benchmark/results/, gitignored)
bench_one_batch.json (raw numbers), bench_one_batch.md (the table) and bench_one_batch.png (plot).

    python benchmark/bench_one_batch.py                       # defaults: TP1+TP2, B=1,4,16,64, in 128, out 32
    python benchmark/bench_one_batch.py --batch-sizes 1 8 --tp-sizes 1 --output-len 16 --skip-hf
    python benchmark/bench_one_batch.py --device cuda --tp-sizes 1 --attention-backends triton torch_native \
        --dtype bfloat16                                      # one GPU (scripts/gpu_check.sh); copy bandwidth
                                                              # and timings on the GPU (synchronized)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import cpu_model_name  # noqa: E402

# ---------------------------------------------------------------------------------------------------------
# set-up helpers
# ---------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-path", default=None, help="existing HF checkpoint; default: build a demo model")
    p.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "sglang-bench-one-batch-llama"),
                   help="where the demo checkpoint is written (reused if the spec matches)")
    p.add_argument("--arch", default="llama", choices=["llama", "mistral", "qwen2", "qwen3"])
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=8)
    p.add_argument("--num-kv-heads", type=int, default=4)
    p.add_argument("--intermediate-size", type=int, default=1376)
    p.add_argument("--vocab-size", type=int, default=512, help="demo tokenizer vocabulary target")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--tp-sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tp-collectives", nargs="+", default=["shm"], choices=["shm", "gloo"],
                   help="TP>1 collectives to run (each a row per batch size): shared memory (sgl_kernel) and/or gloo")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where TP1 and transformers run (cuda: the current GPU; TP > 1 is CPU-only here)")
    p.add_argument("--attention-backends", nargs="+", default=["cpu"], choices=["cpu", "torch_native", "triton"],
                   help="--attention-backend of the runners (each a row per batch size)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads of the TP1 runner and of transformers; TP>1 ranks get threads // tp (>= 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (after one warm-up)")
    p.add_argument("--skip-hf", action="store_true", help="do not run the transformers baseline")
    p.add_argument("--result-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.output_len < 2:
        p.error("--output-len must be >= 2")
    if args.device == "cuda" and (any(t > 1 for t in args.tp_sizes) or not torch.cuda.is_available()):
        p.error("--device cuda needs a CUDA device and --tp-sizes 1 (the TP2 rows are gloo processes on CPU)")
    return args


def sync_device(device: str) -> None:
    """Wait for the device's queued work (timings on CUDA end when the GPU is done, not when launched)."""
    if device == "cuda":
        torch.cuda.synchronize()


def build_model(args) -> str:
    if args.model_path:
        return args.model_path
    from sglang.srt.demo_model import DemoModelSpec, make_demo_model

    spec = DemoModelSpec(arch=args.arch, hidden_size=args.hidden_size, num_hidden_layers=args.num_layers,
                         num_attention_heads=args.num_heads, num_key_value_heads=args.num_kv_heads,
                         intermediate_size=args.intermediate_size, vocab_size=args.vocab_size,
                         max_position_embeddings=max(4096, args.input_len + args.output_len + 1))
    return make_demo_model(args.model_dir, spec)


def model_facts(path: str) -> Dict:
    """Shape and byte counts of the checkpoint (from config.json and the safetensors headers)."""
    from safetensors import safe_open

    cfg = json.load(open(os.path.join(path, "config.json")))
    tensors = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    n = 1
                    for d in sl.get_shape():
                        n *= d
                    tensors[key] = n
    num_params = sum(tensors.values())
    embed = sum(n for k, n in tensors.items() if k.endswith("embed_tokens.weight"))
    tied = not any(k.endswith("lm_head.weight") for k in tensors)
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    return {
        "architecture": cfg["architectures"][0],
        "hidden_size": cfg["hidden_size"], "num_layers": cfg["num_hidden_layers"], "num_heads": heads,
        "num_kv_heads": kv_heads, "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // heads,
        "intermediate_size": cfg["intermediate_size"], "vocab_size": cfg["vocab_size"],
        "num_params": num_params,
        # weights a decode step streams from memory: everything but the embedding table (only B rows of it
        # are read), unless it doubles as the lm_head
        "decode_weight_params": num_params - (0 if tied else embed),
    }


def measure_copy_bandwidth(threads: int, nbytes: int = 512 * 2**20, repeats: int = 5, device: str = "cpu") -> float:
    """Bytes/s moved by dst.copy_(src) of a large float32 tensor (read + write counted), best of `repeats`."""
    torch.set_num_threads(threads)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        sync_device(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync_device(device)
        best = min(best, time.perf_counter() - t)
    del src, dst
    return 2 * nbytes / best


def input_ids(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=gen)


# ---------------------------------------------------------------------------------------------------------
# our runtime
# ---------------------------------------------------------------------------------------------------------


def _pages_per_req(args) -> int:
    return -(-(args.input_len + args.output_len + 1) // args.page_size)


def make_runner(args, path: str, tp_group, tp_size: int, threads: int, attention_backend: str):
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_executor.model_runner import ModelRunner
    from sglang.srt.server_args import ServerArgs

    # each request of the largest batch owns its own pages (after the pages the packed weights occupy)
    need_pages = max(args.batch_sizes) * _pages_per_req(args)
    sa = ServerArgs(model_path=path, tp_size=tp_size, page_size=args.page_size, dtype=args.dtype,
                    device_memory="16GiB", max_total_tokens=need_pages * args.page_size,
                    cpu_threads_per_worker=threads, attention_backend=attention_backend)
    runner = ModelRunner(sa, ModelConfig.from_server_args(sa), tp_group, args.device if tp_size == 1 else "cpu",
                         show_progress=False)
    if runner.num_pages - runner.reserved_pages < need_pages:
        raise RuntimeError(f"KV pool has {runner.num_pages - runner.reserved_pages} free pages, the benchmark "
                           f"needs {need_pages}")
    return runner


def summarize(bs: int, args, prefill_s: List[float], step_runs: List[List[float]], **extra) -> Dict:
    """Best run of each: prefill = fastest run; decode step = the run with the smallest median step time
    (the median resists the odd step stalled by another process on a shared machine)."""
    step_medians = [statistics.median(s) for s in step_runs]
    best_prefill, best_step = min(prefill_s), min(step_medians)
    return dict({
        "batch_size": bs, "prefill_s": prefill_s, "decode_step_s_runs": step_runs,
        "prefill_tok_s": bs * args.input_len / best_prefill,
        "prefill_tok_s_median_run": bs * args.input_len / statistics.median(prefill_s),
        "decode_step_ms": 1e3 * best_step,
        "decode_step_ms_median_run": 1e3 * statistics.median(step_medians),
        "decode_step_ms_mean_best_run": 1e3 * min(statistics.fmean(s) for s in step_runs),
        "decode_tok_s": bs / best_step,
    }, **extra)


def _report(tag: str, r: Dict) -> None:
    print(f"  {tag:<14} B={r['batch_size']:3d}: prefill {r['prefill_tok_s']:9.0f} tok/s, decode "
          f"{r['decode_tok_s']:8.0f} tok/s ({r['decode_step_ms']:.2f} ms/step)", flush=True)


def runner_one(args, runner, tp_group, bs: int) -> Dict:
    """One batch size on our ModelRunner. Every rank calls this in lockstep; rank 0's timings count."""
    from sglang.srt.model_executor.forward_batch import ForwardBatch

    vocab = runner.model_config.vocab_size
    ps, ppr = args.page_size, _pages_per_req(args)
    sync = tp_group.barrier  # lockstep: every rank starts each timed region together
    ids = input_ids(bs, args.input_len, vocab).tolist()
    first = runner.reserved_pages  # pages below hold the weights (WeightStore arena)
    pages = [list(range(first + b * ppr, first + (b + 1) * ppr)) for b in range(bs)]
    n_prefill_pages = -(-args.input_len // ps)
    prefill_batch = ForwardBatch.build(ids, [0] * bs, [p[:n_prefill_pages] for p in pages], logits="last")

    prefill_s, step_runs, build_s = [], [], []
    for rep in range(args.repeats + 1):  # rep 0 is the warm-up
        sync()
        t = time.perf_counter()
        logits = runner.forward(prefill_batch)
        next_tok = logits.argmax(-1)
        sync_device(logits.device.type)
        dt = time.perf_counter() - t
        steps = []
        for i in range(args.output_len):
            pos = args.input_len + i  # position of the token fed in this step
            tb = time.perf_counter()
            batch = ForwardBatch.build([[int(x)] for x in next_tok.tolist()], [pos] * bs,
                                       [p[: pos // ps + 1] for p in pages])
            if rep:
                build_s.append(time.perf_counter() - tb)
            sync()
            t = time.perf_counter()
            logits = runner.forward(batch)
            next_tok = logits.argmax(-1)
            sync_device(logits.device.type)
            steps.append(time.perf_counter() - t)
        if rep:
            prefill_s.append(dt)
            step_runs.append(steps)
    return summarize(bs, args, prefill_s, step_runs, host_batch_build_ms=1e3 * statistics.median(build_s))


def load_hf(args, path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).to(args.device).eval()


def hf_one(args, model, bs: int) -> Dict:
    """One batch size on transformers. Prefill: a plain forward. Decode: generate(), whose per-step times
    come from a StoppingCriteria callback (called once after each forward): the first call ends generate's
    own prefill, so (end - first call) / (output_len - 1) is "generate minus prefill" per token, measured
    within the same call; a separately timed prefill is too noisy to subtract on a shared machine."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Stamps(StoppingCriteria):
        def __init__(self):
            self.t = []

        def __call__(self, input_ids, scores, **kwargs):
            sync_device(input_ids.device.type)
            self.t.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    torch.set_num_threads(args.threads)
    cfg = model.config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
    ids = input_ids(bs, args.input_len, cfg.vocab_size).to(args.device)
    mask = torch.ones_like(ids)
    prefill_s, step_runs, gen_s, gen_minus_prefill = [], [], [], []
    for rep in range(args.repeats + 1):
        with torch.inference_mode():
            t = time.perf_counter()
            logits = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1).logits
            logits[:, -1].argmax(-1)
            sync_device(args.device)
            dt = time.perf_counter() - t
            stamps = Stamps()
            t = time.perf_counter()
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.output_len,
                                 min_new_tokens=args.output_len, do_sample=False, use_cache=True,
                                 pad_token_id=pad, stopping_criteria=StoppingCriteriaList([stamps]))
            t_end = time.perf_counter()
        assert gen.shape == (bs, args.input_len + args.output_len), gen.shape
        assert len(stamps.t) == args.output_len, len(stamps.t)
        if rep:
            prefill_s.append(dt)
            gen_s.append(t_end - t)
            gen_minus_prefill.append((t_end - stamps.t[0]) / (args.output_len - 1))
            step_runs.append([b - a for a, b in zip(stamps.t, stamps.t[1:])])
    return summarize(bs, args, prefill_s, step_runs, generate_s=gen_s,
                     generate_minus_prefill_per_token_s=gen_minus_prefill)


def bench_local(args, path: str, run_ours: bool, run_hf: bool) -> Dict[str, List[Dict]]:
    """TP1 runner and transformers in this process, interleaved per batch size so that both see the same
    machine load."""
    from sglang.srt.distributed.parallel_state import get_tp_group

    group = get_tp_group([0])
    runners = {b: make_runner(args, path, group, 1, args.threads, b) for b in args.attention_backends} if run_ours \
        else {}
    model = load_hf(args, path) if run_hf else None
    out = {"transformers": [], **{b: [] for b in runners}}
    for bs in args.batch_sizes:
        for backend, runner in runners.items():
            torch.set_num_threads(args.threads)
            out[backend].append(runner_one(args, runner, group, bs))
            _report(f"sglang {backend} TP1", out[backend][-1])
        if model is not None:
            out["transformers"].append(hf_one(args, model, bs))
            _report("transformers", out["transformers"][-1])
    return out


def _tp_worker(rank: int, world: int, port: int, args, path: str, out_file: str, collective: str,
               attention_backend: str) -> None:
    from sglang.srt.distributed.parallel_state import (create_aligned_groups, destroy_distributed, get_tp_group,
                                                       init_distributed)

    threads = max(1, args.threads // world)
    torch.set_num_threads(threads)
    init_distributed(world, rank, f"tcp://127.0.0.1:{port}", "gloo")
    create_aligned_groups(world, collective)
    group = get_tp_group(list(range(world)))
    runner = make_runner(args, path, group, world, threads, attention_backend)
    results = []
    for bs in args.batch_sizes:
        results.append(runner_one(args, runner, group, bs))
        if rank == 0:
            _report(f"sglang {attention_backend} TP{world} ({collective})", results[-1])
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(results, f)
    group.barrier()
    destroy_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_tp(args, path: str, tp: int, collective: str, attention_backend: str) -> List[Dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "rank0.json")
        mp.spawn(_tp_worker, args=(tp, _free_port(), args, path, out_file, collective, attention_backend), nprocs=tp,
                 join=True)
        with open(out_file) as f:
            return json.load(f)


# ---------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------


def add_roofline(rows: List[Dict], facts: Dict, args, bandwidth: float) -> None:
    elem = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    weight_bytes = facts["decode_weight_params"] * elem
    kv_per_token = facts["num_layers"] * 2 * facts["num_kv_heads"] * facts["head_dim"] * elem
    mean_ctx = args.input_len + (args.output_len + 1) / 2  # keys attended per request, averaged over the steps
    for r in rows:
        kv_bytes = r["batch_size"] * mean_ctx * kv_per_token
        r["roofline_weights_steps_s"] = bandwidth / weight_bytes
        r["roofline_weights_kv_steps_s"] = bandwidth / (weight_bytes + kv_bytes)
        r["decode_steps_s"] = 1e3 / r["decode_step_ms"]
        r["pct_of_roofline_weights_kv"] = 100 * r["decode_steps_s"] / r["roofline_weights_kv_steps_s"]


def markdown_table(rows: List[Dict]) -> str:
    head = ("| runtime | TP | batch | prefill tok/s | decode tok/s | decode step ms | decode steps/s | "
            "roofline steps/s (weights) | roofline steps/s (weights+KV) | % of weights+KV roofline |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['runtime']} | {r['tp']} | {r['batch_size']} | {r['prefill_tok_s']:,.0f} | "
                     f"{r['decode_tok_s']:,.0f} | {r['decode_step_ms']:.2f} | {r['decode_steps_s']:.1f} | "
                     f"{r['roofline_weights_steps_s']:.1f} | {r['roofline_weights_kv_steps_s']:.1f} | "
                     f"{r['pct_of_roofline_weights_kv']:.0f}% |")
    return "\n".join(lines)


def plot(rows: List[Dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    series = {}
    for r in rows:
        series.setdefault(f"{r['runtime']} TP{r['tp']}", []).append(r)
    for label, rs in series.items():
        bs = [r["batch_size"] for r in rs]
        axes[0].plot(bs, [r["prefill_tok_s"] for r in rs], marker="o", label=label)
        axes[1].plot(bs, [r["decode_tok_s"] for r in rs], marker="o", label=label)
    first = next(iter(series.values()))
    bs = [r["batch_size"] for r in first]
    axes[1].plot(bs, [b * r["roofline_weights_kv_steps_s"] for b, r in zip(bs, first)], "k--",
                 label="memory roofline (weights+KV)")
    axes[1].plot(bs, [b * r["roofline_weights_steps_s"] for b, r in zip(bs, first)], "k:",
                 label="memory roofline (weights only)")
    for ax, name in zip(axes, ["prefill", "decode"]):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(bs, [str(b) for b in bs])
        ax.set_xlabel("batch size")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{name} throughput")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine_info(threads: int, device: str = "cpu") -> Dict:
    cpu = cpu_model_name()
    import transformers

    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv=None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    path = build_model(args)
    facts = model_facts(path)
    machine = machine_info(args.threads, args.device)
    print(f"model {path}: {facts['architecture']} hidden {facts['hidden_size']}, {facts['num_layers']} layers, "
          f"{facts['num_heads']} heads / {facts['num_kv_heads']} kv, intermediate {facts['intermediate_size']}, "
          f"vocab {facts['vocab_size']}, {facts['num_params'] / 1e6:.1f}M params, {args.dtype}", flush=True)
    print(f"machine: {machine}", flush=True)

    bandwidth = measure_copy_bandwidth(args.threads, device=args.device)
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s (read + write)", flush=True)

    rows: List[Dict] = []
    load_before = os.getloadavg()
    print(f"sglang ModelRunner TP1{'' if args.skip_hf else ' and transformers (interleaved)'}:", flush=True)
    local = bench_local(args, path, 1 in args.tp_sizes, not args.skip_hf)
    for backend in args.attention_backends:
        rows += [dict(r, runtime=f"sglang {backend}", tp=1) for r in local.get(backend, [])]
    for tp in args.tp_sizes:
        for backend in (args.attention_backends if tp > 1 else []):
            for collective in args.tp_collectives:
                print(f"sglang ModelRunner TP{tp} ({tp} processes, {backend} attention, {collective} collectives):",
                      flush=True)
                rows += [dict(r, runtime=f"sglang {backend} {collective}", tp=tp)
                         for r in bench_tp(args, path, tp, collective, backend)]
    rows += [dict(r, runtime="transformers", tp=1) for r in local["transformers"]]
    machine["loadavg_before_after"] = [list(load_before), list(os.getloadavg())]
    add_roofline(rows, facts, args, bandwidth)

    table = markdown_table(rows)
    print()
    print(table)
    os.makedirs(args.result_dir, exist_ok=True)
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0])] + (sys.argv[1:] if argv is None else list(argv)))
    result = {"command": cmd, "args": vars(args), "model": facts, "machine": machine,
              "copy_bandwidth_bytes_s": bandwidth, "wall_s": time.perf_counter() - t_start, "results": rows}
    with open(os.path.join(args.result_dir, "bench_one_batch.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.result_dir, "bench_one_batch.md"), "w") as f:
        f.write(table + "\n")
    if not args.no_plot:
        title = (f"{facts['architecture']} h{facts['hidden_size']} L{facts['num_layers']} "
                 f"({facts['num_params'] / 1e6:.1f}M params, {args.dtype}), in {args.input_len} / out "
                 f"{args.output_len}; {machine.get('gpu') or machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}")
        plot(rows, os.path.join(args.result_dir, "bench_one_batch.png"), title)
    print(f"\nwrote {args.result_dir}/bench_one_batch.{{json,md" + ("" if args.no_plot else ",png") +
          f"}} in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
