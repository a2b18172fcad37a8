"""Prometheus metrics, named as SGLang names them (prefix `sglang:`).

Data flow:
    TokenizerManager --observe_ttft / observe_inter_token / observe_e2e / count_tokens--> MetricsCollector
    HTTP GET /metrics --tm.get_internal_state()--> set_load(...) --> render() --> Prometheus text

Every collector owns its own CollectorRegistry, so several servers (or tests) in one process never clash
on the global registry. All metrics carry the label `model_name` (the served model name), as SGLang's do.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Bucket bounds (seconds) for the latency histograms: CPU runs are slow, GPU runs fast; cover both.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                15.0, 20.0, 25.0, 30.0, 60.0, 120.0, 300.0)
ITL_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3,
               0.4, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 90.0, 120.0, 180.0,
               300.0, 600.0, 1200.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class MetricsCollector:
    """Holds the server's Prometheus metrics and renders them as text exposition format."""

    def __init__(self, model_name: str = "default", labels: Optional[Dict[str, str]] = None):
        self.registry = CollectorRegistry(auto_describe=True)
        self.labels = {"model_name": model_name, **(labels or {})}
        names = list(self.labels)

        def gauge(name, doc):
            return Gauge(name, doc, names, registry=self.registry, multiprocess_mode="mostrecent").labels(
                **self.labels)

        def counter(name, doc):
            return Counter(name, doc, names, registry=self.registry).labels(**self.labels)

        def histogram(name, doc, buckets: Iterable[float]):
            return Histogram(name, doc, names, buckets=tuple(buckets), registry=self.registry).labels(
                **self.labels)

        # ---- load (refreshed from the schedulers' state) --------------------------------------------
        self.num_running_reqs = gauge("sglang:num_running_reqs", "The number of running requests.")
        self.num_queue_reqs = gauge("sglang:num_queue_reqs", "The number of requests in the waiting queue.")
        self.num_used_tokens = gauge("sglang:num_used_tokens", "The number of KV cache tokens in use.")
        self.max_total_num_tokens = gauge("sglang:max_total_num_tokens",
                                          "KV cache capacity in tokens (all instances).")
        self.token_usage = gauge("sglang:token_usage", "The token usage (KV tokens used / capacity).")
        # ---- throughput counters ---------------------------------------------------------------------
        # prometheus_client appends `_total`: sglang:prompt_tokens_total, sglang:generation_tokens_total.
        self.prompt_tokens = counter("sglang:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("sglang:generation_tokens", "Number of generation tokens processed.")
        self.num_requests = counter("sglang:num_requests", "Number of requests processed.")
        # ---- latency histograms ----------------------------------------------------------------------
        self.ttft = histogram("sglang:time_to_first_token_seconds", "Histogram of time to first token in "
                              "seconds.", TTFT_BUCKETS)
        self.itl = histogram("sglang:inter_token_latency_seconds", "Histogram of inter-token latency in "
                             "seconds.", ITL_BUCKETS)
        self.e2e = histogram("sglang:e2e_request_latency_seconds", "Histogram of end-to-end request latency "
                             "in seconds.", E2E_BUCKETS)

    # ---- called by the TokenizerManager ------------------------------------------------------------------
    def observe_ttft(self, seconds: float) -> None:
        self.ttft.observe(max(0.0, float(seconds)))

    def observe_inter_token(self, seconds: float) -> None:
        self.itl.observe(max(0.0, float(seconds)))

    def observe_e2e(self, seconds: float) -> None:
        """One finished request: its latency, and one more request in the request counter."""
        self.e2e.observe(max(0.0, float(seconds)))
        self.num_requests.inc()

    def count_tokens(self, prompt: int, generated: int) -> None:
        if prompt > 0:
            self.prompt_tokens.inc(prompt)
        if generated > 0:
            self.generation_tokens.inc(generated)

    def set_load(self, running: int, queued: int, kv_used_tokens: int, kv_capacity_tokens: int) -> None:
        self.num_running_reqs.set(running)
        self.num_queue_reqs.set(queued)
        self.num_used_tokens.set(kv_used_tokens)
        self.max_total_num_tokens.set(kv_capacity_tokens)
        self.token_usage.set(kv_used_tokens / kv_capacity_tokens if kv_capacity_tokens > 0 else 0.0)

    def set_load_from_states(self, states: Iterable[dict]) -> None:
        """Sum the per-instance states of tm.get_internal_state() into the load gauges."""
        running = queued = used = cap = 0
        for s in states:
            running += int(s.get("running", 0) or 0)
            queued += int(s.get("waiting", 0) or 0)
            used += int(s.get("kv_used_tokens", 0) or 0)
            cap += int(s.get("kv_capacity_tokens", 0) or 0)
        self.set_load(running, queued, used, cap)

    # ---- rendering ---------------------------------------------------------------------------------------
    def render(self) -> bytes:
        return generate_latest(self.registry)
