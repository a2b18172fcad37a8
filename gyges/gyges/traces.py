"""Request traces: load the public traces in shared/traces, then select, scale and mix them.

Data flow: `load_trace(path)` (or `load_azure_csv` / `load_mooncake_jsonl`) reads one file into a list of
`TraceRequest`, sorted by arrival, arrival in seconds from the first row. `window` / `sample` pick a
part of it, `scale_trace` stretches time and shrinks lengths to the model and devices at hand, and
`mix_traces` merges several by arrival. The simulator (gyges.sim) and the serving benchmarks replay the
result. `synthetic_trace` makes a Poisson mix of short and long requests for tests.

Formats (shared/traces/README.md):
  azure CSV       TIMESTAMP (wall clock, e.g. 2023-11-16 18:15:46.6805900), ContextTokens, GeneratedTokens
  mooncake JSONL  {"timestamp": ms, "input_length": n, "output_length": n, "hash_ids": [one per 512-token
                  prompt block; equal ids = shared prefix]}
"""

from __future__ import annotations

import csv
import heapq
import json
import random
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

PathLike = Union[str, Path]


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float  # seconds since the trace's first request
    prompt_tokens: int
    output_tokens: int
    prefix_group: Optional[int] = None  # requests with the same group share a prompt prefix (mooncake)
    source: str = ""  # which trace it came from (file stem), kept through mixing


def _parse_azure_timestamp(text: str) -> float:
    """Seconds since the epoch (read as UTC) of 'YYYY-MM-DD HH:MM:SS[.fffffff]' (more than 6 fraction digits allowed)."""
    whole, _, frac = text.strip().partition(".")
    t = datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc).timestamp()
    return t + (float("0." + frac) if frac else 0.0)


def _rebase(rows: List[TraceRequest]) -> List[TraceRequest]:
    rows.sort(key=lambda r: r.arrival_s)
    if not rows:
        return rows
    t0 = rows[0].arrival_s
    return [replace(r, arrival_s=r.arrival_s - t0) for r in rows]


def load_azure_csv(path: PathLike) -> List[TraceRequest]:
    path = Path(path)
    rows: List[TraceRequest] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: not an Azure LLM trace (missing columns {sorted(missing)})")
        for row in reader:
            rows.append(TraceRequest(_parse_azure_timestamp(row["TIMESTAMP"]), int(row["ContextTokens"]),
                                     int(row["GeneratedTokens"]), None, path.stem))
    return _rebase(rows)


def load_mooncake_jsonl(path: PathLike) -> List[TraceRequest]:
    path = Path(path)
    rows: List[TraceRequest] = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                hashes = d.get("hash_ids") or []
                rows.append(TraceRequest(float(d["timestamp"]) / 1000.0, int(d["input_length"]),
                                         int(d["output_length"]), int(hashes[0]) if hashes else None, path.stem))
            except (KeyError, ValueError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: not a mooncake trace row ({e})") from None
    return _rebase(rows)


def load_trace(path: PathLike) -> List[TraceRequest]:
    """Load by extension: .csv (Azure) or .jsonl (Mooncake)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return load_azure_csv(path)
    if suffix in (".jsonl", ".json"):
        return load_mooncake_jsonl(path)
    raise ValueError(f"{path}: unknown trace format {suffix!r} (expected .csv or .jsonl)")


# -- selection ------------------------------------------------------------------------------------------
def window(reqs: Sequence[TraceRequest], start_s: float, duration_s: float,
           rebase: bool = True) -> List[TraceRequest]:
    """Requests arriving in [start_s, start_s + duration_s), arrivals shifted to start at 0."""
    out = [r for r in reqs if start_s <= r.arrival_s < start_s + duration_s]
    return [replace(r, arrival_s=r.arrival_s - start_s) for r in out] if rebase else out


def sample(reqs: Sequence[TraceRequest], n: int, seed: int = 0) -> List[TraceRequest]:
    """n requests drawn without replacement (all if n >= len), in arrival order."""
    if n >= len(reqs):
        return list(reqs)
    idx = sorted(random.Random(seed).sample(range(len(reqs)), n))
    return [reqs[i] for i in idx]


# -- transformation -------------------------------------------------------------------------------------
def scale_trace(reqs: Iterable[TraceRequest], time_scale: float = 1.0, length_scale: float = 1.0,
                max_prompt: Optional[int] = None, max_output: Optional[int] = None,
                output_scale: Optional[float] = None) -> List[TraceRequest]:
    """Arrivals times time_scale (0.5 = twice the rate); prompt lengths times length_scale and output
    lengths times output_scale (default: length_scale), each at least 1 and capped at max_prompt /
    max_output."""
    if time_scale <= 0 or length_scale <= 0 or (output_scale is not None and output_scale <= 0):
        raise ValueError("scales must be positive")
    oscale = length_scale if output_scale is None else output_scale
    out = []
    for r in reqs:
        p = max(1, round(r.prompt_tokens * length_scale))
        o = max(1, round(r.output_tokens * oscale))
        if max_prompt is not None:
            p = min(p, max_prompt)
        if max_output is not None:
            o = min(o, max_output)
        out.append(replace(r, arrival_s=r.arrival_s * time_scale, prompt_tokens=p, output_tokens=o))
    return out


def mix_traces(*traces: Sequence[TraceRequest], offsets_s: Optional[Sequence[float]] = None) -> List[TraceRequest]:
    """Merge traces by arrival (stable: ties keep argument order); offsets_s shifts each trace first."""
    offsets = list(offsets_s) if offsets_s is not None else [0.0] * len(traces)
    if len(offsets) != len(traces):
        raise ValueError("give one offset per trace")
    shifted = [[(r.arrival_s + off, k, i, r) for i, r in enumerate(sorted(t, key=lambda r: r.arrival_s))]
               for k, (t, off) in enumerate(zip(traces, offsets))]
    return [replace(r, arrival_s=t) for t, _, _, r in heapq.merge(*shifted)]


def rate(reqs: Sequence[TraceRequest]) -> float:
    """Requests per second over the trace's span."""
    if len(reqs) < 2:
        return 0.0
    span = reqs[-1].arrival_s - reqs[0].arrival_s
    return (len(reqs) - 1) / span if span > 0 else float("inf")


def synthetic_trace(n: int, rate_per_s: float, short: Tuple[int, int] = (512, 128),
                    long: Tuple[int, int] = (16384, 64), long_fraction: float = 0.05, seed: int = 0,
                    jitter: float = 0.5) -> List[TraceRequest]:
    """n Poisson arrivals; each long with probability long_fraction. Lengths (prompt, output) vary
    uniformly by +-jitter around the given means."""
    rng = random.Random(seed)
    t = 0.0
    out = []
    for _ in range(n):
        t += rng.expovariate(rate_per_s)
        is_long = rng.random() < long_fraction
        p, o = long if is_long else short
        vary = lambda x: max(1, round(x * rng.uniform(1 - jitter, 1 + jitter)))
        out.append(TraceRequest(t, vary(p), vary(o), None, "long" if is_long else "short"))
    return out
