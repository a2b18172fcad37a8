"""Cost models the policy and the simulator use (pure arithmetic, parameters in a small JSON file).

Data flow: `gyges.plans` gives the bytes a transformation moves; `transform_cost` turns them into
seconds with a link bandwidth. `StepTimeModel.step_time` predicts one forward iteration of an instance of
TP tp; the simulator advances time with it and the policy compares options with it. Parameters are fitted
offline (benchmark/) and saved with `save` / loaded with `load`. `TransformCostModel` estimates what a
merge or a split moves (KV bytes from the members' used tokens, weight bytes from the model size) and how
long it pauses the instances involved; the Gyges policy ranks candidate merges with it and the simulator
pauses instances for its estimate.

Step-time model (seconds), per forward iteration of an instance of TP tp:

    step_time = base_s
              + weight_s / tp                       (reading the weight shard once)
              + per_token_s * batch_tokens / tp     (GEMM work of the new tokens)
              + per_context_token_s * context_tokens / tp   (attention reads of the KV cache)
              + (allreduce_s + allreduce_per_token_s * batch_tokens) * allreduce_scale(tp)   (0 at tp=1)

with allreduce_scale(tp) = 2 * (tp - 1) / tp (ring all-reduce traffic per byte; 1 at TP2), so TP adds a
communication cost per step that TP1 does not pay: that is why k TP1 instances out-serve one TP-k.

Parameter file (what `--gyges-cost-model` and `python -m gyges.sim --step-model` load; written by
`python -m gyges.costmodel fit`, see `main`):

    {"format": "gyges-costmodel/1",
     "step_time": {"base_s": .., "weight_s": .., "per_token_s": .., "per_context_token_s": ..,
                   "allreduce_s": .., "allreduce_per_token_s": ..},                  (StepTimeModel, seconds)
     "transform": {"kv_bytes_per_token": .., "weight_bytes": ..,                        (TransformCostModel)
                   "link_bandwidth_bytes_per_s": .., "fixed_overhead_s": ..},
     "fit": {...}}                                  (provenance: sources, points, residuals; not read back)

`StepTimeModel.load` / `TransformCostModel.load` read their section of such a file, or a flat file holding
only their own fields (what their `save` writes); a section that is missing keeps the defaults.

Fitting (`fit_step_time`, `fit_transform_cost`): relative least squares (each point weighted by 1/measured
time, so a 2 ms step counts as much as a 2 s one) with every parameter >= 0 (Lawson-Hanson NNLS, written
out here: gyges has no dependencies). base_s, weight_s and allreduce_s can never be told apart from step
times alone, at any set of TP degrees: allreduce_scale(tp) = 2 - 2/tp, so base_s + weight_s/tp +
allreduce_s*allreduce_scale(tp) only determines base_s + 2*allreduce_s and weight_s - 2*allreduce_s. The fit
command therefore fixes weight_s to weight bytes / memory bandwidth when it knows them (bench_one_batch's
roofline, or --measure), else fixes allreduce_s to 0; the predicted step times are the same either way.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, fields
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

FORMAT = "gyges-costmodel/1"


def _section(d: dict, key: str) -> dict:
    """The `key` section of a combined parameter file, or d itself if it is a flat one."""
    if "format" in d or "step_time" in d or "transform" in d:
        return dict(d.get(key) or {})
    return d


def _from_dict(cls, d: dict, what: str):
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {what} parameters: {sorted(unknown)}")
    return cls(**{k: float(v) for k, v in d.items()})


@dataclass(frozen=True)
class TransformCost:
    kv_bytes: int
    weight_bytes: int
    est_seconds: float

    @property
    def total_bytes(self) -> int:
        return self.kv_bytes + self.weight_bytes


def transform_cost(kv_bytes: int, weight_bytes: int, bandwidth_bytes_per_s: float,
                   fixed_overhead_s: float = 0.0) -> TransformCost:
    """Seconds to move kv_bytes + weight_bytes over a link of the given bandwidth, plus a fixed overhead
    (planning, synchronisation)."""
    if bandwidth_bytes_per_s <= 0:
        raise ValueError("bandwidth must be positive")
    if kv_bytes < 0 or weight_bytes < 0:
        raise ValueError("byte counts must be >= 0")
    secs = fixed_overhead_s + (kv_bytes + weight_bytes) / bandwidth_bytes_per_s
    return TransformCost(kv_bytes, weight_bytes, secs)


@dataclass(frozen=True)
class StepTimeModel:
    base_s: float = 0.006  # fixed per-iteration overhead (scheduling, launches)
    weight_s: float = 0.010  # time to stream all weights once at TP1
    per_token_s: float = 2e-5  # per new token (prefill/decode compute) at TP1
    per_context_token_s: float = 5e-8  # per cached token attended, at TP1
    allreduce_s: float = 0.003  # all-reduce latency per step of a TP2 instance (scaled for larger tp)
    allreduce_per_token_s: float = 1e-5  # all-reduce traffic per new token at TP2 (activations)

    @staticmethod
    def allreduce_scale(tp: int) -> float:
        return 2.0 * (tp - 1) / tp

    def step_time(self, batch_tokens: int, context_tokens: int, tp: int) -> float:
        if tp < 1:
            raise ValueError(f"tp must be >= 1, got {tp}")
        if batch_tokens < 0 or context_tokens < 0:
            raise ValueError("token counts must be >= 0")
        comm = (self.allreduce_s + self.allreduce_per_token_s * batch_tokens) * self.allreduce_scale(tp) \
            if tp > 1 else 0.0
        return (self.base_s + self.weight_s / tp + self.per_token_s * batch_tokens / tp
                + self.per_context_token_s * context_tokens / tp + comm)

    # -- persistence -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StepTimeModel":
        return _from_dict(cls, d, "step-time")

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: str) -> "StepTimeModel":
        """A flat file (save) or the "step_time" section of a combined parameter file."""
        with open(path) as f:
            return cls.from_dict(_section(json.load(f), "step_time"))


@dataclass(frozen=True)
class TransformCostModel:
    """Bytes and seconds of a merge or split, from token counts (what the controller knows).

    KV: a part of TP t merged into TP T keeps 1/stride of each used page's bytes in place (stride = T/t,
    gyges.plans) and moves the rest; a split moves the same fraction back. Weights: a merge keeps each
    device's new (smaller) shard in place and moves nothing; a split to TP t re-gathers, on each of the T
    devices, the rows of its larger shard it lacks: weight_bytes * (T/t - 1) in all. Moves run on all the
    devices' links at once, so the time is bytes / (link bandwidth * devices) plus a fixed overhead.
    """

    kv_bytes_per_token: float = 131072.0  # all KV heads, all layers, one token (8B model: 32*8*128*2*2)
    weight_bytes: float = 16e9  # the whole model's sharded weights
    link_bandwidth_bytes_per_s: float = 50e9  # per device (P2P copy bandwidth)
    fixed_overhead_s: float = 0.05  # planning, synchronisation, page-table rewrites

    def _cost(self, kv_bytes: float, weight_bytes: float, devices: int) -> TransformCost:
        return transform_cost(int(kv_bytes), int(weight_bytes), self.link_bandwidth_bytes_per_s * max(1, devices),
                              self.fixed_overhead_s)

    def merge_cost(self, parts: Sequence[Tuple[int, int]], tp: int) -> TransformCost:
        """parts: (tp, used KV tokens) of each source instance; tp: the merged instance's TP."""
        if sum(t for t, _ in parts) != tp:
            raise ValueError(f"parts of TP {[t for t, _ in parts]} do not make one instance of TP {tp}")
        kv = sum(used * self.kv_bytes_per_token * (1.0 - t / tp) for t, used in parts)
        return self._cost(kv, 0.0, tp)

    def split_cost(self, tp: int, new_tp: int, used_tokens: int) -> TransformCost:
        """Split an instance of TP tp holding used_tokens of KV into instances of TP new_tp."""
        if new_tp < 1 or new_tp >= tp or tp % new_tp:
            raise ValueError(f"cannot split TP {tp} into TP {new_tp}")
        kv = used_tokens * self.kv_bytes_per_token * (1.0 - new_tp / tp)
        weights = self.weight_bytes * (tp / new_tp - 1.0)
        return self._cost(kv, weights, tp)

    # -- persistence -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TransformCostModel":
        return _from_dict(cls, d, "transform-cost")

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: str) -> "TransformCostModel":
        """A flat file (save) or the "transform" section of a combined parameter file."""
        with open(path) as f:
            return cls.from_dict(_section(json.load(f), "transform"))


