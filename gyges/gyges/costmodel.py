"""Cost models the policy and the simulator use (pure arithmetic, parameters in a small JSON file), and their fit.

Data flow: `gyges.plans` gives the bytes a transformation moves; `transform_cost` turns them into
seconds with a link bandwidth. `StepTimeModel.step_time` predicts one forward iteration of an instance of
TP tp; the simulator advances time with it and the policy compares options with it. `TransformCostModel`
estimates what a merge or a split moves (KV bytes from the members' used tokens, weight bytes from the model
size) and how long it pauses the instances involved; the Gyges policy ranks candidate merges with it and the
simulator pauses instances for its estimate. Parameters come from measurements on the engine
(`benchmark/measure_costs.py` measures, `fit_step_time` / `fit_transform_cost` fit, `save_models` writes) or
from first principles for GPUs (`gyges.hardware`).

Step-time model (seconds), per forward iteration of an instance of TP tp running `requests` sequences with
batch_tokens new tokens over context_tokens tokens of KV (new ones included):

    step_time = base_s
              + weight_s / tp                             (reading the weight shard once)
              + per_token_s * batch_tokens / tp           (GEMM work of the new tokens)
              + per_request_s * requests                  (per-sequence work every rank repeats: sampling,
                                                           outputs, attention set-up)
              + per_context_token_s * context_tokens / tp (attention reads of the KV cache)
              + per_attended_s * attended / tp            (attention compute: query-key pairs)
              + (allreduce_s + allreduce_per_token_s * batch_tokens) * allreduce_scale(tp)   (0 at tp=1)

With overlap = 1 (the GPU models of `gyges.hardware`), the memory terms (weights, KV reads) and the compute
terms (new tokens, attention pairs) are not added but the larger of the two counts: the roofline of a step
whose kernels stream memory and compute at the same time. Measured models are fitted with overlap = 0.
allreduce_scale(tp) = 2 * (tp - 1) / tp (ring all-reduce traffic per byte; 1 at TP2), so TP adds a
communication cost per step that TP1 does not pay: that is why k TP1 instances out-serve one TP-k.
attended = sum over the sequences of new tokens x context tokens; `step_time` estimates it as
batch_tokens * context_tokens / requests (exact for a batch of equal sequences: one prefill chunk, or decodes
of equal context); `batch_time` takes the sequences one by one and sums exactly. requests defaults to
batch_tokens (every sequence decodes one token), which makes attended = context_tokens.

`padding` (batch_time only) describes attention kernels that pad a batch: with padding = 1 the KV reads and
the query-key pairs are those of every sequence padded to the longest new-token count and the longest context
(this engine's torch-native backend gathers [sequences, longest context] keys and runs SDPA on [sequences,
longest new tokens] queries; benchmark/measure_costs.py writes 1), with 0 the exact sums (paged kernels).
For equal sequences both are the same, so fits of uniform batches do not depend on it.

Parameter file (what `--gyges-cost-model` and `python -m gyges.sim.simulator --step-model` load; written by
`benchmark/measure_costs.py`):

    {"format": "gyges-costmodel/1",
     "step_time": {"base_s": .., "weight_s": .., "per_token_s": .., "per_request_s": ..,
                   "per_context_token_s": .., "per_attended_s": ..,
                   "allreduce_s": .., "allreduce_per_token_s": .., "overlap": 0, "padding": 1},
                                                                                        (StepTimeModel, seconds)
     "transform": {"kv_bytes_per_token": .., "weight_bytes": ..,                        (TransformCostModel)
                   "link_bandwidth_bytes_per_s": .., "fixed_overhead_s": ..},
     "fit": {...}}                                  (provenance: sources, points, residuals; not read back)

`StepTimeModel.load` / `TransformCostModel.load` read their section of such a file, or a flat file holding
only their own fields (what their `save` writes); a missing section or field keeps the defaults (the
defaults are round placeholders for tests; reported results use a measured or a `gyges.hardware` model).

Fitting (`fit_step_time`, `fit_transform_cost`): relative least squares (each point weighted by 1/measured
time, so a 2 ms step counts as much as a 2 s one) with every parameter >= 0 (`scipy.optimize.nnls`).
base_s, weight_s and allreduce_s can never be told apart from step times alone, at any set of TP degrees:
allreduce_scale(tp) = 2 - 2/tp, so base_s + weight_s/tp + allreduce_s*allreduce_scale(tp) only determines
base_s + 2*allreduce_s and weight_s - 2*allreduce_s. A caller that knows weight_s (weight bytes / memory
bandwidth) pins it with `fixed`; otherwise allreduce_s is pinned to 0. The predicted step times at the
measured TP degrees are the same either way.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from scipy.optimize import nnls

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
    per_request_s: float = 0.0  # per sequence in the batch, on every rank (not divided by tp)
    per_attended_s: float = 0.0  # per query-key pair (new token x context token), at TP1
    overlap: float = 0.0  # 0: memory and compute terms add (a linear fit); 1: the larger one counts (roofline)
    padding: float = 0.0  # batch_time: 1 = every sequence's attention costs as the longest one's (padded kernels)

    @staticmethod
    def allreduce_scale(tp: int) -> float:
        return 2.0 * (tp - 1) / tp

    def step_time(self, batch_tokens: int, context_tokens: int, tp: int, requests: Optional[int] = None) -> float:
        """One iteration of `requests` sequences (default: batch_tokens, i.e. all decoding) with batch_tokens
        new tokens over context_tokens of KV."""
        if tp < 1:
            raise ValueError(f"tp must be >= 1, got {tp}")
        if batch_tokens < 0 or context_tokens < 0:
            raise ValueError("token counts must be >= 0")
        reqs = batch_tokens if requests is None else requests
        if reqs < 0 or (batch_tokens > 0 and reqs == 0):
            raise ValueError(f"requests must be >= 1 when there are tokens, got {requests}")
        attended = batch_tokens * context_tokens / reqs if reqs else 0.0
        return self._time(batch_tokens, context_tokens, reqs, attended, tp)

    def batch_time(self, seqs: Sequence[Tuple[int, int]], tp: int) -> float:
        """One iteration over seqs = (new tokens, context tokens incl. the new ones) per sequence."""
        if tp < 1:
            raise ValueError(f"tp must be >= 1, got {tp}")
        if any(n < 0 or c < 0 for n, c in seqs):
            raise ValueError("token counts must be >= 0")
        context, attended = float(sum(c for _, c in seqs)), float(sum(n * c for n, c in seqs))
        if self.padding and seqs:  # padded attention: [sequences, longest new] x [sequences, longest context]
            longest_n, longest_c = max(n for n, _ in seqs), max(c for _, c in seqs)
            context += self.padding * (len(seqs) * longest_c - context)
            attended += self.padding * (len(seqs) * longest_n * longest_c - attended)
        return self._time(sum(n for n, _ in seqs), context, len(seqs), attended, tp)

    def _time(self, batch_tokens: float, context_tokens: float, requests: float, attended: float, tp: int) -> float:
        f = dict(zip(STEP_PARAMS, step_features(batch_tokens, context_tokens, tp, requests, attended)))
        terms = {k: getattr(self, k) * v for k, v in f.items()}
        total = sum(terms.values())
        if self.overlap:
            memory = terms["weight_s"] + terms["per_context_token_s"]
            compute = terms["per_token_s"] + terms["per_attended_s"]
            total -= self.overlap * min(memory, compute)
        return float(total)

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


STEP_PARAMS = ("base_s", "weight_s", "per_token_s", "per_context_token_s", "allreduce_s", "allreduce_per_token_s",
               "per_request_s", "per_attended_s")


def step_features(batch_tokens: float, context_tokens: float, tp: int, requests: float,
                  attended: float) -> Tuple[float, ...]:
    """What multiplies each of STEP_PARAMS in the step time (same order)."""
    s = StepTimeModel.allreduce_scale(tp)
    return (1.0, 1.0 / tp, batch_tokens / tp, context_tokens / tp, s, s * batch_tokens, float(requests),
            attended / tp)


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
# Fitting (scipy NNLS on relative errors)
# =====================================================================================================
class StepPoint(NamedTuple):
    """One measured iteration (a plain (batch_tokens, context_tokens, tp, seconds) tuple works too)."""

    batch_tokens: float
    context_tokens: float
    tp: int
    seconds: float
    requests: Optional[int] = None  # sequences in the batch; None: batch_tokens (all decoding)
    with_call_overhead: bool = False  # the time also holds one request's way in and out of the engine


def relative_nnls(rows: np.ndarray, y: np.ndarray, target: Optional[np.ndarray] = None) -> np.ndarray:
    """argmin_x sum((rows @ x - target) / y)^2 subject to x >= 0 (y > 0; target defaults to y): least
    squares on relative errors. Columns are scaled to unit norm for conditioning; all-zero columns get 0."""
    y = np.asarray(y, dtype=float)
    if y.size == 0:
        raise ValueError("no data points to fit")
    w = np.asarray(rows, dtype=float) / y[:, None]
    t = (y if target is None else np.asarray(target, dtype=float)) / y
    norms = np.linalg.norm(w, axis=0)
    use = norms > 0
    x = np.zeros(w.shape[1])
    if use.any():
        sol, _ = nnls(w[:, use] / norms[use], t, maxiter=50 * w.shape[1])
        x[use] = sol / norms[use]
    return x


def _fit_report(pred: Sequence[float], y: Sequence[float]) -> dict:
    rel = np.array([(p - t) / t for p, t in zip(pred, y) if t > 0])
    return {"points": len(y),
            "rms_rel_error": float(np.sqrt(np.mean(rel ** 2))) if rel.size else 0.0,
            "max_rel_error": float(np.max(np.abs(rel))) if rel.size else 0.0}


def fit_step_time(points: Iterable[Sequence], fixed: Optional[Dict[str, float]] = None) -> Tuple[StepTimeModel, dict]:
    """Fit StepTimeModel to measured iterations: StepPoint or (batch_tokens, context_tokens, tp, seconds)
    tuples. `fixed`: parameters held at the given values (e.g. weight_s from bytes / bandwidth). base_s,
    weight_s and allreduce_s are not separable (module docstring): when `fixed` pins neither weight_s nor
    allreduce_s, both ways of pinning one of them to 0 are fitted and the better fit is kept (allreduce_s = 0
    cannot express a TP step that costs more than TP1's at no batch, weight_s = 0 not one that costs less).
    Points marked with_call_overhead get one more unknown, the engine's per-call overhead, reported as
    call_overhead_s and kept out of the model. Returns the model and a report (points, rms/max relative
    error of the fitted times, tp_degrees, fixed, call_overhead_s)."""
    pts = [StepPoint(*p) for p in points]
    pts = [p for p in pts if p.seconds > 0]
    if not pts:
        raise ValueError("no step-time measurements")
    fixed = dict(fixed or {})
    unknown = set(fixed) - set(STEP_PARAMS)
    if unknown:
        raise ValueError(f"unknown step-time parameters: {sorted(unknown)}")
    if "weight_s" in fixed or "allreduce_s" in fixed:
        return _fit_step_time(pts, fixed)
    fits = [_fit_step_time(pts, dict(fixed, **{k: 0.0})) for k in ("allreduce_s", "weight_s")]
    return min(fits, key=lambda f: f[1]["rms_rel_error"])


def _fit_step_time(pts: List[StepPoint], fixed: Dict[str, float]) -> Tuple[StepTimeModel, dict]:
    free = [k for k in STEP_PARAMS if k not in fixed]
    feats = np.array([_point_features(p) for p in pts])  # [points, len(STEP_PARAMS)]
    y = np.array([p.seconds for p in pts])
    rest = y - feats @ np.array([fixed.get(k, 0.0) for k in STEP_PARAMS])
    over = np.array([[1.0 if p.with_call_overhead else 0.0] for p in pts])
    a = np.hstack([feats[:, [STEP_PARAMS.index(k) for k in free]], over])
    x = relative_nnls(a, y, rest)  # relative errors of the whole time, fixed part included
    sol = dict(zip(free, x[:-1]))
    model = StepTimeModel(**{k: float(fixed.get(k, sol.get(k, 0.0))) for k in STEP_PARAMS})
    overhead = float(x[-1])
    pred = [model.step_time(p.batch_tokens, p.context_tokens, p.tp, requests=p.requests) +
            (overhead if p.with_call_overhead else 0.0) for p in pts]
    report = _fit_report(pred, y)
    report["tp_degrees"] = sorted({p.tp for p in pts})
    report["fixed"] = fixed
    if any(p.with_call_overhead for p in pts):
        report["call_overhead_s"] = overhead
    return model, report


def _point_features(p: StepPoint) -> Tuple[float, ...]:
    reqs = p.batch_tokens if p.requests is None else p.requests
    attended = p.batch_tokens * p.context_tokens / reqs if reqs else 0.0
    return step_features(p.batch_tokens, p.context_tokens, int(p.tp), reqs, attended)


def fit_transform_cost(points: Iterable[Tuple[float, int, float]], base: Optional[TransformCostModel] = None
                       ) -> Tuple[TransformCostModel, dict]:
    """Fit link bandwidth and fixed overhead to (bytes moved, devices, seconds) of measured merges and
    splits: seconds = fixed_overhead_s + bytes / (link_bandwidth * devices). kv_bytes_per_token and
    weight_bytes come from `base` (they describe the model, not the link)."""
    pts = [(float(b), max(1, int(d)), float(s)) for b, d, s in points if float(s) > 0]
    if not pts:
        raise ValueError("no transformation measurements")
    base = base or TransformCostModel()
    rows = np.array([[1.0, b / d] for b, d, _ in pts])
    fixed_s, inv_bw = relative_nnls(rows, np.array([s for _, _, s in pts]))
    if inv_bw * max(b / d for b, d, _ in pts) <= 1e-6 * max(s for _, _, s in pts):  # no byte term (round-off)
        raise ValueError("the measurements show no dependence on the bytes moved: cannot fit a bandwidth "
                         "(measure transformations that move different amounts of KV)")
    model = TransformCostModel(kv_bytes_per_token=base.kv_bytes_per_token, weight_bytes=base.weight_bytes,
                               link_bandwidth_bytes_per_s=float(1.0 / inv_bw), fixed_overhead_s=float(fixed_s))
    pred = [model.fixed_overhead_s + b / (model.link_bandwidth_bytes_per_s * d) for b, d, _ in pts]
    return model, _fit_report(pred, [p[2] for p in pts])


if __name__ == "__main__":
    raise SystemExit("gyges.costmodel has no command line any more: measure and fit with "
                     "`python benchmark/measure_costs.py --model-path DIR --out FILE.json` (README, cost models)")
