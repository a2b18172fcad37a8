"""Helpers shared by the benchmarks (run as scripts from the repository root or from benchmark/)."""

from __future__ import annotations

import platform


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
