"""KV pre-copy ahead of a split: while the merged instance keeps serving, the KV pages that no longer change are
copied to the pages they will be on their part after the split; the pause then moves only the pages written since.

    leader (Scheduler.begin_transform: a split with --gyges-precopy-chunk-bytes > 0, after the weight prefetch
    has taken its staging region)
        choose    split_group_targets: the part each page group (running requests, cached paths, session pins)
                  goes to, by the rule the pause uses; the full pages of each group (cached paths, full pages of
                  running requests) are the candidates, running groups first
        reserve   gyges.plans.split_precopy_slots: free aligned blocks of merged pages (at most
                  PRECOPY_FREE_SHARE of the free pages, above every part's weights, below the staging region)
                  are taken from the allocator; a block is, on each part's devices, whole pages of that part's
                  layout, and each becomes the destination of one candidate; every page the allocator hands out
                  from now on is watched (AllocationWatch)
        start     broadcast SplitPrecopyStart (the page map) -> every device builds the same KV plan
                  (gyges.plans.kv_regroup_plan from the merged layout to the parts'; destinations are free, so
                  nothing is staged) and cuts it into chunks of chunk_bytes per device (regroup.executor_rounds)
        step      once per iteration: broadcast SplitPrecopyStep -> every device moves the chunk (P2P on the
                  merged instance's device group, straight from and into the pool) and waits for it
    pause (gyges_transform.execute_transform)
        a pre-copied page keeps its copy iff every device moved every chunk, the page is still used and the
        leader did not hand it out again since the start; the split's groups go to the parts their copies are on
        (when they fit) and the plan moves only the other pages; the reserved pages that hold no kept copy are
        free pages of the new pools. A refused split returns the reserved pages to the merged pool.

Memory: the destinations are free pages of the merged pool taken for the pre-copy's duration (no staging: a chunk
is sent from and received into the pool); the merged instance serves with the rest of its free pages.
"""

from __future__ import annotations

import logging
import time
from typing import Dict, List, Optional, Tuple

from gyges.plans import KVLayout, kv_regroup_plan, split_precopy_slots
from gyges.topology import Instance
from sglang.srt.distributed.parallel_state import get_tp_group
from sglang.srt.managers.io_struct import SplitPrecopyStart, TransformCmd
from sglang.srt.managers.schedule_batch import InstanceState
from sglang.srt.mem_cache.page_allocator import AllocationWatch, runs_count
from sglang.srt.model_executor import regroup
from sglang.srt.model_executor.weight_store import packed_layout

logger = logging.getLogger(__name__)

# Message tags of split pre-copy chunks (the pause's executor numbers its rounds from 0, the merge pre-copy from
# 1 << 20, the weight prefetch from 1 << 21).
_SPLIT_PRECOPY_TAG = 1 << 22


def pool_layout(runner) -> KVLayout:
    return regroup.pool_kv_layout(runner.model_config, runner.kv_pool)


