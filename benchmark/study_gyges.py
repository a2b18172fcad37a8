"""Gyges against every static configuration at GPU scale, in the simulator (issue: Gyges pays off).

    python benchmark/study_gyges.py traces   [--gpu H200] [--model Llama-3-8B] [--mix conv] [--duration 3600]
    python benchmark/study_gyges.py load     [--gpu H200] [--model Qwen2.5-32B] [--loads 0.5,1,2,4]
    python benchmark/study_gyges.py paper    [--gpu H20] [--model Qwen2.5-32B] [--minutes 30]

Data flow: the hardware and model shapes give a step-time model, a transformation-cost model and the KV
capacity of an instance at each TP (gyges.hardware, first principles, no measured constants); the real
traces in ../shared/traces are mixed unchanged (Azure conversation or code with Mooncake, arrival times and
lengths as recorded); gyges.sim.Simulator plays every configuration on the same requests; each
subcommand prints a table, and writes JSON and a PNG under benchmark/results/.

Configurations: gyges (merges for memory, and for speed with the TTFT target), the static shapes of the
same devices (all TP1 with least-loaded and round-robin placement, all TP2, TP4 x 2, TP8, and TP1s beside
one TP2 or TP4 for long requests), and for the paper's scheduler experiment gyges-rr / gyges-ll (Gyges'
mechanism with placement blind to it).

Metrics: goodput = requests that finish with TTFT <= --slo-ttft and TPOT <= --slo-tpot, per second of the
trace's arrival span (rejected and unfinished requests count as misses); throughput (output tokens/s);
TTFT and TPOT p50/p99 of completed requests; rejected; merges/splits. "on DP-servable" is a policy's goodput
on the requests static DP (all TP1) does not reject, for the >= 0.9x DP comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

from gyges import hardware
from gyges.costmodel import StepTimeModel
from gyges.sim.simulator import SimConfig, Simulator, build_policy, percentile
from gyges.traces import TraceRequest, load_trace, mix_traces, scale_trace, window

HERE = os.path.dirname(os.path.abspath(__file__))
TRACES = os.path.join(HERE, "..", "..", "shared", "traces")
RESULTS = os.path.join(HERE, "results")

# name -> policy spec (gyges.sim.simulator.build_policy)
STATIC = {
    "static TP1 x8 (least-loaded)": "static-dp-ll",
    "static TP1 x8 (round-robin)": "static-dp-rr",
    "static TP2 x4": "static-dp-ll:tp=2",
    "static TP4 x2": "static-dp-ll:tp=4",
    "static TP8": "static-tp",
    "hybrid TP2 + 6 x TP1": "static-hybrid:big_tp=2",
    "hybrid TP4 + 4 x TP1": "static-hybrid:big_tp=4",
    "hybrid TP4 + TP2 + 2 x TP1": "static-shape:sizes=4-2-1-1",
    "hybrid TP4 + 2 x TP2": "static-shape:sizes=4-2-2",
    "hybrid 2 x TP2 + 4 x TP1": "static-shape:sizes=2-2-1-1-1-1",
}


@dataclass(frozen=True)
class TPPenalizedStepModel(StepTimeModel):
    """A step-time model whose steps at TP t take tp_factor[t] times the roofline's: the TP penalty the
    roofline leaves out (engine overheads that do not shrink with TP, smaller GEMMs, exposed all-reduces)."""

    tp_factor: Tuple[Tuple[int, float], ...] = ()  # (tp, factor) pairs; a TP not listed runs at the roofline

    def _time(self, batch_tokens, context_tokens, requests, attended, tp: int) -> float:
        return super()._time(batch_tokens, context_tokens, requests, attended, tp) * dict(self.tp_factor).get(tp, 1.0)


def paper_tp_penalty() -> Dict[int, float]:
    """Step-time factors per TP that make the roofline's 4 x H20 serving estimate for Qwen2.5-32B lose to TP
    what the Gyges paper measured (check_gpu_model.PAPER: 2 x TP2 at 0.75x and TP4 at 0.43x the tokens/s of
    4 x TP1, where the roofline loses 1% and 5%); TP8 extrapolated geometrically (s8 = s4^2 / s2)."""
    from check_gpu_model import PAPER

    est = {tp: hardware.serving_estimate(hardware.GPUS["H20"], hardware.MODELS["Qwen2.5-32B"], 4, tp, 1024, 1024)
           for tp in PAPER}
    factor = {1: 1.0}
    for tp in (2, 4):
        model_ratio = est[tp].total_tokens_per_s / est[1].total_tokens_per_s
        paper_ratio = PAPER[tp]["tok_s"] / PAPER[1]["tok_s"]
        factor[tp] = model_ratio / paper_ratio
    factor[8] = factor[4] ** 2 / factor[2]
    return factor


@dataclass
class Setup:
    gpu: str
    model: str
    devices: int
    slo_ttft_s: float
    slo_tpot_s: float
    capacity_override: Optional[Dict[int, int]] = None  # KV tokens by TP instead of the memory model's
    tp_penalty: Optional[Dict[int, float]] = None  # step-time factor by TP (TPPenalizedStepModel), None: roofline

    def config(self) -> SimConfig:
        """The simulated host: roofline step time, NVLink transformations, KV capacity at each TP, and
        SGLang's default chunking on a large GPU (8K-token prefill chunks, 16K prefill tokens per step)."""
        gpu, model = hardware.GPUS[self.gpu], hardware.MODELS[self.model]
        capacity = {tp: hardware.kv_capacity_tokens(gpu, model, tp) for tp in (1, 2, 4, 8) if tp <= self.devices}
        if self.capacity_override:
            capacity = dict(self.capacity_override)
        step = hardware.step_time_model(gpu, model)
        if self.tp_penalty:
            step = TPPenalizedStepModel(**asdict(step), tp_factor=tuple(sorted(self.tp_penalty.items())))
        return SimConfig(num_devices=self.devices, max_tp=max(capacity), kv_tokens_per_device=capacity[1],
                         chunk_tokens=16384, chunked_prefill_size=8192, max_prefill_tokens=16384,
                         capacity_by_tp=capacity, slo_ttft_s=self.slo_ttft_s, slo_tpot_s=self.slo_tpot_s,
                         step_model=step,
                         transform_model=hardware.transform_model(gpu, model))

    def variant(self) -> str:
        """What differs from the plain roofline + memory model, for titles and file names."""
        parts = (["paper's KV limits"] if self.capacity_override else []) + \
                (["paper's TP penalty"] if self.tp_penalty else [])
        return " (" + ", ".join(parts) + ")" if parts else ""

    def tag(self) -> str:
        return f"{self.gpu}_{self.model}" + ("_paperkv" if self.capacity_override else "") + \
            ("_tppenalty" if self.tp_penalty else "")

    def gyges_spec(self) -> str:
        # the prefill-time target: half the TTFT SLO, leaving the other half for queueing
        return f"gyges:ttft_target_s={self.slo_ttft_s / 2}"


