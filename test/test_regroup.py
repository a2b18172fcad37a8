"""Byte-range gathers/scatters of the KV executor: the one-op block path and the general path agree."""

import torch

from sglang.srt.model_executor.regroup import gather_blocks, scatter_blocks


def _buffer(n=4096):
    return torch.arange(n, dtype=torch.int64).remainder(251).to(torch.uint8)


def test_uniform_blocks_take_and_put_the_same_bytes_as_slices():
    flat = _buffer()
    offsets, sizes = [512, 0, 3584, 1024], [512] * 4
    got = gather_blocks(flat, offsets, sizes)
    assert torch.equal(got, torch.cat([flat[o:o + n] for o, n in zip(offsets, sizes)]))
    target = torch.zeros_like(flat)
    scatter_blocks(target, [0, 2048, 1536, 512], sizes, got)
    for dst, src in zip([0, 2048, 1536, 512], offsets):
        assert torch.equal(target[dst:dst + 512], flat[src:src + 512])


def test_unaligned_or_mixed_ranges_use_the_general_path():
    flat = _buffer()
    offsets, sizes = [10, 700, 2000], [30, 64, 5]
    got = gather_blocks(flat, offsets, sizes)
    assert torch.equal(got, torch.cat([flat[o:o + n] for o, n in zip(offsets, sizes)]))
    target = torch.zeros_like(flat)
    scatter_blocks(target, [100, 3000, 5], sizes, got)
    assert torch.equal(target[100:130], flat[10:40]) and torch.equal(target[3000:3064], flat[700:764])
    assert torch.equal(target[5:10], flat[2000:2005])
    assert gather_blocks(flat, [], []).numel() == 0
