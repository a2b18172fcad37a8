"""Shared-memory all-reduce / all-gather for one tensor-parallel group whose ranks are processes of one host.

    ShmCommunicator.create(ranks, cpu_group)   collective over the group's gloo CPU group: its first rank
        creates a POSIX shm segment (sgl_kernel's ShmGroup, csrc/shm_comm.cpp), the name is broadcast, the
        others map it, and the name is unlinked once all have (the memory goes when the last rank exits)
    all_reduce_(t)          in place, sum, t on CPU in float32 / bfloat16 / float16 (else: supports() False)
    all_gather(t) -> [size, *t.shape]   every rank's t in group-rank order
    broadcast_bytes(data, root) -> bytes  the root's bytes on every other rank (b"" on the root)

Segment size: size * (2 * chunk + 64) + 2 * chunk bytes; larger messages move in chunk-sized pieces.
The forward pass's collectives, the leader's per-iteration broadcasts to its followers and a transformation's
state exchange use it (TPGroup); KV and weight transfers stay on gloo. A follower waiting here spins, yields
and then sleeps 50 us at a time, so a leader about to wait for requests parks its followers on gloo first
(TPGroup.park_followers; `parked` is kept here, one flag per group, the same on every rank).
"""

from __future__ import annotations

import os
import uuid
from typing import Any, List

import torch
import torch.distributed as dist

DEFAULT_CHUNK_BYTES = 4 << 20  # per rank and parity: 4 MiB moves a [64, 8192] float32 activation in one call

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class ShmCommunicator:
    """One group's segment, seen from one rank. Every rank of the group must make the same calls in order."""

    def __init__(self, impl: Any, ranks: List[int]):
        self._impl = impl  # sgl_kernel ShmGroup
        self.ranks = list(ranks)
        self.rank = impl.rank
        self.size = impl.size
        # The next object broadcast of this group goes over gloo: the leader parked its followers there
        # before waiting for requests (flipped by the same messages on every rank, see TPGroup.broadcast_object).
        self.parked = False

    @classmethod
    def create(cls, ranks: List[int], cpu_group, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> "ShmCommunicator":
        """Collective over `cpu_group` (gloo, same ranks): every rank of `ranks` calls it."""
        from sgl_kernel import shm_comm

        ext = shm_comm()
        me = dist.get_rank()
        box = [f"/sglang_tp_{os.getpid()}_{'_'.join(map(str, ranks))}_{uuid.uuid4().hex[:8]}"
               if me == ranks[0] else None]
        dist.broadcast_object_list(box, src=ranks[0], group=cpu_group)
        name = box[0]
        local = ranks.index(me)
        impl = ext.ShmGroup(name, local == 0, local, len(ranks), chunk_bytes) if local == 0 else None
        dist.barrier(group=cpu_group)  # the segment exists
        if impl is None:
            impl = ext.ShmGroup(name, False, local, len(ranks), chunk_bytes)
        dist.barrier(group=cpu_group)  # everyone has mapped it
        if local == 0:
            impl.unlink()
        return cls(impl, ranks)

    @staticmethod
    def supports(t: torch.Tensor) -> bool:
        return t.device.type == "cpu" and t.dtype in _DTYPES

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        if t.is_contiguous():
            self._impl.all_reduce_(t)
            return t
        c = t.contiguous()
        self._impl.all_reduce_(c)
        return t.copy_(c)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        out = torch.empty((self.size,) + tuple(t.shape), dtype=t.dtype)
        self._impl.all_gather_into(out, t)
        return out

    def broadcast_bytes(self, data: bytes, root: int) -> bytes:
        """`data` of local rank `root` to every rank: the others get it back, the root gets b""."""
        return self._impl.broadcast_bytes(data, root)

    def barrier(self) -> None:
        self._impl.barrier()

    def set_timeout(self, seconds: float) -> None:
        """A wait for a peer longer than this raises RuntimeError (a peer that exited raises within ~1 s)."""
        self._impl.set_timeout(float(seconds))
