"""Head-centric paged KV pool: the shape of CONTRACTS.md, token write/gather, contiguous page blocks."""

import torch

from sglang.srt.mem_cache.kv_pool import HeadCentricKVPool


def _pool(**kw):
    args = dict(num_pages=6, page_size=4, local_kv_heads=4, num_layers=3, head_dim=8, dtype=torch.float32,
                device="cpu")
    args.update(kw)
    return HeadCentricKVPool(**args)


def test_buffer_shape_and_sizes():
    pool = _pool(dtype=torch.bfloat16)
    assert pool.kv_buffer.shape == (6, 4, 3, 2, 4, 8)
    assert pool.kv_buffer.dtype == torch.bfloat16
    assert pool.bytes_per_page == 4 * 3 * 2 * 4 * 8 * 2
    assert pool.total_bytes == pool.kv_buffer.numel() * pool.kv_buffer.element_size()
    assert pool.max_total_num_tokens == 24


def test_write_then_gather_round_trip_and_leaves_other_tokens_alone():
    pool = _pool()
    gen = torch.Generator().manual_seed(0)
    pages, slots = torch.tensor([2, 2, 5]), torch.tensor([0, 3, 1])
    k, v = torch.randn(3, 4, 8, generator=gen), torch.randn(3, 4, 8, generator=gen)
    pool.write(1, k, v, pages, slots)
    gk, gv = pool.gather(1, pages.view(1, 3), slots.view(1, 3))  # [1, 3, H, D]
    torch.testing.assert_close(gk[0], k)
    torch.testing.assert_close(gv[0], v)
    # the token's K sits at [page, head, layer, 0, slot, :]
    torch.testing.assert_close(pool.kv_buffer[5, :, 1, 0, 1], k[2])
    assert pool.kv_buffer[:, :, 0].abs().sum() == 0 and pool.kv_buffer[:, :, 2].abs().sum() == 0
    assert int((pool.kv_buffer != 0).sum()) == 2 * k.numel()