def save_models(path: str, step: Optional[StepTimeModel] = None, transform: Optional[TransformCostModel] = None,
                fit_info: Optional[dict] = None) -> dict:
    """Write a combined parameter file (the schema in the module docstring); returns what was written."""
    d: dict = {"format": FORMAT}
    if step is not None:
        d["step_time"] = step.to_dict()
    if transform is not None:
        d["transform"] = transform.to_dict()
    if fit_info:
        d["fit"] = fit_info
    with open(path, "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)
    return d


# =====================================================================================================
# Fitting: non-negative least squares, by hand
# =====================================================================================================
def _solve(m: List[List[float]], v: List[float]) -> List[float]:
    """Gaussian elimination with partial pivoting (m square; a singular pivot gives 0 for that unknown)."""
    n = len(v)
    a = [row[:] + [v[i]] for i, row in enumerate(m)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(a[r][c]))
        a[c], a[p] = a[p], a[c]
        if abs(a[c][c]) < 1e-300:
            continue
        for r in range(c + 1, n):
            f = a[r][c] / a[c][c]
            if f:
                for k in range(c, n + 1):
                    a[r][k] -= f * a[c][k]
    x = [0.0] * n
    for c in reversed(range(n)):
        if abs(a[c][c]) < 1e-300:
            continue
        x[c] = (a[c][n] - sum(a[c][k] * x[k] for k in range(c + 1, n))) / a[c][c]
    return x


def _lstsq_on(cols: Sequence[Sequence[float]], y: Sequence[float], active: Sequence[int]) -> Dict[int, float]:
    """Unconstrained least squares using only the `active` columns (unit-norm columns, tiny ridge so that
    exactly collinear columns still give one answer)."""
    m = [[sum(a * b for a, b in zip(cols[i], cols[j])) for j in active] for i in active]
    for k in range(len(active)):
        m[k][k] += 1e-12
    v = [sum(a * b for a, b in zip(cols[i], y)) for i in active]
    return dict(zip(active, _solve(m, v)))


def nnls(rows: Sequence[Sequence[float]], y: Sequence[float], max_iter: int = 200) -> List[float]:
    """argmin ||A x - y||_2 subject to x >= 0 (Lawson-Hanson active set). rows: A's rows."""
    if not rows:
        raise ValueError("no data points to fit")
    n = len(rows[0])
    if any(len(r) != n for r in rows) or len(rows) != len(y):
        raise ValueError("rows and y do not match")
    # scale every column to unit norm (conditioning); all-zero columns stay out of the fit
    norms = [math.sqrt(sum(r[j] ** 2 for r in rows)) for j in range(n)]
    cols = [[r[j] / norms[j] for r in rows] if norms[j] > 0 else [0.0] * len(rows) for j in range(n)]
    usable = [j for j in range(n) if norms[j] > 0]
    x = [0.0] * n
    passive: List[int] = []
    tol = 1e-12 * max(1.0, math.sqrt(sum(v * v for v in y)))

    def residual() -> List[float]:
        return [yi - sum(cols[j][i] * x[j] for j in passive) for i, yi in enumerate(y)]

    for _ in range(max_iter):
        res = residual()
        grad = {j: sum(c * r for c, r in zip(cols[j], res)) for j in usable if j not in passive}
        if not grad:
            break
        j, g = max(grad.items(), key=lambda kv: kv[1])
        if g <= tol:
            break
        passive.append(j)
        while True:
            z = _lstsq_on(cols, y, passive)
            if all(z[k] > 0 for k in passive):
                for k in passive:
                    x[k] = z[k]
                break
            # step from x towards z until the first passive coefficient reaches 0; that one leaves
            steps = {k: (x[k] / (x[k] - z[k]) if x[k] - z[k] > 0 else 0.0) for k in passive if z[k] <= 0}
            first = min(steps, key=steps.get)
            alpha = steps[first]
            for k in passive:
                x[k] = x[k] + alpha * (z[k] - x[k])
            eps = 1e-12 * max(abs(x[k]) for k in passive) if passive else 0.0
            passive = [k for k in passive if k != first and x[k] > eps]
            for k in range(n):
                if k not in passive:
                    x[k] = 0.0
            if not passive:
                break
    return [x[j] / norms[j] if norms[j] > 0 else 0.0 for j in range(n)]


def _fit_report(pred: Sequence[float], y: Sequence[float]) -> dict:
    rel = [(p - t) / t for p, t in zip(pred, y) if t > 0]
    return {"points": len(y),
            "rms_rel_error": math.sqrt(sum(r * r for r in rel) / len(rel)) if rel else 0.0,
            "max_rel_error": max((abs(r) for r in rel), default=0.0)}


STEP_PARAMS = ("base_s", "weight_s", "per_token_s", "per_context_token_s", "allreduce_s", "allreduce_per_token_s")


def _step_features(batch_tokens: float, context_tokens: float, tp: int) -> List[float]:
    s = StepTimeModel.allreduce_scale(tp) if tp > 1 else 0.0
    return [1.0, 1.0 / tp, batch_tokens / tp, context_tokens / tp, s, s * batch_tokens]


def fit_step_time(points: Iterable[Tuple[float, float, int, float]],
                  fixed: Optional[Dict[str, float]] = None) -> Tuple[StepTimeModel, dict]:
    """Fit StepTimeModel to (batch_tokens, context_tokens, tp, seconds) measurements. `fixed`: parameters
    held at the given values (e.g. weight_s from bytes / bandwidth). Returns the model and a report
    (points, rms/max relative error)."""
    pts = [(float(b), float(c), int(t), float(s)) for b, c, t, s in points]
    pts = [p for p in pts if p[3] > 0]
    if not pts:
        raise ValueError("no step-time measurements")
    fixed = dict(fixed or {})
    unknown = set(fixed) - set(STEP_PARAMS)
    if unknown:
        raise ValueError(f"unknown step-time parameters: {sorted(unknown)}")
    free = [k for k in STEP_PARAMS if k not in fixed]
    rows, y = [], []
    for b, c, t, s in pts:
        f = dict(zip(STEP_PARAMS, _step_features(b, c, t)))
        rest = s - sum(fixed[k] * f[k] for k in fixed)
        rows.append([f[k] / s for k in free])  # relative least squares
        y.append(rest / s)
    sol = dict(zip(free, nnls(rows, y)))
    model = StepTimeModel(**{k: float(fixed.get(k, sol.get(k, 0.0))) for k in STEP_PARAMS})
    report = _fit_report([model.step_time(int(b), int(c), t) for b, c, t, _ in pts], [p[3] for p in pts])
    report["tp_degrees"] = sorted({p[2] for p in pts})
    report["fixed"] = fixed
    return model, report


def fit_transform_cost(points: Iterable[Tuple[float, int, float]], base: Optional[TransformCostModel] = None
                       ) -> Tuple[TransformCostModel, dict]:
    """Fit link bandwidth and fixed overhead to (bytes moved, devices, seconds) of measured merges and
    splits: seconds = fixed_overhead_s + bytes / (link_bandwidth * devices). kv_bytes_per_token and
    weight_bytes come from `base` (they describe the model, not the link)."""
    pts = [(float(b), max(1, int(d)), float(s)) for b, d, s in points if float(s) > 0]
    if not pts:
        raise ValueError("no transformation measurements")
    base = base or TransformCostModel()
    rows = [[1.0 / s, b / d / s] for b, d, s in pts]
    fixed_s, inv_bw = nnls(rows, [1.0] * len(pts))
    if inv_bw <= 0:
        raise ValueError("the measurements show no dependence on the bytes moved: cannot fit a bandwidth "
                         "(measure transformations that move different amounts of KV)")
    model = TransformCostModel(kv_bytes_per_token=base.kv_bytes_per_token, weight_bytes=base.weight_bytes,
                               link_bandwidth_bytes_per_s=1.0 / inv_bw, fixed_overhead_s=fixed_s)
    pred = [model.fixed_overhead_s + b / (model.link_bandwidth_bytes_per_s * d) for b, d, _ in pts]
    return model, _fit_report(pred, [p[2] for p in pts])


# =====================================================================================================
# Reading the benchmarks' JSON, describing a checkpoint, measuring
# =====================================================================================================
_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "float64": 8}


