"""Helpers shared by the benchmarks (run as scripts from the repository root or from benchmark/)."""

from __future__ import annotations

import platform
from typing import List, Optional


def cpu_model_name() -> str:
    """The CPU's marketing name from /proc/cpuinfo, or what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pct(xs: List[float], q: float) -> Optional[float]:
    """The q-th percentile of xs with linear interpolation between closest ranks (None when empty)."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)
