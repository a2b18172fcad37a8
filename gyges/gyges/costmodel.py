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
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Sequence, Tuple


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