# =====================================================================================================
# Traces
# =====================================================================================================
def trace_mix(mix: str, duration_s: float, time_scale: float = 1.0) -> List[TraceRequest]:
    """Azure conversation or code (the short-context services, 58 min) mixed with Mooncake (the long tail,
    17 min, replayed back to back to cover the window), the first duration_s seconds, lengths and arrival
    times as recorded; time_scale < 1 compresses arrivals (offered load x 1/time_scale)."""
    azure = {"conv": "azure2023_conv.csv", "code": "azure2023_code.csv"}[mix]
    tag = lambda reqs, src: [replace(r, source=src) for r in reqs]
    parts = [tag(window(load_trace(os.path.join(TRACES, azure)), 0.0, duration_s), f"azure-{mix}")]
    moon = tag(load_trace(os.path.join(TRACES, "mooncake_synthetic.jsonl")), "mooncake")
    period = moon[-1].arrival_s + (moon[-1].arrival_s - moon[0].arrival_s) / max(1, len(moon) - 1)
    offsets = [period * k for k in range(int(math.ceil(duration_s / period)))]
    replays = mix_traces(*([moon] * len(offsets)), offsets_s=offsets)
    parts.append([r for r in replays if r.arrival_s < duration_s])
    out = mix_traces(*parts)
    return scale_trace(out, time_scale=time_scale) if time_scale != 1.0 else out


