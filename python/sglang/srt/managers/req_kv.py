"""Pages for requests: prefix matching, allocation with eviction, release into the radix cache.

The scheduler asks this class for KV memory; it composes the page allocator (free pages) and the radix
cache (pages holding cached prefixes, evictable when unreferenced):

    admit(req)           match the longest cached page-aligned prefix, lock it, start the page table
    reserve(req, n)      make sure the page table covers n tokens, evicting cached leaves if needed
    release(req)         insert the request's computed, page-aligned KV into the cache, unlock, free the rest
    sessions             open sessions' pinned paths (mem_cache/session_pins.py): kept between turns, given
                         up least recently used first when running requests need their pages
"""

from __future__ import annotations

from typing import List

from sglang.srt.managers.schedule_batch import Req
from sglang.srt.mem_cache.page_allocator import PageAllocator
from sglang.srt.mem_cache.radix_cache import RadixCache
from sglang.srt.mem_cache.session_pins import SessionPins


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class ReqKVManager:
    def __init__(self, num_pages: int, page_size: int, disable_radix_cache: bool, reserved_pages: int = 0,
                 session_budget: float = 0.5):
        """num_pages: page ids [0, num_pages); the first `reserved_pages` hold weights and are never handed out.
        session_budget: share of the usable pages open sessions may keep pinned between turns."""
        self.page_size = page_size
        self.allocator = PageAllocator(num_pages)
        self.allocator.take(range(reserved_pages))
        self.reserved_pages = reserved_pages
        self.tree = RadixCache(page_size, self.allocator, disable=disable_radix_cache)
        self.sessions = SessionPins(self.tree, int(session_budget * (num_pages - reserved_pages)))

    # ---- capacity ---------------------------------------------------------------------------------
    @property
    def num_pages(self) -> int:
        """Pages requests can use (the pool minus the reserved ones)."""
        return self.allocator.num_total - self.reserved_pages

    def available_pages(self) -> int:
        """Pages obtainable now: free ones, cached ones nobody references, and those only session pins hold."""
        return self.allocator.num_free + self.tree.evictable_pages() + self.tree.pinned_pages()

    def used_pages(self) -> int:
        return self.num_pages - self.allocator.num_free

    # ---- request lifecycle ------------------------------------------------------------------------
    def admit(self, req: Req) -> None:
        """Attach the longest cached prefix of the request's tokens (at least one token is left to compute)."""
        fill = req.fill_ids
        limit = len(fill) - 1
        if req.wants_input_logprobs:
            # Logits of position i-1 give the logprob of token i: keep them computed.
            limit = min(limit, max(0, req.logprob_start_len - 1))
        match = self.tree.match_prefix(fill[: max(0, limit)])
        req.page_table = list(match.pages)
        req.num_tree_pages = len(match.pages)
        req.kv_len = match.num_tokens
        req.cache_node = match.last_node
        self.tree.inc_lock_ref(match.last_node)
        if not req.admitted_once:
            req.cached_tokens = match.num_tokens
            req.admitted_once = True

    def reserve(self, req: Req, num_tokens: int) -> bool:
        """Grow the request's page table to cover `num_tokens` tokens. False (nothing changed) if out of pages."""
        need = pages_for(num_tokens, self.page_size) - len(req.page_table)
        if need <= 0:
            return True
        pages = self.alloc(need)
        if pages is None:
            return False
        req.page_table.extend(pages)
        return True

    def alloc(self, n: int) -> List[int] | None:
        pages = self.allocator.alloc(n)
        if pages is None:
            self.tree.evict(n - self.allocator.num_free)
            pages = self.allocator.alloc(n)
        while pages is None and self.sessions.release_lru():  # running requests come first
            self.tree.evict(n - self.allocator.num_free)
            pages = self.allocator.alloc(n)
        return pages

    def release(self, req: Req) -> None:
        """Give the request's KV back: full pages of computed tokens to the cache, the rest to the allocator."""
        if req.cache_node is None and not req.page_table:
            return
        ps = self.page_size
        aligned_pages = min(req.kv_len // ps, len(req.page_table))
        owned_from = req.num_tree_pages
        if aligned_pages > 0 and not self.tree.disable:
            tokens = req.fill_ids[: aligned_pages * ps]
            already = self.tree.insert(tokens, req.page_table[:aligned_pages]) // ps
            # Pages the tree already had for this prefix: ours are duplicates (except the tree's own).
            self.allocator.free(req.page_table[owned_from:max(owned_from, already)])
            owned_from = max(owned_from, aligned_pages)
        self.allocator.free(req.page_table[owned_from:])
        if req.cache_node is not None:
            self.tree.dec_lock_ref(req.cache_node)
        req.reset_kv()

    def finish_session_turn(self, session_id: str, computed_tokens: List[int]) -> None:
        """A session's turn finished and was released: pin its computed tokens until the next turn."""
        self.sessions.pin(session_id, computed_tokens)

    def flush(self) -> None:
        self.sessions.clear()
        self.tree.reset()

    # ---- Gyges: ownership after a transformation ----------------------------------------------------
    def adopt(self, tree_paths, running: List[Req], ) -> None:
        """Rebuild page ownership on a fresh manager from migrated state (page ids already re-based).

        The cached paths go into the tree (where two instances cached the same tokens, one copy is kept and
        the other's pages are duplicates); every running request re-points the cached part of its prefix to
        the tree's pages and locks it; the pages nobody references any more are returned to the free list.
        """
        ps = self.page_size
        used = set()
        for _, pages in tree_paths:
            used.update(pages)
        for req in running:
            used.update(req.page_table)
        self.allocator.take(used)
        duplicates = set(self.tree.import_(tree_paths))
        to_free = set()
        for req in running:
            n_aligned = min(req.kv_len // ps, len(req.page_table)) * ps
            match = self.tree.match_prefix(req.fill_ids[:n_aligned])
            for i, page in enumerate(match.pages):
                old = req.page_table[i]
                if old != page and i >= req.num_tree_pages:
                    to_free.add(old)  # the request's own copy of KV the tree also holds
            req.page_table[: len(match.pages)] = match.pages
            req.num_tree_pages = len(match.pages)
            req.cache_node = match.last_node
            self.tree.inc_lock_ref(match.last_node)
        still_used = {p for r in running for p in r.page_table}
        self.allocator.free(sorted((duplicates | to_free) - still_used))