def model_sizes(model_path: str, dtype: Optional[str] = None) -> Tuple[float, float]:
    """(KV bytes per token over all layers and KV heads, weight bytes) of an HF checkpoint directory, at
    `dtype` (default: the checkpoint's torch_dtype)."""
    with open(os.path.join(model_path, "config.json")) as f:
        cfg = json.load(f)
    cfg = cfg.get("text_config", cfg)
    layers = int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    ckpt_dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").replace("torch.", "")
    want = (dtype or ckpt_dtype).replace("torch.", "")
    nbytes = _DTYPE_BYTES.get(want, 4)
    stored = sum(os.path.getsize(os.path.join(model_path, n)) for n in os.listdir(model_path)
                 if n.endswith(".safetensors"))
    weight_bytes = stored * nbytes / _DTYPE_BYTES.get(ckpt_dtype, 4)
    return float(2 * layers * kv_heads * head_dim * nbytes), float(weight_bytes)


def step_points_from_one_batch(d: dict) -> Tuple[List[Tuple[float, float, int, float]], Optional[float]]:
    """Step-time points from benchmark/bench_one_batch.py's JSON (sglang rows): prefill = B x input_len
    new tokens over as many context tokens; decode step i = B new tokens over B x (input_len + i) context.
    Also the weight_s its roofline implies (decode weight bytes / copy bandwidth), if the file has them."""
    args = d.get("args", {})
    L = int(args.get("input_len", 128))
    pts = []
    for r in d.get("results", []):
        if r.get("runtime", "sglang") != "sglang":
            continue
        B, tp = int(r["batch_size"]), int(r.get("tp", 1))
        for s in r.get("prefill_s", []):
            pts.append((B * L, B * L, tp, float(s)))
        for run in r.get("decode_step_s_runs", []):
            for i, s in enumerate(run):
                pts.append((B, B * (L + i), tp, float(s)))
    weight_s = None
    model, bw = d.get("model", {}), d.get("copy_bandwidth_bytes_s")
    if model.get("decode_weight_params") and bw:
        nbytes = _DTYPE_BYTES.get(str(args.get("dtype", "float32")), 4)
        weight_s = model["decode_weight_params"] * nbytes / float(bw)
    return pts, weight_s


