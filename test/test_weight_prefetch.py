"""A split's weight prefetch (managers/weight_prefetch.py), its pure parts without processes: where the staging
region goes in the merged pool, what fits in it, and that a refused split returns its pages.

The live behaviour (tokens identical with requests decoding, arriving and aborted during the prefetch; a partial
prefetch; the 4-device shape walk) is in test_precopy.py and test_gyges_live.py."""

import pytest
import torch

from gyges.plans import ParamSpec, weight_split_plan
from gyges.topology import Instance
from sglang.srt.managers.io_struct import TransformCmd
from sglang.srt.managers.weight_prefetch import WeightPrefetch, take_prefetched
from sglang.srt.mem_cache.page_allocator import PageAllocator
from sglang.srt.model_executor.weight_store import WeightStore

PAGE = 1024  # bytes of one page of the merged pool
PAGES = 64


def _prefetch(rows=64, row_bytes=64, chunk=1024):
    """Device 0 of a TP2 instance splitting into two TP1: it fetches rows/2 rows of one parameter from device 1."""
    cmd = TransformCmd("t1", "split", [[0, 1]], [[0], [1]], 0.0)
    plan = weight_split_plan([ParamSpec("w", rows, row_bytes)], 2, Instance.of([0, 1]), [Instance.of([0]),
                                                                                       Instance.of([1])])
    new_model = torch.nn.Linear(row_bytes // 4, rows, bias=False, device="meta")  # the part's [rows, cols] float32
    old_model = torch.nn.Linear(row_bytes // 4, rows // 2, bias=False)
    return WeightPrefetch(cmd, 0, old_model, new_model, plan, WeightStore(PAGES * PAGE, "cpu"), None, chunk)


def test_staging_region_is_the_free_top_of_the_pool_above_the_new_weights():
    pre = _prefetch()
    need = pre.plan.max_staging_bytes
    assert need == 32 * 64 and len(pre.plan.chunks) == 2  # 32 rows of 64 bytes in 1 KiB chunks
    alloc = PageAllocator(PAGES)
    alloc.take(range(10))  # weights and requests at the bottom
    assert pre.staging_region(alloc, PAGE, keep_free_bytes=0) == (PAGES - 2, need)
    # the room the parts' KV needs pushes the region up; what is left above it is what gets fetched
    assert pre.staging_region(alloc, PAGE, keep_free_bytes=(PAGES - 1) * PAGE - 4096) == (PAGES - 1, PAGE)
    assert pre.staging_region(alloc, PAGE, keep_free_bytes=PAGES * PAGE) is None
    alloc.take([PAGES - 1])  # a request holds the top page: no region
    assert pre.staging_region(alloc, PAGE, keep_free_bytes=0) is None


def test_start_takes_the_region_and_release_returns_it():
    pre = _prefetch()
    alloc = PageAllocator(PAGES)
    first, capacity = pre.staging_region(alloc, PAGE, 0)
    pre.start(first * PAGE, capacity, alloc, first)
    assert alloc.num_free == PAGES - (PAGES - first)
    assert all(p < first for p in alloc.alloc(first))  # nobody else gets a staging page
    alloc.free(list(range(first)))
    pre.release()  # the split was refused
    assert alloc.num_free == PAGES and take_prefetched("t1") is None


@pytest.mark.parametrize("capacity", [0, 1024, 1500, 2048])
def test_limit_fetches_what_fits_and_leaves_the_rest_to_the_pause(capacity):
    pre = _prefetch(chunk=256)
    pieces = [p for c in pre.plan.chunks for p in c]
    pre.limit(capacity)
    fetched = [p for c in pre.chunks for p in c]
    assert all(c for c in pre.chunks)
    assert all(p.staging_offset + p.nbytes <= capacity for p in fetched)
    assert sorted(fetched + pre.pause_pieces, key=pieces.index) == pieces
    for device in (0, 1):  # each device fetches the whole 256-byte pieces inside its region
        assert sum(p.nbytes for p in fetched if p.dst_device == device) == capacity // 256 * 256