def paper_trace(minutes: float, short_per_min: int = 60, short=(1024, 256), long=(50_000, 256)) -> List[TraceRequest]:
    """The Gyges paper's scheduler experiment: 1K-token requests at short_per_min (the paper: 60/min) and
    50K-token ones at 1/min, evenly spaced (the long one mid-minute); 256 output tokens each (the paper's
    summary does not give them)."""
    out = []
    for m in range(int(minutes)):
        for k in range(short_per_min):
            out.append(TraceRequest(60.0 * m + 60.0 * k / short_per_min, short[0], short[1], None, "1K"))
        out.append(TraceRequest(60.0 * m + 30.25, long[0], long[1], None, "50K"))
    return sorted(out, key=lambda r: r.arrival_s)


# =====================================================================================================
# One run and its metrics
# =====================================================================================================
def run_one(args: Tuple[str, str, Setup, List[TraceRequest]]) -> dict:
    label, spec, setup, trace = args
    cfg = setup.config()
    t0 = time.time()
    sim = Simulator(build_policy(spec, cfg), trace, cfg)
    res = sim.run()
    span = max(r.arrival for r in sim.reqs) - min(r.arrival for r in sim.reqs)
    per_req = [(r.rid, r.source, r.rejected is not None,
                None if r.first_token_at is None else r.first_token_at - r.arrival,
                None if r.finished_at is None or r.output <= 1 else (r.finished_at - r.first_token_at) / (r.output - 1),
                r.finished_at is not None) for r in sim.reqs]
    return {"label": label, "spec": spec, "span_s": span, "requests": per_req, "merges": res.merges,
            "splits": res.splits, "throughput_tok_s": res.throughput_tok_s, "sim_seconds": time.time() - t0}


def good(rec, slo_ttft: float, slo_tpot: float) -> bool:
    _, _, rejected, ttft, tpot, done = rec
    return done and not rejected and ttft <= slo_ttft and (tpot is None or tpot <= slo_tpot)


def metrics(run: dict, setup: Setup, among: Optional[set] = None) -> dict:
    reqs = [r for r in run["requests"] if among is None or r[0] in among]
    done = [r for r in reqs if r[5]]
    ttft = [r[3] for r in done]
    tpot = [r[4] for r in done if r[4] is not None]
    ok = sum(1 for r in reqs if good(r, setup.slo_ttft_s, setup.slo_tpot_s))
    return {
        "goodput_req_s": ok / run["span_s"] if run["span_s"] > 0 else 0.0,
        "slo_pct": 100.0 * ok / len(reqs) if reqs else float("nan"),
        "throughput_tok_s": run["throughput_tok_s"],
        "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
        "tpot_p50": percentile(tpot, 50), "tpot_p99": percentile(tpot, 99),
        "rejected": sum(1 for r in reqs if r[2]),
        "unfinished": sum(1 for r in reqs if not r[2] and not r[5]),
        "merges": run["merges"], "splits": run["splits"],
    }


def run_all(jobs: Sequence[Tuple[str, str, Setup, List[TraceRequest]]], workers: int) -> List[dict]:
    if workers <= 1:
        return [run_one(j) for j in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(run_one, jobs))


# =====================================================================================================
# Tables and plots
# =====================================================================================================
def table(rows: Sequence[dict], cols: Sequence[Tuple[str, str, str]]) -> str:
    head = [c[1] for c in cols]
    body = [[(fmt.format(r[key]) if isinstance(r[key], (int, float)) and not (isinstance(r[key], float)
              and math.isnan(r[key])) else str(r[key])) for key, _, fmt in cols] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(b) for b in body])