def transform_points_from_bench(d: dict) -> List[Tuple[float, int, float]]:
    """(bytes moved, devices, seconds) from benchmark/bench_transform.py's JSON: the engine's merge/split
    breakdowns (bytes = kv_bytes + weight_bytes, seconds = pause) and the executor rows of the Gyges
    method on real buffers (rows marked WRONG are skipped)."""
    pts = []
    eng = d.get("engine") or {}
    for key in ("all_merges", "all_splits"):
        for b in eng.get(key) or []:
            pts.append((b["kv_bytes"] + b["weight_bytes"], len(b.get("devices") or [0, 1]), b["pause_ms"] / 1e3))
    for r in d.get("rows", []):
        method, note = str(r.get("method", "")), str(r.get("note", ""))
        if "(Engine)" in str(r.get("model", "")) or not method.startswith("gyges:") or "WRONG" in note:
            continue
        pts.append((r["bytes"], 2, r["ms"] / 1e3))
    return pts


def measure(model_path: str, dtype: str = "float32", page_size: int = 16, device: str = "cpu",
            log=print) -> Tuple[List[Tuple[float, float, int, float]], List[Tuple[float, int, float]], float]:
    """A quick measurement on the runtime itself (needs sglang; ~1-2 min on CPU): step times from
    Engine(tp_size=1) and Engine(tp_size=2) (prefill = a max_new_tokens=1 batch; decode step = the extra
    time of 17 more tokens / 16), merges and splits of Engine(dp_size=2, enable_gyges) holding 0-64 cached
    prompts, and the memory copy bandwidth (for weight_s). Returns (step points, transform points,
    copy bytes/s)."""
    import random
    import time

    import torch

    import sglang

    rng = random.Random(0)

    def prompts(n: int, length: int) -> List[List[int]]:
        return [[1] + [rng.randrange(3, 500) for _ in range(length - 1)] for _ in range(n)]

    common = dict(model_path=model_path, device=device, dtype=dtype, page_size=page_size, log_level="warning")
    step_pts: List[Tuple[float, float, int, float]] = []
    L, N = 64, 16
    for tp in (1, 2):
        eng = sglang.Engine(tp_size=tp, **common)
        try:
            eng.generate(input_ids=prompts(2, 16), sampling_params={"max_new_tokens": 4, "ignore_eos": True})
            for B in (1, 4, 16):
                for _ in range(2):
                    t0 = time.perf_counter()
                    eng.generate(input_ids=prompts(B, L), sampling_params={"max_new_tokens": 1, "ignore_eos": True})
                    t1 = time.perf_counter()
                    eng.generate(input_ids=prompts(B, L),
                                 sampling_params={"max_new_tokens": N + 1, "ignore_eos": True})
                    t2 = time.perf_counter()
                    step_pts.append((B * L, B * L, tp, t1 - t0))
                    step_pts.append((B, B * (L + N // 2), tp, max(1e-6, (t2 - t1 - (t1 - t0)) / N)))
            log(f"measured step times at TP{tp}")
        finally:
            eng.shutdown()
    tr_pts: List[Tuple[float, int, float]] = []
    eng = sglang.Engine(dp_size=2, enable_gyges=True, **common)
    try:
        for cached in (0, 16, 64):
            if cached:
                eng.generate(input_ids=prompts(cached, 128), sampling_params={"max_new_tokens": 1})
            for devices, tp in (([0, 1], 2), ([0, 1], 1)):
                b = eng.gyges_transform(devices, tp)
                tr_pts.append((b["kv_bytes"] + b["weight_bytes"], len(b["devices"]), b["pause_ms"] / 1e3))
        log("measured merges and splits")
    finally:
        eng.shutdown()
    src = torch.empty(64 << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    copy_bw = 2 * src.numel() / best  # read + write bytes, as bench_one_batch counts them
    return step_pts, tr_pts, copy_bw


# =====================================================================================================
# Command line
# =====================================================================================================
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gyges.costmodel",
                                description="Fit the step-time and transformation cost models.")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="fit both models and write the JSON --gyges-cost-model loads")
    f.add_argument("--transform-json", help="benchmark/results/bench_transform.json")
    f.add_argument("--one-batch-json", help="benchmark/results/bench_one_batch.json")
    f.add_argument("--measure", action="store_true",
                   help="measure on the runtime itself (needs sglang and --model-path; used for what no JSON gives)")
    f.add_argument("--model-path", help="the checkpoint that will be served: its KV bytes per token and weight "
                                        "bytes go into the transform model (and --measure runs it)")
    f.add_argument("--dtype", default="float32", help="dtype the model is served in (default float32)")
    f.add_argument("--device", default="cpu", help="device for --measure")
    f.add_argument("--out", required=True, help="output JSON")
    args = p.parse_args(argv)

    if not (args.transform_json or args.one_batch_json or args.measure):
        p.error("give --transform-json and/or --one-batch-json, or --measure")
    if args.measure and not args.model_path:
        p.error("--measure needs --model-path")
    step_pts: List[Tuple[float, float, int, float]] = []
    tr_pts: List[Tuple[float, int, float]] = []
    weight_s: Optional[float] = None
    sources: Dict[str, str] = {}
    if args.one_batch_json:
        with open(args.one_batch_json) as fh:
            step_pts, weight_s = step_points_from_one_batch(json.load(fh))
        sources["step_time"] = args.one_batch_json
    if args.transform_json:
        with open(args.transform_json) as fh:
            tr_pts = transform_points_from_bench(json.load(fh))
        sources["transform"] = args.transform_json
    if args.measure and (not step_pts or not tr_pts):
        m_step, m_tr, copy_bw = measure(args.model_path, args.dtype, device=args.device,
                                        log=lambda m: print(m, file=sys.stderr))
        if not step_pts:
            step_pts, sources["step_time"] = m_step, "measured"
            weight_s = model_sizes(args.model_path, args.dtype)[1] / copy_bw
        if not tr_pts:
            tr_pts, sources["transform"] = m_tr, "measured"

    base = TransformCostModel()
    if args.model_path:
        kvt, wb = model_sizes(args.model_path, args.dtype)
        base = TransformCostModel(kv_bytes_per_token=kvt, weight_bytes=wb)
        sources["model"] = args.model_path
    info: dict = {"sources": sources}
    step = transform = None
    if step_pts:
        # base / weight / allreduce are not separable (module docstring): pin one of them
        fixed = {"weight_s": weight_s} if weight_s is not None else {"allreduce_s": 0.0}
        step, info["step_time"] = fit_step_time(step_pts, fixed)
    if tr_pts:
        transform, info["transform"] = fit_transform_cost(tr_pts, base)
    elif args.model_path:
        transform = base
    out = save_models(args.out, step, transform, info)
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
