"""Cost models the policy and the simulator use (pure arithmetic, parameters in a small JSON file).

Data flow: `gyges.plans` gives the bytes a transformation moves; `transform_cost` turns them into
seconds with a link bandwidth. `StepTimeModel.step_time` predicts one forward iteration of an instance of
TP tp; the simulator advances time with it and the policy compares options with it. Parameters are fitted
offline (benchmark/) and saved with `save` / loaded with `load`.

Step-time model (seconds), per forward iteration of an instance of TP tp:

    step_time = base_s
              + weight_s / tp                       (reading the weight shard once)
              + per_token_s * batch_tokens / tp     (GEMM work of the new tokens)
              + per_context_token_s * context_tokens / tp   (attention reads of the KV cache)
              + (allreduce_s + allreduce_per_token_s * batch_tokens) * allreduce_scale(tp)   (0 at tp=1)

with allreduce_scale(tp) = 2 * (tp - 1) / tp (ring all-reduce traffic per byte; 1 at TP2), so TP adds a
communication cost per step that TP1 does not pay: that is why k TP1 instances out-serve one TP-k.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields


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
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown step-time parameters: {sorted(unknown)}")
        return cls(**{k: float(v) for k, v in d.items()})

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: str) -> "StepTimeModel":
        with open(path) as f:
            return cls.from_dict(json.load(f))
