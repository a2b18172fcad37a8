"""Validate the simulator against the live engine: the same requests, the cost models measured on this
machine, every policy, side by side.

    python benchmark/validate_sim.py                       # bench_traces' workload, every policy (~12 min)
    python benchmark/validate_sim.py --policies gyges static-tp --short-n 60 --long-n 20 --duration 20

1. Cost models: `benchmark/measure_costs.py --model-path DEMO --out <results>/validate_sim_costmodel.json`;
   `--cost-model FILE` uses a model file measured before instead. The same file goes to the live Gyges server (--gyges-cost-model).
2. Live: `bench_traces.run_policy` per policy (a real `python -m sglang.launch_server` on 2 CPU devices,
   bench_traces' flags, its workload replayed over HTTP; static-hybrid needs >= 3 devices and is reported
   as skipped). Right before and right after the replay the server is probed (`--overhead-probes`
   sequential requests of 8 prompt tokens and 17 new ones, alone on it): the machine's speed now against
   when the model was measured (speed factor = their streamed decode step / that of the same probes at
   the same TP during step 1; the load of a shared machine drifts: 2x within minutes here), and the server's own per-request
   overhead (HTTP, tokenizer manager, controller, detokenizer: their TTFT less the scaled model's prefill).
3. Simulated: gyges.sim.Simulator fed the same requests (prompt length, max_new_tokens, arrival = when the
   client really sent each one in that live run), a SimConfig made from the live server's own flags
   (ServerArgs: page size, chunked prefill size, prefill budget, running limit; KV capacity of each TP as
   the live instances reported it) and controller behaviour (a tick on every iteration's report and every
   100 ms, none during a transformation; no request sizes reported), the measured models (step times x
   the speed factor, unless --no-speed-calibration; attention padding as the server's attention backend
   does it: engine_attention_padding), the measured overhead (half on the way in, half on
   the way out: only their sum is measured), and the policy object
   the live controller builds from the same flags (Controller._make_policy).
4. Per policy: live vs simulated throughput (req/s), TTFT p50/p99, TPOT p50, merges and splits with the
   relative error; errors above --tolerance (15%) or transformation counts off by more than one are
   flagged. Both sides are summarized by the same function from per-request records (bench_traces'
   definitions: TTFT from the send, TPOT = (last - first token) / (tokens - 1), throughput = completed /
   time from the replay's start to the last response).

Output: the table (stdout, <results>/validate_sim.md), <results>/validate_sim.json (the tables, the model
file, every request's live and simulated timeline) and validate_sim.png (per-request TTFT, live against
simulated, one panel per policy; needs matplotlib). Exit status 1 when any metric is flagged.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import aiohttp
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmark"))

import bench_traces  # noqa: E402
import measure_costs  # noqa: E402
from bench_common import cpu_model_name, pct  # noqa: E402
from gyges.costmodel import StepTimeModel, TransformCostModel  # noqa: E402
from gyges.sim.simulator import SimConfig, Simulator  # noqa: E402
from gyges.traces import TraceRequest  # noqa: E402

TOLERANCE = 0.15
METRICS = [  # (key, label, unit scale for the table, kind): kind "rel" = relative error, "count" = absolute
    ("throughput_req_s", "throughput (req/s)", 1.0, "rel"),
    ("ttft_p50_s", "TTFT p50 (s)", 1.0, "rel"),
    ("ttft_p99_s", "TTFT p99 (s)", 1.0, "rel"),
    ("tpot_p50_s", "TPOT p50 (ms)", 1e3, "rel"),
    ("merges", "merges", 1.0, "count"),
    ("splits", "splits", 1.0, "count"),
]


# =====================================================================================================
# Cost models
# =====================================================================================================
@dataclass
class StreamTiming:
    """One streamed request of a generate call, on the call's clock (seconds since it began)."""

    first_s: float  # first token received
    last_s: float  # last token received
    tokens: int  # completion tokens
    reads: int  # reads of the stream that brought new tokens (< tokens: some arrived together)

    @property
    def paced(self) -> bool:
        """Tokens after the first arrived one read each, at most one in four together: the client read the
        stream as the server wrote it (a client starved of CPU finds several events at once, and then
        last - first no longer spans the decode steps)."""
        return self.tokens > 1 and self.reads - 1 >= 0.75 * (self.tokens - 1)


