"""Padded, shard-major weight layout (CONTRACTS.md "Weight layout", DESIGN §5). Pure functions, no I/O.

A parallel weight is split along one axis (rows of [out, in] for column-parallel; rows of the transposed
[in, out] for row-parallel) into G *fine shards*; rank r of TP degree t (t divides G) owns fine shards
[r*G/t, (r+1)*G/t), which are contiguous. A *fused* weight (QKV, gate_up) has several parts; each part is
split into G fine pieces and the full layout is fine-shard-major:

    rows = [fine shard 0: part 0 piece | part 1 piece | ...][fine shard 1: ...] ... [fine shard G-1: ...]

A part whose length does not divide by G is padded with zero rows up to `padded_size(...)`. Attention
parts are padded by whole heads instead (gyges.heads.HeadLayout): padded head u of the part is HF head
sources[u] (its `unit` = head_dim rows) or zero; `head_shard_copies` gives their row copies.

Data flow:
    HF tensor (one part, unpadded, split axis first)
      --shard_copies(part_sizes, padded, part, G, rank, t)--> [RowCopy(src_start, dst_start, length)]
      --loader copies those row ranges straight into this rank's local parameter (no full padded tensor)
    to_padded_layout / shard_of build the full padded tensor and slice it: the reference the tests compare
    the copies against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch

VOCAB_ALIGN = 64  # vocab rows per fine shard are a multiple of this


@dataclass(frozen=True)
class RowCopy:
    """Copy `length` rows of the HF tensor's split axis from src_start into local rows from dst_start."""

    src_start: int
    dst_start: int
    length: int


