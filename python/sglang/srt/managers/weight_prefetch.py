"""Weight prefetch ahead of a split: while the merged instance keeps serving, every device fetches the weight
rows it will lack after the split into the top of its KV pool; the pause then copies them into place on the
device instead of receiving them over the links (issue: the pause never waits for weights).

    leader (Scheduler.begin_transform: a split with --gyges-prefetch-chunk-bytes > 0)
        plan      WeightPrefetch: the new model on meta, the split's weight plan, its pieces and chunks
                  (gyges.plans.weight_prefetch_plan), the same on every device
        reserve   staging_region(): the top pages of the merged pool, free now, taken from the allocator; the
                  region must start at or above the end of the parts' weights. No room: no prefetch
        start     broadcast WeightPrefetchStart -> the followers build the same plan (follower_loop)
        step      once per iteration: broadcast WeightPrefetchStep -> every device posts the chunk's isend
                  (rows of its current shard) / irecv (into its staging region) and waits for them
                  [the merged instance's device group, between two forward passes]
    pause (gyges_transform.execute_transform)
        every device's summary travels with the state all-gather; when every device fetched every chunk, the
        split's KV plan places the parts' pages below the staging region (when that keeps every page the full
        pool would keep) and regroup.regroup_weights copies the staged rows into place; otherwise the rows are
        received in the pause as without prefetch. After the split the staging pages are ordinary free pages
        of the new pools (their allocators are built from the pages requests use).

Memory: the staging region is KV memory the parts give to their grown weights anyway (a split must fit the
parts' weights and KV into the same arena); it is taken from the merged pool for the prefetch's duration.
"""

from __future__ import annotations

import logging
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from gyges.plans import StagedRows, WeightPrefetchPlan, weight_prefetch_plan, weight_regroup_plan
from gyges.topology import Instance
from sglang.srt.distributed.parallel_state import get_tp_group
from sglang.srt.managers.io_struct import TransformCmd
from sglang.srt.model_executor import regroup
from sglang.srt.model_executor.weight_store import packed_layout, unique_parameters

logger = logging.getLogger(__name__)

# Message tags of prefetch chunks (the pause's KV executor numbers its rounds from 0, pre-copy from 1 << 20).
_PREFETCH_TAG = 1 << 21
# transform id -> this device's prefetch (finished or not), read by execute_transform at the pause.
_PREFETCHED: Dict[str, "WeightPrefetch"] = {}


