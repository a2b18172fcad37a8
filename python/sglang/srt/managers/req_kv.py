"""Pages for requests: prefix matching, allocation with eviction, release into the radix cache.

The scheduler asks this class for KV memory; it composes the page allocator (free pages) and the radix
cache (pages holding cached prefixes, evictable when unreferenced):

    admit(req)           match the longest cached page-aligned prefix, lock it, start the page table
    reserve(req, n)      make sure the page table covers n tokens, evicting cached leaves if needed
    release(req)         insert the request's computed, page-aligned KV into the cache, unlock, free the rest
    export/import_session   a session's pinned path as (tokens, page bytes of every KV head), closed on the source and adopted +
                         pinned on the destination (Controller: MoveSessionReq -> SessionKVTransfer)
    sessions             open sessions' pinned paths (mem_cache/session_pins.py): kept between turns, given
                         up least recently used first when running requests need their pages
    host                 optional host-memory tier (mem_cache/host_tier.py, --enable-hierarchical-cache):
                         every node the radix cache evicts is copied there first; admit() reloads the pages
                         on host that continue the device match (before matching), so they count as cached
    hints                session_params.next_turn_in_s / X-Next-Turn-In: note_request() keeps the hint, and
                         when the request finishes its computed path is remembered (HintedPath) until then;
                         background() (the scheduler's loop, between iterations) copies a far-off hinted path
                         to host while it is still on device (its later eviction copies nothing), and
                         HINT_LEAD_S before the expected turn reloads what was evicted and re-pins the
                         session, so the turn finds its KV on device; pins are given up farthest-turn-first
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from sglang.srt.managers.schedule_batch import Req
from sglang.srt.mem_cache.host_tier import HostKVTier
from sglang.srt.mem_cache.page_allocator import PageAllocator
from sglang.srt.mem_cache.radix_cache import RadixCache, TreeNode
from sglang.srt.mem_cache.session_pins import HINT_LEAD_S, SessionPins


@dataclass
class HintedPath:
    """A finished turn whose client said when the next turn comes: its computed tokens are kept ready."""

    tokens: List[int]  # the turn's computed tokens (prompt + output but the last token)
    next_turn_at: float  # time.monotonic() the next turn is expected
    session_id: Optional[str]  # re-pinned before the turn (None: a request without a session)
    offloaded: bool = False  # copied to the host tier already


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class ReqKVManager:
    def __init__(self, num_pages: int, page_size: int, disable_radix_cache: bool, reserved_pages: int = 0,
                 session_budget: float = 0.5, host: Optional[HostKVTier] = None):
        """num_pages: page ids [0, num_pages); the first `reserved_pages` hold weights and are never handed out.
        session_budget: share of the usable pages open sessions may keep pinned between turns.
        host: the host KV tier (None: evicted KV is dropped)."""
        self.page_size = page_size
        self.allocator = PageAllocator(num_pages)
        self.allocator.take(range(reserved_pages))
        self.reserved_pages = reserved_pages
        self.tree = RadixCache(page_size, self.allocator, disable=disable_radix_cache)
        self.sessions = SessionPins(self.tree, int(session_budget * (num_pages - reserved_pages)))
        self.host = None
        self.attach_host(host if not disable_radix_cache else None)
        self.hinted: Dict[str, HintedPath] = {}  # session id (or "rid:" + rid) -> its hinted path
        # open sessions that ran a turn here (host tier on): their KV stays here -> their path's first page's
        # tokens (where a split sends them: the part that takes that path)
        self._host_sessions: Dict[str, Tuple[int, ...]] = {}
        self._pending_hints: Dict[str, float] = {}  # rid of a running request -> next_turn_in_s
        # sessions whose hinted turn was prefetched (re-pinned) and has not come yet -> when it is expected
        self._prefetched_turns: Dict[str, float] = {}
        self.sessions.next_turn_at = lambda sid: h.next_turn_at if (h := self.hinted.get(sid)) else None
        self.host_reloaded_tokens = 0  # tokens reloaded from host at admission (on the request's path)
        self.hint_prefetched_tokens = 0  # tokens reloaded from host ahead of a hinted turn (off it)
        self.host_reload_cut_pages = 0  # host pages a reload left behind (no room on device, or dropped meanwhile)

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
        if self.host is not None:
            self.host_reloaded_tokens += self.reload(fill[: max(0, limit)])
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
        pages = self.alloc_unpinned(n)
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
        if self._pending_hints and req.finished and req.rid in self._pending_hints:
            key = req.session_id or f"rid:{req.rid}"
            self.hinted[key] = HintedPath(list(req.fill_ids[:aligned_pages * ps]),
                                          time.monotonic() + self._pending_hints.pop(req.rid), req.session_id)
        req.reset_kv()

    def finish_session_turn(self, session_id: str, computed_tokens: List[int]) -> None:
        """A session's turn finished and was released: pin its computed tokens until the next turn."""
        self.sessions.pin(session_id, computed_tokens)
        if self.host is not None:
            self._host_sessions[session_id] = tuple(computed_tokens[:self.page_size])

    def home_sessions(self) -> List[str]:
        """Sessions whose KV this instance holds: pinned, or (with a host tier) unpinned but copied to host
        when evicted. The controller places their next turns here (its session map follows the reports)."""
        return sorted(set(self._host_sessions) | set(self.sessions.pins))

    def close_session(self, session_id: str) -> int:
        """The session ended: forget its hint, unpin it and free its own pages (returns them)."""
        self.hinted.pop(session_id, None)
        self._prefetched_turns.pop(session_id, None)
        self._host_sessions.pop(session_id, None)
        return self.sessions.close(session_id)

    def flush(self) -> None:
        self.sessions.clear()
        self.tree.reset()
        self.hinted.clear()
        self._prefetched_turns.clear()
        self._host_sessions.clear()
        if self.host is not None:
            self.host.clear()

    # ---- host tier -------------------------------------------------------------------------------------
    def _offload_evicted(self, node: TreeNode) -> None:
        tokens, pages = self.tree.path_of(node)
        self.host.offload(tokens, len(pages) - len(node.pages), node.pages)

    def reload(self, token_ids: Sequence[int]) -> int:
        """Bring back from host the pages that continue the device match of token_ids (as many as free and
        evictable pages allow) and insert them into the radix cache. Returns the tokens reloaded."""
        ps = self.page_size
        max_pages = len(token_ids) // ps
        match = self.tree.match_prefix(token_ids[:max_pages * ps])
        start = match.num_tokens // ps
        if self.host is None or start >= max_pages or not self.host.match(token_ids, start, max_pages):
            return 0
        self.tree.inc_lock_ref(match.last_node)  # evicting for room must not take the matched prefix
        try:
            want = len(self.host.match(token_ids, start, max_pages))
            pages = self.alloc_unpinned(want)  # eviction offloads what it evicts
            if pages is None:
                pages = self.allocator.alloc(self.allocator.num_free)
            run = self.host.match(token_ids, start, max_pages)[:len(pages)]  # eviction may have dropped some
            self.host_reload_cut_pages += want - len(run)
            self.allocator.free(pages[len(run):])
            pages = pages[:len(run)]
            if not run:
                return 0
            self.host.load(run, pages)
            end = (start + len(run)) * ps
            already = self.tree.insert(token_ids[:end], match.pages + pages) // ps
            self.allocator.free(pages[:max(0, already - start)])  # cached meanwhile: ours are duplicates
            return (start + len(run) - max(start, already)) * ps
        finally:
            self.tree.dec_lock_ref(match.last_node)

    # ---- moving a session between instances -----------------------------------------------------------------
    def export_session(self, session_id: str, read_pages: Callable[[List[int]], torch.Tensor]) -> tuple:
        """(token ids, read_pages(their pages): uint8 [pages, bytes of every KV head], see host_tier.
        read_pages_all_heads) of the session's pinned path; the session is then closed here (its own pages
        freed). ValueError when it is not pinned here."""
        pin = self.sessions.pins.get(session_id)
        if pin is None:
            raise ValueError(f"session {session_id!r} has no KV pinned on this instance")
        tokens, pages = self.tree.path_of(pin.node)
        kv = read_pages(pages)
        self.close_session(session_id)
        return tokens, kv

    def import_session(self, session_id: str, tokens: Sequence[int], kv,
                       write_pages: Callable[[List[int], torch.Tensor], None]) -> tuple:
        """Adopt a moved session (kv from export_session, at any TP degree): the pages of `tokens` not cached here
        are allocated (evicting cache, never pins), written by write_pages and inserted into the radix cache,
        and the path is pinned for the session. Returns (tokens adopted, bytes written); ValueError when the
        page layout differs or memory is short."""
        ps = self.page_size
        if kv.shape[0] * ps != len(tokens):
            raise ValueError(f"{kv.shape[0]} pages of KV for {len(tokens)} tokens (page size {ps})")
        match = self.tree.match_prefix(tokens)
        start = match.num_tokens // ps
        self.tree.inc_lock_ref(match.last_node)
        try:
            pages = self.alloc_unpinned(kv.shape[0] - start)
            if pages is None:
                raise ValueError(f"instance has no room for the session's {kv.shape[0] - start} pages")
            if pages:
                try:
                    write_pages(pages, kv[start:])
                except ValueError:
                    self.allocator.free(pages)
                    raise
                already = self.tree.insert(tokens, match.pages + pages) // ps
                self.allocator.free(pages[:max(0, already - start)])
        finally:
            self.tree.dec_lock_ref(match.last_node)
        self.sessions.pin(session_id, tokens)
        return len(tokens), len(pages) * kv.shape[1]

    def alloc_unpinned(self, n: int) -> Optional[List[int]]:
        """n pages from the free list and evictable cache (open sessions' pins are left alone)."""
        pages = self.allocator.alloc(n)
        if pages is None:
            self.tree.evict(n - self.allocator.num_free)
            pages = self.allocator.alloc(n)
        return pages

    # ---- hints -----------------------------------------------------------------------------------------
    def note_request(self, rid: str, session_id: Optional[str], next_turn_in_s: Optional[float]) -> None:
        """A request arrived: its session's earlier hint is used up; its own hint waits for it to finish."""
        if session_id is not None:
            self.hinted.pop(session_id, None)
            self._prefetched_turns.pop(session_id, None)
        if next_turn_in_s is not None:
            self._pending_hints[rid] = float(next_turn_in_s)

    def forget_request(self, rid: str) -> None:
        self._pending_hints.pop(rid, None)

    def background(self, now: Optional[float] = None) -> bool:
        """Between iterations: prepare hinted paths (see the module docstring). Returns whether it did work."""
        if not self.hinted:
            return False
        now = time.monotonic() if now is None else now
        worked = False
        for key, h in list(self.hinted.items()):
            if h.next_turn_at - HINT_LEAD_S <= now:  # the turn is near: its KV back on device, pinned
                del self.hinted[key]
                if h.session_id is not None:
                    self._prefetched_turns[h.session_id] = h.next_turn_at
                if self.host is not None:
                    self.hint_prefetched_tokens += self.reload(h.tokens)
                if h.session_id is not None and h.session_id not in self.sessions:
                    self.sessions.pin(h.session_id, h.tokens)
                worked = True
            elif not h.offloaded and self.host is not None:  # far off: a copy on host while it is on device
                match = self.tree.match_prefix(h.tokens, touch=False)
                self.host.offload(h.tokens, 0, match.pages)
                h.offloaded = worked = True
        return worked

    def host_stats(self) -> Dict[str, int]:
        out = {"hinted_paths": len(self.hinted), "host_reloaded_tokens": self.host_reloaded_tokens,
               "hint_prefetched_tokens": self.hint_prefetched_tokens, "host_reload_cut_pages": self.host_reload_cut_pages}
        if self.host is not None:
            out.update(self.host.stats())
        return out

    def attach_host(self, host: Optional[HostKVTier]) -> None:
        """Use `host` as the host tier from now on (at start, or when a transformation's re-layout of it is
        done); None keeps evicted KV dropped."""
        self.host = host
        if host is not None and not self.tree.disable:
            self.tree.on_evict = self._offload_evicted

    # ---- Gyges: what a transformation carries besides pages ---------------------------------------------
    def export_hints(self) -> Tuple[Dict[str, Tuple[int, ...]], List[Tuple[str, HintedPath]], Dict[str, float]]:
        """(sessions kept on host here -> their first page's tokens, hinted paths, sessions whose hinted turn
        was prefetched -> when it is expected) for InstanceState."""
        return dict(self._host_sessions), list(self.hinted.items()), dict(self._prefetched_turns)

    def adopt_hints(self, host_sessions: Dict[str, Tuple[int, ...]], hinted: List[Tuple[str, HintedPath]],
                    prefetched_turns: Dict[str, float]) -> None:
        self._host_sessions.update(host_sessions)  # (only a source with a host tier has any)
        self.hinted.update(hinted)
        self._prefetched_turns.update(prefetched_turns)

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
            # A new list (page_table_tensor() mirrors a list by identity, so no in-place edit).
            req.page_table = list(match.pages) + req.page_table[len(match.pages):]
            req.num_tree_pages = len(match.pages)
            req.cache_node = match.last_node
            self.tree.inc_lock_ref(match.last_node)
        still_used = {p for r in running for p in r.page_table}
        self.allocator.free(sorted((duplicates | to_free) - still_used))