def padded_size(size: int, granularity: int, align: int = 1) -> int:
    """Smallest multiple of granularity*align that is >= size."""
    unit = granularity * align
    return -(-size // unit) * unit


def padded_vocab_size(vocab_size: int, granularity: int) -> int:
    return padded_size(vocab_size, granularity, VOCAB_ALIGN)


def _check(granularity: int, tp_size: int, rank: int) -> None:
    if granularity < 1 or tp_size < 1 or granularity % tp_size:
        raise ValueError(f"tp_size {tp_size} must divide the weight granularity {granularity}")
    if not 0 <= rank < tp_size:
        raise ValueError(f"rank {rank} out of range for tp_size {tp_size}")


def fine_shard_rows(padded_sizes: Sequence[int], granularity: int) -> int:
    """Rows of one fine shard of a fused weight (all parts)."""
    return sum(p // granularity for p in padded_sizes)


def local_rows(padded_sizes: Sequence[int], granularity: int, tp_size: int) -> int:
    """Rows of the split axis one rank holds at TP degree tp_size."""
    return fine_shard_rows(padded_sizes, granularity) * (granularity // tp_size)


def shard_copies(part_sizes: Sequence[int], padded_sizes: Sequence[int], part: int, granularity: int,
                 rank: int, tp_size: int) -> List[RowCopy]:
    """Where rows of HF part `part` (true length part_sizes[part]) land in the local shard of (rank, tp).

    Padding rows get no copy (the local parameter is zero-initialised). Adjacent runs are merged, so an
    unfused weight gives a single copy.
    """
    _check(granularity, tp_size, rank)
    for s, p in zip(part_sizes, padded_sizes):
        if p < s or p % granularity:
            raise ValueError(f"padded size {p} must be >= {s} and a multiple of {granularity}")
    block = fine_shard_rows(padded_sizes, granularity)
    piece = padded_sizes[part] // granularity
    offset_in_block = sum(p // granularity for p in padded_sizes[:part])
    per_rank = granularity // tp_size
    copies: List[RowCopy] = []
    for i in range(per_rank):
        f = rank * per_rank + i
        src = f * piece
        length = min(piece, part_sizes[part] - src)
        if length <= 0:
            continue
        _append_run(copies, src, i * block + offset_in_block, length)
    return copies


def _append_run(copies: List[RowCopy], src: int, dst: int, length: int) -> None:
    """Append a copy, extending the last one when both ranges continue it."""
    last = copies[-1] if copies else None
    if last and last.src_start + last.length == src and last.dst_start + last.length == dst:
        copies[-1] = RowCopy(last.src_start, last.dst_start, last.length + length)
    else:
        copies.append(RowCopy(src, dst, length))


def head_shard_copies(sources: Sequence[int], unit: int, padded_sizes: Sequence[int], part: int,
                      granularity: int, rank: int, tp_size: int) -> List[RowCopy]:
    """Row copies of HF part `part` into the local shard of (rank, tp) when the part is laid out by heads:
    padded unit u (rows [u*unit, (u+1)*unit) of the padded part) is HF unit sources[u], or zero padding
    (no copy) when sources[u] < 0. A source may fill several units (replicated KV heads)."""
    _check(granularity, tp_size, rank)
    if padded_sizes[part] != len(sources) * unit or len(sources) % granularity:
        raise ValueError(f"{len(sources)} heads of {unit} rows do not tile padded size {padded_sizes[part]} "
                         f"in {granularity} fine shards")
    block = fine_shard_rows(padded_sizes, granularity)
    offset_in_block = sum(p // granularity for p in padded_sizes[:part])
    per_piece = len(sources) // granularity  # heads of this part in one fine shard
    per_rank = granularity // tp_size
    copies: List[RowCopy] = []
    for i in range(per_rank):
        f = rank * per_rank + i
        for k in range(per_piece):
            src_head = sources[f * per_piece + k]
            if src_head < 0:
                continue
            _append_run(copies, src_head * unit, i * block + offset_in_block + k * unit, unit)
    return copies


def to_padded_layout(parts: Sequence[torch.Tensor], padded_sizes: Sequence[int], granularity: int) -> torch.Tensor:
    """Full padded, fine-shard-major tensor from unpadded HF parts (split axis = dim 0)."""
    pieces = []
    for part, padded in zip(parts, padded_sizes):
        pad = torch.zeros((padded - part.shape[0],) + tuple(part.shape[1:]), dtype=part.dtype)
        pieces.append(torch.cat([part, pad]).reshape((granularity, padded // granularity) + tuple(part.shape[1:])))
    return torch.cat(pieces, dim=1).reshape((-1,) + tuple(parts[0].shape[1:]))  # [G * block, ...]


def shard_of(full: torch.Tensor, rank: int, tp_size: int) -> torch.Tensor:
    """Rank r's contiguous slice of a full padded layout at TP degree tp_size (a view)."""
    n = full.shape[0] // tp_size
    return full[rank * n:(rank + 1) * n]


def build_local_shard(parts: Sequence[torch.Tensor], padded_sizes: Sequence[int], granularity: int, rank: int,
                      tp_size: int) -> torch.Tensor:
    """The local shard assembled from HF parts through shard_copies (what the loader does, in memory)."""
    rows = local_rows(padded_sizes, granularity, tp_size)
    out = torch.zeros((rows,) + tuple(parts[0].shape[1:]), dtype=parts[0].dtype)
    sizes = [p.shape[0] for p in parts]
    for j, part in enumerate(parts):
        for c in shard_copies(sizes, padded_sizes, j, granularity, rank, tp_size):
            out[c.dst_start:c.dst_start + c.length] = part[c.src_start:c.src_start + c.length]
    return out


@dataclass
class WeightTarget:
    """Where one HF checkpoint tensor goes: rows `copies` of its split axis into `param` (local shard).

    transpose: the HF tensor is [out, in] split on `in` (row-parallel); the local parameter is stored
    transposed, [in_local, out], so the copies address HF columns.
    """

    param: torch.Tensor
    hf_shape: tuple
    copies: List[RowCopy]
    transpose: bool = False


def replicated_target(param: torch.Tensor) -> WeightTarget:
    """A weight every rank holds whole (norms)."""
    return WeightTarget(param, tuple(param.shape), [RowCopy(0, 0, param.shape[0])])
