"""Measure the engine's step time and transformation cost on this machine, fit the cost models, write the file
that `python -m gyges.sim.simulator --step-model` and the server's `--gyges-cost-model` load.

    python benchmark/measure_costs.py --model-path DIR --out FILE.json [--tp 1 2] [--quick]

One in-process engine (`sglang.Engine`) does everything, the way a Gyges server runs:

    Engine(dp_size=D, enable_gyges=True, gyges_policy="manual")     D = max(--tp) devices, all at TP1
      for each TP t in --tp (ascending):
          empty the prefix cache, merge every aligned group of t devices into one TP-t instance
                                                                           -> transformation points
          step cases (below), D / t copies of each request batch at once -> step points at TP t
      split back down to TP1, one degree at a time                         -> transformation points
      fill the prefix cache with K tokens per instance, merge, split       -> more transformation points

A step case (b, P, S, N): every instance gets b requests whose first P tokens are a prefix already in its
radix cache (P = 0: none) followed by S fresh tokens; the manual policy spreads equal requests evenly over
the instances (least loaded first), so every instance runs the same batch at the same time, as under load.
Cases that need more KV than an instance holds (--max-total-tokens: the server's setting) are skipped.
Two calls per case, each timed around `Engine.generate` (median of --repeats runs; --statistic min: the best):

    max_new_tokens = 1       one prefill iteration: b*S new tokens over b*(P+S) context tokens
                             (+ the request's way through tokenizer manager, controller, detokenizer)
    max_new_tokens = N + 1   the same prefill, then N decode iterations of b tokens; the difference of the
                             two calls / N is one decode step over b*(P+S+(N+1)/2) context tokens

The fit (gyges.costmodel.fit_step_time, scipy NNLS) takes the per-call overhead as one extra unknown of the
prefill points (it is not part of a step: the simulator adds no such term). Transformations: each merge or
split's breakdown gives (kv_bytes + weight_bytes moved, devices, pause_ms) -> fit_transform_cost.
KV bytes per token and weight bytes come from the checkpoint (model_sizes).

Output: a table of measured against fitted step times with the relative error (stdout), and FILE.json in the
format of gyges/gyges/costmodel.py's docstring, with every raw measurement under "fit".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from gyges.costmodel import StepPoint, TransformCostModel, fit_step_time, fit_transform_cost, save_models
from gyges.heads import pad_heads

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import cpu_model_name  # noqa: E402

_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "float64": 8}
def attention_padding(attention_backend: Optional[str], device: str, dtype: str) -> float:
    """StepTimeModel.padding of the attention backend the engine runs with these flags on this machine: 0 for
    sgl_kernel's CPU paged attention (the default on CPU since it builds: no padding between requests) and the
    Triton kernels, 1 for the torch-native backend (layers/attention/torch_native_backend.py gathers [sequences,
    longest context] keys and runs SDPA on [sequences, longest new tokens] queries: a mixed batch costs as if
    every sequence were the longest). It matters only for mixed batches (a long prefill chunk or a long context
    beside short decodes), which the grid's uniform cases cannot show, so it is set, not fitted: with 1 on the
    CPU backend, the simulated bench_traces Gyges run stays merged for 430 s where the live one splits back 10
    times."""
    import torch
    from sglang.srt.layers.attention.selection import resolve_attention_backend

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        str(dtype), torch.float32)
    return 1.0 if resolve_attention_backend(attention_backend, device, torch_dtype) == "torch_native" else 0.0


# =====================================================================================================
# The checkpoint
# =====================================================================================================
def model_sizes(model_path: str, dtype: Optional[str] = None, granularity: int = 1) -> Tuple[float, float]:
    """(KV bytes per token over all layers and KV heads, weight bytes) of an HF checkpoint directory, at
    `dtype` (default: the checkpoint's own dtype). KV heads are those the engine stores when its largest TP
    degree is `granularity` (gyges.heads: padded to a multiple of it, the real ones when it divides them)."""
    cfg = _config(model_path)
    layers = int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = pad_heads(heads, int(cfg.get("num_key_value_heads") or heads), granularity).padded_kv_heads
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    ckpt_dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").replace("torch.", "")
    want = ckpt_dtype if dtype in (None, "auto") else dtype.replace("torch.", "")
    nbytes = _DTYPE_BYTES.get(want, 4)
    stored = sum(os.path.getsize(os.path.join(model_path, n)) for n in os.listdir(model_path)
                 if n.endswith(".safetensors"))
    weight_bytes = stored * nbytes / _DTYPE_BYTES.get(ckpt_dtype, 4)
    return float(2 * layers * kv_heads * head_dim * nbytes), float(weight_bytes)


def _config(model_path: str) -> dict:
    with open(os.path.join(model_path, "config.json")) as f:
        cfg = json.load(f)
    return cfg.get("text_config", cfg)


# =====================================================================================================
# What is measured
# =====================================================================================================
@dataclass(frozen=True)
class StepCase:
    batch: int  # requests per instance
    prefix: int  # tokens of each prompt already in the instance's radix cache (a multiple of the page size)
    suffix: int  # fresh prompt tokens of each request (<= the chunked-prefill size: one prefill iteration)
    decode_steps: int  # N


def step_cases(quick: bool) -> List[StepCase]:
    """The grid: batch x cached prefix x fresh tokens. Quick: fewer points, shorter contexts."""
    if quick:
        return [StepCase(b, p, s, 16) for b in (1, 8) for p in (0, 512) for s in (16, 256)]
    return [StepCase(b, p, s, 32) for b in (1, 4, 16) for p in (0, 256, 2048) for s in (16, 512)]


def kv_tokens_needed(case: StepCase) -> int:
    """KV tokens a case holds on one instance at its peak: the shared prefix once, each request's own tokens."""
    return case.prefix + case.batch * (case.suffix + case.decode_steps + 1)


def fill_tokens(quick: bool) -> List[int]:
    """KV tokens cached per instance before the extra merge/split pairs (bytes moved vary with them)."""
    return [8192] if quick else [4096, 32768]


# =====================================================================================================
# Measuring on the engine
# =====================================================================================================
def start_engine(args, devices: int):
    """The engine measured: `devices` TP1 instances, Gyges on, transformations by hand (manual policy)."""
    import sglang

    kw = dict(model_path=args.model_path, device=args.device, dtype=args.dtype, page_size=args.page_size,
              log_level="warning", dp_size=devices, enable_gyges=True, gyges_policy="manual", gyges_max_tp=devices)
    if args.threads_per_device:
        kw["cpu_threads_per_worker"] = args.threads_per_device
    if args.device_memory:
        kw["device_memory"] = args.device_memory
    if args.max_total_tokens:
        kw["max_total_tokens"] = args.max_total_tokens
    if args.attention_backend:
        kw["attention_backend"] = args.attention_backend
    return sglang.Engine(**kw)


class EngineProbe:
    """Times generate calls and transformations on a Gyges engine of `devices` devices (anything with
    sglang.Engine's generate / gyges_topology / gyges_transform / flush_cache / shutdown)."""

    def __init__(self, engine, devices: int, vocab: int, page_size: int, seed: int = 0, clock=time.perf_counter):
        self.engine = engine
        self.devices = devices
        self.vocab = vocab
        self.page_size = page_size
        self.rng = random.Random(seed)
        self.clock = clock
        self.transforms: List[Dict] = []  # every breakdown, in order

    def close(self) -> None:
        self.engine.shutdown()

    def tokens(self, n: int) -> List[int]:
        return [self.rng.randrange(3, self.vocab) for _ in range(n)]

    def instances(self) -> int:
        return len(self.engine.gyges_topology()["instances"])

    def generate(self, prompts: List[List[int]], max_new: int) -> float:
        """Seconds for one generate call of all prompts (ignore_eos: exactly max_new tokens each)."""
        t = self.clock()
        self.engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": max_new, "ignore_eos": True})
        return self.clock() - t

    def transform(self, devices: List[int], tp: int) -> Dict:
        b = self.engine.gyges_transform(devices, tp)
        self.transforms.append(b)
        return b

    def set_tp(self, tp: int) -> None:
        """Merge or split every aligned group of tp devices into one instance of TP tp."""
        topo = self.engine.gyges_topology()["instances"]
        now = {int(i["tp"]) for i in topo}
        assert len(now) == 1, f"mixed topology {topo}"
        cur = now.pop()
        if cur == tp:
            return
        if tp > cur:  # merge
            for g in range(0, self.devices, tp):
                self.transform(list(range(g, g + tp)), tp)
        else:  # split one degree at a time (cur -> cur/2 -> ... -> tp)
            t = cur
            while t > tp:
                for g in range(0, self.devices, t):
                    self.transform(list(range(g, g + t)), t // 2)
                t //= 2

    def warm(self) -> None:
        n = self.instances()
        for _ in range(2):
            self.generate([[1] + self.tokens(15) for _ in range(n)], 4)

    def kv_capacity(self) -> Optional[int]:
        """The smallest instance's KV capacity in tokens (None: not reported)."""
        caps = [int(i.get("kv_capacity_tokens") or 0) for i in self.engine.gyges_topology()["instances"]]
        return min(caps) if caps and min(caps) > 0 else None

    def step_case(self, case: StepCase, repeats: int) -> Dict:
        """Time one case on every instance at once (module docstring). Returns the raw timings."""
        n = self.instances()
        prefix = [1] + self.tokens(case.prefix - 1) if case.prefix else []
        if prefix:  # one copy per instance: the least-loaded placement gives each instance its own
            self.generate([prefix + self.tokens(1) for _ in range(n)], 1)
        one, many = [], []
        for _ in range(repeats):
            fresh = lambda: [(prefix or [1]) + self.tokens(case.suffix - (0 if prefix else 1))  # noqa: E731
                             for _ in range(case.batch * n)]
            one.append(self.generate(fresh(), 1))
            many.append(self.generate(fresh(), case.decode_steps + 1))
        return {"case": asdict(case), "instances": n, "prefill_call_s": one, "decode_call_s": many}

    def fill(self, tokens_per_instance: int, prompt_len: int = 512) -> None:
        """Cache about tokens_per_instance KV tokens on every instance (distinct prompts, 1 token each)."""
        n = self.instances()
        k = max(1, tokens_per_instance // prompt_len)
        for start in range(0, k, 16):
            batch = min(16, k - start)
            self.generate([[1] + self.tokens(prompt_len - 1) for _ in range(batch * n)], 1)


STATISTICS = {"median": statistics.median, "min": min}


def step_points(raw: Dict, tp: int, statistic: str = "median") -> List[StepPoint]:
    """The prefill and the decode point of one case's timings (the median run of each by default: the time a
    loaded machine gives, which a live run sees too; "min": the least disturbed run)."""
    c = StepCase(**raw["case"])
    b, ctx = c.batch, c.prefix + c.suffix
    stat = STATISTICS[statistic]
    t1, tn = stat(raw["prefill_call_s"]), stat(raw["decode_call_s"])
    pts = [StepPoint(b * c.suffix, b * ctx, tp, t1, requests=b, with_call_overhead=True)]
    decode = (tn - t1) / c.decode_steps
    if decode > 0:
        pts.append(StepPoint(b, b * (ctx + (c.decode_steps + 1) / 2), tp, decode, requests=b))
    return pts


def transform_points(breakdowns: Sequence[Dict]) -> List[Tuple[float, int, float]]:
    """(bytes moved, devices, seconds paused) of every merge and split."""
    return [(float(b["kv_bytes"] + b["weight_bytes"]), len(b["devices"]), b["pause_ms"] / 1e3)
            for b in breakdowns]


def run_probe(probe: EngineProbe, tps: Sequence[int], cases: Sequence[StepCase], repeats: int,
              fills: Sequence[int], log=print, max_kv_tokens: Optional[int] = None) -> Dict:
    """Every measurement on one probe (module docstring): the step cases at each TP in tps (those that fit the
    instances' KV, and max_kv_tokens when given), then a merge to max(tps) and a split back to TP1 after filling
    the prefix cache with each of `fills` tokens per instance. Returns the raw data (steps per TP, breakdowns)."""
    raw: Dict = {"steps": {}, "transforms": []}
    for tp in sorted(set(tps)):
        probe.engine.flush_cache()  # transformations move cached KV too: only the fills below choose how much
        probe.set_tp(tp)
        probe.warm()
        t0 = time.perf_counter()
        caps = [c for c in (probe.kv_capacity(), max_kv_tokens) if c]
        cap = min(caps) if caps else None
        fit = [c for c in cases if cap is None or kv_tokens_needed(c) <= cap]  # the server's regime only
        raw["steps"][str(tp)] = [probe.step_case(c, repeats) for c in fit]
        log(f"TP{tp}: {len(fit)} step cases ({len(cases) - len(fit)} need more than the {cap} KV tokens of an "
            f"instance) on {probe.instances()} instance(s) in {time.perf_counter() - t0:.0f} s")
    probe.engine.flush_cache()
    probe.set_tp(1)
    if max(tps) > 1:
        for k in fills:
            probe.engine.flush_cache()
            probe.fill(k)
            probe.set_tp(max(tps))
            probe.set_tp(1)
        log(f"{len(probe.transforms)} transformations")
    raw["transforms"] = probe.transforms
    return raw


def measure(args, log=print, engine_factory=start_engine, clock=time.perf_counter) -> Dict:
    """Run every measurement on an engine from engine_factory(args, devices); returns the raw data."""
    tps = sorted(set(args.tp))
    devices = max(tps)
    vocab = int(_config(args.model_path).get("vocab_size", 512))
    probe = EngineProbe(engine_factory(args, devices), devices, vocab, args.page_size, clock=clock)
    try:
        return run_probe(probe, tps, step_cases(args.quick), args.repeats or (2 if args.quick else 3),
                         fill_tokens(args.quick), log)
    finally:
        probe.close()


# =====================================================================================================
# Fit and report
# =====================================================================================================
def fit_all(raw: Dict, model_path: str, dtype: str, padding: float, statistic: str = "median"
            ) -> Tuple[dict, List[Tuple[StepPoint, float]]]:
    """Fit both models to the raw measurements; returns what save_models wrote's parts and the step points
    with their fitted times. padding: the measured backend's attention padding (attention_padding)."""
    pts = [p for tp, cases in raw["steps"].items() for c in cases for p in step_points(c, int(tp), statistic)]
    step, step_report = fit_step_time(pts)
    step = dataclasses.replace(step, padding=padding)
    kvt, wb = model_sizes(model_path, dtype, max(int(tp) for tp in raw["steps"]) if raw["steps"] else 1)
    base = TransformCostModel(kv_bytes_per_token=kvt, weight_bytes=wb)
    tr_pts = transform_points(raw["transforms"])
    transform, tr_report = (fit_transform_cost(tr_pts, base) if tr_pts else (base, None))
    fitted = [(p, step.step_time(int(p.batch_tokens), int(p.context_tokens), p.tp, requests=p.requests)
               + (step_report.get("call_overhead_s", 0.0) if p.with_call_overhead else 0.0)) for p in pts]
    return {"step": step, "transform": transform, "step_report": step_report, "transform_report": tr_report,
            "transform_points": tr_pts}, fitted


def table(fitted: List[Tuple[StepPoint, float]]) -> str:
    head = "| kind | TP | requests | batch tokens | context tokens | measured ms | fitted ms | rel. error |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for p, f in fitted:
        kind = "prefill (+call)" if p.with_call_overhead else "decode"
        lines.append(f"| {kind} | {p.tp} | {p.requests} | {p.batch_tokens:,.0f} | {p.context_tokens:,.0f} | "
                     f"{p.seconds * 1e3:.2f} | {f * 1e3:.2f} | {(f - p.seconds) / p.seconds:+.1%} |")
    return "\n".join(lines)


def summary_table(fitted: List[Tuple[StepPoint, float]]) -> str:
    """Relative error of the fit per TP degree and kind of step."""
    groups: Dict[Tuple[int, str], List[float]] = {}
    for p, f in fitted:
        kind = "prefill (+call)" if p.with_call_overhead else "decode"
        groups.setdefault((p.tp, kind), []).append((f - p.seconds) / p.seconds)
    lines = ["| TP | kind | points | measured ms (min-max) | rms rel. error | max rel. error |", "|---|---|---|---|---|---|"]
    for (tp, kind), errs in sorted(groups.items()):
        ms = [p.seconds * 1e3 for p, _ in fitted if p.tp == tp and p.with_call_overhead == kind.startswith("prefill")]
        rms = (sum(e * e for e in errs) / len(errs)) ** 0.5
        lines.append(f"| {tp} | {kind} | {len(errs)} | {min(ms):.2f}-{max(ms):.2f} | {rms:.1%} | "
                     f"{max(abs(e) for e in errs):.1%} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-path", required=True, help="HF checkpoint directory (the model that will be served)")
    p.add_argument("--out", required=True, help="model file to write (JSON)")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2],
                   help="TP degrees to measure; the engine uses max(--tp) devices")
    p.add_argument("--quick", action="store_true", help="a smaller grid (about a minute on the demo model)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per call (default 3, quick 2)")
    p.add_argument("--statistic", default="median", choices=sorted(STATISTICS),
                   help="which of the repeated runs a point takes: median (what a loaded machine gives, as a live "
                        "run on it sees) or min (the least disturbed)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", help="dtype the model is served in")
    p.add_argument("--attention-backend", default=None, choices=["torch_native", "cpu", "triton"],
                   help="attention backend the model is served with (default: the server's default for the device); "
                        "decides the step-time model's attention padding")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--threads-per-device", type=int, default=None,
                   help="torch threads per CPU worker; default: the server's (cores / devices)")
    p.add_argument("--device-memory", default=None, help="per-device memory budget on CPU (server default: 1GiB)")
    p.add_argument("--max-total-tokens", type=int, default=None,
                   help="the server's --max-total-tokens (KV tokens per TP1 instance): step cases that need more KV "
                        "than an instance holds are skipped, so the fit covers the contexts the server will see")
    p.add_argument("--raw-json", default=None, help="also write the raw measurements here")
    args = p.parse_args(argv)
    if min(args.tp) < 1 or any(t & (t - 1) for t in args.tp):
        p.error("--tp takes powers of two")
    return args


