"""How many base-TP instances the base-class (short) requests need: the Gyges policy keeps that many out of
merges, the way a static hybrid isolates short requests on TP1 instances, but sized from demand.

    on_request (a base-class arrival) --record(now, occupancy)--> sliding window of the last window_s
    GygesPolicy.base_reserve --instances_needed(now, backlog)--> ceil((window occupancy / window_s + backlog)
                                                                 / utilization)

Occupancy of one request, in instance-seconds (`occupancy`): its share of an instance's KV for as long as
it stays there (need_tokens / capacity x predicted residence: prefill, then one decode step per output
token at the batch its size allows) plus its prefill time (the instance computes nothing else then). By
Little's law the window's total over window_s is the mean number of instances the class keeps busy; the
requests held now (backlog, in instances of KV) are added, so a queue that builds raises the reserve at
once. Dividing by `utilization` (< 1) leaves the headroom that keeps queueing short under bursts.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Deque, Tuple


class BaseDemand:
    min_span_s = 5.0  # the shortest span a mean is taken over (the first seconds of a run)

    def __init__(self, window_s: float = 60.0, utilization: float = 0.6):
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        if not 0 < utilization <= 1:
            raise ValueError("utilization must be in (0, 1]")
        self.window_s = window_s
        self.utilization = utilization
        self._arrivals: Deque[Tuple[float, float]] = deque()  # (arrival time, occupancy in instance-seconds)
        self._total = 0.0
        self._first: float | None = None  # the first arrival: until window_s has passed, the mean is over less

    @staticmethod
    def occupancy(need_tokens: int, capacity_tokens: int, prefill_s: float, decode_step_s: float,
                  output_tokens: int) -> float:
        """Instance-seconds one request keeps a base instance busy (see the module docstring)."""
        residence = prefill_s + output_tokens * decode_step_s
        return need_tokens / max(1, capacity_tokens) * residence + prefill_s

    def record(self, now: float, occupancy: float) -> None:
        if self._first is None:
            self._first = now
        self._arrivals.append((now, occupancy))
        self._total += occupancy

    def _expire(self, now: float) -> None:
        while self._arrivals and self._arrivals[0][0] < now - self.window_s:
            self._total -= self._arrivals.popleft()[1]
        if not self._arrivals:
            self._total = 0.0  # no float drift once the window is empty

    def busy_instances(self, now: float) -> float:
        """Mean base instances the class kept busy over the last window_s."""
        self._expire(now)
        span = self.window_s if self._first is None else min(self.window_s, max(self.min_span_s, now - self._first))
        return max(0.0, self._total) / span

    def instances_needed(self, now: float, backlog_instances: float = 0.0) -> int:
        """Base instances to keep for the class: its mean occupancy plus what is held now, at the target
        utilization (0 when nothing arrived in the window and nothing is held)."""
        demand = self.busy_instances(now) + max(0.0, backlog_instances)
        return int(math.ceil(demand / self.utilization - 1e-9)) if demand > 0 else 0
