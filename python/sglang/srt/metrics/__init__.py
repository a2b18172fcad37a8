"""Prometheus metrics of the server (see collector.py)."""

from sglang.srt.metrics.collector import MetricsCollector

__all__ = ["MetricsCollector"]