MAIN_COLS = [("label", "configuration", "{}"), ("goodput_req_s", "goodput req/s", "{:.2f}"),
             ("vs_best_static", "x best static (serves all)", "{:.2f}"), ("dp_goodput", "on DP-servable", "{:.2f}"),
             ("slo_pct", "SLO %", "{:.1f}"), ("throughput_tok_s", "tok/s", "{:.0f}"),
             ("ttft_p50", "TTFT p50", "{:.2f}"), ("ttft_p99", "TTFT p99", "{:.1f}"),
             ("tpot_p50", "TPOT p50", "{:.3f}"), ("tpot_p99", "TPOT p99", "{:.3f}"),
             ("rejected", "rejected", "{}"), ("unfinished", "unfinished", "{}"),
             ("merges", "merges", "{}"), ("splits", "splits", "{}")]


def compare_rows(runs: Sequence[dict], setup: Setup) -> List[dict]:
    """Metrics per run, plus goodput relative to the best static configuration that rejects no request some
    instance could hold, and goodput on the requests all-TP1 least-loaded DP serves."""
    rows = [dict(label=r["label"], **metrics(r, setup)) for r in runs]
    dp = next((r for r in runs if r["spec"] == "static-dp-ll"), None)
    servable = {q[0] for q in dp["requests"] if not q[2]} if dp else None
    # "serves every request": rejects only what no instance of the largest size could hold (the fewest rejected)
    least_rejected = min(row["rejected"] for row in rows)
    serve_all = [row for row in rows if row["label"].startswith(("static", "hybrid"))
                 and row["rejected"] == least_rejected]
    best = max((row["goodput_req_s"] for row in serve_all), default=float("nan"))
    for run, row in zip(runs, rows):
        row["vs_best_static"] = row["goodput_req_s"] / best if best and best == best else float("nan")
        row["dp_goodput"] = metrics(run, setup, servable)["goodput_req_s"] if servable is not None else float("nan")
    return rows


def slo_ceiling(trace: Sequence[TraceRequest], setup: Setup) -> float:
    """The fraction of requests that can meet the SLO at all: prefilled alone on an idle instance of the TP
    (among those whose KV holds the request) where the step model prefills it fastest, within the TTFT SLO,
    and decoding alone within the TPOT SLO. No placement or shape does better; a goal above it is unreachable."""
    cfg = setup.config()
    step = cfg.step_model

    def prefill_s(prompt: int, tp: int) -> float:
        total, done = 0.0, 0
        while done < prompt:
            chunk = min(cfg.chunked_prefill_size, prompt - done)
            done += chunk
            total += step.step_time(chunk, done, tp, requests=1)
        return total

    ok = 0
    for r in trace:
        need = r.prompt_tokens + r.output_tokens
        tps = [tp for tp, cap in sorted(cfg.capacity_by_tp.items()) if cap >= need]
        if not tps:
            continue
        t_best, tp_best = min((prefill_s(r.prompt_tokens, tp), tp) for tp in tps)
        ok += t_best <= setup.slo_ttft_s and step.step_time(1, need, tp_best) <= setup.slo_tpot_s
    return ok / len(trace) if trace else float("nan")


