"""Ablations of the Gyges policy for the paper's scheduler experiment: the same mechanism (target TP,
merges on demand, splits back when the requests fit the parts) with a placement that knows nothing of
transformations. `GygesRoundRobin` deals requests in turn over the instances that fit them now;
`GygesLeastLoaded` picks the least-loaded one. Neither keeps base-TP work off merged instances nor
reserves instances for a held long request, so short work keeps landing where a long request waits
and on merged instances that could otherwise split.
"""

from __future__ import annotations

from typing import Optional, Set

from gyges.policies.base import InstanceLoad, LoadLedger, RequestInfo, fits_now, least_loaded
from gyges.policies.gyges_policy import GygesPolicy


class GygesLeastLoaded(GygesPolicy):
    name = "gyges-ll"

    def _choose(self, req: RequestInfo, target: int, ledger: LoadLedger, reserved: Set[int]
                ) -> Optional[InstanceLoad]:
        cands = [i for i in ledger.loads() if i.tp >= target and fits_now(req, i)]
        return least_loaded(cands) if cands else None


class GygesRoundRobin(GygesPolicy):
    name = "gyges-rr"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._turn = 0

    def _choose(self, req: RequestInfo, target: int, ledger: LoadLedger, reserved: Set[int]
                ) -> Optional[InstanceLoad]:
        cands = sorted((i for i in ledger.loads() if i.tp >= target and fits_now(req, i)), key=lambda i: i.base)
        if not cands:
            return None
        self._turn += 1
        return cands[self._turn % len(cands)]