class WeightPrefetch:
    """One device's share of a split's weight prefetch (leader and followers alike): the split's weight plan,
    its chunks, and the staging region of this device's arena (`store`) the rows land in."""

    def __init__(self, cmd: TransformCmd, me: int, old_model: torch.nn.Module, new_model: torch.nn.Module,
                 weight_plan, store, device_group, chunk_bytes: int):
        self.cmd, self.me = cmd, me
        self.old_model, self.new_model, self.store = old_model, new_model, store
        self.old_params = dict(unique_parameters(old_model))  # the rows are sent from these, chunk after chunk
        self.new_weights_end = packed_layout(new_model)[1]
        self.weight_plan = weight_plan
        self.plan: WeightPrefetchPlan = weight_prefetch_plan(weight_plan, chunk_bytes)
        self.chunks: List[List[StagedRows]] = self.plan.chunks  # what is fetched while serving (see limit)
        self.pause_pieces: List[StagedRows] = []  # rows left to the pause (no room in the staging region)
        self.device_group = device_group
        self.staging_start = -1  # byte offset of the staging region in the arena (set by start)
        self.reserved: list = []  # leader: the pool pages under the staging region, taken from the allocator
        self.allocator = None
        self.next_chunk = 0
        self.bytes_received = 0
        self.failed = ""
        self.deadline = float("inf")  # leader: time.monotonic() past which the pause starts without the rest
        self.t_start = self.t_end = time.time()

    @classmethod
    def for_split(cls, cmd: TransformCmd, me: int, runner, chunk_bytes: int) -> "WeightPrefetch":
        """The prefetch of `cmd` on the device `runner` drives: the new model built on meta now (the pause
        would build it first), the split's weight plan, the merged instance's device group."""
        cfg = runner.model_config
        src = [Instance.of(d) for d in cmd.src_instances]
        dst = [Instance.of(d) for d in cmd.dst_instances]
        new_inst = next(i for i in dst if me in i.devices)
        new_model = regroup.build_model_on_meta(type(runner.model), regroup.new_model_config(cfg, new_inst.tp),
                                                get_tp_group(list(new_inst.devices)))
        specs = regroup.param_specs(runner.model, new_model, cfg.tp_size)
        plan = weight_regroup_plan(specs, cfg.weight_granularity, src, dst)
        return cls(cmd, me, runner.model, new_model, plan, runner.weight_store,
                   get_tp_group(cmd.devices).device_group, chunk_bytes)

    # -- where the rows go ---------------------------------------------------------------------------------
    def staging_region(self, allocator, page_bytes: int, keep_free_bytes: int) -> Optional[Tuple[int, int]]:
        """Leader: (first page, bytes) of the staging region, the top pages of the pool that are free now, above
        the parts' weights plus `keep_free_bytes` (room the parts' KV will need below it), at most what there is
        to fetch. None when that leaves no room for one piece (no prefetch)."""
        need = self.plan.max_staging_bytes
        smallest = min((p.staging_offset + p.nbytes for c in self.plan.chunks for p in c), default=0)
        runs = allocator.free_runs()
        total = allocator.num_total
        if need == 0 or not runs or runs[-1][1] != total:
            return None
        lowest = max(runs[-1][0], -(-(self.new_weights_end + keep_free_bytes) // page_bytes),
                     total - -(-need // page_bytes))
        capacity = min(need, (total - lowest) * page_bytes)
        if capacity < smallest:
            return None
        return lowest, capacity

    def limit(self, capacity: int) -> None:
        """Fetch only the pieces inside the first `capacity` bytes of every device's staging region; the pause
        receives the others (each device's pieces are laid out in order, so that is a suffix of each)."""
        fits = lambda p: p.staging_offset + p.nbytes <= capacity  # noqa: E731
        self.chunks = [kept for c in self.plan.chunks if (kept := [p for p in c if fits(p)])]
        self.pause_pieces = [p for c in self.plan.chunks for p in c if not fits(p)]

    def start(self, staging_start: int, capacity: int, allocator=None, first_page: int = 0) -> None:
        """Every device: remember the region and what fits in it. The leader also takes its pages."""
        self.staging_start = staging_start
        self.limit(capacity)
        if allocator is not None:
            self.allocator = allocator
            self.reserved = list(range(first_page, allocator.num_total))
            allocator.take(self.reserved)
        self.t_start = time.time()
        _PREFETCHED[self.cmd.transform_id] = self

    # -- between iterations ----------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return not self.failed and self.next_chunk == len(self.chunks)

    def step(self, chunk: int) -> None:
        """Every device, at the same point: move chunk `chunk` (sends from the current shard, receives into
        staging) and wait for it. Bounded: a chunk receives at most the chunk size per device."""
        if self.failed or chunk != self.next_chunk:
            self.failed = self.failed or f"prefetch chunk {chunk} out of order (expected {self.next_chunk})"
            return
        old = self.old_params
        arena = self.store.arena
        ops = []
        for i, piece in enumerate(self.chunks[chunk]):
            p = old[piece.param]
            if piece.src_device == self.me:
                ops.append((dist.isend, p.data[piece.src_local_start:piece.src_local_start + piece.rows],
                            piece.dst_device, _PREFETCH_TAG + i))
            if piece.dst_device == self.me:
                at = self.staging_start + piece.staging_offset
                into = arena[at:at + piece.nbytes].view(p.dtype).view(piece.rows, *p.shape[1:])
                ops.append((dist.irecv, into, piece.src_device, _PREFETCH_TAG + i))
                self.bytes_received += piece.nbytes
        try:
            for w in regroup._post(ops, self.device_group):
                w.wait()
        except RuntimeError as e:  # a peer died: the pause's collectives then fail the split as without it
            self.failed = f"prefetch failed: {e}"
            logger.warning("split of devices %s: %s", self.cmd.devices, self.failed)
        self.next_chunk += 1
        self.t_end = time.time()

    # -- the pause -------------------------------------------------------------------------------------------
    def summary(self) -> dict:
        return {"complete": self.complete, "staging_start": self.staging_start, "received": self.bytes_received,
                "chunks": self.next_chunk, "t_start": self.t_start, "t_end": self.t_end}

    def copy_into_place(self, new_params: Dict[str, torch.nn.Parameter]) -> int:
        """After the kept rows moved and the new model was bound: copy this device's staged rows into their
        rows of the new parameters (the staging region lies above the new weights). Returns bytes copied."""
        arena = self.store.arena
        copied = 0
        for chunk in self.chunks:
            for piece in chunk:
                if piece.dst_device != self.me:
                    continue
                target = new_params[piece.param]
                at = self.staging_start + piece.staging_offset
                staged = arena[at:at + piece.nbytes].view(target.dtype).view(piece.rows, *target.shape[1:])
                target.data[piece.dst_local_start:piece.dst_local_start + piece.rows].copy_(staged)
                copied += piece.nbytes
        return copied

    def release(self) -> None:
        """Leader, when the split is refused: the staging pages go back to the merged pool."""
        if self.allocator is not None and self.reserved:
            self.allocator.free(self.reserved)
        self.reserved = []
        _PREFETCHED.pop(self.cmd.transform_id, None)


def prefetch_applies(cmd: TransformCmd, chunk_bytes: int) -> bool:
    """Splits of an instance of TP > 1 whose parts receive rows (any split: the parts' shards grow)."""
    return chunk_bytes > 0 and cmd.kind == "split" and len(cmd.src_instances) == 1 \
        and len(cmd.src_instances[0]) > 1


def take_prefetched(transform_id: str) -> Optional[WeightPrefetch]:
    return _PREFETCHED.pop(transform_id, None)