class HttpEngine:
    """sglang.Engine's generate / gyges_topology / gyges_transform / flush_cache / shutdown over a running
    server's HTTP API, so that measure_costs.py's probe times the server as bench_traces drives it: every
    prompt of a generate call is its own streaming /generate request (input_ids, ignore_eos), all sent at
    once, and the call returns when the last stream ends. `last_timings`: when each request of the last call
    got its first and its last token (the client's view, as bench_traces times TTFT and TPOT)."""

    def __init__(self, url: str, timeout_s: float = 600.0):
        self.url = url
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.last_timings: List[StreamTiming] = []

    def _get(self, path: str) -> dict:
        return requests.get(self.url + path, timeout=self.timeout.total).json()

    def _post(self, path: str, body: dict) -> dict:
        resp = requests.post(self.url + path, json=body, timeout=self.timeout.total)
        if resp.status_code != 200:
            raise RuntimeError(f"POST {path} {body}: {resp.status_code} {resp.text[:300]}")
        return resp.json()

    async def stream_one(self, session: aiohttp.ClientSession, ids: List[int], sampling_params: dict,
                         t0: float) -> StreamTiming:
        """One streaming /generate of ids; times on the clock that started at t0."""
        body = {"input_ids": ids, "sampling_params": dict(sampling_params, temperature=0), "stream": True}
        first = last = None
        tokens = reads = 0
        async with session.post(self.url + "/generate", json=body, timeout=self.timeout) as resp:
            if resp.status != 200:
                raise RuntimeError(f"/generate: {resp.status} {(await resp.text())[:300]}")
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk
                before = tokens
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    payload = event.strip()[5:].strip()  # after "data:"
                    if not payload or payload == b"[DONE]":
                        continue
                    tokens = max(tokens, int(json.loads(payload).get("meta_info", {}).get("completion_tokens", 0)))
                if tokens > before:
                    last = time.perf_counter() - t0
                    first = last if first is None else first
                    reads += 1
        return StreamTiming(first or 0.0, last or 0.0, tokens, reads)

    async def _stream_all(self, prompts: List[List[int]], sampling_params: dict) -> List[StreamTiming]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            t0 = time.perf_counter()
            return await asyncio.gather(*(self.stream_one(session, ids, sampling_params, t0) for ids in prompts))

    async def stream_sequential(self, prompts: List[List[int]], sampling_params: dict) -> List[StreamTiming]:
        """One request after the other over one session (as the replay's client keeps one), each timed from
        its own send."""
        out = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            for ids in prompts:
                out.append(await self.stream_one(session, ids, sampling_params, time.perf_counter()))
        return out

    def generate(self, input_ids, sampling_params: dict) -> None:
        prompts = input_ids if input_ids and isinstance(input_ids[0], list) else [input_ids]
        self.last_timings = asyncio.run(self._stream_all(prompts, sampling_params))

    def gyges_topology(self) -> dict:
        return self._get("/gyges/topology")

    def gyges_transform(self, devices: List[int], tp: int) -> dict:
        return self._post("/gyges/transform", {"devices": devices, "tp": tp})

    def flush_cache(self) -> bool:
        return requests.post(self.url + "/flush_cache", timeout=self.timeout.total).status_code == 200

    def shutdown(self) -> None:
        pass  # the server is stopped by whoever started it


def small_grid():
    """The `--grid small` step cases (measure_costs.StepCase: batch per instance, cached prefix, fresh tokens,
    decode steps) for light loads of short requests: prefills of 32 to 512 tokens (one over a cached prefix,
    like a long prompt's later chunks), decodes of 1, 2 and 4 requests; ~20 s per TP degree on the demo model."""
    StepCase = measure_costs.StepCase
    return [StepCase(1, 0, 32, 16), StepCase(1, 0, 160, 16), StepCase(1, 0, 512, 16), StepCase(2, 0, 96, 16),
            StepCase(4, 0, 64, 16), StepCase(1, 1024, 512, 16)]


