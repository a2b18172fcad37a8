"""Process groups of the host: every aligned TP group is created once, at start-up, by every rank.

Data flow:
    init_distributed(world_size, rank, init_method, backend)      one world = all devices of the host
    create_aligned_groups(world_size, collective)                 every rank, same order: for each size
        s in 2, 4, 8, ... <= world_size and each aligned offset o (o % s == 0), a device group (nccl on CUDA,
        gloo on CPU) and a gloo CPU group over ranks [o, o + s), kept in a registry; with collective "shm"
        (CPU, every rank on this host) also a shared-memory segment per group (shm_communicator.py) that
        the forward pass's all-reduce (sum) / all-gather use instead of gloo; every aligned group has its
        own, so a merged or split instance uses its new group's segment
        then warms each group this rank belongs to (one tiny all-reduce, same order on every rank): NCCL
        builds a communicator lazily at its first collective, which would otherwise be the first merge
        (batched send/recv on a group use that group's communicator)
    get_tp_group(ranks) -> TPGroup                                looks a group up; never creates one, so a
        Gyges merge/split never builds a communicator
    world_min(value, device)                                      MIN over the world group: every device of
        the host agrees on one memory budget at start-up, hence one arena and the same Gyges plans

A TPGroup of size 1 needs no torch.distributed at all: its collectives are no-ops, so world_size == 1
runs without init_distributed.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _set_pg_timeout

from gyges.topology import bitrev

logger = logging.getLogger(__name__)

# tuple of global ranks -> (device group, cpu group, ShmCommunicator or None); filled by create_aligned_groups.
_GROUPS: Dict[Tuple[int, ...], Tuple[Any, Any, Any, Any]] = {}
# groups whose communicators this rank has used once (create_aligned_groups warms every group it is in)
_WARMED: List[Tuple[int, ...]] = []
_WORLD_WARMED = False  # the world group's communicator used once

TP_COLLECTIVES = ("auto", "shm", "gloo")

# Followers wait for their leader's next batch in a collective for as long as the server is idle: the
# default 30-minute collective timeout would kill an idle TP instance.
IDLE_TIMEOUT = timedelta(days=365)

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


def init_distributed(world_size: int, rank: int, init_method: str, backend: Optional[str] = None) -> None:
    """Join the host-wide process group. backend: 'gloo' on CPU (default), 'nccl' on CUDA."""
    if world_size <= 1 and not init_method:
        return
    if dist.is_initialized():
        return
    dist.init_process_group(backend=backend or "gloo", init_method=init_method, world_size=world_size,
                            rank=rank, timeout=IDLE_TIMEOUT)


def aligned_rank_lists(world_size: int) -> List[List[int]]:
    """[[0, 1], [2, 3], ..., [0, 1, 2, 3], ...]: every aligned group of size >= 2, in creation order."""
    out, s = [], 2
    while s <= world_size:
        for offset in range(0, world_size - s + 1, s):
            out.append(list(range(offset, offset + s)))
        s *= 2
    return out


def sgl_kernel_builds(extension: str) -> bool:
    """True when sgl_kernel is installed and its C++ extension `extension` builds here; never raises."""
    try:
        from sgl_kernel import available
    except ImportError:  # the package is not installed: the torch implementations serve
        return False
    return available(extension)


def resolve_collective(collective: str) -> str:
    """'shm' or 'gloo' for the forward pass's CPU collectives; every rank of the world gets the same answer.

    auto: shm when the world runs on CPU (gloo) and sgl_kernel's extension builds on every rank, else gloo.
    shm: required (raises when it cannot be had). Collective when auto on a multi-rank CPU world."""
    if collective not in TP_COLLECTIVES:
        raise ValueError(f"tp collective {collective!r}: expected one of {TP_COLLECTIVES}")
    on_cpu = not dist.is_initialized() or dist.get_backend() == "gloo"
    if collective == "gloo":
        return "gloo"
    if not on_cpu:
        if collective == "shm":
            raise ValueError("--tp-collective shm is for CPU workers (on CUDA the device group is NCCL)")
        return "gloo"
    ok = sgl_kernel_builds("sgl_kernel_shm_comm")
    if collective == "shm" and not ok:
        from sgl_kernel import shm_comm

        shm_comm()  # raises the build error
    if dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([int(ok)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag.item())
    return "shm" if ok else "gloo"


def create_aligned_groups(world_size: int, collective: str = "auto") -> None:
    """Create every aligned group's device + CPU communicators (+ shm segment when collective resolves to
    'shm', see resolve_collective). Collective: every rank calls it with the same arguments."""
    if world_size <= 1:
        return
    device_backend = dist.get_backend()
    use_shm = resolve_collective(collective) == "shm"
    if dist.get_rank() == 0:
        logger.info("TP collectives of the forward pass: %s (--tp-collective %s)", "shm" if use_shm else
                    device_backend, collective)
    for ranks in aligned_rank_lists(world_size):
        device_group = dist.new_group(ranks, backend=device_backend, timeout=IDLE_TIMEOUT)
        cpu_group = dist.new_group(ranks, backend="gloo", timeout=IDLE_TIMEOUT)  # separate even on CPU: object broadcasts never
        # interleave with the forward pass's collectives
        # a third (gloo) for work in a background thread while the group serves (the host KV tier's re-layout
        # after a transformation, mem_cache/host_carry.py): never interleaves with the other two
        side_group = dist.new_group(ranks, backend="gloo", timeout=IDLE_TIMEOUT)
        shm = None
        if use_shm and dist.get_rank() in ranks:
            from sglang.srt.distributed.shm_communicator import ShmCommunicator

            shm = ShmCommunicator.create(ranks, cpu_group)
        _GROUPS[tuple(ranks)] = (device_group, cpu_group, shm, side_group)
    warm_groups()


def collective_device() -> torch.device:
    """Where the world backend's tensors live: this process's current CUDA device under NCCL, else CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def warm_groups() -> None:
    """One all-reduce of one element on the device group and one barrier on the CPU group of every group
    this rank is in, in creation order (every rank walks the same order, so no two ranks wait on each other
    in opposite orders): NCCL creates a group's communicator at its first collective; after this no
    transformation does."""
    device = collective_device()
    me = dist.get_rank()
    global _WORLD_WARMED
    if not _WORLD_WARMED:  # first the world group itself (world_min runs on it at start-up)
        dist.all_reduce(torch.ones(1, dtype=torch.int64, device=device))
        _WORLD_WARMED = True
    for ranks, (device_group, cpu_group, _shm, side_group) in _GROUPS.items():
        if me not in ranks or ranks in _WARMED:
            continue
        probe = torch.ones(1, dtype=torch.int64, device=device)
        dist.all_reduce(probe, group=device_group)
        if int(probe.item()) != len(ranks):
            raise RuntimeError(f"warm-up all-reduce on group {list(ranks)} gave {int(probe.item())}, "
                               f"expected {len(ranks)}")
        dist.barrier(group=cpu_group)
        dist.barrier(group=side_group)
        _WARMED.append(ranks)


