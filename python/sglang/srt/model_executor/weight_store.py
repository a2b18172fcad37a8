"""WeightStore: one byte arena per device, shared by the weights and the KV pool (DESIGN §4-5).

    arena   [arena_bytes] uint8, arena_bytes a multiple of the TP1 page size
            [ weights, packed from offset 0 (each parameter 256-byte aligned) | KV pages ... ]
    pages   the whole arena viewed as KV pages: page j = bytes [j * page_bytes, (j+1) * page_bytes);
            pages overlapping the weights are reserved (never allocated)

Because pages are numbered over the whole arena, a merge's renumbering (old page p -> p*k + s, each page
cut into k smaller ones) holds for weights and KV alike. A merge packs every parameter's smaller shard to
the front (`compact`): the tail of the old weight region becomes free KV pages. A split first has its KV
moved out of the region the weights need back (the split plan's reserved pages), then `expand` moves the
kept rows up to their new offsets and the missing rows arrive from the peers straight into place.
Nothing here allocates a second copy of the weights; moves go through a bounded staging buffer.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

ALIGN = 256  # byte alignment of every parameter in the arena
STAGING_BYTES = 8 << 20  # largest chunk of an in-arena move through staging
# Moves by at least this distance copy straight, in chunks of the distance (no staging, each byte copied once).
DIRECT_MOVE_MIN_BYTES = 1 << 20


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _nbytes(shape, dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def unique_parameters(model: torch.nn.Module) -> List[Tuple[str, torch.nn.Parameter]]:
    """(name, parameter) in a fixed order, tied parameters once."""
    return list(model.named_parameters(remove_duplicate=True))


def packed_layout(model: torch.nn.Module) -> Tuple[Dict[str, int], int]:
    """Byte offset of every parameter packed from 0 in parameter order, and the end of the packed region."""
    offsets, off = {}, 0
    for name, p in unique_parameters(model):
        offsets[name] = off
        off += _align(_nbytes(p.shape, p.dtype))
    return offsets, off


class WeightStore:
    def __init__(self, arena_bytes: int, device):
        # [arena_bytes] raw bytes: weights at the front, KV pages over everything
        self.arena = torch.empty(arena_bytes, dtype=torch.uint8, device=device)
        self.offsets: Dict[str, int] = {}
        self.weights_end = 0

    @property
    def arena_bytes(self) -> int:
        return self.arena.numel()

    def view(self, offset: int, shape, dtype: torch.dtype) -> torch.Tensor:
        n = _nbytes(shape, dtype)
        return self.arena[offset:offset + n].view(dtype).view(tuple(shape))

    def reserved_pages(self, page_bytes: int) -> int:
        """Pages (of `page_bytes`) that overlap the weights."""
        return -(-self.weights_end // page_bytes)

    # ---- placing a model -----------------------------------------------------------------------------
    def adopt(self, model: torch.nn.Module) -> None:
        """Copy the model's parameters into the arena (packed) and make them views of it."""
        self.offsets, self.weights_end = packed_layout(model)
        if self.weights_end > self.arena_bytes:
            raise ValueError(f"weights need {self.weights_end} bytes, the arena has {self.arena_bytes}")
        views = {}
        for name, p in unique_parameters(model):
            v = self.view(self.offsets[name], p.shape, p.dtype)
            v.copy_(p.data)
            views[id(p)] = torch.nn.Parameter(v, requires_grad=False)
        install_parameters(model, views)

    def bind(self, model: torch.nn.Module, offsets: Dict[str, int], weights_end: int) -> None:
        """Make `model`'s parameters (meta or stale) views at `offsets` (contents already in place)."""
        views = {}
        for name, p in unique_parameters(model):
            views[id(p)] = torch.nn.Parameter(self.view(offsets[name], p.shape, p.dtype), requires_grad=False)
        install_parameters(model, views)
        self.offsets, self.weights_end = dict(offsets), weights_end

    # ---- in-arena moves ------------------------------------------------------------------------------
    def move(self, src: int, dst: int, nbytes: int) -> int:
        """memmove inside the arena; returns the staging bytes used. Chunks no longer than the distance moved
        are copied straight (a chunk's destination is then never a byte still to be read); a shorter distance
        goes through a bounded staging buffer."""
        if src == dst or nbytes == 0:
            return 0
        gap = abs(src - dst)
        if gap >= nbytes or gap >= DIRECT_MOVE_MIN_BYTES:
            chunk, staging = min(gap, nbytes), None
        else:
            chunk = min(STAGING_BYTES, nbytes)
            staging = torch.empty(chunk, dtype=torch.uint8, device=self.arena.device)  # [chunk] bytes
        starts = range(0, nbytes, chunk)
        # Moving down: low to high; moving up: high to low. Each chunk is read whole before it is written.
        for s in (starts if dst < src else reversed(starts)):
            n = min(chunk, nbytes - s)
            if staging is None:
                self.arena[dst + s:dst + s + n].copy_(self.arena[src + s:src + s + n])  # disjoint ranges
            else:
                staging[:n].copy_(self.arena[src + s:src + s + n])
                self.arena[dst + s:dst + s + n].copy_(staging[:n])
        return 0 if staging is None else chunk


def install_parameters(model: torch.nn.Module, replacements: Dict[int, torch.nn.Parameter]) -> None:
    """Replace parameters by identity everywhere they are referenced (tied weights appear twice)."""
    for module in model.modules():
        for leaf, param in list(module._parameters.items()):
            if param is not None and id(param) in replacements:
                module._parameters[leaf] = replacements[id(param)]
