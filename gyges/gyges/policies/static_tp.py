"""Static tensor parallelism: one instance over all devices (several of TP max_tp on a larger host)."""

from __future__ import annotations

from typing import List, Tuple

from gyges.policies.base import uniform_groups
from gyges.policies.static_dp import StaticDPLeastLoad


class StaticTP(StaticDPLeastLoad):
    """One instance over all devices (TP = num_devices, or several of TP max_tp on a larger host)."""

    name = "static-tp"

    def __init__(self):
        super().__init__(tp=1)

    def initial_instances(self, num_devices: int, max_tp: int) -> List[Tuple[int, ...]]:
        tp = 1
        while tp * 2 <= min(num_devices, max_tp):
            tp *= 2
        return uniform_groups(num_devices, tp)