def warmed_groups() -> List[Tuple[int, ...]]:
    """The groups this rank has warmed, in warm-up order."""
    return list(_WARMED)


def world_min(value: int) -> int:
    """MIN of an integer over the world group (every rank calls it); the value itself without a world."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def destroy_distributed() -> None:
    global _WORLD_WARMED
    _GROUPS.clear()
    _WARMED.clear()
    _WORLD_WARMED = False
    if dist.is_initialized():
        dist.destroy_process_group()


class _ParkOnGloo:
    """The leader's message to its followers: wait for the next broadcast over gloo (TPGroup.park_followers)."""


@dataclass
class TPGroup:
    """One tensor-parallel instance seen from one of its ranks."""

    rank: int  # local rank within the group
    size: int
    ranks: List[int] = field(default_factory=lambda: [0])  # global ranks, ascending
    device_group: Any = None
    cpu_group: Any = None
    shm: Any = None  # ShmCommunicator of this group (CPU, --tp-collective shm) or None: gloo / nccl
    side_group: Any = None  # gloo, for a background thread's transfers while the group serves

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def shard_rank(self) -> int:
        """Which weight / KV-head shard this rank holds: the bit-reversed group rank (gyges.topology).

        With this placement a merge keeps every device's new shard inside its old one and a split keeps the
        old shard inside the new one, so transformations keep a slice in place (see gyges/plans.py).
        For TP <= 2 it equals `rank`.
        """
        return bitrev(self.rank, self.size.bit_length() - 1)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place over the device group (sums over the shm segment when there is one); returns the tensor."""
        if self.size > 1:
            if self.shm is not None and op == "sum" and self.shm.supports(tensor):
                return self.shm.all_reduce_(tensor)
            dist.all_reduce(tensor, op=_REDUCE_OPS[op], group=self.device_group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's tensor (same shape) along `dim`, in shard order (see shard_rank)."""
        if self.size == 1:
            return tensor
        tensor = tensor.contiguous()
        if self.shm is not None and tensor.device.type == "cpu":
            parts = self.shm.all_gather(tensor)  # [size, *shape], group-rank order
        else:
            parts = [torch.empty_like(tensor) for _ in range(self.size)]
            dist.all_gather(parts, tensor, group=self.device_group)
        bits = self.size.bit_length() - 1
        return torch.cat([parts[bitrev(s, bits)] for s in range(self.size)], dim=dim)

    def broadcast_object(self, obj: Any = None, src_local: int = 0) -> Any:
        """Pickle `obj` from local rank src_local to every rank: over the shm segment when the group has one
        (a memcpy and a barrier), else, or while the followers are parked (park_followers), over gloo."""
        if self.size == 1:
            return obj
        shm = self.shm
        if shm is None or shm.parked:
            box = [obj if self.rank == src_local else None]
            dist.broadcast_object_list(box, src=self.ranks[src_local], group=self.cpu_group)
            if shm is not None:
                shm.parked = False  # woken: the next message is back on shm
            return box[0]
        if self.rank == src_local:
            shm.broadcast_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), src_local)
            if isinstance(obj, _ParkOnGloo):
                shm.parked = True
            return obj
        msg = pickle.loads(shm.broadcast_bytes(b"", src_local))
        if isinstance(msg, _ParkOnGloo):  # the leader waits for requests: so does this rank, on gloo
            shm.parked = True
            return self.broadcast_object(None, src_local)
        return msg

    def park_followers(self) -> None:
        """Leader, before it waits for requests: the followers' next wait for a broadcast is a blocking gloo
        receive instead of the shm segment's spin-and-sleep. The next broadcast_object wakes them over gloo
        and brings the group back onto shm. No-op without an shm segment or when already parked."""
        if self.size > 1 and self.shm is not None and not self.shm.parked:
            self.broadcast_object(_ParkOnGloo())

    def all_gather_object(self, obj: Any) -> List[Any]:
        """Every rank's `obj` (pickled), in group-rank order. Over the shm segment when the group has one: two
        memcpy gathers (the lengths, then the padded bytes) instead of gloo's two loopback round trips, which
        is most of what a transformation's state exchange costs in its pause."""
        if self.size == 1:
            return [obj]
        if self.shm is None:
            out = [None] * self.size
            dist.all_gather_object(out, obj, group=self.cpu_group)
            return out
        blob = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        lengths = self.shm.all_gather(torch.tensor([len(blob)], dtype=torch.int64)).view(-1).tolist()
        padded = torch.zeros(max(lengths), dtype=torch.uint8)  # [longest blob] bytes
        if blob:
            padded[:len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        rows = self.shm.all_gather(padded)  # [size, longest blob]
        return [pickle.loads(rows[r, :n].numpy().tobytes()) for r, n in enumerate(lengths)]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.cpu_group)


