"""Open sessions' KV on one instance: radix paths pinned between a conversation's turns.

SGLang's session API (POST /open_session, /generate with session_params) appends each turn to the
session's earlier request; the TokenizerManager builds the full prompt (managers/session_controller.py)
and the turn reaches the instance that holds the conversation's KV (the controller places it by
affinity). This class keeps that KV there between turns:

    turn finishes      pin(session_id, fill_ids[:kv_len])   the request's computed tokens, already inserted
                                                             into the radix tree by release(), are pinned:
                                                             not evicted by LRU while the session is open
    next turn admitted match_prefix finds the pinned path: only the new tokens are prefilled
    close / expiry     close(session_id)                    unpinned, and the pages only this session used
                                                             are freed back to the allocator
    Gyges merge/split  export() -> InstanceState.session_pins -> adopt() on the new instance(s)

Eviction rule (what does not fit is recomputed):
  1. budget: the pages held only by pins stay <= budget_pages (--session-kv-budget of the pool); past it the
     least recently used session (by the end of its last turn) is unpinned first, the new pin included;
  2. serving first: when running requests need pages and no ordinary cache is left, ReqKVManager.alloc
     unpins the least recently used session (`release_lru`) and evicts, one session at a time.
An unpinned session's path is ordinary cache (LRU-evicted); a later turn recomputes what was evicted (or
reloads it from the host KV tier, mem_cache/host_tier.py, when --enable-hierarchical-cache is on).

Hints (session_params.next_turn_in_s): `next_turn_at(session_id)` (given by ReqKVManager) says when a session's
next turn is expected. Both rules then unpin first the hinted session whose next turn is farthest away (and
more than HINT_LEAD_S from now), and only then the least recently used one (SYMPHONY's order: the KV needed
last goes first).
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from sglang.srt.mem_cache.radix_cache import RadixCache, TreeNode


@dataclass
class SessionPin:
    node: TreeNode  # deepest pinned node; the path root..node is pinned
    tokens: int  # tokens the pinned path covers
    last_used: int  # logical time of the turn that pinned it (LRU order)


# A hinted session whose next turn is due within this many seconds is not unpinned before unhinted ones.
HINT_LEAD_S = 1.0

# (session id, token ids, page ids, last_used): one pinned path as plain data (what a transformation moves)
ExportedPin = Tuple[str, List[int], List[int], int]


class SessionPins:
    def __init__(self, tree: RadixCache, budget_pages: int):
        self.tree = tree
        self.budget_pages = max(0, int(budget_pages))
        self.pins: "OrderedDict[str, SessionPin]" = OrderedDict()  # least recently used first
        self._clock = itertools.count(1)
        self.unpinned_for_memory = 0  # sessions unpinned because running requests needed the pages
        self.unpinned_for_budget = 0  # sessions unpinned because the budget was exceeded
        # session id -> time.monotonic() its next turn is expected (None: no hint); set by ReqKVManager
        self.next_turn_at: Callable[[str], Optional[float]] = lambda session_id: None

    # ---- queries ---------------------------------------------------------------------------------------
    def __contains__(self, session_id: str) -> bool:
        return session_id in self.pins

    def session_ids(self) -> List[str]:
        return sorted(self.pins)

    def pinned_tokens(self, session_id: str) -> int:
        pin = self.pins.get(session_id)
        return pin.tokens if pin is not None else 0

    # ---- lifecycle -------------------------------------------------------------------------------------
    def pin(self, session_id: str, token_ids: Sequence[int]) -> int:
        """Pin the cached page-aligned prefix of token_ids for the session (replacing its earlier pin).
        Returns the tokens pinned (0 when nothing is cached or the budget leaves no room)."""
        if self.tree.disable:
            return 0
        match = self.tree.match_prefix(token_ids)
        self._drop(session_id)
        if match.num_tokens == 0:
            return 0
        self.tree.pin(match.last_node)
        self.pins[session_id] = SessionPin(match.last_node, match.num_tokens, next(self._clock))
        self._enforce_budget()
        return self.pinned_tokens(session_id)

    def close(self, session_id: str) -> int:
        """The session ended: unpin it and free the pages only it used. Returns the pages freed."""
        pin = self.pins.pop(session_id, None)
        if pin is None:
            return 0
        self.tree.unpin(pin.node)
        return self.tree.free_path(pin.node)

    def release_lru(self) -> bool:
        """Unpin the least recently used session so running requests can have its pages (rule 2)."""
        if not self.pins:
            return False
        self._drop(self.victim())
        self.unpinned_for_memory += 1
        return True

    def victim(self) -> str:
        """The session to unpin first: the hinted one whose next turn is farthest (beyond HINT_LEAD_S), else the
        least recently used."""
        horizon = time.monotonic() + HINT_LEAD_S
        far = [(at, sid) for sid in self.pins if (at := self.next_turn_at(sid)) is not None and at > horizon]
        return max(far)[1] if far else next(iter(self.pins))

    def clear(self) -> None:
        """Forget every pin (the tree is being flushed)."""
        for pin in self.pins.values():
            self.tree.unpin(pin.node)
        self.pins.clear()

    def _drop(self, session_id: str) -> None:
        pin = self.pins.pop(session_id, None)
        if pin is not None:
            self.tree.unpin(pin.node)

    def _enforce_budget(self) -> None:
        while self.pins and self.tree.pinned_pages() > self.budget_pages:
            self._drop(self.victim())
            self.unpinned_for_budget += 1

    # ---- Gyges: moving pins with the tree ------------------------------------------------------------------
    def export(self) -> List[ExportedPin]:
        out = []
        for session_id, pin in self.pins.items():
            tokens, pages = self.tree.path_of(pin.node)
            out.append((session_id, tokens, pages, pin.last_used))
        return out

    def adopt(self, pins: Sequence[ExportedPin]) -> None:
        """Re-pin migrated sessions on this (new) tree by their tokens, oldest first."""
        for session_id, tokens, _, last_used in sorted(pins, key=lambda p: p[3]):
            match = self.tree.match_prefix(tokens)
            self._drop(session_id)
            if match.num_tokens == 0:
                continue
            self.tree.pin(match.last_node)
            self.pins[session_id] = SessionPin(match.last_node, match.num_tokens, last_used)
        if pins:
            start = max(p[3] for p in pins) + 1
            self._clock = itertools.count(max(start, next(self._clock)))
        self._enforce_budget()

    def stats(self) -> Dict[str, int]:
        return {"sessions_pinned": len(self.pins), "session_pinned_pages": self.tree.pinned_pages(),
                "session_budget_pages": self.budget_pages, "sessions_unpinned_for_memory": self.unpinned_for_memory,
                "sessions_unpinned_for_budget": self.unpinned_for_budget}


def pinned_pages_of(pins: Sequence[ExportedPin]) -> set:
    """Every page the exported pins cover."""
    return {p for _, _, pages, _ in pins for p in pages}


