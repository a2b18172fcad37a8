"""WeightStore.move: a memmove inside the arena, straight copies when the distance allows, staged otherwise.
Checked against numpy's copy semantics (source read whole before anything is written) on random moves, with
the thresholds shrunk so every path (one copy, chunks of the distance, staged chunks, up and down) is taken."""

import numpy as np
import torch
from hypothesis import given, settings, strategies as st

from sglang.srt.model_executor import weight_store
from sglang.srt.model_executor.weight_store import WeightStore

ARENA = 4096


@settings(max_examples=300, deadline=None)
@given(src=st.integers(0, ARENA - 1), dst=st.integers(0, ARENA - 1), nbytes=st.integers(0, ARENA),
       direct_min=st.sampled_from([1, 64, 1 << 20]), staging=st.sampled_from([7, 256, 8 << 20]))
def test_move_is_a_memmove(src, dst, nbytes, direct_min, staging):
    nbytes = min(nbytes, ARENA - src, ARENA - dst)
    old = (weight_store.DIRECT_MOVE_MIN_BYTES, weight_store.STAGING_BYTES)
    weight_store.DIRECT_MOVE_MIN_BYTES, weight_store.STAGING_BYTES = direct_min, staging
    try:
        store = WeightStore(ARENA, "cpu")
        ref = np.random.default_rng(src * 7 + dst).integers(0, 256, ARENA, dtype=np.uint8)
        store.arena.copy_(torch.from_numpy(ref))
        expected = ref.copy()
        expected[dst:dst + nbytes] = ref[src:src + nbytes].copy()
        used = store.move(src, dst, nbytes)
        assert np.array_equal(store.arena.numpy(), expected)
        gap = abs(src - dst)
        if gap >= nbytes or gap >= direct_min:
            assert used == 0  # no staging buffer
        else:
            assert used <= staging
    finally:
        weight_store.DIRECT_MOVE_MIN_BYTES, weight_store.STAGING_BYTES = old


def test_large_move_by_a_long_distance_needs_no_staging():
    store = WeightStore(7 << 20, "cpu")
    ref = torch.arange(store.arena_bytes, dtype=torch.int64).remainder(251).to(torch.uint8)
    store.arena.copy_(ref)
    n = (4 << 20) + 100
    assert store.move(2 << 20, 0, n) == 0  # down by 2 MiB: chunks of 2 MiB, copied straight
    assert torch.equal(store.arena[:n], ref[2 << 20:(2 << 20) + n])
    store.arena.copy_(ref)
    assert store.move(0, 2 << 20, n) == 0  # up
    assert torch.equal(store.arena[2 << 20:(2 << 20) + n], ref[:n])