@contextlib.contextmanager
def collective_timeout(group: "TPGroup", seconds: float):
    """Within the block, collectives of `group` (device and CPU communicators) fail after `seconds` instead
    of waiting as long as the server is idle (IDLE_TIMEOUT): a Gyges transformation whose peer died or hung
    raises here and its worker exits instead of waiting forever."""
    if group.size == 1:
        yield
        return
    limit = timedelta(seconds=seconds)
    for pg in (group.device_group, group.cpu_group):
        _set_pg_timeout(limit, pg)
    if group.shm is not None:
        group.shm.set_timeout(seconds)
    try:
        yield
    finally:
        for pg in (group.device_group, group.cpu_group):
            _set_pg_timeout(IDLE_TIMEOUT, pg)
        if group.shm is not None:
            group.shm.set_timeout(IDLE_TIMEOUT.total_seconds())


def get_tp_group(ranks: Sequence[int]) -> TPGroup:
    """TPGroup for an aligned list of global ranks (this process must be one of them)."""
    ranks = sorted(int(r) for r in ranks)
    if len(ranks) == 1:
        return TPGroup(rank=0, size=1, ranks=ranks)
    key = tuple(ranks)
    if key not in _GROUPS:
        raise ValueError(f"no communicator for ranks {ranks}: only aligned groups created at start-up exist "
                         f"({sorted(_GROUPS)}); call create_aligned_groups(world_size) on every rank first")
    me = dist.get_rank()
    if me not in ranks:
        raise ValueError(f"rank {me} is not in TP group {ranks}")
    device_group, cpu_group, shm, side_group = _GROUPS[key]
    return TPGroup(rank=ranks.index(me), size=len(ranks), ranks=ranks, device_group=device_group,
                   cpu_group=cpu_group, shm=shm, side_group=side_group)
