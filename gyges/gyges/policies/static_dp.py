"""Static data parallelism: fixed instances of one TP degree, never transformed.

`StaticPolicy` is the shared machinery of every static baseline: each request goes to a FIFO queue
(`queue_of`); a queue's head is placed on the instance `pick` chooses among `homes` (the instances allowed
to serve it) that fit now, else it and everything behind it in that queue is held. `StaticDPLeastLoad`
(one queue, least-loaded instance) and `StaticDPRoundRobin` (SGLang's round_robin: each instance its own
queue) are the DP baselines.
"""

from __future__ import annotations

from typing import Dict, Hashable, List, Optional, Sequence, Set, Tuple

from gyges.policies.base import (ClusterState, Decision, Hold, InstanceLoad, LoadLedger, Place, Policy, Reject,
                                 RequestInfo, TickDecision, can_ever_fit, fits_now,
                                 too_long_message, uniform_groups)
from gyges.policies.affinity import pick_by_affinity
from gyges.topology import is_power_of_two


class StaticPolicy(Policy):
    """Fixed instances, never transforms. Each request goes to a FIFO queue (`queue_of`); a queue's
    head is placed on the instance `pick` chooses among `homes` (instances allowed to serve it) that fit
    now, else it and everything behind it in that queue is held."""

    def __init__(self, tp: int = 1):
        if not is_power_of_two(tp):
            raise ValueError(f"tp={tp} is not a power of two")
        self.tp = tp

    def initial_instances(self, num_devices: int, max_tp: int) -> List[Tuple[int, ...]]:
        return uniform_groups(num_devices, min(self.tp, max_tp, num_devices))

    # -- what subclasses choose ------------------------------------------------------------------------
    def homes(self, req: RequestInfo, state: ClusterState) -> List[InstanceLoad]:
        return [i for i in state.instances if can_ever_fit(req, i)]

    def queue_of(self, req: RequestInfo, state: ClusterState) -> Hashable:
        return "all"

    def pick(self, req: RequestInfo, cands: Sequence[InstanceLoad]) -> InstanceLoad:
        return pick_by_affinity(req, cands)  # least_loaded unless its prompt is cached on one of them

    def forget(self, rid: str) -> None:
        """Called once a request is placed or rejected."""

    # -- the interface ---------------------------------------------------------------------------------
    def _reject_if_unservable(self, req: RequestInfo, state: ClusterState) -> Optional[Reject]:
        if any(can_ever_fit(req, i) for i in state.instances) and self.homes(req, state):
            return None
        limit = max(i.kv_capacity_tokens for i in state.instances)
        self.forget(req.rid)
        return Reject(req.rid, too_long_message(req, limit, f"the largest instance of {self.name}"))

    def _try_place(self, req: RequestInfo, state: ClusterState, ledger: LoadLedger) -> Optional[Place]:
        homes = {i.base for i in self.homes(req, state)}
        cands = [i for i in ledger.loads() if i.base in homes and fits_now(req, i)]
        if not cands:
            return None
        self.forget(req.rid)
        return ledger.place(req, self.pick(req, cands).base)

    def on_request(self, req: RequestInfo, state: ClusterState) -> Decision:
        rej = self._reject_if_unservable(req, state)
        if rej:
            return rej
        queue = self.queue_of(req, state)
        if any(self.queue_of(h, state) == queue for h in state.held):
            return Hold(req.rid, "queued behind earlier held requests")
        placed = self._try_place(req, state, LoadLedger(state))
        return placed or Hold(req.rid, "its instance has no free KV memory now")

    def on_tick(self, state: ClusterState) -> List[TickDecision]:
        out: List[TickDecision] = []
        ledger = LoadLedger(state)
        blocked: Set[Hashable] = set()
        for h in state.held:
            rej = self._reject_if_unservable(h, state)
            if rej:
                out.append(rej)
                continue
            queue = self.queue_of(h, state)
            if queue in blocked:
                continue
            placed = self._try_place(h, state, ledger)
            if placed:
                out.append(placed)
            else:
                blocked.add(queue)
        return out


class StaticDPLeastLoad(StaticPolicy):
    """D instances of TP tp; each request to the least-loaded instance that fits (one FIFO queue)."""

    name = "static-dp-ll"


class StaticDPRoundRobin(StaticPolicy):
    """D instances of TP tp; requests dealt round robin over the instances that can ever hold them
    (SGLang's --load-balance-method round_robin); each instance keeps its own FIFO queue."""

    name = "static-dp-rr"

    def __init__(self, tp: int = 1):
        super().__init__(tp)
        self._next = 0
        self._target: Dict[str, int] = {}

    def _target_of(self, req: RequestInfo, state: ClusterState) -> Optional[int]:
        if req.rid not in self._target:
            able = [i.base for i in sorted(state.instances, key=lambda i: i.base) if can_ever_fit(req, i)]
            if not able:
                return None
            self._target[req.rid] = able[self._next % len(able)]
            self._next += 1
        return self._target[req.rid]

    def homes(self, req: RequestInfo, state: ClusterState) -> List[InstanceLoad]:
        target = self._target_of(req, state)
        return [i for i in state.instances if i.base == target]

    def queue_of(self, req: RequestInfo, state: ClusterState) -> Hashable:
        return self._target.get(req.rid, self._target_of(req, state))

    def on_request(self, req: RequestInfo, state: ClusterState) -> Decision:
        self._target_of(req, state)  # deal it before looking at the queues
        return super().on_request(req, state)

    def forget(self, rid: str) -> None:
        self._target.pop(rid, None)
