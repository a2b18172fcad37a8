"""Triton page-block copy: runs of bytes between places of a flat buffer, or into / out of a contiguous buffer.

What a Gyges transformation moves (sglang.srt.model_executor.regroup): the pool's bytes as one flat uint8 tensor
    flat [total_bytes]      (HeadCentricKVPool.kv_buffer viewed as bytes; one page = bytes_per_page contiguous bytes,
                             one rank's heads of a page one contiguous block inside it)
and lists of runs (start offsets and lengths in bytes, int64 on the host):
    copy_runs(src, src_offsets, dst, dst_offsets, sizes)   dst[dst_offsets[i] : +sizes[i]] = src[src_offsets[i] : ..]
    gather_runs(src, offsets, sizes) -> buf                the runs back to back in a new contiguous buffer
    scatter_runs(dst, offsets, sizes, buf)                 the inverse: buf's consecutive pieces into the runs
The kernel moves the widest word (8, 4, 2 or 1 bytes) that divides every offset and size (the buffers are viewed
as that dtype), so page-aligned runs move as int64; offsets are int64 throughout (pools larger than 2**31 bytes).
One launch for any number of runs: grid (num_runs, min(cdiv(longest run, BLOCK), 65535)); program (r, c) copies
chunks c, c + grid[1], ... of BLOCK words of run r (masked at the run's end). Runs whose source and destination
ranges overlap are not supported (the caller stages them, as regroup does); runs of one call must not write the
same bytes.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

BLOCK = 1024  # words per program and iteration
MAX_CHUNK_PROGRAMS = 65535  # CUDA's limit on grid dimensions 1 and 2 (runs go on dimension 0: 2**31 - 1)


@triton.jit
def _copy_runs_kernel(src, dst, src_starts, dst_starts, lengths, BLOCK: tl.constexpr):
    run = tl.program_id(0)
    length = tl.load(lengths + run)
    s = tl.load(src_starts + run)
    d = tl.load(dst_starts + run)
    # chunks of BLOCK words, strided over the programs of axis 1 (at most MAX_CHUNK_PROGRAMS: CUDA's grid limit)
    for first in range(tl.program_id(1).to(tl.int64) * BLOCK, length, tl.num_programs(1).to(tl.int64) * BLOCK):
        offs = first + tl.arange(0, BLOCK)  # [BLOCK] int64 word offsets inside the run
        mask = offs < length
        tl.store(dst + d + offs, tl.load(src + s + offs, mask=mask), mask=mask)


# True when the kernel was defined under TRITON_INTERPRET=1 (triton decides at definition time)
INTERPRETED = type(_copy_runs_kernel).__name__ == "InterpretedFunction"

_WORDS = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.uint8))


def _word(*values: Sequence[int]) -> tuple:
    """The widest (bytes, dtype) dividing every value given."""
    for nbytes, dtype in _WORDS:
        if all(int(x) % nbytes == 0 for vs in values for x in vs):
            return nbytes, dtype
    return _WORDS[-1]


def _as_words(flat: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if flat.dim() != 1 or flat.dtype != torch.uint8 or not flat.is_contiguous():
        raise ValueError("expected a contiguous 1-D uint8 buffer")
    return flat.view(dtype)


def copy_runs(src: torch.Tensor, src_offsets: Sequence[int], dst: torch.Tensor, dst_offsets: Sequence[int],
              sizes: Sequence[int], block: int = BLOCK, max_chunk_programs: int = MAX_CHUNK_PROGRAMS) -> None:
    """dst[dst_offsets[i]:dst_offsets[i] + sizes[i]] = src[src_offsets[i]:src_offsets[i] + sizes[i]] (bytes)."""
    if not (len(src_offsets) == len(dst_offsets) == len(sizes)):
        raise ValueError("src_offsets, dst_offsets and sizes must have one entry per run")
    sizes = [int(n) for n in sizes]
    if not sizes or max(sizes) == 0:
        return
    for buf, offs in ((src, src_offsets), (dst, dst_offsets)):
        if min(int(o) for o in offs) < 0 or max(int(o) + n for o, n in zip(offs, sizes)) > buf.numel():
            raise ValueError("a run reaches outside its buffer")
    nbytes, dtype = _word([b.storage_offset() * b.element_size() for b in (src, dst)], [src.numel(), dst.numel()],
                          src_offsets, dst_offsets, sizes)
    src_w, dst_w = _as_words(src, dtype), _as_words(dst, dtype)

    def words(vals):  # int64 [num_runs] on the buffers' device
        return torch.tensor([int(x) // nbytes for x in vals], dtype=torch.int64).to(src.device)

    lengths = [n // nbytes for n in sizes]
    grid = (len(sizes), min(triton.cdiv(max(lengths), block), max_chunk_programs))
    _copy_runs_kernel[grid](src_w, dst_w, words(src_offsets), words(dst_offsets), words(sizes), BLOCK=block,
                            num_warps=4)


def gather_runs(src: torch.Tensor, offsets: Sequence[int], sizes: Sequence[int], block: int = BLOCK) -> torch.Tensor:
    """-> uint8 [sum(sizes)]: the byte runs of src back to back."""
    sizes = [int(n) for n in sizes]
    buf = torch.empty(sum(sizes), dtype=torch.uint8, device=src.device)  # [sum(sizes)] packed runs
    packed = [0]
    for n in sizes[:-1]:
        packed.append(packed[-1] + n)
    copy_runs(src, offsets, buf, packed, sizes, block)
    return buf


def scatter_runs(dst: torch.Tensor, offsets: Sequence[int], sizes: Sequence[int], buf: torch.Tensor,
                 block: int = BLOCK) -> None:
    """buf uint8 [sum(sizes)] (runs back to back) -> the byte runs of dst."""
    sizes = [int(n) for n in sizes]
    if buf.numel() != sum(sizes):
        raise ValueError(f"buffer holds {buf.numel()} bytes, the runs {sum(sizes)}")
    packed = [0]
    for n in sizes[:-1]:
        packed.append(packed[-1] + n)
    copy_runs(buf, packed, dst, offsets, sizes, block)
