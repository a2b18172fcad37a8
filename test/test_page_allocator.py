"""PageAllocator: all-or-nothing alloc, checked free, O(n) operations."""

import time

import pytest
from hypothesis import given, settings, strategies as st

from sglang.srt.mem_cache.page_allocator import (PageAllocator, first_ids, intersect_runs, merge_runs,
                                                 runs_count, runs_of)


def test_alloc_and_free_basic():
    a = PageAllocator(8)
    assert (a.num_total, a.num_free, a.num_used) == (8, 8, 0)
    p = a.alloc(3)
    assert p == [0, 1, 2]
    assert a.num_free == 5 and a.num_used == 3
    assert not a.is_free(1) and a.is_free(3)
    a.free(p)
    assert a.num_free == 8
    assert sorted(a.free_pages()) == list(range(8))


def test_alloc_never_partial():
    a = PageAllocator(4)
    assert a.alloc(3) is not None
    assert a.alloc(2) is None
    assert a.num_free == 1  # the failed call took nothing
    assert a.alloc(1) is not None
    assert a.alloc(1) is None
    assert a.alloc(0) == []


def test_free_errors_leave_state_unchanged():
    a = PageAllocator(4)
    p = a.alloc(2)
    with pytest.raises(ValueError, match="double free"):
        a.free([p[0], 3])  # 3 was never allocated
    assert a.num_free == 2  # nothing of the bad call was applied
    with pytest.raises(ValueError, match="out of range"):
        a.free([4])
    with pytest.raises(ValueError, match="out of range"):
        a.free([-1])
    with pytest.raises(ValueError):
        a.free([p[0], p[0]])
    with pytest.raises(ValueError):
        a.alloc(-1)
    with pytest.raises(ValueError):
        a.free([1.0])
    a.free(p)
    with pytest.raises(ValueError, match="double free"):
        a.free(p[:1])
    assert a.num_free == 4


def test_clear():
    a = PageAllocator(5)
    a.alloc(5)
    assert a.num_free == 0
    a.clear()
    assert a.num_free == 5 and a.alloc(5) == [0, 1, 2, 3, 4]


def test_zero_pages():
    a = PageAllocator(0)
    assert a.alloc(1) is None and a.alloc(0) == []


def test_cost_independent_of_pool_size():
    # An allocator that scanned the pool per call would take minutes here (20k calls x 2M pages).
    a = PageAllocator(1 << 21)
    t0 = time.perf_counter()
    for _ in range(20_000):
        a.free(a.alloc(4))
    assert time.perf_counter() - t0 < 2.0


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 40), st.lists(st.tuples(st.booleans(), st.integers(0, 12)), max_size=60))
def test_random_ops_keep_accounting(num_pages, ops):
    a = PageAllocator(num_pages)
    held = []  # lists of pages we own
    for do_alloc, n in ops:
        if do_alloc or not held:
            got = a.alloc(n)
            free_before = a.num_free + (len(got) if got else 0)
            if got is None:
                assert n > a.num_free
            else:
                assert len(got) == n and len(set(got)) == n
                assert free_before - n == a.num_free
                held.append(got)
        else:
            a.free(held.pop(n % len(held)))
        owned = [p for h in held for p in h]
        assert len(set(owned)) == len(owned)
        assert sorted(owned + a.free_pages()) == list(range(num_pages))


# ---- the allocator against a plain reference model ---------------------------------------------------------
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule  # noqa: E402


class ReferenceAllocator:
    """The allocator as one explicit list of every free id (the top of the stack is handed out next)."""

    def __init__(self, n: int):
        self.n = n
        self.stack = list(range(n - 1, -1, -1))

    def alloc(self, k: int):
        if k > len(self.stack):
            return None
        out = self.stack[len(self.stack) - k:][::-1]
        del self.stack[len(self.stack) - k:]
        return out

    def free(self, pages) -> str:
        """'' on success, else the kind of error (and nothing changed)."""
        if any(not 0 <= p < self.n for p in pages):
            return "out of range"
        seen = set()
        for p in pages:
            if p in self.stack:
                return "double free"
            if p in seen:
                return "twice in one call"
            seen.add(p)
        self.stack.extend(reversed(pages))
        return ""

    def take(self, pages) -> str:
        for p in pages:  # checked one by one, in order
            if not 0 <= p < self.n:
                return "out of range"
            if p not in self.stack:
                return "already in use"
        self.stack = [p for p in self.stack if p not in set(pages)]
        return ""


def _same_outcome(expected_error: str, call, pages) -> None:
    """call(pages) raises ValueError matching the reference model's error, or succeeds when it has none."""
    if expected_error:
        with pytest.raises(ValueError, match=expected_error):
            call(pages)
    else:
        call(pages)


