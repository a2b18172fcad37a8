"""Trace replay over HTTP: Gyges against the static baselines on the same devices, same requests, one run.

For each policy this starts a real server subprocess

    python -m sglang.launch_server --model-path DIR --device cpu --dp-size 2 --enable-gyges
        --gyges-policy P --gyges-split-delay S --page-size 16 --max-total-tokens T --dtype float32 --port N

(2 CPU "devices"; static-tp is `--gyges-policy static-tp`, which merges the two devices into one TP2 instance at
start-up: the same arena, hence the same TP2 KV capacity a Gyges merge gets. A plain `--tp-size 2` server caps
its pool at T tokens and has no /gyges/topology.) and replays one workload against it:

    shared/traces/azure2023_conv.csv (short context) + mooncake_synthetic.jsonl (long context)
      -> window [start, start + window) of each, `sample` n of each (fixed seed), lengths x length_scale
         (outputs x output_scale), capped, arrivals x (duration / window), mixed by arrival

Every request is sent at its arrival time as a streaming `/generate` with input_ids (seeded random ids of the
trace's prompt length), max_new_tokens = the scaled output length and ignore_eos; TTFT = first streamed
token, TPOT = (last - first token) / (tokens - 1). GET /gyges/topology is sampled every --sample-interval s
(instance shapes and load); merges and splits are counted from its history. T is chosen so that the long
requests fit no TP1 instance but fit a TP2 merge (they are rejected with HTTP 400 by the DP baselines: the
price of never transforming).

Output: a markdown table (stdout and benchmark/results/bench_traces.md), all raw numbers
(benchmark/results/bench_traces.json), and with matplotlib (`pip install -e "./python[bench]"`)
bench_traces_timeline.png (the Gyges run: TP per device and running/waiting over time) and
bench_traces_metrics.png (bar charts per policy). The Gyges run loads the cost models measured on this machine
by `benchmark/measure_costs.py --quick` (same --max-total-tokens), unless --cost-model is given.

    python benchmark/bench_traces.py                      # all policies, ~2 min each on a 2-core CPU
    python benchmark/bench_traces.py --policies gyges static-tp --duration 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import aiohttp
import requests
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmark" / "results"
ALL_POLICIES = ["gyges", "static-dp-rr", "static-dp-ll", "static-tp", "static-hybrid"]

from gyges.traces import TraceRequest, load_trace, mix_traces, rate, sample, scale_trace, window  # noqa: E402

sys.path.insert(0, str(REPO / "benchmark"))
from bench_common import pct  # noqa: E402


# =====================================================================================================
# Workload
# =====================================================================================================
def build_workload(a) -> List[TraceRequest]:
    traces = Path(a.traces_dir)
    tscale = a.duration / a.window
    parts = []
    for name, n in ((a.short_trace, a.short_n), (a.long_trace, a.long_n)):
        reqs = window(load_trace(traces / name), a.window_start, a.window)
        reqs = sample(reqs, n, seed=a.seed)
        parts.append(scale_trace(reqs, time_scale=tscale, length_scale=a.length_scale, output_scale=a.output_scale,
                                 max_prompt=a.max_prompt, max_output=a.max_output))
    return mix_traces(*parts)


def prompt_ids(i: int, n: int, seed: int, vocab: int) -> List[int]:
    rng = random.Random(seed * 1_000_003 + i)
    return [1] + [rng.randrange(3, vocab) for _ in range(n - 1)]


# =====================================================================================================
# Server
# =====================================================================================================
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir: str, policy: str, a, cost_model: Optional[str], log_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "sglang.launch_server", "--model-path", model_dir, "--device", "cpu",
                     "--dp-size", "2", "--enable-gyges", "--gyges-policy", policy,
                     "--gyges-split-delay", str(a.split_delay), "--page-size", "16",
                     "--max-total-tokens", str(a.max_total_tokens), "--dtype", "float32", "--port", str(self.port),
                     "--log-level", "warning"]
        if cost_model and policy in ("gyges", "auto"):
            self.args += ["--gyges-cost-model", cost_model]
        self.log_path = log_dir / f"server-{policy}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.tail()}")
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready in {timeout:.0f} s: {self.tail()}")

    def tail(self, n: int = 3000) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group of the server this script started
                self.proc.wait(10)
        self.log.close()


# =====================================================================================================
# Client
# =====================================================================================================
@dataclass
class Result:
    idx: int
    source: str
    prompt_tokens: int
    max_new_tokens: int
    arrival_s: float
    ok: bool = False
    status: int = 0
    error: str = ""
    ttft_s: Optional[float] = None
    tpot_s: Optional[float] = None
    e2e_s: Optional[float] = None
    completion_tokens: int = 0
    # the same events on the replay's clock (seconds since its start; arrival_s is on it too)
    sent_s: Optional[float] = None  # the request was sent
    first_token_s: Optional[float] = None
    last_token_s: Optional[float] = None
    end_s: Optional[float] = None  # the response ended


async def send_one(session: aiohttp.ClientSession, url: str, i: int, r: TraceRequest, a, t0: float,
                   bar: tqdm) -> Result:
    res = Result(i, r.source, r.prompt_tokens, r.output_tokens, r.arrival_s)
    delay = t0 + r.arrival_s - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    body = {"input_ids": prompt_ids(i, r.prompt_tokens, a.seed, a.vocab),
            "sampling_params": {"max_new_tokens": r.output_tokens, "ignore_eos": True, "temperature": 0},
            "stream": True}
    start = time.perf_counter()
    first = last = None
    tokens = 0
    try:
        async with session.post(url + "/generate", json=body,
                                timeout=aiohttp.ClientTimeout(total=a.request_timeout)) as resp:
            res.status = resp.status
            if resp.status != 200:
                text = await resp.text()
                try:
                    res.error = json.loads(text)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    res.error = text[:300]
            else:
                buf = b""
                async for chunk in resp.content.iter_any():
                    buf += chunk
                    while b"\n\n" in buf:
                        event, buf = buf.split(b"\n\n", 1)
                        line = event.strip()
                        if not line.startswith(b"data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            continue
                        d = json.loads(payload)
                        if "error" in d:
                            res.error = str(d["error"].get("message", d["error"]))[:300]
                            continue
                        fr = d.get("meta_info", {}).get("finish_reason") or {}
                        if isinstance(fr, dict) and fr.get("type") == "abort":  # rejected after the 200
                            res.error = f"abort ({fr.get('status_code', '?')}): {fr.get('message', '')}"[:300]
                        n = int(d.get("meta_info", {}).get("completion_tokens", 0))
                        if n > tokens:
                            now = time.perf_counter()
                            if first is None:
                                first = now
                            last = now
                            tokens = n
                res.ok = not res.error and tokens > 0
    except asyncio.TimeoutError:
        res.error = f"timeout after {a.request_timeout:.0f} s"
    except aiohttp.ClientError as e:
        res.error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    res.completion_tokens = tokens
    res.sent_s, res.end_s = start - t0, end - t0
    if first is not None:
        res.ttft_s = first - start
        res.e2e_s = end - start
        res.tpot_s = (last - first) / (tokens - 1) if tokens > 1 else None
        res.first_token_s, res.last_token_s = first - t0, last - t0
    bar.update(1)
    return res


async def sample_topology(session: aiohttp.ClientSession, url: str, t0: float, interval: float,
                          out: List[dict], stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            async with session.get(url + "/gyges/topology", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                d = await resp.json()
            out.append({"t": time.perf_counter() - t0,
                        "instances": [{k: i.get(k) for k in ("devices", "tp", "state", "running", "waiting",
                                                              "kv_used_tokens", "kv_capacity_tokens")}
                                      for i in d.get("instances", [])]})
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            pass
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except asyncio.TimeoutError:
            pass


async def replay(url: str, workload: List[TraceRequest], a, label: str):
    samples: List[dict] = []
    stop = asyncio.Event()
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        t0 = time.perf_counter()
        wall0 = time.time()
        sampler = asyncio.create_task(sample_topology(session, url, t0, a.sample_interval, samples, stop))
        with tqdm(total=len(workload), desc=label, unit="req", mininterval=2.0) as bar:
            results = await asyncio.gather(*(send_one(session, url, i, r, a, t0, bar)
                                             for i, r in enumerate(workload)))
        makespan = time.perf_counter() - t0
        # a little tail so the timeline shows the split back
        await asyncio.sleep(min(a.tail_s, 30.0))
        stop.set()
        await sampler
    return results, samples, makespan, wall0


# =====================================================================================================
# Metrics
# =====================================================================================================
def summarize(policy: str, results: List[Result], makespan: float, history: List[dict], wall0: float, a) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpot = [r.tpot_s for r in ok if r.tpot_s is not None]
    slo = [r for r in ok if r.ttft_s <= a.slo_ttft and (r.tpot_s is None or r.tpot_s <= a.slo_tpot)]
    during = [h for h in history if h.get("at", 0) >= wall0]
    errors: Dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = f"{r.status or 'no status'}: {r.error[:90]}"
            errors[key] = errors.get(key, 0) + 1
    long_ids = {r.idx for r in results if r.prompt_tokens + r.max_new_tokens > a.max_total_tokens}
    return {
        "policy": policy,
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "long_requests": len(long_ids),
        "long_completed": sum(1 for r in ok if r.idx in long_ids),
        "makespan_s": makespan,
        "throughput_req_s": len(ok) / makespan,
        "output_tok_s": sum(r.completion_tokens for r in ok) / makespan,
        "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
        "tpot_p50_s": pct(tpot, 50), "tpot_p99_s": pct(tpot, 99),
        "slo_attainment": len(slo) / len(results),
        "goodput_req_s": len(slo) / makespan,  # requests finished within the SLO per second
        "merges": sum(1 for h in during if h.get("kind") == "merge"),
        "splits": sum(1 for h in during if h.get("kind") == "split"),
        "transform_pause_ms": [round(h.get("pause_ms", 0.0), 1) for h in during],
        "errors": errors,
    }


def fmt(x, unit="", digits=2):
    if x is None:
        return "n/a"
    return f"{x:,.{digits}f}{unit}"


def table(rows: List[dict], a) -> str:
    head = ("| policy | completed | failed | long done | goodput req/s | req/s | out tok/s | TTFT p50 | TTFT p99 | "
            f"TPOT p50 | TPOT p99 | SLO (TTFT<={a.slo_ttft:g}s, TPOT<={a.slo_tpot * 1e3:g}ms) | merges | splits |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for s in rows:
        if "skipped" in s:
            lines.append(f"| {s['policy']} | " + " | ".join(["n/a"] * 13) + " |")
            continue
        lines.append(
            f"| {s['policy']} | {s['completed']}/{s['requests']} | {s['failed']} | "
            f"{s['long_completed']}/{s['long_requests']} | {fmt(s['goodput_req_s'])} | {fmt(s['throughput_req_s'])} | "
            f"{fmt(s['output_tok_s'], '', 1)} | "
            f"{fmt(s['ttft_p50_s'], ' s')} | {fmt(s['ttft_p99_s'], ' s')} | "
            f"{fmt(None if s['tpot_p50_s'] is None else s['tpot_p50_s'] * 1e3, ' ms', 1)} | "
            f"{fmt(None if s['tpot_p99_s'] is None else s['tpot_p99_s'] * 1e3, ' ms', 1)} | "
            f"{s['slo_attainment'] * 100:.1f}% | {s['merges']} | {s['splits']} |")
    return "\n".join(lines)


# =====================================================================================================
# Plots
# =====================================================================================================
def plot(runs: Dict[str, dict], a, out_dir: Path) -> List[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e './python[bench]'): no plots", file=sys.stderr)
        return []
    written = []
    g = runs.get("gyges")
    if g and g.get("samples"):
        samples = g["samples"]
        ts = [s["t"] for s in samples]
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
        for dev in (0, 1):
            tp = []
            for s in samples:
                v = next((i["tp"] for i in s["instances"] if dev in (i["devices"] or [])), 0)
                tp.append(v + (0.03 if dev else -0.03))
            ax1.step(ts, tp, where="post", label=f"device {dev}")
        for r in g["results"]:
            if r["prompt_tokens"] + r["max_new_tokens"] > a.max_total_tokens:
                ax1.axvline(r["arrival_s"], color="red", alpha=0.25, lw=1)
        ax1.set_ylabel("TP of the instance\nholding the device")
        ax1.set_yticks([1, 2])
        ax1.set_ylim(0.5, 2.5)
        ax1.legend(loc="upper right")
        ax1.set_title(f"gyges: instance shapes (red: arrival of a request that fits no TP1 instance)")
        running = [sum(i.get("running") or 0 for i in s["instances"]) for s in samples]
        waiting = [sum(i.get("waiting") or 0 for i in s["instances"]) for s in samples]
        ax2.plot(ts, running, label="running")
        ax2.plot(ts, waiting, label="waiting")
        ax2.set_xlabel("seconds since the first request")
        ax2.set_ylabel("requests (all instances)")
        ax2.legend(loc="upper right")
        fig.tight_layout()
        p = out_dir / "bench_traces_timeline.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(str(p))
    rows = [r["summary"] for r in runs.values() if "skipped" not in r["summary"]]
    if rows:
        metrics = [("completed", "completed requests", 1), ("output_tok_s", "output tok/s", 1),
                   ("ttft_p50_s", "TTFT p50 (s)", 1), ("ttft_p99_s", "TTFT p99 (s)", 1),
                   ("tpot_p50_s", "TPOT p50 (ms)", 1e3), ("tpot_p99_s", "TPOT p99 (ms)", 1e3),
                   ("slo_attainment", "SLO attainment (%)", 100), ("failed", "failed requests", 1)]
        fig, axes = plt.subplots(2, 4, figsize=(15, 6))
        names = [r["policy"] for r in rows]
        for ax, (k, title, mul) in zip(axes.flat, metrics):
            vals = [(r[k] or 0) * mul for r in rows]
            ax.bar(range(len(names)), vals, color=["C3" if n == "gyges" else "C0" for n in names])
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
            ax.set_title(title, fontsize=10)
        fig.tight_layout()
        p = out_dir / "bench_traces_metrics.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(str(p))
    return written


# =====================================================================================================
# Main
# =====================================================================================================
def ensure_model(a) -> str:
    from sglang.srt.demo_model import DemoModelSpec, make_demo_model

    d = Path(a.model_dir)
    if (d / "config.json").exists() and any(d.glob("*.safetensors")):
        return str(d)
    spec = DemoModelSpec(arch="llama", hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, intermediate_size=688, max_position_embeddings=8192, seed=11)
    return make_demo_model(str(d), spec)


def ensure_cost_model(a, model_dir: str) -> Optional[str]:
    if a.cost_model:
        return None if a.cost_model == "none" else a.cost_model
    out = RESULTS / "bench_traces_costmodel.json"
    cmd = [sys.executable, str(REPO / "benchmark" / "measure_costs.py"), "--model-path", model_dir, "--out", str(out),
           "--quick", "--max-total-tokens", str(a.max_total_tokens)]
    print("measuring the cost model:", " ".join(cmd[1:]), file=sys.stderr)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return str(out)


def skip_reason(policy: str) -> Optional[str]:
    """Why `policy` cannot run on these 2 devices (static-hybrid needs >= 3), or None."""
    if policy != "static-hybrid":
        return None
    from gyges.policy import StaticHybrid

    try:
        StaticHybrid().initial_instances(2, 2)
    except ValueError as e:
        return str(e)
    return None


def run_policy(policy: str, workload: List[TraceRequest], a, model_dir: str, cost_model: Optional[str],
               log_dir: Path, before_replay: Optional[Callable[[str, dict], None]] = None,
               after_replay: Optional[Callable[[str, dict], None]] = None) -> dict:
    """One live run: a server for `policy`, the workload replayed against it. Returns {"summary", "samples",
    "history", "wall0", "results" (one dict per request, Result's fields), "server_args"}; {"summary":
    {"policy", "skipped"}} when the policy cannot run on 2 devices or the run failed. before_replay(url,
    topology) runs once the server is ready, after_replay(url, topology) once the replay (and its tail) is over
    (benchmark/validate_sim.py times the server's overhead there)."""
    reason = skip_reason(policy)
    if reason:
        print(f"{policy} skipped on 2 devices: {reason}", file=sys.stderr)
        return {"summary": {"policy": policy, "skipped": reason}}
    srv = Server(model_dir, policy, a, cost_model, log_dir)
    try:
        srv.wait_ready()
        topo0 = requests.get(srv.url + "/gyges/topology", timeout=30).json()
        if before_replay is not None:
            before_replay(srv.url, topo0)
        load_before = os.getloadavg()
        results, samples, makespan, wall0 = asyncio.run(replay(srv.url, workload, a, policy))
        load_after = os.getloadavg()
        topo = requests.get(srv.url + "/gyges/topology", timeout=30).json()
        if after_replay is not None:
            after_replay(srv.url, topo)
        summary = summarize(policy, results, makespan, topo.get("history", []), wall0, a)
        summary["initial_instances"] = [(i["devices"], i["tp"], i["kv_capacity_tokens"]) for i in topo0["instances"]]
        summary["loadavg_before_after"] = [[round(x, 2) for x in load_before], [round(x, 2) for x in load_after]]
        print(json.dumps({k: v for k, v in summary.items() if k != "transform_pause_ms"}), file=sys.stderr)
        return {"summary": summary, "samples": samples, "history": topo.get("history", []), "wall0": wall0,
                "results": [asdict(r) for r in results], "server_args": srv.args[1:]}
    except Exception as e:  # noqa: BLE001 - report the policy as failed, go on with the others
        print(f"{policy}: {type(e).__name__}: {e}\n{srv.tail()}", file=sys.stderr)
        return {"summary": {"policy": policy, "skipped": f"{type(e).__name__}: {e}"}}
    finally:
        srv.stop()


def workload_records(workload: List[TraceRequest]) -> List[dict]:
    """The request list as sent: arrival (s), prompt tokens, max_new_tokens (= output tokens), source."""
    return [{"arrival_s": r.arrival_s, "prompt_tokens": r.prompt_tokens, "max_new_tokens": r.output_tokens,
             "source": r.source} for r in workload]


def make_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=add_help)
    p.add_argument("--policies", nargs="+", default=["gyges", "static-dp-rr", "static-dp-ll", "static-tp"],
                   choices=ALL_POLICIES + ["auto"],
                   help="static-hybrid needs a TP>=2 instance plus a TP1 instance: >= 3 devices (skipped on 2)")
    p.add_argument("--model-dir", default="/tmp/sglang-bench-traces-demo")
    default_traces = REPO.parent / "shared" / "traces"
    if not default_traces.is_dir() and Path("/work/shared/traces").is_dir():
        default_traces = Path("/work/shared/traces")
    p.add_argument("--traces-dir", default=str(default_traces))
    p.add_argument("--short-trace", default="azure2023_conv.csv")
    p.add_argument("--long-trace", default="mooncake_synthetic.jsonl")
    p.add_argument("--window-start", type=float, default=120.0, help="seconds into each trace")
    p.add_argument("--window", type=float, default=300.0, help="seconds of each trace replayed")
    p.add_argument("--short-n", type=int, default=240, help="requests sampled from the short trace's window")
    p.add_argument("--long-n", type=int, default=80, help="requests sampled from the long trace's window")
    p.add_argument("--duration", type=float, default=75.0, help="seconds the window is compressed into")
    p.add_argument("--length-scale", type=float, default=1 / 12)
    p.add_argument("--output-scale", type=float, default=1 / 6)
    p.add_argument("--max-prompt", type=int, default=4500)
    p.add_argument("--max-output", type=int, default=64)
    p.add_argument("--max-total-tokens", type=int, default=2048, help="KV tokens per TP1 instance")
    p.add_argument("--split-delay", type=float, default=3.0)
    p.add_argument("--cost-model", help="JSON for --gyges-cost-model ('none': built-in constants; default: fit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=500, help="input ids drawn from [3, vocab)")
    p.add_argument("--slo-ttft", type=float, default=3.0, help="SLO: TTFT <= this (s)")
    p.add_argument("--slo-tpot", type=float, default=0.15, help="SLO: TPOT <= this (s)")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--sample-interval", type=float, default=0.5)
    p.add_argument("--tail-s", type=float, default=6.0, help="keep sampling the topology this long after the end")
    p.add_argument("--result-dir", default=str(RESULTS))
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="print the workload and exit")
    return p


def main() -> int:
    a = make_parser().parse_args()

    workload = build_workload(a)
    n_long = sum(1 for r in workload if r.prompt_tokens + r.output_tokens > a.max_total_tokens)
    wl = {"requests": len(workload), "span_s": workload[-1].arrival_s if workload else 0, "rate_req_s": rate(workload),
          "prompt_tokens": sum(r.prompt_tokens for r in workload), "output_tokens": sum(r.output_tokens for r in workload),
          "long_requests": n_long, "max_need": max(r.prompt_tokens + r.output_tokens for r in workload),
          "by_source": {s: sum(1 for r in workload if r.source == s) for s in {r.source for r in workload}}}
    print("workload:", json.dumps(wl), file=sys.stderr)
    if a.dry_run:
        return 0

    out_dir = Path(a.result_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-traces-logs-"))
    model_dir = ensure_model(a)
    cost_model = ensure_cost_model(a, model_dir) if any(x in ("gyges", "auto") for x in a.policies) else None
    runs: Dict[str, dict] = {policy: run_policy(policy, workload, a, model_dir, cost_model, log_dir)
                             for policy in a.policies}

    rows = [r["summary"] for r in runs.values()]
    md = table(rows, a)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
               f"load average before/after {os.getloadavg()}")
    try:
        import torch

        machine += f", torch {torch.__version__}"
    except ImportError:
        pass
    cmdline = "python benchmark/bench_traces.py " + " ".join(sys.argv[1:])
    print(md)
    skipped = [f"{r['policy']}: {r['skipped']}" for r in rows if "skipped" in r]
    (out_dir / "bench_traces.md").write_text(f"{cmdline}\n\nmachine: {machine}\n\nworkload: {json.dumps(wl)}\n\n{md}\n"
                                             + "".join(f"\nskipped {s}" for s in skipped) + "\n")
    pngs = [] if a.no_plot else plot(runs, a, out_dir)
    with open(out_dir / "bench_traces.json", "w") as f:
        json.dump({"command": cmdline, "args": vars(a), "machine": machine, "workload": wl,
                   "requests": workload_records(workload),
                   "cost_model": cost_model and json.loads(Path(cost_model).read_text()),
                   "runs": runs, "plots": pngs}, f, indent=1)
    print(f"wrote {out_dir / 'bench_traces.md'}, bench_traces.json, {', '.join(Path(x).name for x in pngs)}; "
          f"server logs in {log_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
