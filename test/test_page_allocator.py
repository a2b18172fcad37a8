"""PageAllocator: all-or-nothing alloc, checked free, O(n) operations."""

import time

import pytest
from hypothesis import given, settings, strategies as st

from sglang.srt.mem_cache.page_allocator import PageAllocator


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
