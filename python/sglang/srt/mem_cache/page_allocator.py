"""Page allocator: hands out KV page ids of one instance's head-centric KV pool.

Data flow: the Scheduler asks `alloc(n)` for the pages a request's new tokens need (after asking the
RadixCache to `evict` when `num_free` is short), writes the ids into the request's page table, and gives
them back with `free(pages)` when the request finishes (pages the radix tree adopted are freed by the tree
when it evicts them). Page ids are instance-wide (page j exists on every TP rank of the instance).

Cost: `alloc(n)` and `free(pages)` are O(n) in the number of pages moved, independent of the pool size;
only the constructor and `clear()` touch every page.
"""

from __future__ import annotations

import operator
from typing import Iterable, List, Optional


class PageAllocator:
    """A free list of page ids 0..num_pages-1.

    - `alloc(n)` returns n distinct free page ids, or None (and allocates nothing) when fewer than n are
      free. Low ids are handed out first on a fresh allocator, which keeps tests deterministic.
    - `free(pages)` returns pages; freeing a page that is already free, an id out of range, or the same id
      twice in one call raises ValueError and leaves the allocator unchanged.
    """

    def __init__(self, num_pages: int):
        if num_pages < 0:
            raise ValueError(f"num_pages must be >= 0, got {num_pages}")
        self._num_total = int(num_pages)
        self.clear()

    # -- queries ---------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free_stack)

    @property
    def num_total(self) -> int:
        return self._num_total

    @property
    def num_used(self) -> int:
        return self._num_total - len(self._free_stack)

    def is_free(self, page: int) -> bool:
        return bool(self._is_free[self._as_id(page)])

    def free_pages(self) -> List[int]:
        """The currently free page ids (a copy; O(pool size), for tests and accounting)."""
        return list(self._free_stack)

    # -- mutation --------------------------------------------------------------------------------------
    def alloc(self, n: int) -> Optional[List[int]]:
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages ({n})")
        if n > len(self._free_stack):
            return None
        if n == 0:
            return []
        stack = self._free_stack
        pages = stack[-n:]
        del stack[-n:]
        pages.reverse()  # pop order: lowest ids first on a fresh allocator
        is_free = self._is_free
        for p in pages:
            is_free[p] = 0
        return pages

    def free(self, pages: Iterable[int]) -> None:
        pages = [self._as_id(p) for p in pages]
        if not pages:
            return
        is_free = self._is_free
        seen = set()
        for p in pages:
            if is_free[p]:
                raise ValueError(f"double free of page {p}")
            if p in seen:
                raise ValueError(f"page {p} freed twice in one call")
            seen.add(p)
        for p in pages:
            is_free[p] = 1
        # Push in reverse so that the next alloc hands these back in the order they were given.
        self._free_stack.extend(reversed(pages))

    def take(self, pages: Iterable[int]) -> None:
        """Mark specific free pages as used (rebuilding ownership after a Gyges transformation)."""
        wanted = set()
        for p in pages:
            p = self._as_id(p)
            if not self._is_free[p]:
                raise ValueError(f"page {p} is already in use")
            wanted.add(p)
        if not wanted:
            return
        for p in wanted:
            self._is_free[p] = 0
        self._free_stack = [p for p in self._free_stack if p not in wanted]

    def clear(self) -> None:
        """Every page free again (the pool is flushed)."""
        self._free_stack: List[int] = list(range(self._num_total - 1, -1, -1))
        self._is_free = bytearray(b"\x01" * self._num_total)

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
