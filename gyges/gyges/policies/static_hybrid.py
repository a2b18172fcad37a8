"""Static hybrid: k TP1 instances plus one large instance, requests split by length."""

from __future__ import annotations

from typing import Hashable, List, Optional, Tuple

from gyges.policies.base import ClusterState, InstanceLoad, RequestInfo, can_ever_fit
from gyges.policies.static_dp import StaticPolicy
from gyges.topology import is_power_of_two


class StaticHybrid(StaticPolicy):
    """k TP1 instances plus one TP m instance on devices [0, m): requests needing more than
    `long_threshold_tokens` (default: what a TP1 instance can hold) go to the big instance, the rest to
    the least-loaded TP1 instance. One FIFO queue per side."""

    name = "static-hybrid"

    def __init__(self, big_tp: Optional[int] = None, long_threshold_tokens: Optional[int] = None):
        super().__init__(tp=1)
        if big_tp is not None and (not is_power_of_two(big_tp) or big_tp < 2):
            raise ValueError(f"big_tp={big_tp} must be a power of two >= 2")
        self.big_tp = big_tp
        self.long_threshold_tokens = long_threshold_tokens

    def initial_instances(self, num_devices: int, max_tp: int) -> List[Tuple[int, ...]]:
        m = self.big_tp
        if m is None:
            m = 2
            while m * 2 <= min(num_devices // 2, max_tp):
                m *= 2
        if m > max_tp or m >= num_devices:
            raise ValueError(f"static-hybrid: a TP {m} instance needs more than {num_devices} devices "
                             f"(max_tp {max_tp}) leaving one TP1 instance")
        return [tuple(range(m))] + [(d,) for d in range(m, num_devices)]

    def _threshold(self, state: ClusterState) -> int:
        if self.long_threshold_tokens is not None:
            return self.long_threshold_tokens
        small = [i.kv_capacity_tokens for i in state.instances if i.tp == 1]
        return min(small) if small else 0

    def _is_long(self, req: RequestInfo, state: ClusterState) -> bool:
        return req.need_tokens > self._threshold(state)

    def homes(self, req: RequestInfo, state: ClusterState) -> List[InstanceLoad]:
        big = max(i.tp for i in state.instances)
        want_big = self._is_long(req, state)
        return [i for i in state.instances if (i.tp == big) == want_big and can_ever_fit(req, i)]

    def queue_of(self, req: RequestInfo, state: ClusterState) -> Hashable:
        return "long" if self._is_long(req, state) else "short"
