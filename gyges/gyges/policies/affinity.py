"""Placement by affinity: send a request where its conversation's (or its longest cached prefix's) KV lives,
unless the load there costs more than recomputing that prefix elsewhere (issue 13, SYMPHONY-style).

Pure logic (no torch, no sockets), used by the live controller (manual placement) and by the policies
(pick_by_affinity: GygesPolicy's base-TP choice, StaticDPLeastLoad) through RequestInfo.cached_tokens:

    PrefixIndex          the controller's approximate view of every instance's radix cache: chained hashes
                         of the page-aligned blocks of the prompts it routed there (LRU-bounded by the
                         instance's KV capacity); match() = leading tokens of a prompt cached there
    AffinityCandidate    one instance that can take the request now (fits its KV), with its load and the
                         tokens of this prompt cached there (the session's pinned prefix, or the index's match)
    choose_by_affinity   the candidate whose first token comes soonest by the cost model:

        work_i = prefill_tokens_queued_i + (prompt - cached_i)        prompt tokens computed before it
        cost_i = sum over the chunks of work_i of one iteration batched with running_i decodes
               = step_model.step_time(chunk + running_i, prompt, tp_i, running_i + 1) per chunk   (a model)
               = work_i + running_i * chunks_i                          token-equivalents (no model)

    so recomputing N prompt tokens costs exactly the prefill time of N tokens, and a busy home loses to an
    idle instance once its queue costs more than the recompute it saves. Ties: fewer requests, fewer tokens
    in flight, more free KV memory (new conversations spread, so their pinned KV is not evicted by each
    other), lowest device. Without any cached tokens this is least-queued-work placement.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

from gyges.policies.base import InstanceLoad, RequestInfo, least_loaded
from gyges.prefix_hashes import block_hashes


@dataclass(frozen=True)
class AffinityCandidate:
    base: int  # the instance's first device
    tp: int
    running: int  # requests decoding or prefilling there
    waiting: int  # requests queued there
    prefill_tokens_queued: int  # prompt tokens its requests have still to prefill, in all
    tokens_in_flight: int  # tokens its requests may still need (tie-break)
    cached_tokens: int = 0  # leading tokens of this request's prompt whose KV is there
    kv_free_tokens: int = 0  # KV tokens not held by requests or cache there (tie-break: spread the memory)


def _chunks(n: int, chunk: int) -> int:
    return -(-n // chunk) if n > 0 else 0


def placement_cost(prompt_tokens: int, cand: AffinityCandidate, step_model=None, chunk_tokens: int = 512) -> float:
    """Predicted time (seconds with step_model, token-equivalents without) until the request's first token."""
    if chunk_tokens < 1:
        raise ValueError("chunk_tokens must be >= 1")
    recompute = max(1, prompt_tokens - min(cand.cached_tokens, prompt_tokens))  # >= 1: the last token always runs
    work = cand.prefill_tokens_queued + recompute
    chunks = _chunks(work, chunk_tokens)
    if step_model is None:
        return float(work + cand.running * chunks)
    full, rest = divmod(work, chunk_tokens)
    decodes = cand.running
    cost = full * step_model.step_time(chunk_tokens + decodes, prompt_tokens, cand.tp, requests=decodes + 1)
    if rest:
        cost += step_model.step_time(rest + decodes, prompt_tokens, cand.tp, requests=decodes + 1)
    return cost


def choose_by_affinity(prompt_tokens: int, cands: Sequence[AffinityCandidate], step_model=None,
                       chunk_tokens: int = 512) -> AffinityCandidate:
    """The candidate with the lowest placement_cost (see the module docstring). cands must not be empty."""
    if not cands:
        raise ValueError("no candidate instance")
    return min(cands, key=lambda c: (placement_cost(prompt_tokens, c, step_model, chunk_tokens),
                                     c.running + c.waiting, c.tokens_in_flight, -c.kv_free_tokens, c.base))


def pick_by_affinity(req: RequestInfo, cands: Sequence[InstanceLoad], step_model=None,
                     chunk_tokens: int = 512) -> InstanceLoad:
    """The policies' choice among instances that fit req now: least_loaded when nothing of its prompt is
    cached on any of them (the behaviour without affinity), else choose_by_affinity."""
    cached = dict(req.cached_tokens)
    if not any(cached.get(c.base, 0) for c in cands):
        return least_loaded(cands)
    by_base = {c.base: c for c in cands}
    best = choose_by_affinity(req.prompt_tokens, [
        AffinityCandidate(c.base, c.tp, c.running, c.waiting, c.prefill_tokens_queued or 0, c.tokens_in_flight,
                          cached.get(c.base, 0), c.kv_capacity_tokens - c.kv_used_tokens)
        for c in cands], step_model, chunk_tokens)
    return by_base[best.base]


class PrefixIndex:
    """Per instance, the page-aligned prompt prefixes recently routed there (an approximation of its radix
    cache: it does not see evictions, and after a split every part inherits the merged instance's entries)."""

    def __init__(self, block_tokens: int):
        if block_tokens < 1:
            raise ValueError("block_tokens must be >= 1")
        self.block_tokens = block_tokens
        self._blocks: Dict[int, "OrderedDict[int, None]"] = {}

    def block_hashes(self, token_ids: Sequence[int]) -> List[int]:
        """Chained hash of each whole block: block i's hash depends on every token before its end."""
        return block_hashes(token_ids, self.block_tokens)

    def insert(self, instance: int, token_ids: Sequence[int], max_blocks: Optional[int] = None,
               hashes: Optional[List[int]] = None) -> None:
        """Record that instance now caches token_ids' whole blocks (oldest entries dropped past max_blocks;
        a prompt's leading blocks count as the most recent, so its tail goes first, as in a radix cache)."""
        table = self._blocks.setdefault(instance, OrderedDict())
        for h in reversed(hashes if hashes is not None else self.block_hashes(token_ids)):
            table[h] = None
            table.move_to_end(h)
        if max_blocks is not None:
            while len(table) > max(0, max_blocks):
                table.popitem(last=False)

    def match(self, instance: int, token_ids: Sequence[int], hashes: Optional[List[int]] = None) -> int:
        """Leading tokens of token_ids whose blocks the instance holds (a multiple of block_tokens)."""
        table = self._blocks.get(instance)
        if not table:
            return 0
        n = 0
        for h in (hashes if hashes is not None else self.block_hashes(token_ids)):
            if h not in table:
                break
            n += 1
        return n * self.block_tokens

    def regroup(self, sources: Iterable[int], targets: Iterable[int]) -> None:
        """Instances `sources` became `targets` (a merge: several into one; a split: one into several): each
        target gets the union of the sources' entries."""
        sources = list(sources)
        union: "OrderedDict[int, None]" = OrderedDict()
        for s in sources:
            union.update(self._blocks.get(s, {}))
        for s in sources:
            self._blocks.pop(s, None)
        for t in targets:
            self._blocks[t] = OrderedDict(union)

    def replace(self, instance: int, hashes: Sequence[int], max_blocks: Optional[int] = None) -> None:
        """The instance holds exactly these blocks (its own report after a transformation)."""
        self._blocks[instance] = OrderedDict()
        self.insert(instance, (), max_blocks, list(hashes))

    def drop(self, instance: int) -> None:
        self._blocks.pop(instance, None)

    def size(self, instance: int) -> int:
        return len(self._blocks.get(instance, ()))