def streamed_decode_step(timings: Sequence[StreamTiming]) -> Optional[float]:
    """One decode step from a call's streams: the median over its paced requests (StreamTiming.paced) of
    (last - first token) / (tokens - 1); None when none was paced. Every token after the first is one decode
    iteration of the batch the request is in, and the prefill's time does not enter (timing two calls and
    subtracting, as measure_costs.py does in-process, buries a 5 ms decode step under the noise of a 300 ms
    prefill on a shared machine)."""
    steps = sorted((t.last_s - t.first_s) / (t.tokens - 1) for t in timings if t.paced)
    return steps[len(steps) // 2] if steps else None


class StreamingProbe(measure_costs.EngineProbe):
    """measure_costs.EngineProbe whose step cases are timed from the streams of one call per repeat: the
    prefill point is the call's time to the last request's first token (its prefill iteration, plus the
    request's way through the server: with_call_overhead), the decode point the streamed decode step;
    written in EngineProbe's raw format (decode_call_s = prefill + N steps), so measure_costs.fit_all fits
    them unchanged. The engine is an HttpEngine."""

    def step_case(self, case: measure_costs.StepCase, repeats: int) -> Dict:
        n = self.instances()
        prefix = [1] + self.tokens(case.prefix - 1) if case.prefix else []
        if prefix:  # one copy per instance: the least-loaded placement gives each instance its own
            self.generate([prefix + self.tokens(1) for _ in range(n)], 1)
        one, steps = [], []
        for _ in range(repeats + 2):  # up to two more calls when streams came back unpaced
            prompts = [(prefix or [1]) + self.tokens(case.suffix - (0 if prefix else 1)) for _ in range(case.batch * n)]
            self.generate(prompts, case.decode_steps + 1)
            timings = self.engine.last_timings
            step = streamed_decode_step(timings)
            if len(one) < repeats:
                one.append(max(t.first_s for t in timings))
            if step is not None:
                steps.append(step)
            if len(one) >= repeats and len(steps) >= repeats:
                break
        steps = steps or [0.0]  # no paced stream at all: no decode point (fit_all drops a step <= 0)
        t1 = sorted(one)[len(one) // 2]
        return {"case": asdict(case), "instances": n, "prefill_call_s": one,
                "decode_call_s": [t1 + case.decode_steps * d for d in steps], "timed": "streamed"}


def measure_alone_speedup(engine: HttpEngine, vocab: int, repeats: int = 3, steps: int = 16) -> dict:
    """How much faster a TP1 instance decodes while the other one is idle (SimConfig.alone_speedup): one
    32-token request decoding `steps` tokens alone, against two at once (one per instance); each decode
    step streamed (streamed_decode_step), the median of `repeats` calls."""
    import random

    rng = random.Random(1)

    def decode_step(k: int) -> Optional[float]:
        runs = []
        for _ in range(repeats + 2):  # up to two more calls when streams came back unpaced
            engine.generate([[1] + [rng.randrange(3, vocab) for _ in range(31)] for _ in range(k)],
                            {"max_new_tokens": steps + 1, "ignore_eos": True})
            step = streamed_decode_step(engine.last_timings)
            runs += [] if step is None else [step]
            if len(runs) >= repeats:
                break
        return sorted(runs)[len(runs) // 2] if runs else None

    alone, both = decode_step(1), decode_step(2)
    measured = bool(alone and both)
    return {"decode_alone_s": alone, "decode_both_s": both, "measured": measured,
            "alone_speedup": max(1.0, both / alone) if measured else 1.0}


def measure_cost_model(a, model_dir: str, out: Path, log_dir: Path) -> Path:
    """Measure the step-time and transformation models on this machine and write them to `out`.

    --costs server (default): measure_costs.py's probe (StreamingProbe: each step case on every instance at
    once, TP1 then TP2, then merges and splits holding different amounts of KV) and fit (fit_all), timed
    through a server started with bench_traces' flags (policy manual, the whole KV arena: the grid's batches
    need more than --max-total-tokens), streaming like the replay (prefill = time to the first tokens, decode
    step = the streamed time between tokens), and first measure_alone_speedup (written under "fit" ->
    "serving"). --grid: small (small_grid), quick or full (measure_costs.py's). --costs engine:
    `measure_costs.py` as it is (an in-process sglang.Engine; no alone_speedup: 1)."""
    if a.costs == "engine":
        cmd = [sys.executable, str(REPO / "benchmark" / "measure_costs.py"), "--model-path", model_dir,
               "--out", str(out)] + (["--quick"] if a.grid != "full" else [])
        print("measuring the cost models:", " ".join(cmd[1:]), file=sys.stderr)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return out
    from gyges.costmodel import save_models

    probe_args = copy.copy(a)
    probe_args.max_total_tokens = 1 << 30
    srv = bench_traces.Server(model_dir, "manual", probe_args, None, log_dir)
    t0 = time.perf_counter()
    load0 = list(os.getloadavg())
    try:
        srv.wait_ready()
        print(f"measuring the cost models through {srv.url} ({a.grid} grid)", file=sys.stderr)
        cases = small_grid() if a.grid == "small" else measure_costs.step_cases(a.grid == "quick")
        repeats = 3  # best of: a shared machine only ever makes a run slower
        vocab = int(json.loads((Path(model_dir) / "config.json").read_text()).get("vocab_size", 512))
        probe = StreamingProbe(HttpEngine(srv.url), 2, vocab, 16)
        raw: dict = {"steps": {}, "transforms": []}
        probe.warm()
        serving = measure_alone_speedup(probe.engine, vocab)
        for tp in (1, 2):
            probe.set_tp(tp)
            probe.warm()
            serving.setdefault("probe_decode_s", {})[str(tp)] = probe_decode_step(srv.url, a.overhead_probes)
            raw["steps"][str(tp)] = [probe.step_case(c, repeats) for c in cases]
        probe.set_tp(1)
        for k in (512, 1536) if a.grid == "small" else measure_costs.fill_tokens(a.grid == "quick"):
            probe.engine.flush_cache()
            probe.fill(k)
            probe.set_tp(2)
            probe.set_tp(1)
        raw["transforms"] = probe.transforms
    finally:
        srv.stop()
    from sglang.srt.server_args import prepare_server_args

    parts, fitted = measure_costs.fit_all(raw, model_dir, "float32",
                                          engine_attention_padding(prepare_server_args(srv.args[3:])))
    print(measure_costs.summary_table(fitted), file=sys.stderr)
    info = {"source": "benchmark/validate_sim.py: measure_costs.py's probe and fit over the HTTP API of "
                      "python -m sglang.launch_server " + " ".join(srv.args[3:]),
            "grid": a.grid, "serving": serving, "loadavg_before_after": [load0, list(os.getloadavg())], "step_time": parts["step_report"],
            "transform": parts["transform_report"], "raw": raw, "wall_s": time.perf_counter() - t0}
    save_models(str(out), parts["step"], parts["transform"], info)
    return out


# =====================================================================================================
# Live
# =====================================================================================================
PROBE_PROMPT, PROBE_NEW = 8, 17  # the probe requests (prompt tokens, new tokens)


def _probe_server(url: str, n: int, prompt_len: int, new_tokens: int) -> List[StreamTiming]:
    """n sequential streaming requests of prompt_len tokens and new_tokens new ones, each alone on the server."""
    prompts = [[1] + [3 + (7 * i + j) % 400 for j in range(prompt_len - 1)] for i in range(n)]
    return asyncio.run(HttpEngine(url).stream_sequential(prompts, {"max_new_tokens": new_tokens, "ignore_eos": True}))


def probe_decode_step(url: str, n: int) -> Optional[float]:
    """The median streamed decode step of n probe requests (PROBE_PROMPT + PROBE_NEW tokens, sequential)."""
    timings = _probe_server(url, n + 1, PROBE_PROMPT, PROBE_NEW)[1:]  # the first pays one-off costs
    steps = [(t.last_s - t.first_s) / (t.tokens - 1) for t in timings if t.paced]
    return pct(steps, 50)


def scaled(model: StepTimeModel, factor: float) -> StepTimeModel:
    """model with every time term multiplied by factor (a machine `factor` times slower)."""
    return dataclasses.replace(model, **{f.name: getattr(model, f.name) * factor for f in dataclasses.fields(model)
                                         if f.name.endswith("_s")})


def serving_of(model_file: Path) -> dict:
    """What measure_cost_model measured beside the fit ("fit" -> "serving"; {} for another model file)."""
    fit = json.loads(Path(model_file).read_text()).get("fit") or {}
    return fit.get("serving") or {}


def alone_speedup_of(model_file: Path) -> float:
    """SimConfig.alone_speedup measured with a model file (1 when it was not measured)."""
    return float(serving_of(model_file).get("alone_speedup", 1.0))


def live_run(policy: str, workload: List[TraceRequest], a, model_dir: str, cost_model: str, log_dir: Path,
             step_model: StepTimeModel, alone_speedup: float = 1.0, reference_decode: Optional[dict] = None) -> dict:
    """bench_traces' live run of `policy`, with the server probed right before and right after the replay (on a
    shared machine the load drifts: the two sides bracket the replay): `--overhead-probes` sequential requests
    of PROBE_PROMPT prompt tokens and PROBE_NEW new ones each time, alone on the server.

    speed_factor (with --speed-calibration): the median streamed decode step of the probes over that of the
    same probes when the model was measured (reference_decode: TP -> seconds, measure_cost_model's
    "probe_decode_s"; probes on an instance of another TP than the run's first are not compared): how much
    slower or faster the machine runs now than then; the simulation scales every step time by it. overhead =
    the median of (probe TTFT - the scaled model's prefill of PROBE_PROMPT tokens): the request's way
    through the server (HTTP, tokenizer manager, controller, detokenizer)."""
    probe: dict = {"ttft_s": [], "decode_step_s": [], "model_prefill_s": [], "reference_decode_s": None}

    def measure(url: str, topology: dict) -> None:
        tp = max(int(i["tp"]) for i in topology["instances"])
        alone = alone_speedup if len(topology["instances"]) > 1 else 1.0  # each probe runs alone on the host
        timings = _probe_server(url, a.overhead_probes + 1, PROBE_PROMPT, PROBE_NEW)[1:]  # the first pays one-offs
        probe["ttft_s"] += [t.first_s for t in timings]
        probe["model_prefill_s"] += [step_model.batch_time([(PROBE_PROMPT, PROBE_PROMPT)], tp) / alone] * len(timings)
        probe.setdefault("tp", tp)
        if tp == probe["tp"]:
            probe["decode_step_s"] += [(t.last_s - t.first_s) / (t.tokens - 1) for t in timings if t.paced]

    run = bench_traces.run_policy(policy, workload, a, model_dir, cost_model, log_dir, before_replay=measure,
                                  after_replay=measure)
    factor = 1.0
    ref = (reference_decode or {}).get(str(probe.get("tp")))
    if a.speed_calibration and probe["decode_step_s"] and ref:
        probe["reference_decode_s"] = ref
        factor = pct(probe["decode_step_s"], 50) / ref
    probe["speed_factor"] = factor
    probe["overhead_s"] = max(0.0, pct([t - factor * m for t, m in zip(probe["ttft_s"], probe["model_prefill_s"])],
                                       50) or 0.0)
    run["overhead_probe"] = probe
    return run


# =====================================================================================================
# Simulated
# =====================================================================================================
def engine_attention_padding(server_args) -> float:
    """StepTimeModel.padding of the attention backend these server flags run on this machine."""
    return measure_costs.attention_padding(server_args.attention_backend, server_args.device, server_args.dtype)


def controller_policy(server_argv: Sequence[str]):
    """The policy object the live controller builds from these launch_server flags."""
    from sglang.srt.managers.controller import Controller
    from sglang.srt.server_args import prepare_server_args

    args = prepare_server_args(list(server_argv))
    return Controller._make_policy(None, args), args


def capacities(runs: Dict[str, dict]) -> Dict[int, int]:
    """KV tokens of an instance of each TP, as the live instances reported them."""
    caps: Dict[int, int] = {}
    for run in runs.values():
        for devices, tp, cap in run.get("summary", {}).get("initial_instances", []):
            caps.setdefault(int(tp), int(cap))
        for s in run.get("samples", []):
            for i in s["instances"]:
                if i.get("kv_capacity_tokens") and i.get("state") != "transforming":
                    caps.setdefault(int(i["tp"]), int(i["kv_capacity_tokens"]))
    return caps


def sim_config(server_args, caps: Dict[int, int], step_model: StepTimeModel, transform_model: TransformCostModel,
               overhead_s: float, alone_speedup: float = 1.0) -> SimConfig:
    """The simulator configured as the live server runs (module docstring, step 3)."""
    n = server_args.num_devices
    return SimConfig(
        num_devices=n, max_tp=server_args.gyges_max_tp or n, kv_tokens_per_device=caps.get(1, 0),
        capacity_by_tp=dict(caps), chunk_tokens=1 << 40, chunked_prefill_size=server_args.chunked_prefill_size,
        max_prefill_tokens=server_args.max_prefill_tokens, max_running_requests=server_args.max_running_requests,
        page_size=server_args.page_size, tick_s=0.1, tick_on_step=True, tick_during_transform=False,
        report_largest_request=False, dispatch_s=overhead_s / 2, response_s=overhead_s / 2, settle_s=10.0,
        alone_speedup=alone_speedup,
        step_model=step_model, transform_model=transform_model)


def simulate_run(run: dict, caps: Dict[int, int], step_model: StepTimeModel, transform_model: TransformCostModel,
                 alone_speedup: float = 1.0) -> Tuple[dict, List[dict]]:
    """The simulator on the requests of one live run. Returns (the Simulator's result dict, per-request
    records in bench_traces' Result fields)."""
    policy, server_args = controller_policy(run["server_args"][2:])  # after "-m sglang.launch_server"
    overhead = run["overhead_probe"]["overhead_s"]
    step_model = dataclasses.replace(scaled(step_model, run["overhead_probe"].get("speed_factor", 1.0)),
                                     padding=engine_attention_padding(server_args))
    cfg = sim_config(server_args, caps, step_model, transform_model, overhead, alone_speedup)
    live = run["results"]
    trace = [TraceRequest(r["sent_s"] if r.get("sent_s") is not None else r["arrival_s"], r["prompt_tokens"],
                          r["max_new_tokens"], None, r["source"]) for r in live]
    sim = Simulator(policy, trace, cfg)
    result = sim.run()
    # Simulator sorts by arrival and names requests r0..; map back to the live order.
    order = sorted(range(len(trace)), key=lambda i: trace[i].arrival_s)
    records: List[Optional[dict]] = [None] * len(trace)
    lag = cfg.response_s
    for sreq, i in zip(sim.reqs, order):
        done = sreq.finished_at is not None
        records[i] = {
            "idx": live[i]["idx"], "source": live[i]["source"], "prompt_tokens": sreq.prompt,
            "max_new_tokens": sreq.output, "arrival_s": live[i]["arrival_s"], "sent_s": sreq.arrival,
            "ok": done, "error": sreq.rejected or ("" if done else "unfinished"),
            "ttft_s": sreq.first_token_at + lag - sreq.arrival if done else None,
            "tpot_s": ((sreq.finished_at - sreq.first_token_at) / (sreq.output - 1)
                       if done and sreq.output > 1 else None),
            "completion_tokens": sreq.output if done else 0,
            "first_token_s": sreq.first_token_at + lag if done else None,
            "end_s": sreq.finished_at + lag if done else None,
            "placed_s": sreq.placed_at,
        }
    out = result.to_dict()
    out["config"] = {k: v for k, v in cfg.__dict__.items() if k not in ("step_model", "transform_model")}
    return out, records


# =====================================================================================================
# Comparison
# =====================================================================================================
def metrics(records: List[dict], merges: int, splits: int) -> dict:
    """The compared metrics from per-request records (the same function for live and simulated)."""
    ok = [r for r in records if r["ok"]]
    ends = [r["end_s"] for r in ok if r.get("end_s") is not None]
    makespan = max(ends) if ends else 0.0
    return {
        "completed": len(ok), "requests": len(records),
        "throughput_req_s": len(ok) / makespan if makespan > 0 else 0.0,
        "output_tok_s": sum(r["completion_tokens"] for r in ok) / makespan if makespan > 0 else 0.0,
        "ttft_p50_s": pct([r["ttft_s"] for r in ok if r["ttft_s"] is not None], 50),
        "ttft_p99_s": pct([r["ttft_s"] for r in ok if r["ttft_s"] is not None], 99),
        "tpot_p50_s": pct([r["tpot_s"] for r in ok if r["tpot_s"] is not None], 50),
        "merges": merges, "splits": splits, "makespan_s": makespan,
    }


def compare(live: dict, sim: dict, tolerance: float) -> List[dict]:
    rows = []
    for key, label, scale, kind in METRICS:
        lv, sv = live.get(key), sim.get(key)
        if lv is None or sv is None:
            rows.append({"metric": key, "label": label, "live": lv, "sim": sv, "error": None, "flag": lv != sv})
            continue
        if kind == "count":
            err = sv - lv
            flag = abs(err) > 1
        else:
            err = (sv - lv) / lv if lv else (0.0 if sv == 0 else float("inf"))
            flag = abs(err) > tolerance
        rows.append({"metric": key, "label": label, "live": lv, "sim": sv, "error": err, "flag": bool(flag),
                     "scale": scale, "kind": kind})
    return rows


def per_request_agreement(live: List[dict], sim: List[dict]) -> dict:
    """How the per-request TTFTs agree: median and p90 of |sim - live|, and of the relative difference."""
    pairs = [(a["ttft_s"], b["ttft_s"]) for a, b in zip(live, sim)
             if a.get("ttft_s") is not None and b.get("ttft_s") is not None]
    if not pairs:
        return {}
    absd = [abs(s - l) for l, s in pairs]
    rel = [abs(s - l) / l for l, s in pairs if l > 0]
    return {"pairs": len(pairs), "abs_diff_p50_s": pct(absd, 50), "abs_diff_p90_s": pct(absd, 90),
            "rel_diff_p50": pct(rel, 50), "rel_diff_p90": pct(rel, 90)}


def fmt_value(v, scale: float, kind: str) -> str:
    if v is None:
        return "n/a"
    if kind == "count":
        return f"{int(v)}"
    return f"{v * scale:,.3f}"


def table(policy: str, rows: List[dict], tolerance: float) -> str:
    lines = [f"| {policy} | live | simulated | error |", "|---|---|---|---|"]
    for r in rows:
        kind, scale = r.get("kind", "rel"), r.get("scale", 1.0)
        if r["error"] is None:
            err = "n/a"
        elif kind == "count":
            err = f"{r['error']:+d}"
        else:
            err = f"{r['error'] * 100:+.1f}%"
        flag = " **over**" if r["flag"] else ""
        lines.append(f"| {r['label']} | {fmt_value(r['live'], scale, kind)} | {fmt_value(r['sim'], scale, kind)} | "
                     f"{err}{flag} |")
    return "\n".join(lines)


def plot(entries: Dict[str, dict], path: Path) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e './python[bench]'): no plot", file=sys.stderr)
        return None
    names = [p for p, e in entries.items() if "live_requests" in e]
    if not names:
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        e = entries[name]
        xs, ys, cs = [], [], []
        for lv, sv in zip(e["live_requests"], e["sim_requests"]):
            if lv.get("ttft_s") is None or sv.get("ttft_s") is None:
                continue
            xs.append(lv["ttft_s"])
            ys.append(sv["ttft_s"])
            cs.append("C3" if lv["source"] and "mooncake" in lv["source"] else "C0")
        ax.scatter(xs, ys, s=8, c=cs, alpha=0.6)
        top = max(xs + ys + [1e-3])
        ax.plot([0, top], [0, top], "k--", lw=0.8)
        ax.set_title(name)
        ax.set_xlabel("live TTFT (s)")
        ax.set_ylabel("simulated TTFT (s)")
    fig.suptitle("per-request TTFT, live vs simulated (red: long-context trace)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# =====================================================================================================
# Main
# =====================================================================================================
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], parents=[bench_traces.make_parser(add_help=False)],
                                conflict_handler="resolve")
    p.add_argument("--policies", nargs="+", default=list(bench_traces.ALL_POLICIES),
                   choices=bench_traces.ALL_POLICIES + ["auto"],
                   help="policies to run live and simulate (auto: the Gyges policy as --gyges-policy auto)")
    p.add_argument("--cost-model", default=None,
                   help="a model file measured before (default: measure now, step 1 of the module docstring)")
    p.add_argument("--grid", choices=["small", "quick", "full"], default="quick",
                   help="step cases measured: small_grid(), or measure_costs.py's --quick / full grid")
    p.add_argument("--costs", choices=["server", "engine"], default="server",
                   help="measure through a server with bench_traces' flags (default) or an in-process Engine")
    p.add_argument("--measure-once", dest="measure_each", action="store_false",
                   help="measure the models once for all policies (default: right before each live run)")
    p.add_argument("--overhead-probes", type=int, default=8,
                   help="sequential requests probing the server before and after each replay (overhead, speed)")
    p.add_argument("--no-speed-calibration", dest="speed_calibration", action="store_false",
                   help="simulate with the step model as measured (default: scaled by the probes' speed factor)")
    p.add_argument("--tolerance", type=float, default=TOLERANCE, help="relative error flagged (default 0.15)")
    p.add_argument("--out-name", default="validate_sim", help="file name stem under --result-dir")
    return p.parse_args(argv)


def validate(a, workload: Optional[List[TraceRequest]] = None) -> dict:
    """Steps 1-4 of the module docstring for every policy in a.policies (workload: bench_traces' by default).
    Without --cost-model the models are measured right before each policy's live run (the machine's speed
    drifts when it is shared), and that policy's server and simulation use them."""
    out_dir = Path(a.result_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="validate-sim-logs-"))
    workload = workload if workload is not None else bench_traces.build_workload(a)
    model_dir = bench_traces.ensure_model(a)
    load_before = os.getloadavg()
    runs: Dict[str, dict] = {}
    models: Dict[str, Path] = {}
    for policy in a.policies:
        reason = bench_traces.skip_reason(policy)
        if reason:
            runs[policy] = {"summary": {"policy": policy, "skipped": reason}}
            continue
        if a.cost_model:
            models[policy] = Path(a.cost_model)
        elif not a.measure_each and models:
            models[policy] = next(iter(models.values()))
        else:
            models[policy] = measure_cost_model(a, model_dir, out_dir / f"{a.out_name}_costmodel_{policy}.json",
                                                log_dir)
        step_model = StepTimeModel.load(str(models[policy]))
        runs[policy] = live_run(policy, workload, a, model_dir, str(models[policy]), log_dir, step_model,
                                alone_speedup_of(models[policy]), serving_of(models[policy]).get("probe_decode_s"))
    caps = capacities(runs)
    entries: Dict[str, dict] = {}
    for policy, run in runs.items():
        if "skipped" in run["summary"]:
            entries[policy] = {"skipped": run["summary"]["skipped"]}
            continue
        step_model = StepTimeModel.load(str(models[policy]))
        transform_model = TransformCostModel.load(str(models[policy]))
        sim_result, sim_records = simulate_run(run, caps, step_model, transform_model,
                                               alone_speedup_of(models[policy]))
        live_m = metrics(run["results"], run["summary"]["merges"], run["summary"]["splits"])
        sim_m = metrics(sim_records, sim_result["merges"], sim_result["splits"])
        rows = compare(live_m, sim_m, a.tolerance)
        entries[policy] = {"live": live_m, "sim": sim_m, "rows": rows, "live_summary": run["summary"],
                           "server_args": run["server_args"],
                           "per_request_ttft": per_request_agreement(run["results"], sim_records),
                           "overhead_probe": run["overhead_probe"], "live_history": run["history"],
                           "cost_model_file": str(models[policy]),
                           "cost_model": json.loads(models[policy].read_text()),
                           "sim_timeline": sim_result["timeline"], "sim_config": sim_result["config"],
                           "live_requests": run["results"], "sim_requests": sim_records}
    machine = (f"{cpu_model_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
               f"load average before {tuple(round(x, 2) for x in load_before)}, after "
               f"{tuple(round(x, 2) for x in os.getloadavg())}")
    return {"entries": entries, "capacities": caps, "machine": machine, "log_dir": str(log_dir),
            "workload": bench_traces.workload_records(workload)}