class AllocatorVsReference(RuleBasedStateMachine):
    """Random alloc / free / take / clear sequences: same ids, same errors, same free list (in order)."""

    @rule(n=st.integers(0, 30))
    def new_allocator(self, n):
        self.real, self.ref = PageAllocator(n), ReferenceAllocator(n)

    def _ready(self):
        return hasattr(self, "real")

    @precondition(_ready)
    @rule(k=st.integers(0, 12))
    def alloc(self, k):
        assert self.real.alloc(k) == self.ref.alloc(k)

    @precondition(_ready)
    @rule(data=st.data())
    def free(self, data):
        n = self.ref.n
        used = sorted(set(range(n)) - set(self.ref.stack))
        pages = data.draw(st.lists(st.sampled_from(used), max_size=6, unique=True) if used else st.just([]))
        pages = data.draw(st.permutations(pages))
        # Sometimes add a bad id: a free page, an out-of-range id, or a repeat.
        bad = data.draw(st.sampled_from(["none", "free", "range", "repeat"]))
        if bad == "free" and self.ref.stack:
            pages = pages + [data.draw(st.sampled_from(self.ref.stack))]
        elif bad == "range":
            pages = pages + [data.draw(st.sampled_from([-1, n, n + 3]))]
        elif bad == "repeat" and pages:
            pages = pages + [pages[0]]
        _same_outcome(self.ref.free(list(pages)), self.real.free, pages)

    @precondition(_ready)
    @rule(data=st.data())
    def take(self, data):
        n = self.ref.n
        pool = list(range(-1, n + 1))
        pages = data.draw(st.lists(st.sampled_from(pool), max_size=8)) if n else []
        _same_outcome(self.ref.take(pages), self.real.take, pages)

    @precondition(_ready)
    @rule(lo=st.integers(0, 30), length=st.integers(0, 10))
    def take_range(self, lo, length):
        pages = [p for p in range(lo, lo + length) if p in self.ref.stack]
        assert self.ref.take(pages) == ""
        self.real.take(iter(pages))

    @precondition(_ready)
    @rule()
    def clear(self):
        self.real.clear()
        self.ref = ReferenceAllocator(self.ref.n)

    @precondition(_ready)
    @invariant()
    def same_state(self):
        assert self.real.free_pages() == self.ref.stack
        assert self.real.num_free == len(self.ref.stack)
        assert self.real.num_used == self.ref.n - len(self.ref.stack)
        free = set(self.ref.stack)
        assert [self.real.is_free(p) for p in range(self.ref.n)] == [p in free for p in range(self.ref.n)]
        runs = self.real.fresh_runs()
        assert all(lo < hi for lo, hi in runs) and all(a[1] < b[0] for a, b in zip(runs, runs[1:]))
        assert {p for lo, hi in runs for p in range(lo, hi)} <= free
        all_runs = self.real.free_runs()
        assert [p for lo, hi in all_runs for p in range(lo, hi)] == sorted(free)
        assert all(a[1] < b[0] for a, b in zip(all_runs, all_runs[1:]))  # disjoint and not adjacent


AllocatorVsReference.TestCase.settings = settings(max_examples=80, stateful_step_count=30, deadline=None)
test_allocator_matches_reference = AllocatorVsReference.TestCase


def test_construction_and_take_touch_only_the_pages_taken():
    """A fresh allocator over a big pool does not list its pages: init + take of a few stays tiny in memory."""
    import tracemalloc

    tracemalloc.start()
    a = PageAllocator(1 << 22)
    a.take(range(100))
    a.take([5000, 4096])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < (1 << 22) + (1 << 16)  # one state byte per page, no list of 4M ids (~150 MB)
    assert a.alloc(3) == [100, 101, 102] and a.num_free == (1 << 22) - 105
    assert not a.is_free(4096) and a.is_free(4095)


_id_sets = st.lists(st.frozensets(st.integers(0, 60), max_size=40), min_size=1, max_size=4)


@settings(max_examples=200, deadline=None)
@given(_id_sets, st.integers(0, 70))
def test_run_helpers_match_sets(sets, n):
    """What the pre-copy's start computes from every part's free runs equals the same on plain sets."""
    runs = [runs_of(sorted(x)) for x in sets]
    assert [[p for lo, hi in r for p in range(lo, hi)] for r in runs] == [sorted(x) for x in sets]
    common = runs[0]
    for r in runs[1:]:
        common = intersect_runs(common, r)
    expected = sorted(frozenset.intersection(*sets))
    assert [p for lo, hi in common for p in range(lo, hi)] == expected
    assert runs_count(common) == len(expected)
    assert first_ids(common, n) == expected[:n]
    union = merge_runs(runs[0], runs_of(sorted(set(range(61)) - sets[0])))
    assert union == [(0, 61)]