def save(name: str, payload: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name + ".json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    return path


def plot_load_curve(path: str, loads: Sequence[float], curves: Dict[str, List[float]], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, ys in curves.items():
        ax.plot(loads, ys, marker="o", label=label, linewidth=2.5 if label.startswith("gyges") else 1.2)
    ax.set_xlabel("offered load (x the traces' recorded rate)")
    ax.set_ylabel("goodput (req/s within SLO)")
    ax.set_title(textwrap.fill(title, 90), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bars(path: str, rows: Sequence[dict], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [r["label"] for r in rows]
    ax.barh(labels, [r["goodput_req_s"] for r in rows], color=["C3" if l.startswith("gyges") else "C0" for l in labels])
    ax.set_xlabel("goodput (req/s within SLO)")
    ax.set_title(textwrap.fill(title, 90), fontsize=9)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# =====================================================================================================
# Subcommands
# =====================================================================================================
def static_tp(label: str) -> int:
    """The largest instance of a static configuration, from its label ("static TP4 x2" -> 4)."""
    return max((int(w[2:]) for w in label.replace("TP", " TP").split() if w[:2] == "TP" and w[2:].isdigit()),
               default=1)


def configurations(setup: Setup, include: Optional[str]) -> List[Tuple[str, str]]:
    """gyges and every static shape whose instances the setup's capacity table covers."""
    max_tp = setup.config().max_tp
    confs = [("gyges", setup.gyges_spec())] + [(k, v) for k, v in STATIC.items() if static_tp(k) <= max_tp]
    if include:
        keep = [s.strip() for s in include.split(",")]
        confs = [c for c in confs if any(k in c[0] for k in keep)]
    return confs


def cmd_traces(a, setup: Setup) -> int:
    out = {}
    for mix in a.mix.split(","):
        trace = trace_mix(mix, a.duration)
        confs = configurations(setup, a.only)
        runs = run_all([(label, spec, setup, trace) for label, spec in confs], a.workers)
        rows = compare_rows(runs, setup)
        title = (f"{setup.devices} x {setup.gpu.upper()}, {setup.model}, Azure {mix} + Mooncake, "
                 f"{a.duration:.0f} s, {len(trace)} requests; SLO TTFT <= {setup.slo_ttft_s:g} s, "
                 f"TPOT <= {setup.slo_tpot_s * 1000:g} ms{setup.variant()}")
        print(title + f"; SLO ceiling {100 * slo_ceiling(trace, setup):.1f}%")
        print(table(rows, MAIN_COLS))
        print()
        tag = f"study_{setup.tag()}_{mix}"
        plot_bars(os.path.join(RESULTS, tag + ".png"), rows, title)
        out[mix] = rows
        save(tag, {"title": title, "rows": rows})
    return 0


def cmd_load(a, setup: Setup) -> int:
    loads = [float(x) for x in a.loads.split(",")]
    confs = configurations(setup, a.only)
    curves: Dict[str, List[float]] = {label: [] for label, _ in confs}
    tables = []
    for load in loads:
        trace = trace_mix(a.mix, a.duration, time_scale=1.0 / load)  # the same requests, arriving load x faster
        runs = run_all([(label, spec, setup, trace) for label, spec in confs], a.workers)
        rows = compare_rows(runs, setup)
        for row in rows:
            curves[row["label"]].append(row["goodput_req_s"])
        tables.append((load, rows))
        ceiling = slo_ceiling(trace, setup)
        curves.setdefault("SLO ceiling (each request alone, fastest TP)", []).append(
            ceiling * len(trace) / max(1e-9, trace[-1].arrival_s - trace[0].arrival_s))
        print(f"offered load {load:g}x ({len(trace)} requests over {trace[-1].arrival_s:.0f} s){setup.variant()}; "
              f"SLO ceiling {100 * ceiling:.1f}% (requests that meet the SLO alone on an idle instance)")
        print(table(rows, MAIN_COLS), flush=True)
        print()
    title = (f"{setup.devices} x {setup.gpu.upper()}, {setup.model}, Azure {a.mix} + Mooncake, "
             f"{a.duration:.0f} s windows{setup.variant()}; goodput against offered load")
    print(title)
    cols = [("label", "configuration", "{}")] + [(f"l{k}", f"{load:g}x", "{:.2f}") for k, load in enumerate(loads)]
    rows = [dict(label=label, **{f"l{k}": v for k, v in enumerate(vals)}) for label, vals in curves.items()]
    print(table(rows, cols))
    tag = f"study_load_{setup.tag()}_{a.mix}"
    os.makedirs(RESULTS, exist_ok=True)
    save(tag, {"title": title, "loads": loads, "curves": curves,
               "tables": [{"load": load, "rows": rows} for load, rows in tables]})
    plot_load_curve(os.path.join(RESULTS, tag + ".png"), loads, curves, title)
    return 0


def cmd_paper(a, setup: Setup) -> int:
    trace = paper_trace(a.minutes, a.short_per_min)
    confs = [("gyges", setup.gyges_spec()), ("gyges mechanism + round-robin", "gyges-rr:" + setup.gyges_spec().split(":")[1]),
             ("gyges mechanism + least-loaded", "gyges-ll:" + setup.gyges_spec().split(":")[1]),
             ("static TP1 x8 (round-robin)", "static-dp-rr"), ("static TP1 x8 (least-loaded)", "static-dp-ll")]
    # the static shapes that hold a 50K-token request (the goal's "best static configuration that serves every
    # request"), where the capacity table covers them
    confs += [(k, v) for k, v in STATIC.items() if static_tp(k) in (4, 8) and static_tp(k) <= setup.config().max_tp]
    runs = run_all([(label, spec, setup, trace) for label, spec in confs], a.workers)
    rows = compare_rows(runs, setup)
    base = {r["label"]: r["throughput_tok_s"] for r in rows}
    for r in rows:
        r["vs_rr"] = r["throughput_tok_s"] / base["gyges mechanism + round-robin"]
        r["vs_ll"] = r["throughput_tok_s"] / base["gyges mechanism + least-loaded"]
    title = (f"Paper's scheduler experiment: {setup.devices} x {setup.gpu.upper()} TP1 at start, {setup.model}, "
             f"1K-token requests {a.short_per_min}/min + 50K-token 1/min, {a.minutes:g} min{setup.variant()}")
    print(title)
    cols = [("label", "configuration", "{}"), ("throughput_tok_s", "tok/s", "{:.0f}"), ("vs_rr", "x RR", "{:.2f}"),
            ("vs_ll", "x LL", "{:.2f}"), ("goodput_req_s", "goodput req/s", "{:.2f}"),
            ("vs_best_static", "goodput x best static", "{:.2f}"), ("slo_pct", "SLO %", "{:.1f}"),
            ("ttft_p50", "TTFT p50", "{:.2f}"), ("ttft_p99", "TTFT p99", "{:.1f}"), ("tpot_p50", "TPOT p50", "{:.3f}"),
            ("rejected", "rejected", "{}"), ("unfinished", "unfinished", "{}"), ("merges", "merges", "{}"),
            ("splits", "splits", "{}")]
    print(table(rows, cols))
    tag = f"study_paper_{setup.tag()}_{a.short_per_min}"
    save(tag, {"title": title, "rows": rows})
    plot_bars(os.path.join(RESULTS, tag + ".png"), rows, title)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", choices=["traces", "load", "paper"])
    p.add_argument("--gpu", default="H200", choices=sorted(hardware.GPUS))
    p.add_argument("--model", default="Llama-3-8B", choices=sorted(hardware.MODELS))
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--mix", default="conv,code", help="traces: comma list of conv / code; load: one of them")
    p.add_argument("--duration", type=float, default=3600.0, help="seconds of each trace, from its start")
    p.add_argument("--loads", default="0.5,1,2,4", help="load: offered-load multipliers")
    p.add_argument("--minutes", type=float, default=30.0, help="paper: minutes of the synthetic workload")
    p.add_argument("--short-per-min", type=int, default=60, help="paper: 1K-token requests per minute")
    p.add_argument("--slo-ttft", type=float, default=10.0)
    p.add_argument("--slo-tpot", type=float, default=0.1)
    p.add_argument("--only", help="comma list of substrings: run only the configurations whose label matches")
    p.add_argument("--workers", type=int, default=2, help="simulations run in parallel processes")
    p.add_argument("--capacity", metavar="TP:TOKENS,...",
                   help="KV tokens of an instance at each TP instead of the memory model's (e.g. the Gyges "
                        "paper's max contexts for Qwen2.5-32B on H20: 1:3750,2:41250,4:120500); the largest TP "
                        "given is the largest Gyges may form")
    p.add_argument("--tp-penalty", choices=["none", "paper"], default="none",
                   help="paper: steps at TP t take paper_tp_penalty()[t] x the roofline's, so TP costs the "
                        "throughput the Gyges paper measured on H20 (the roofline alone loses almost none)")
    a = p.parse_args(argv)
    override = None
    if a.capacity:
        override = {int(k): int(v) for k, v in (item.split(":") for item in a.capacity.split(","))}
    setup = Setup(a.gpu, a.model, a.devices, a.slo_ttft, a.slo_tpot, override,
                  paper_tp_penalty() if a.tp_penalty == "paper" else None)
    return {"traces": cmd_traces, "load": cmd_load, "paper": cmd_paper}[a.study](a, setup)


if __name__ == "__main__":
    sys.exit(main())
