"""Static hybrids: fixed instances of mixed TP degrees, requests split by length.

StaticHybrid: k TP1 instances plus one large instance. StaticShape: any multiset of sizes (e.g. 1-1-1-1-2-2);
each request goes to the smallest size that can hold it (one FIFO queue per size), least loaded there.
"""

from __future__ import annotations

from typing import Hashable, List, Optional, Sequence, Tuple, Union

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


class StaticShape(StaticPolicy):
    """Fixed instances of the given sizes (powers of two, summing to the devices; laid out largest first so
    every instance is an aligned group). A request goes to the smallest size that can ever hold it: one FIFO
    queue per size, the least-loaded instance of that size that fits now."""

    name = "static-shape"

    def __init__(self, sizes: Union[str, Sequence[int]] = "1-1-2-4"):
        super().__init__(tp=1)
        parsed = [int(x) for x in sizes.split("-")] if isinstance(sizes, str) else [int(x) for x in sizes]
        if not parsed or any(not is_power_of_two(t) for t in parsed):
            raise ValueError(f"static-shape sizes {sizes!r}: each must be a power of two, e.g. 1-1-2-4")
        self.sizes = sorted(parsed, reverse=True)

    def initial_instances(self, num_devices: int, max_tp: int) -> List[Tuple[int, ...]]:
        if sum(self.sizes) != num_devices or max(self.sizes) > max_tp:
            raise ValueError(f"static-shape sizes {'-'.join(map(str, self.sizes))} must sum to the {num_devices} "
                             f"devices with none above max TP {max_tp}")
        out, start = [], 0
        for t in self.sizes:  # largest first: each starts at a multiple of its size
            out.append(tuple(range(start, start + t)))
            start += t
        return out

    def _size_of(self, req: RequestInfo, state: ClusterState) -> Optional[int]:
        able = [i.tp for i in state.instances if can_ever_fit(req, i)]
        return min(able) if able else None

    def homes(self, req: RequestInfo, state: ClusterState) -> List[InstanceLoad]:
        size = self._size_of(req, state)
        return [i for i in state.instances if i.tp == size and can_ever_fit(req, i)]

    def queue_of(self, req: RequestInfo, state: ClusterState) -> Hashable:
        return self._size_of(req, state)