def report(res: dict, a, cmdline: str) -> Tuple[str, bool]:
    parts = [f"`{cmdline}`", "", f"machine: {res['machine']}", ""]
    flagged = False
    for policy, e in res["entries"].items():
        if "skipped" in e:
            parts += [f"{policy}: skipped ({e['skipped']})", ""]
            continue
        flagged |= any(r["flag"] for r in e["rows"])
        pr = e["per_request_ttft"]
        parts += [table(policy, e["rows"], a.tolerance), "",
                  f"{policy}: {e['live']['completed']}/{e['live']['requests']} completed live, "
                  f"{e['sim']['completed']} simulated; per-request TTFT |sim - live| p50 "
                  f"{pr.get('abs_diff_p50_s', float('nan')):.3f} s, p90 {pr.get('abs_diff_p90_s', float('nan')):.3f} s; "
                  f"measured overhead {e['overhead_probe'].get('overhead_s', float('nan')) * 1e3:.1f} ms, machine "
                  f"speed factor {e['overhead_probe'].get('speed_factor', 1.0):.2f} (probe decode step now / when "
                  f"the model was measured); "
                  f"load average before/after the replay {e['live_summary'].get('loadavg_before_after')}", ""]
    summaries = [e["live_summary"] for e in res["entries"].values() if "live_summary" in e]
    if summaries:
        parts += ["The live runs (bench_traces' table):", "", bench_traces.table(summaries, a), ""]
    return "\n".join(parts), flagged


def write_outputs(res: dict, a, cmdline: str) -> bool:
    """Print the tables and write <out-name>.md / .json / .png under --result-dir; returns whether any
    metric is flagged."""
    md, flagged = report(res, a, cmdline)
    print(md)
    out_dir = Path(a.result_dir)
    (out_dir / f"{a.out_name}.md").write_text(md + "\n")
    png = None if a.no_plot else plot(res["entries"], out_dir / f"{a.out_name}.png")
    res.update({"command": cmdline, "args": vars(a), "plot": png, "flagged": flagged})
    with open(out_dir / f"{a.out_name}.json", "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {out_dir / (a.out_name + '.md')}, .json{', .png' if png else ''}; server logs in {res['log_dir']}",
          file=sys.stderr)
    return flagged


def main(argv=None) -> int:
    a = parse_args(argv)
    res = validate(a)
    cmdline = "python benchmark/validate_sim.py " + " ".join(argv if argv is not None else sys.argv[1:])
    return 1 if write_outputs(res, a, cmdline) else 0


if __name__ == "__main__":
    sys.exit(main())
