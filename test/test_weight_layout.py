"""Padded shard-major weight layout: every TP degree's shard is one contiguous slice of the full layout, the
loader's row copies build exactly that slice, and padding does not change what the layers compute."""

import pytest
import torch

from sglang.srt.model_executor.weight_layout import (
    RowCopy,
    build_local_shard,
    local_rows,
    padded_size,
    padded_vocab_size,
    shard_copies,
    shard_of,
    to_padded_layout,
)

GRANULARITIES = [1, 2, 4, 8]


def _divisors(g):
    return [t for t in GRANULARITIES if g % t == 0]


def _parts(sizes, cols=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, cols, generator=gen) for s in sizes]


# (name, part sizes): plain, fused QKV, padded gate_up, padded vocab, transposed down_proj
CASES = [
    ("column", [64]),
    ("qkv", [64, 16, 16]),
    ("gate_up", [172, 172]),
    ("vocab", [509]),
    ("down_transposed", [100]),
]


@pytest.mark.parametrize("g", GRANULARITIES)
@pytest.mark.parametrize("name,sizes", CASES)
def test_every_shard_is_contiguous_and_shards_concatenate_to_full(name, sizes, g):
    padded = [padded_size(s, g) for s in sizes]
    parts = _parts(sizes)
    full = to_padded_layout(parts, padded, g)
    assert full.shape[0] == sum(padded)
    for t in _divisors(g):
        shards = []
        for r in range(t):
            view = shard_of(full, r, t)
            assert view.is_contiguous()
            assert view.data_ptr() == full.data_ptr() + r * view.numel() * full.element_size()
            local = build_local_shard(parts, padded, g, r, t)
            assert local.shape[0] == local_rows(padded, g, t)
            torch.testing.assert_close(local, view, rtol=0, atol=0)
            shards.append(local)
        torch.testing.assert_close(torch.cat(shards), full, rtol=0, atol=0)


@pytest.mark.parametrize("g", GRANULARITIES)
def test_full_layout_is_fine_shard_major_with_zero_padding(g):
    sizes = [12 * g, 4 * g, 3]  # a padded third part
    padded = [padded_size(s, g) for s in sizes]
    parts = _parts(sizes, seed=1)
    full = to_padded_layout(parts, padded, g)
    block = sum(p // g for p in padded)
    for f in range(g):
        rows = full[f * block:(f + 1) * block]
        offset = 0
        for part, p in zip(parts, padded):
            piece = p // g
            expect = torch.zeros(piece, part.shape[1])
            real = part[f * piece:(f + 1) * piece]
            expect[: real.shape[0]] = real
            torch.testing.assert_close(rows[offset:offset + piece], expect, rtol=0, atol=0)
            offset += piece


def test_unfused_copies_merge_into_one_run():
    assert shard_copies([64], [64], 0, 8, 1, 2) == [RowCopy(32, 0, 32)]
    # the last rank of a padded part copies only the real rows
    assert shard_copies([172], [176], 0, 8, 0, 1) == [RowCopy(0, 0, 172)]
    assert shard_copies([172], [176], 0, 8, 1, 2) == [RowCopy(88, 0, 84)]


def test_padded_vocab_is_aligned_for_every_degree():
    for g in GRANULARITIES:
        vp = padded_vocab_size(509, g)
        assert vp >= 509 and vp % (64 * g) == 0


def test_tp_not_dividing_granularity_is_rejected():
    with pytest.raises(ValueError, match="must divide"):
        shard_copies([64], [64], 0, 2, 0, 4)


@pytest.mark.parametrize("g", GRANULARITIES)
def test_padded_mlp_computes_the_same_as_unpadded(g):
    """gate_up (fused, padded rows) + down (transposed, padded rows), summed over ranks == the HF MLP."""
    hidden, inter = 24, 172
    gen = torch.Generator().manual_seed(3)
    gate, up = torch.randn(inter, hidden, generator=gen), torch.randn(inter, hidden, generator=gen)
    down = torch.randn(hidden, inter, generator=gen)
    x = torch.randn(7, hidden, generator=gen, dtype=torch.float64).float()
    ref = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
    ip = padded_size(inter, g)
    for t in _divisors(g):
        total = torch.zeros_like(ref)
        for r in range(t):
            w = build_local_shard([gate, up], [ip, ip], g, r, t)  # [local rows, hidden]
            y = (x @ w.T).view(7, g // t, -1)
            h = torch.nn.functional.silu(y[..., : ip // g]) * y[..., ip // g:]
            w_down = build_local_shard([down.T.contiguous()], [ip], g, r, t)  # [local in, hidden]
            total += h.reshape(7, -1) @ w_down
        torch.testing.assert_close(total, ref, rtol=1e-4, atol=1e-4)
