"""Order of the waiting queue: fcfs (arrival order) or lpm (longest cached prefix first)."""

from __future__ import annotations

from typing import List

from sglang.srt.managers.schedule_batch import Req


class SchedulePolicy:
    def __init__(self, policy: str, tree):
        if policy not in ("fcfs", "lpm"):
            raise ValueError(f"unknown schedule_policy {policy!r}; allowed: fcfs, lpm")
        self.policy = policy
        self.tree = tree

    def order(self, waiting: List[Req]) -> List[Req]:
        """Return the waiting requests in the order admission should try them.

        Retracted requests always go first (they already hold output and were admitted before).
        """
        if self.policy == "fcfs" or self.tree.disable or len(waiting) <= 1:
            return sorted(waiting, key=lambda r: (r.retractions == 0, r.arrival_time))

        def cached(req: Req) -> int:
            return self.tree.match_prefix(req.fill_ids[:-1]).num_tokens

        return sorted(waiting, key=lambda r: (r.retractions == 0, -cached(r), r.arrival_time))
