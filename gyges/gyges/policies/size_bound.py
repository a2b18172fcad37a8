"""A bound on the largest request a merged instance may still hold, from aggregate reports alone."""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

from gyges.policies.base import ClusterState, InstanceLoad


class RequestSizeBound:
    """An upper bound on the largest request each merged instance may still hold, so that a split can
    be proven safe from the aggregate reports alone.

    A request admitted to an instance holds exactly its need (used + still needed tokens) until it
    finishes, so a request whose need exceeds the instance's held_tokens is surely gone. Per merged
    instance we keep the needs of the requests placed on it (and, for each member at the merge, the
    bound of that member); the bound is the largest of them not yet surely gone. For an instance whose
    history we did not see (e.g. merged by hand) the bound is its held_tokens. When the caller reports
    largest_request_tokens, that is used instead."""

    def __init__(self):
        self._needs: Dict[Tuple[int, ...], List[int]] = {}

    def bound(self, inst: InstanceLoad) -> int:
        if inst.largest_request_tokens is not None:
            return inst.largest_request_tokens
        needs = self._needs.get(inst.devices)
        if needs is None:
            return inst.held_tokens
        needs[:] = [n for n in needs if n <= inst.held_tokens]
        return max(needs, default=0)

    def on_merge(self, devices: Tuple[int, ...], members: Sequence[InstanceLoad]) -> None:
        self._needs[devices] = [self.bound(m) for m in members]

    def on_place(self, inst: InstanceLoad, need: int) -> None:
        if inst.devices in self._needs:
            self._needs[inst.devices].append(need)

    def forget_missing(self, state: ClusterState) -> None:
        present = {i.devices for i in state.instances}
        for devs in [d for d in self._needs if d not in present]:
            del self._needs[devs]