def main(argv=None, engine_factory=start_engine, clock=time.perf_counter) -> int:
    """engine_factory / clock: the engine and the clock it is timed with (tests pass a simulated one)."""
    args = parse_args(argv)
    t0 = time.perf_counter()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    load0 = list(os.getloadavg())
    raw = measure(args, log, engine_factory, clock)
    if args.raw_json:
        with open(args.raw_json, "w") as f:
            json.dump(raw, f, indent=1)
    parts, fitted = fit_all(raw, args.model_path, args.dtype,
                            attention_padding(args.attention_backend, args.device, args.dtype), args.statistic)
    print(table(fitted))
    print()
    print(summary_table(fitted))
    sr = parts["step_report"]
    print(f"\nstep time: {sr['points']} points, rms relative error {sr['rms_rel_error']:.1%}, max "
          f"{sr['max_rel_error']:.1%}; per-call overhead (not in the model) {sr.get('call_overhead_s', 0) * 1e3:.2f} ms")
    print("fitted:", json.dumps(parts["step"].to_dict()))
    tr = parts["transform_report"]
    if tr:
        print(f"transformations: {tr['points']} points, rms relative error {tr['rms_rel_error']:.1%}; "
              f"link {parts['transform'].link_bandwidth_bytes_per_s / 1e9:.2f} GB/s per device, fixed "
              f"{parts['transform'].fixed_overhead_s * 1e3:.1f} ms")
    info = {"source": "benchmark/measure_costs.py", "command": " ".join(["python"] + sys.argv),
            "machine": {"cpu": cpu_model_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                        "loadavg_before_after": [load0, list(os.getloadavg())]},
            "model_path": args.model_path, "dtype": args.dtype, "statistic": args.statistic, "tp": sorted(set(args.tp)), "quick": args.quick,
            "step_time": sr, "transform": tr, "raw": raw, "wall_s": time.perf_counter() - t0}
    save_models(args.out, parts["step"], parts["transform"], info)
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
