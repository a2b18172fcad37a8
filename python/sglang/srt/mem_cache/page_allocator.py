"""Page allocator: hands out KV page ids of one instance's head-centric KV pool.

Data flow: the Scheduler asks `alloc(n)` for the pages a request's new tokens need (after asking the
RadixCache to `evict` when `num_free` is short), writes the ids into the request's page table, and gives
them back with `free(pages)` when the request finishes (pages the radix tree adopted are freed by the tree
when it evicts them). Page ids are instance-wide (page j exists on every TP rank of the instance).
After a Gyges transformation the new instance's ReqKVManager builds a fresh allocator and `take()`s the
pages its migrated requests and cache hold (reserved weight pages first).

Representation: the free ids are an explicit stack of pages given back by `free` (top = next handed out)
above an implicit range of ids never handed out since `clear()`, [fresh_from, num_pages), handed out
lowest first. A one-byte state per page (FRESH / USED / STACKED, a zero-filled bytearray) says where each
page is, so `take()` of a page in the fresh range only marks it (the range scan skips it later).

Cost: construction, `clear()` and `take(pages)` are O(pages touched) (plus one zero-filled byte per page,
~50 us for 1M pages); `alloc(n)` and `free(pages)` are O(n) in the number of pages moved; `take` of pages
that are on the explicit stack also filters that stack (O(pages given back so far)); `free_runs()` (the
free ids as runs, what a pre-copy's start exchanges) is O(runs + pages given back). Only `free_pages()`
walks the pool.
"""

from __future__ import annotations

import operator
import re
from typing import Iterable, List, Optional, Tuple

_FRESH = 0  # free, in the never-handed-out range [fresh_from, num_pages)
_USED = 1  # handed out (alloc) or taken (take)
_STACKED = 2  # free, on the explicit stack (given back by free)
_NOT_FRESH_RUN = re.compile(b"[\\x01\\x02]+")  # a run of USED / STACKED pages in the state bytes