def weight_pages(runner, part: Instance, weights_end: Optional[int] = None) -> int:
    """Pages (of `part`'s layout) that `part`'s weights occupy at the start of every device's arena after a split:
    weights_end (bytes) when known, else from the part's model built on meta, packed as the pause packs it."""
    if weights_end is None:
        cfg = runner.model_config
        model = regroup.build_model_on_meta(type(runner.model), regroup.new_model_config(cfg, part.tp),
                                            get_tp_group(list(part.devices)))
        weights_end = packed_layout(model)[1]
    return -(-weights_end // pool_layout(runner).page_bytes(part.tp))


def split_precopy_applies(cmd: TransformCmd, chunk_bytes: int) -> bool:
    return chunk_bytes > 0 and cmd.kind == "split" and len(cmd.src_instances) == 1 \
        and len(cmd.src_instances[0]) > 1


def choose_split_precopy(cmd: TransformCmd, runner, allocator, state: InstanceState, buffer_bytes: int,
                         free_share: float, own_weights_end: Optional[int] = None
                         ) -> Tuple[List[int], Dict[int, Tuple[int, int]]]:
    """Leader: (merged pages to reserve, {merged page: (part index, page)}) for the pre-copy of `cmd`'s split, from
    the instance's pages now (`state`, read only). buffer_bytes: the parts' KV region (the weight prefetch's staging
    region starts there); own_weights_end: the leader's part's weight bytes when already known (the prefetch)."""
    from sglang.srt.managers.gyges_transform import split_group_targets

    layout = pool_layout(runner)
    merged = Instance.of(cmd.src_instances[0])
    parts = sorted((Instance.of(d) for d in cmd.dst_instances), key=lambda i: i.base)
    me = min(merged.devices)
    own = next(p for p in parts if me in p.devices)
    by_tp: Dict[int, int] = {}
    if own_weights_end is not None:
        by_tp[own.tp] = weight_pages(runner, own, own_weights_end)
    for p in parts:
        if p.tp not in by_tp:
            by_tp[p.tp] = weight_pages(runner, p)
    first_page = [by_tp[p.tp] for p in parts]
    try:
        groups, targets = split_group_targets(state, merged, parts, layout, buffer_bytes, by_tp[own.tp])
    except ValueError:  # the running requests fit no part now: the pause refuses the split, nothing to copy
        return [], {}
    ps = layout.page_size
    full = {p for _, pages in state.tree_paths for p in pages}
    for r in state.running:
        full.update(r.page_table[:r.kv_len // ps])
    candidates = [(q, t) for g, t in zip(groups, targets) if t is not None for q in g.pages if q in full]
    free = allocator.free_runs()
    capacity = [layout.pages_per_device(buffer_bytes, p.tp) for p in parts]
    return split_precopy_slots(merged, parts, free, candidates, first_page, capacity,
                               int(runs_count(free) * free_share))


class SplitKVPrecopy:
    """One device's share of a split's KV pre-copy (leader and followers alike): the page map, the KV plan's
    chunks, and (leader) the reserved pages and the watch on its allocator."""

    def __init__(self, cmd: TransformCmd, me: int, runner, page_map: Dict[int, Tuple[int, int]], chunk_bytes: int):
        self.cmd, self.me, self.runner = cmd, me, runner
        self.page_map = dict(page_map)  # merged page -> (part index, page there) holding its copy
        self.flat = regroup.kv_flat_bytes(runner.kv_pool)
        self.layout = pool_layout(runner)
        self.merged = Instance.of(cmd.src_instances[0])
        self.parts = tuple(sorted((Instance.of(d) for d in cmd.dst_instances), key=lambda i: i.base))
        # Chunks of pages (the same on every device): a device holds page_bytes(merged tp) of each page and sends
        # plus receives about that much for it. Each chunk's moves are planned when it runs (no hazards: every
        # destination is free, so the pages' plans are independent), which keeps the start off the iteration.
        per_chunk = max(1, chunk_bytes // self.layout.page_bytes(self.merged.tp))
        pages = sorted(self.page_map)
        self.chunks: List[List[int]] = [pages[i:i + per_chunk] for i in range(0, len(pages), per_chunk)]
        self.bytes_planned = len(pages) * self.layout.page_bytes(1)
        self.device_group = get_tp_group(cmd.devices).device_group
        self.slabs = regroup.StagingSlabs(self.flat.device, 1)
        self.stats = regroup.RegroupStats()
        self.new_model = None  # the pause builds the part's model (a weight prefetch, when on, built it already)
        self.next_chunk = 0
        self.failed = ""
        self.step_seconds = 0.0  # time the steps took, i.e. what the pre-copy added to the iterations
        self.allocator = None
        self.reserved: List[int] = []
        self.watch: Optional[AllocationWatch] = None
        self.deadline = float("inf")
        self.t_start = self.t_end = time.time()
        from sglang.srt.managers.gyges_transform import _PRECOPIED

        _PRECOPIED[cmd.transform_id] = self

    @classmethod
    def start_on_leader(cls, cmd: TransformCmd, me: int, runner, allocator, state: InstanceState, buffer_bytes: int,
                        chunk_bytes: int, timeout_s: float, broadcast,
                        new_weights_end: Optional[int] = None) -> Optional["SplitKVPrecopy"]:
        """Reserve, broadcast the page map to the followers, and start; None when no page can be copied ahead."""
        from sglang.srt.managers.gyges_transform import PRECOPY_FREE_SHARE

        reserved, page_map = choose_split_precopy(cmd, runner, allocator, state, buffer_bytes, PRECOPY_FREE_SHARE,
                                                  new_weights_end)
        if not page_map:
            return None
        allocator.take(reserved)
        if broadcast is not None:
            broadcast(SplitPrecopyStart(cmd, page_map, chunk_bytes))
        pre = cls(cmd, me, runner, page_map, chunk_bytes)
        pre.allocator, pre.reserved = allocator, reserved
        pre.watch = AllocationWatch(allocator)
        pre.deadline = time.monotonic() + timeout_s
        logger.info("split of devices %s: pre-copying %d KV pages (%d bytes) in %d chunks while serving",
                    cmd.devices, len(page_map), pre.bytes_planned, len(pre.chunks))
        return pre

    # -- between iterations ----------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return not self.failed and self.next_chunk == len(self.chunks)

    @property
    def done(self) -> bool:
        """Leader: the pause may start (every chunk moved, one failed, or past --gyges-transform-timeout)."""
        if not self.complete and not self.failed and time.monotonic() > self.deadline:
            self.failed = "pre-copy past --gyges-transform-timeout"
            logger.warning("split of devices %s: %s", self.cmd.devices, self.failed)
        return self.complete or bool(self.failed)

    def step(self, chunk: int) -> None:
        """Every device, at the same point: move chunk `chunk` and wait for it. Bounded: a chunk sends plus
        receives at most the chunk size per device (one move more when a single move is larger)."""
        if self.failed or chunk != self.next_chunk:
            self.failed = self.failed or f"pre-copy chunk {chunk} out of order (expected {self.next_chunk})"
            return
        t0 = time.perf_counter()
        plan = kv_regroup_plan(self.layout, self.flat.numel(), (self.merged,), self.parts,
                               {(0, q): self.page_map[q] for q in self.chunks[chunk]})
        try:
            rnd = regroup._start_round(plan.moves, self.me, self.flat, self.device_group,
                                       _SPLIT_PRECOPY_TAG + chunk, self.stats, self.slabs)
            regroup._finish_round(rnd, self.flat)
        except RuntimeError as e:  # a peer died: the pause's collectives then fail the split as without it
            self.failed = f"pre-copy failed: {e}"
            logger.warning("split of devices %s: %s", self.cmd.devices, self.failed)
        self.next_chunk += 1
        self.step_seconds += time.perf_counter() - t0
        self.t_end = time.time()

    # -- the pause -------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """The pause starts: the leader stops watching its allocator (the steps left nothing on the wire)."""
        if self.watch is not None:
            self.watch.stop()

    def summary(self) -> dict:
        """What the pause needs from this device: the page map and the pages handed out since (the leader's)."""
        leader = self.watch is not None
        return {"complete": self.complete, "leader": leader, "page_map": self.page_map if leader else {},
                "dirty": sorted(self.watch.pages) if leader else [], "t_start": self.t_start, "t_end": self.t_end,
                "sent": self.stats.kv_bytes_sent, "local": self.stats.kv_bytes_local,
                "iterations": self.next_chunk, "reserved": len(self.reserved), "step_s": self.step_seconds,
                "staging": self.slabs.nbytes}

    def release(self) -> None:
        """The split is refused: the reserved pages go back to the merged pool (leader), the watch stops."""
        from sglang.srt.managers.gyges_transform import _PRECOPIED

        self.stop()
        if self.allocator is not None and self.reserved:
            self.allocator.free(self.reserved)
        self.reserved = []
        _PRECOPIED.pop(self.cmd.transform_id, None)


def valid_split_precopied(summaries: List[Optional[dict]], states: Dict[int, InstanceState],
                          merged: Instance) -> Dict[int, Tuple[int, int]]:
    """merged page -> (part, page) of the pre-copied pages the pause may keep: every device moved every chunk, the
    page is still used and the leader did not hand it out again since the pre-copy started."""
    if not summaries or any(x is None or not x["complete"] for x in summaries):
        return {}
    lead = next((x for x in summaries if x["leader"]), None)
    if lead is None:
        return {}
    used = states[merged.base].used_pages()
    dirty = set(lead["dirty"])
    return {q: tuple(at) for q, at in lead["page_map"].items() if q in used and q not in dirty}