class PageAllocator:
    """A free list of page ids 0..num_pages-1.

    - `alloc(n)` returns n distinct free page ids, or None (and allocates nothing) when fewer than n are
      free. The pages freed last come back first; after those, the lowest never-used ids, so a fresh
      allocator hands out 0, 1, 2, ... (which keeps tests deterministic).
    - `free(pages)` returns pages; freeing a page that is already free, an id out of range, or the same id
      twice in one call raises ValueError and leaves the allocator unchanged.
    - `take(pages)` marks specific free pages used (a page already in use raises ValueError, nothing taken).
    """

    def __init__(self, num_pages: int):
        if num_pages < 0:
            raise ValueError(f"num_pages must be >= 0, got {num_pages}")
        self._num_total = int(num_pages)
        self.clear()

    # -- queries ---------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_total(self) -> int:
        return self._num_total

    @property
    def num_used(self) -> int:
        return self._num_total - self._num_free

    def is_free(self, page: int) -> bool:
        return self._state[self._as_id(page)] != _USED

    def free_pages(self) -> List[int]:
        """The currently free page ids (a copy; O(pool size), for tests and accounting), in stack order:
        the fresh range from its highest id down, then the given-back pages, the next alloc's first last."""
        fresh: List[int] = []
        for lo, hi in self.fresh_runs():
            fresh.extend(range(lo, hi))
        fresh.reverse()
        return fresh + self._stack

    def fresh_runs(self) -> List[Tuple[int, int]]:
        """The never-handed-out free ids as ascending half-open runs [lo, hi) (O(runs), not O(pool))."""
        runs, lo, end = [], self._fresh_from, self._num_total
        for m in _NOT_FRESH_RUN.finditer(self._state, lo):
            if m.start() > lo:
                runs.append((lo, m.start()))
            lo = m.end()
        if lo < end:
            runs.append((lo, end))
        return runs

    def free_runs(self) -> List[Tuple[int, int]]:
        """Every free id as ascending, disjoint, non-adjacent half-open runs [lo, hi): what a transformation
        exchanges instead of free_pages() (O(runs + given-back pages), not O(pool))."""
        stacked = runs_of(sorted(self._stack))
        return merge_runs(stacked, self.fresh_runs())

    # -- mutation --------------------------------------------------------------------------------------
    def alloc(self, n: int) -> Optional[List[int]]:
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages ({n})")
        if n > self._num_free:
            return None
        if n == 0:
            return []
        state, stack = self._state, self._stack
        k = min(n, len(stack))
        pages = stack[len(stack) - k:]
        del stack[len(stack) - k:]
        pages.reverse()  # pop order: the page freed last first
        for p in pages:
            state[p] = _USED
        need = n - k
        lo = self._fresh_from
        # Then the lowest FRESH ids, run by run, skipping pages taken meanwhile. The stack is empty by now, so
        # every other page is USED; num_free guarantees `need` FRESH pages at or above fresh_from.
        while need:
            lo = state.find(_FRESH, lo)
            hi = lo + need
            j = state.find(_USED, lo, hi)
            if j != -1:
                hi = j
            state[lo:hi] = bytes([_USED]) * (hi - lo)
            pages.extend(range(lo, hi))
            need -= hi - lo
            lo = hi
        self._fresh_from = lo
        self._num_free -= n
        return pages

    def free(self, pages: Iterable[int]) -> None:
        pages = [self._as_id(p) for p in pages]
        if not pages:
            return
        state = self._state
        seen = set()
        for p in pages:
            if state[p] != _USED:
                raise ValueError(f"double free of page {p}")
            if p in seen:
                raise ValueError(f"page {p} freed twice in one call")
            seen.add(p)
        for p in pages:
            state[p] = _STACKED
        # Push in reverse so that the next alloc hands these back in the order they were given.
        self._stack.extend(reversed(pages))
        self._num_free += len(pages)

    def take(self, pages: Iterable[int]) -> None:
        """Mark specific free pages as used (rebuilding ownership after a Gyges transformation).
        Repeating a page in one call is allowed (it is taken once)."""
        state = self._state
        wanted = set()
        for p in pages:
            p = self._as_id(p)
            if state[p] == _USED:
                raise ValueError(f"page {p} is already in use")
            wanted.add(p)
        if not wanted:
            return
        from_stack = False
        for p in wanted:
            from_stack = from_stack or state[p] == _STACKED
            state[p] = _USED
        if from_stack:
            self._stack = [p for p in self._stack if state[p] == _STACKED]
        self._num_free -= len(wanted)

    def clear(self) -> None:
        """Every page free again (the pool is flushed)."""
        self._state = bytearray(self._num_total)  # all _FRESH
        self._stack: List[int] = []
        self._fresh_from = 0  # every id below it is USED or STACKED
        self._num_free = self._num_total

    # -- helpers ---------------------------------------------------------------------------------------
    def _as_id(self, page) -> int:
        try:
            p = operator.index(page)  # accepts numpy / torch integer scalars, rejects floats
        except TypeError:
            raise ValueError(f"page id {page!r} is not an integer") from None
        self._check_range(p)
        return p

    def _check_range(self, page: int) -> None:
        if not (0 <= page < self._num_total):
            raise ValueError(f"page id {page!r} out of range [0, {self._num_total})")

    def __repr__(self) -> str:
        return f"PageAllocator(num_total={self._num_total}, num_free={self.num_free})"


class AllocationWatch:
    """Records every page an allocator hands out from now until stop(): what a pre-copy must not trust (a page
    allocated since it was copied may hold new KV: prefill, decode, a host reload). Wraps `alloc` with an
    instance attribute that stop() removes."""

    def __init__(self, allocator: PageAllocator):
        self.allocator = allocator
        self.pages: set = set()
        original, pages = allocator.alloc, self.pages

        def alloc(n: int):
            out = original(n)
            if out:
                pages.update(out)
            return out

        allocator.alloc = alloc
        self._watching = True

    def stop(self) -> None:
        if self._watching:
            del self.allocator.alloc
            self._watching = False


# -- page-id runs ([lo, hi) half-open, ascending, disjoint) ----------------------------------------------------
Runs = List[Tuple[int, int]]


def runs_of(sorted_ids: Iterable[int]) -> Runs:
    """Ascending distinct ids as maximal runs."""
    runs: Runs = []
    for p in sorted_ids:
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


def merge_runs(a: Runs, b: Runs) -> Runs:
    """The union of two disjoint run lists, adjacent runs joined."""
    out: Runs = []
    for lo, hi in sorted(a + b):
        if out and out[-1][1] >= lo:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def intersect_runs(a: Runs, b: Runs) -> Runs:
    """The ids in both run lists, as runs (two-pointer walk, O(len(a) + len(b)))."""
    out: Runs = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def runs_count(runs: Runs) -> int:
    return sum(hi - lo for lo, hi in runs)


def first_ids(runs: Runs, n: int) -> List[int]:
    """The n lowest ids of the runs (fewer if they hold fewer)."""
    out: List[int] = []
    for lo, hi in runs:
        if len(out) >= n:
            break
        out.extend(range(lo, min(hi, lo + n - len(out))))
    return out
