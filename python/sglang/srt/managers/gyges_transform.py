"""A Gyges transformation as the workers run it, between two forward iterations.

    controller --TransformCmd--> leaders of the source instances --broadcast--> their followers
    every device of the transformation (the aligned group D covering it), together:
      1. gather     each source leader's InstanceState (requests, page tables, radix paths, open sessions'
                    pinned paths)                                                             [cpu group]
      2. plan       gyges.plans: page renumbering / split assignment, KV moves, weight rows   [pure, same
                    on every device; a plan that cannot work (a split that does not fit) is refused here,
                    before anything moved, and the source instances continue unchanged]
      3. KV         execute the KV plan over the device group (model_executor/regroup.py)
      4. weights    keep the slice in place, receive the missing rows, rebuild the model on the new group
                    (a merge runs 4 before 3: its weights shrink, and the KV of a part of higher TP lands
                    where a part of lower TP still had weights; a split runs 3 first: KV leaves the pages
                    its weights grow into)
      4b. host KV   the host tier's carry planned (mem_cache/host_carry.py); after the pause every rank
                    re-lays its host store on a thread over the side CPU group while the new instance serves,
                    and the new leader's tier adopts the renumbered index when its thread is done
      5. resume     new leaders adopt their re-based requests and cache; followers follow
      6. report     D's first device sends TransformDone with the measured breakdown to the controller

Pre-copy (--gyges-precopy-chunk-bytes > 0): before step 1 the source instances keep serving while the pages that
no longer change are copied to where they will be, a bounded chunk per iteration (Scheduler.begin_transform /
advance_ahead); step 3 then moves only the pages written since. Merges of TP1 instances: KVPrecopy, into free
pages of the merged layout. Splits: split_precopy.SplitKVPrecopy, into free aligned blocks of the merged pool that
are whole pages of the parts' layouts, and step 2 sends each group to the part its pages were copied to.
Weight prefetch (splits, --gyges-prefetch-chunk-bytes > 0, weight_prefetch.py): before step 1 the merged
instance keeps serving while its devices fetch the rows the parts lack into the top pages of its pool, a chunk
per iteration; step 2 places the parts' KV below those pages and step 4 copies the rows into place on the device.

Nothing is recomputed: requests keep their KV, output, sampling seed and grammar state. Open sessions keep
their pinned KV: a merge takes every source's pins; a split moves each session's pages (one page group,
placed right after the running requests' groups; sessions with a hinted next turn first, soonest first, each
counted as a request expected on its part) together to one part, which re-pins them. Hints, sessions kept on
host and the host tier's pages travel too (mem_cache/host_carry.py).
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from gyges.plans import (
    KVLayout,
    KVPlan,
    kv_merge_plan,
    kv_regroup_plan,
    kv_split_plan,
    merge_page_mapping,
    split_page_assignment,
    split_page_mapping,
    weight_regroup_plan,
)
from gyges.topology import Instance
from sglang.srt.distributed.parallel_state import get_tp_group
from sglang.srt.managers.io_struct import TransformCmd
from sglang.srt.managers.schedule_batch import InstanceState, Req
from sglang.srt.mem_cache.page_allocator import AllocationWatch, first_ids, intersect_runs, runs_count
from sglang.srt.model_executor import regroup
from sglang.srt.model_executor.weight_store import packed_layout
from sglang.srt.managers.weight_prefetch import take_prefetched
from sglang.srt.managers.split_precopy import valid_split_precopied
from sglang.srt.mem_cache.host_carry import (HostCarryPlan, first_page_keys, path_first_pages, place_by_first_page,
                                             plan_host_carry)
from sglang.srt.mem_cache.host_tier import HostCarryInFlight, HostPageStore, rank_store, settle_carry

logger = logging.getLogger(__name__)

# Extra memory a transformation's KV moves may take on one device (staging), at most.
MAX_STAGING_BYTES = 64 << 20
# Staged KV bytes per round (per device): the executor keeps regroup.ROUNDS_IN_FLIGHT rounds in flight, and a
# round's short runs also need a packed send buffer about as large as its staged receives.
KV_ROUND_BYTES = MAX_STAGING_BYTES // (2 * regroup.ROUNDS_IN_FLIGHT)


@dataclass
class TransformPlan:
    kv_plan: KVPlan
    states: Dict[int, InstanceState]  # new instance base device -> its re-based state
    running_requests: int
    dropped_groups: int = 0  # split: cached page groups no part had room for (their tokens are recomputed later)
    precopied_kept: int = 0  # pages whose KV the pre-copy already put where the plan wants it (not moved now)


@dataclass
class TransformOutcome:
    ok: bool
    message: str = ""
    ranks: List[int] = field(default_factory=list)  # this device's instance after the transformation
    placements: Dict[int, List[str]] = field(default_factory=dict)  # new instance base -> request ids
    state: Optional[InstanceState] = None  # for the new leaders
    breakdown: Dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------
# planning (pure: the same on every device)
# ------------------------------------------------------------------------------------------------------
def _rebase(req: Req, mapping) -> Req:
    req.page_table = [mapping(p) for p in req.page_table]
    return req


def _precopied_first(natural, ahead: Dict[int, int]):
    return lambda p: ahead[p] if p in ahead else natural(p)


def plan_transform(cmd: TransformCmd, states: Dict[int, InstanceState], layout: KVLayout,
                   buffer_bytes: int, reserved_after: int = 0,
                   precopied: Optional[Dict[Tuple[int, int], int]] = None,
                   precopied_pages: Optional[Dict[int, Tuple[int, int]]] = None) -> TransformPlan:
    """reserved_after: pages each resulting instance's weights occupy (KV must not be placed there).
    precopied (merges): (source index, page) -> merged page that already holds the page's KV on every device.
    precopied_pages (splits): merged page -> (part index, page) that already holds its KV on the part's devices."""
    src = [Instance.of(d) for d in cmd.src_instances]
    dst = [Instance.of(d) for d in cmd.dst_instances]
    running = sum(len(s.running) for s in states.values())
    if cmd.kind == "merge":
        merged = dst[0]
        ahead = precopied or {}
        # Pages already copied while serving (valid_precopied) stay out of the pause's plan.
        used = [sorted(p for p in states[part.base].used_pages() if (i, p) not in ahead) for i, part in enumerate(src)]
        kv_plan = kv_merge_plan(layout, buffer_bytes, src, used, KV_ROUND_BYTES)
        out = InstanceState(devices=list(merged.devices), running=[], waiting=[], tree_paths=[])
        for i, part in enumerate(src):
            st = states[part.base]
            f = _precopied_first(merge_page_mapping(part, merged), {p: q for (s, p), q in ahead.items() if s == i})
            out.running.extend(_rebase(r, f) for r in st.running)
            out.waiting.extend(st.waiting)
            out.tree_paths.extend((toks, [f(p) for p in pages]) for toks, pages in st.tree_paths)
            out.session_pins.extend((sid, toks, [f(p) for p in pages], t) for sid, toks, pages, t in st.session_pins)
            out.new_token_ratio = max(out.new_token_ratio, st.new_token_ratio)
        return TransformPlan(kv_plan, {merged.base: out}, running)
    if cmd.kind == "split":
        merged = src[0]
        st = states[merged.base]
        ahead = precopied_pages or {}
        groups, targets = split_group_targets(st, merged, dst, layout, buffer_bytes, reserved_after, ahead)
        kept = [i for i, t in enumerate(targets) if t is not None]
        assignment = split_page_assignment(layout, buffer_bytes, merged, dst,
                                           [(targets[i], groups[i].pages) for i in kept],
                                           first_page=[reserved_after] * len(dst), fixed=ahead)
        # Pages whose KV was copied to their destination while serving (SplitKVPrecopy) stay out of the moves.
        in_place = {q for q, at in assignment.items() if ahead.get(q) == at}
        kv_plan = kv_split_plan(layout, buffer_bytes, merged, dst,
                                assignment={q: at for q, at in assignment.items() if q not in in_place},
                                max_staging_bytes=KV_ROUND_BYTES)
        outs = {p.base: InstanceState(devices=list(p.devices), running=[], waiting=[], tree_paths=[],
                                      new_token_ratio=st.new_token_ratio) for p in dst}

        def f(page: int) -> int:
            return assignment[page][1]

        for i in kept:
            g = groups[i]
            out = outs[dst[targets[i]].base]
            out.running.extend(_rebase(r, f) for r in g.reqs)
            out.tree_paths.extend((toks, [f(p) for p in pages]) for toks, pages in g.paths)
        session_part = {}
        for sid, toks, pages, t in st.session_pins:
            if pages and all(p in assignment for p in pages):  # else its group was dropped: recomputed later
                part = dst[assignment[pages[0]][0]]
                session_part[sid] = part
                outs[part.base].session_pins.append((sid, toks, [f(p) for p in pages], t))
        for j, req in enumerate(sorted(st.waiting, key=lambda r: r.arrival_time)):
            # Waiting requests hold no KV: spread them, the least loaded part first (a session's next turn
            # goes where its session's KV went).
            part = session_part.get(req.session_id) or min(
                dst, key=lambda p: (len(outs[p.base].running) + len(outs[p.base].waiting), p.base))
            outs[part.base].waiting.append(req)
        return TransformPlan(kv_plan, outs, running, dropped_groups=len(groups) - len(kept),
                             precopied_kept=len(in_place))
    raise ValueError(f"unknown transformation kind {cmd.kind!r}")


def split_group_targets(st: InstanceState, merged: Instance, parts: List[Instance], layout: KVLayout,
                        buffer_bytes: int, reserved_after: int, ahead: Optional[Dict[int, Tuple[int, int]]] = None
                        ) -> Tuple[List["_PageGroup"], List[Optional[int]]]:
    """A split's page groups and the part each goes to (None: a cache-only group dropped for lack of room).
    ahead: merged page -> (part, page) of pages already copied there (a group goes where its pages were copied
    when it fits)."""
    groups = _page_groups(st)
    pinned = {p for _, _, pages, _ in st.session_pins for p in pages}
    # A pinned session's hinted next turn (req_kv.HintedPath): its group is placed by it (_assign_groups).
    turn_at = dict(st.prefetched_turns)
    turn_at.update({h.session_id: h.next_turn_at for _, h in st.hinted if h.session_id is not None})
    page_turn = {p: turn_at[sid] for sid, _, pages, _ in st.session_pins if sid in turn_at for p in pages}
    for g in groups:
        g.pinned = any(p in pinned for p in g.pages)
        turns = [page_turn[p] for p in g.pages if p in page_turn]
        g.next_turn_at = min(turns) if turns else None
    return groups, _assign_groups(groups, merged, parts, layout, buffer_bytes, reserved_after, ahead)


@dataclass
class _PageGroup:
    """Requests and cached paths that share pages: they must end on the same instance after a split."""

    pages: List[int] = field(default_factory=list)
    reqs: List[Req] = field(default_factory=list)
    paths: List[Tuple[List[int], List[int]]] = field(default_factory=list)
    pinned: bool = False  # holds an open session's pinned pages (kept before plain cache)
    next_turn_at: Optional[float] = None  # earliest hinted next turn of a session pinned in it (monotonic s)


def _page_groups(st: InstanceState) -> List[_PageGroup]:
    """The requests and cached paths that share pages, grouped (in order of first appearance). Radix paths run
    from the root and a request's cached pages are a prefix of its table, so pages are shared through a common
    first page: grouping by first page is tried first (set operations, no per-page Python loop) and kept when the
    groups come out disjoint; otherwise a union-find over every page groups them."""
    items: List[Tuple[str, object, List[int]]] = [("req", r, r.page_table) for r in st.running]
    items += [("path", p, p[1]) for p in st.tree_paths]
    groups = _collect_groups(items, lambda pages: pages[0])
    if sum(len(g.pages) for g in groups) == len(set().union(*(g.pages for g in groups))):
        return groups
    parent: Dict[int, int] = {}

    def find(x: int) -> int:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for _, _, pages in items:
        for a, b in zip(pages, pages[1:]):
            parent[find(a)] = find(b)
        for a in pages:
            find(a)
    return _collect_groups(items, lambda pages: find(pages[0]))


def _collect_groups(items: List[Tuple[str, object, List[int]]], key_of) -> List[_PageGroup]:
    groups: Dict[int, _PageGroup] = {}
    order: List[int] = []
    for kind, obj, pages in items:
        if not pages:
            key = -1 - len(order)  # a request without pages yet (admitted, nothing computed): its own group
        else:
            key = key_of(pages)
        if key not in groups:
            groups[key] = _PageGroup()
            order.append(key)
        g = groups[key]
        (g.reqs if kind == "req" else g.paths).append(obj)
    for key in order:
        g = groups[key]
        pages = set()
        for r in g.reqs:
            pages.update(r.page_table)
        for _, ps in g.paths:
            pages.update(ps)
        g.pages = sorted(pages)
    return [groups[k] for k in order]


def _assign_groups(groups: List[_PageGroup], merged: Instance, parts: List[Instance], layout: KVLayout,
                   buffer_bytes: int, reserved_after: int,
                   ahead: Optional[Dict[int, Tuple[int, int]]] = None) -> List[Optional[int]]:
    """Target part of each group, or None for cache-only groups that are dropped (evicted) for lack of room.

    Groups with running requests are placed first, biggest first, on the part their pages were copied to ahead
    (`ahead`: the pre-copy chose it from the same rule a moment earlier) if it has room, else on the part with
    the fewest requests expected (then pages) that has room, preferring where their pages already lie; open
    sessions' pinned paths next: those with a hinted next turn first, soonest first, each counted as a request expected on its
    part (the turns that come first are spread over the parts, and are the last to lose their room), then
    the others; then other cached paths, while room is left. A running group that fits no part refuses the
    split.
    """
    room = [layout.pages_per_device(buffer_bytes, p.tp) - reserved_after for p in parts]
    load = [[0, 0] for _ in parts]  # per part: [requests running or expected (hinted turns), pages]
    targets: List[Optional[int]] = [None] * len(groups)
    order = sorted(range(len(groups)), key=lambda i: (not groups[i].reqs, not groups[i].pinned,
                                                      groups[i].next_turn_at is None,
                                                      groups[i].next_turn_at or 0.0, -len(groups[i].pages)))
    natural_part = split_page_mapping(merged, parts)
    ahead = ahead or {}
    for i in order:
        g = groups[i]
        natural = [0] * len(parts)
        copied = [0] * len(parts)
        for p in g.pages:
            natural[natural_part(p)[0]] += 1
            if p in ahead:
                copied[ahead[p][0]] += 1
        fits = [j for j in range(len(parts)) if room[j] - load[j][1] >= len(g.pages)]
        if not fits:
            if g.reqs:
                raise ValueError(f"running requests need {len(g.pages)} KV pages together, more than any "
                                 f"resulting instance has free ({max(r - l[1] for r, l in zip(room, load))})")
            continue  # only cache: evicted by the split
        best = min(fits, key=lambda j: (-copied[j], load[j][0], load[j][1], -natural[j], j))
        targets[i] = best
        load[best][0] += len(g.reqs) + (g.next_turn_at is not None)
        load[best][1] += len(g.pages)
    return targets


# ------------------------------------------------------------------------------------------------------
# pre-copy (merges of TP1 instances, while they serve)
# ------------------------------------------------------------------------------------------------------
# Pre-copy takes at most this share of the pages free on every part as destinations (the rest stays for serving).
PRECOPY_FREE_SHARE = 0.5
# Message tags of pre-copy chunks (the pause's executor uses its round numbers from 0).
_PRECOPY_TAG = 1 << 20
# transform id -> this device's finished (or abandoned) pre-copy, read by execute_transform at the pause.
_PRECOPIED: Dict[str, "KVPrecopy"] = {}
# A merge pre-copy plans its moves this many chunks' worth of pages at a time (KVPrecopy.plan_more).
PRECOPY_PLAN_CHUNKS = 4


def precopy_applies(cmd: TransformCmd, cfg, chunk_bytes: int) -> bool:
    """Merges of TP1 instances only: every device leads its own instance, and the merged group's device group
    is idle while they serve, so the chunks can cross it between iterations."""
    if chunk_bytes <= 0 or cmd.kind != "merge" or any(len(i) != 1 for i in cmd.src_instances):
        return False
    try:
        check_model_can_take(cmd, cfg)
    except ValueError:
        return False  # refused at the pause as without pre-copy
    return True


class KVPrecopy:
    """One device's pre-copy of a merge of TP1 instances, driven by its scheduler between iterations.

        start     all devices exchange their parts' full pages (cached paths, full pages of running requests) and
                  free pages [cpu group]; every device computes the same choice: old page ids free on every part
                  (at most PRECOPY_FREE_SHARE of them) are taken from each part's allocator, and each of their
                  merged pages (old page j -> merged pages k*j .. k*j+k-1) becomes the destination of one full
                  page. Nothing else: start is one iteration's stall, so the planning waits for advance
        advance   (every iteration) the first builds the merged model on meta; then a posted chunk that completed
                  is written into place and the next one is posted (non-blocking isend/irecv on the merged
                  group's device group, sources read straight from the pool). Chunks are planned as they run:
                  gyges.plans.kv_regroup_plan for the next few chunks' worth of pages (no hazards: destinations
                  are free), cut into chunks of chunk_bytes per device (regroup.executor_rounds)
        pause     execute_transform keeps a pre-copied page's copy iff every chunk completed and the page is still
                  used and was not re-allocated since the start (`dirty`: the allocator's alloc is observed); the
                  pause's plan moves every other page; the reserved pages become ordinary pages of the merged pool
        release   (refused or abandoned) the reserved pages go back to the allocator, the observer is removed
    """

    def __init__(self, cmd: TransformCmd, me: int, runner, kv, chunk_bytes: int, timeout_s: float):
        self.cmd, self.me, self.runner, self.kv = cmd, me, runner, kv
        self.allocator = kv.allocator
        self.chunk_bytes = chunk_bytes
        self.deadline = time.monotonic() + timeout_s
        self.page_map: Dict[Tuple[int, int], int] = {}  # (part index, page) -> merged page holding a copy
        self.reserved: List[int] = []
        self.watch: Optional[AllocationWatch] = None  # this part's pages allocated since start (content may change)
        self.chunks: List = []
        self.next_chunk = 0
        self.posted = None
        self.complete = False
        self.failed = ""
        self.bytes_sent = 0
        self.t_start = time.time()
        self.t_end = self.t_start
        self.iterations = 0

    # -- start ---------------------------------------------------------------------------------------
    def start(self, state: InstanceState) -> None:
        group = get_tp_group(self.cmd.devices)
        self.flat = regroup.kv_flat_bytes(self.runner.kv_pool)
        self.device_group = group.device_group
        full = {p for _, pages in state.tree_paths for p in pages}
        ps = self.runner.kv_pool.page_size
        for r in state.running:
            full.update(r.page_table[:r.kv_len // ps])
        # Free pages travel as runs [lo, hi): a fresh pool is one run, not a list of every page id.
        mine = (sorted(full), self.allocator.free_runs())
        everyone = group.all_gather_object(mine)  # in device order = source instance order (TP1 parts)
        src = [Instance.of(d) for d in self.cmd.src_instances]
        merged = Instance.of(self.cmd.dst_instances[0])
        k = merged.tp
        common_free = everyone[0][1]
        for _, free in everyone[1:]:
            common_free = intersect_runs(common_free, free)
        candidates = [(i, p) for i, (pages, _) in enumerate(everyone) for p in pages]
        budget = int(runs_count(common_free) * PRECOPY_FREE_SHARE)
        self.reserved = first_ids(common_free, min(budget, -(-len(candidates) // k)))
        slots = [j * k + t for j in self.reserved for t in range(k)]
        self.page_map = dict(zip(candidates, slots))
        self.allocator.take(self.reserved)
        self.watch = AllocationWatch(self.allocator)
        # The moves are planned as the chunks run (plan_more), a few chunks' worth of pages at a time: planning
        # all of them here stalled this iteration (~15-25 ms for 2,000 pages of the tiny demo).
        self.layout = regroup.pool_kv_layout(self.runner.model_config, self.runner.kv_pool)
        self.src, self.merged = src, merged
        self.to_plan = sorted(self.page_map.items())  # (part index, page) -> merged page, in plan order
        self.planned = 0  # entries of to_plan whose moves are in self.chunks
        self.bytes_planned = 0
        self.slabs = regroup.StagingSlabs(self.flat.device, 1)
        self._waiter = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="precopy")
        self.landed: Optional[concurrent.futures.Future] = None
        self.stats = regroup.RegroupStats()
        self.new_model = None  # the merged model on meta, built by the first advance (else by the pause)
        self.group = group
        _PRECOPIED[self.cmd.transform_id] = self

    def plan_more(self) -> None:
        """Moves for the next pages of to_plan, about PRECOPY_PLAN_CHUNKS chunks' worth, appended to self.chunks.
        The same on every device: the batch size follows from bytes already planned, which every device shares.
        Batches are independent: every destination is a reserved free page no source reads."""
        if self.planned:
            per_page = max(1, self.bytes_planned // self.planned)
            n = max(1, -(-PRECOPY_PLAN_CHUNKS * self.chunk_bytes // per_page))
        else:
            n = 16
        batch = self.to_plan[self.planned:self.planned + n]
        plan = kv_regroup_plan(self.layout, self.flat.numel(), self.src, (self.merged,),
                               {key: (0, q) for key, q in batch})
        self.planned += len(batch)
        self.bytes_planned += plan.kv_bytes_moved
        self.chunks.extend(regroup.executor_rounds(plan, self.chunk_bytes))

    def stop(self) -> None:
        """The pause starts: no more pages are watched, and a chunk still on the wire lands first."""
        if self.watch is not None:
            self.watch.stop()
        if self.posted is not None:
            self.landed.result()
            regroup._finish_round(self.posted, self.flat, waited=True)
            self.posted = None

    # -- between iterations ----------------------------------------------------------------------------
    def advance(self) -> bool:
        """Progress without blocking; True when the pause may start (done, failed or past the deadline)."""
        self.iterations += 1
        try:
            if self.posted is not None:
                if not self.landed.done():
                    if time.monotonic() > self.deadline:
                        return self._give_up("pre-copy past --gyges-transform-timeout")
                    return False
                self.landed.result()  # raises what the transfer raised
                regroup._finish_round(self.posted, self.flat, waited=True)
                self.posted = None
            if self.new_model is None:  # one iteration of its own: ~2-4 ms on the tiny demo
                self.new_model = regroup.build_model_on_meta(
                    type(self.runner.model), regroup.new_model_config(self.runner.model_config, self.merged.tp),
                    self.group)
                return False
            while self.next_chunk == len(self.chunks) and self.planned < len(self.to_plan):
                self.plan_more()
            if self.next_chunk < len(self.chunks):
                self.posted = regroup._start_round(self.chunks[self.next_chunk], self.me, self.flat,
                                                   self.device_group, _PRECOPY_TAG + self.next_chunk, self.stats,
                                                   self.slabs)
                # Work.is_completed() of gloo's send/recv turns true only in wait(): a side thread waits.
                self.landed = self._waiter.submit(lambda works=self.posted.works: [w.wait() for w in works])
                self.next_chunk += 1
                return False
        except RuntimeError as e:  # a peer died: the pause's collectives fail the transformation as without it
            return self._give_up(f"pre-copy failed: {e}")
        self._waiter.shutdown(wait=False)
        self.complete = True
        self.t_end = time.time()
        return True

    def _give_up(self, why: str) -> bool:
        logger.warning("%s of devices %s: %s", self.cmd.kind, self.cmd.devices, why)
        self._waiter.shutdown(wait=False)
        self.failed = why
        self.t_end = time.time()
        return True

    def summary(self) -> dict:
        """What the pause needs from this device (plain data, gathered from every device)."""
        return {"complete": self.complete, "dirty": sorted(self.watch.pages), "page_map": self.page_map,
                "t_start": self.t_start, "t_end": self.t_end, "sent": self.stats.kv_bytes_sent,
                "local": self.stats.kv_bytes_local, "iterations": self.iterations,
                "reserved": len(self.reserved), "staging": self.slabs.nbytes}

    def release(self) -> None:
        """Nothing stays half-done: the reserved pages return to the allocator, the watch stops."""
        self.stop()
        if self.reserved:
            self.allocator.free(self.reserved)
            self.reserved = []
        _PRECOPIED.pop(self.cmd.transform_id, None)


def start_precopy(cmd: TransformCmd, me: int, runner, kv, state: InstanceState, chunk_bytes: int,
                  timeout_s: float) -> Optional[KVPrecopy]:
    """A started pre-copy for `cmd` when it applies (precopy_applies), else None (stop-and-copy)."""
    if not precopy_applies(cmd, runner.model_config, chunk_bytes):
        return None
    pre = KVPrecopy(cmd, me, runner, kv, chunk_bytes, timeout_s)
    pre.start(state)
    return pre


def _valid_precopied(summaries: List[Optional[dict]], states: Dict[int, InstanceState],
                     src: List[Instance]) -> Dict[Tuple[int, int], int]:
    """(part index, page) -> merged page of the pre-copied pages the pause keeps: every device's chunks completed,
    the page is still used by its part and its part did not re-allocate it."""
    if not summaries or any(x is None or not x["complete"] for x in summaries):
        return {}
    page_map = summaries[0]["page_map"]
    dirty = [set(x["dirty"]) for x in summaries]  # device order = part order for TP1 parts
    used = [states[p.base].used_pages() for p in src]
    return {(i, p): q for (i, p), q in page_map.items() if p in used[i] and p not in dirty[i]}


# ------------------------------------------------------------------------------------------------------
# execution (every device of the transformation)
# ------------------------------------------------------------------------------------------------------
def execute_transform(cmd: TransformCmd, me: int, runner, my_state: Optional[InstanceState]) -> TransformOutcome:
    """Run this device's part of `cmd`. Every device of the transformation calls it at the same point."""
    t_start = time.time()
    devices = cmd.devices
    group = get_tp_group(devices)
    cfg = runner.model_config
    pool = runner.kv_pool
    flat = regroup.kv_flat_bytes(pool)
    pre = _PRECOPIED.pop(cmd.transform_id, None)
    fetched = take_prefetched(cmd.transform_id)  # a split's weight prefetch (weight_prefetch.py)
    if pre is not None:
        pre.stop()  # given up with a chunk on the wire: it lands before anything reuses its pages
    t_gather0 = time.perf_counter()
    host_store = _host_store(runner)
    blobs = group.all_gather_object((my_state, pre.summary() if pre is not None else None,
                                     fetched.summary() if fetched is not None else None,
                                     host_store.flat.numel() if host_store is not None else 0))
    states: Dict[int, InstanceState] = {st.devices[0]: st for st, _, _, _ in blobs if st is not None}
    gather_s = time.perf_counter() - t_gather0
    summaries = [x for _, x, _, _ in blobs]
    fetch_summaries = [x for _, _, x, _ in blobs]
    host_buffer_bytes = min(x for _, _, _, x in blobs)
    # The staged rows are used only when every device fetched every chunk (all or nothing, decided alike).
    staged = fetched is not None and all(x is not None and x["complete"] for x in fetch_summaries)
    layout = regroup.pool_kv_layout(cfg, pool)
    src = [Instance.of(d) for d in cmd.src_instances]
    dst = [Instance.of(d) for d in cmd.dst_instances]
    t_plan0 = time.perf_counter()
    try:
        check_model_can_take(cmd, cfg)
        # The new model's weights decide which pages they reserve (same on every device).
        new_inst = next(i for i in dst if me in i.devices)
        new_cfg = regroup.new_model_config(cfg, new_inst.tp)
        new_group = get_tp_group(list(new_inst.devices))
        # Built while serving by a merge's pre-copy or a split's weight prefetch (a split's KV pre-copy builds none).
        new_model = fetched.new_model if fetched is not None else pre.new_model if pre is not None else None
        if new_model is None:
            new_model = regroup.build_model_on_meta(type(runner.model), new_cfg, new_group)
        _, new_weights_end = packed_layout(new_model)
        build_s = time.perf_counter() - t_plan0
        reserved_after = -(-new_weights_end // layout.page_bytes(new_inst.tp))
        kept_ahead = _valid_precopied(summaries, states, src) if cmd.kind == "merge" else {}
        split_ahead = valid_split_precopied(summaries, states, src[0]) if cmd.kind == "split" else {}
        plan = None
        if staged:
            # The parts' KV goes below the staging region, unless that would leave behind a page the full pool
            # keeps: then the staged rows are dropped and received as without prefetch.
            try:
                plan = plan_transform(cmd, states, layout, fetched.staging_start, reserved_after, kept_ahead,
                                      split_ahead)
            except ValueError:
                plan = None
            full = plan_transform(cmd, states, layout, flat.numel(), reserved_after, kept_ahead, split_ahead) \
                if plan is None or plan.dropped_groups else None
            if full is not None and (plan is None or full.dropped_groups < plan.dropped_groups):
                plan, staged = full, False
        if plan is None:
            plan = plan_transform(cmd, states, layout, flat.numel(), reserved_after, kept_ahead, split_ahead)
        host_carry = _plan_host(cmd, states, plan, layout, host_buffer_bytes, src, dst,
                                runner.server_args.gyges_host_carry_bytes)
    except ValueError as e:
        msg = f"{cmd.kind} of devices {devices} refused: {e}"
        logger.warning(msg)
        if pre is not None:
            pre.release()
        if fetched is not None:
            fetched.release()
        return TransformOutcome(ok=False, message=msg, ranks=_old_ranks(cmd, me))
    planning_s = time.perf_counter() - t_plan0

    stats = regroup.RegroupStats()
    old_model = runner.model
    if fetched is not None:
        weight_plan = fetched.weight_plan
    else:
        specs = regroup.param_specs(old_model, new_model, cfg.tp_size)
        weight_plan = weight_regroup_plan(specs, cfg.weight_granularity, src, dst)
    # Whichever shrinks goes first. A merge packs the weights first: a part of lower TP (larger weights) still
    # holds its old weights where a part of higher TP has KV pages (TP2 pages right after TP2's weights land,
    # on the TP1 devices of a TP2 + TP1 + TP1 merge, inside their TP1 weights). A split moves the KV out of
    # the pages its weights grow back into first.
    if cmd.kind == "merge":
        regroup.regroup_weights(weight_plan, me, runner.weight_store, old_model, new_model, group.device_group,
                                stats)
    regroup.execute_kv_plan(plan.kv_plan, me, flat, group.device_group, stats, KV_ROUND_BYTES)
    if cmd.kind != "merge":
        regroup.regroup_weights(weight_plan, me, runner.weight_store, old_model, new_model, group.device_group,
                                stats, prefetched=fetched if staged else None)
    t_rebind0 = time.perf_counter()
    regroup.adopt_buffers(old_model, new_model)
    new_pool = regroup.reshape_pool(pool, cfg.kv_heads_per_rank(new_inst.tp))
    runner.rebind(new_model, new_group, new_cfg, new_pool)
    if host_carry is not None:
        # The host tier's pages are re-laid in every rank's store on a thread while the new instance serves
        # (the side CPU group); the same bytes then become pages of the new width, which the new leader's
        # tier adopts once its own thread is done (Scheduler._attach_carried_host).
        runner._host_kv_store = None
        runner._host_carry = HostCarryInFlight(
            host_carry, me, host_store.flat[:host_carry.buffer_bytes], group, new_pool,
            layout.pages_per_device(host_carry.buffer_bytes, new_inst.tp), KV_ROUND_BYTES,
            runner.server_args.gyges_transform_timeout)
    rebind_s = time.perf_counter() - t_rebind0
    t_end = time.time()

    mine = {"t_start": t_start, "t_end": t_end, "kv_s": stats.kv_seconds, "weight_s": stats.weight_seconds,
            "kv_staging": stats.kv_staging_peak_bytes, "weight_transient": stats.weight_transient_peak_bytes,
            "weight_recv": stats.weight_bytes_received, "weight_freed": stats.weight_bytes_freed,
            "weight_staged": stats.weight_bytes_staged, "gather_s": gather_s, "build_s": build_s,
            "rebind_s": rebind_s}
    t_report0 = time.perf_counter()
    everyone = group.all_gather_object(mine)
    report_s = time.perf_counter() - t_report0
    breakdown = {
        "kind": cmd.kind,
        "devices": devices,
        "tp": max(i.tp for i in dst) if cmd.kind == "merge" else min(i.tp for i in dst),
        "running_requests": plan.running_requests,
        "planning_ms": planning_s * 1e3,
        # where the pause went, slowest device: the state all-gather, the new model built on meta (part of
        # planning), re-binding model and pool; report_ms: the breakdown's own all-gather, after pause_ms
        "state_gather_ms": max(e["gather_s"] for e in everyone) * 1e3,
        "model_build_ms": max(e["build_s"] for e in everyone) * 1e3,
        "rebind_ms": max(e["rebind_s"] for e in everyone) * 1e3,
        "report_ms": report_s * 1e3,
        "kv_bytes": plan.kv_plan.kv_bytes_moved,
        "kv_bytes_in_place": plan.kv_plan.kv_bytes_in_place,
        "kv_ms": max(e["kv_s"] for e in everyone) * 1e3,
        "weight_bytes": sum(e["weight_recv"] for e in everyone),
        "weight_bytes_freed": sum(e["weight_freed"] for e in everyone),
        "weight_ms": max(e["weight_s"] for e in everyone) * 1e3,
        "peak_extra_bytes": max(max(e["kv_staging"], e["weight_transient"]) for e in everyone),
        "pause_ms": (max(e["t_end"] for e in everyone) - min(e["t_start"] for e in everyone)) * 1e3,
        "total_ms": (max(e["t_end"] for e in everyone) - cmd.issued_at) * 1e3,
        "kv_capacity_tokens": runner.max_total_num_tokens,
        # the host KV tier carried over (mem_cache/host_carry.py; zeros without one), re-laid after the pause
        "host_kv_bytes": host_carry.bytes_kept if host_carry is not None else 0,
        "host_pages_kept": host_carry.pages_kept if host_carry is not None else 0,
        "host_pages_dropped": host_carry.pages_dropped if host_carry is not None else 0,
    }
    ahead = [x for x in summaries if x is not None]
    breakdown.update({  # KV pre-copy while serving, merges and splits (zeros when it did not apply)
        "precopy_ms": (max(x["t_end"] for x in ahead) - min(x["t_start"] for x in ahead)) * 1e3 if ahead else 0.0,
        "precopy_kv_bytes": sum(x["sent"] for x in ahead),
        "precopy_kv_bytes_local": sum(x["local"] for x in ahead),
        "precopy_pages": max((len(x["page_map"]) for x in ahead), default=0),
        "precopy_pages_kept": len(kept_ahead) + plan.precopied_kept,
        "precopy_iterations": max((x["iterations"] for x in ahead), default=0),
        "precopy_complete": bool(ahead) and all(x["complete"] for x in ahead),
        # a split's pre-copy waits for each chunk between two iterations: the time that added to the iterations,
        # slowest device (a merge's chunks cross the link without blocking an iteration: 0)
        "precopy_step_ms": max((x.get("step_s", 0.0) for x in ahead), default=0.0) * 1e3,
        # memory the pre-copy took beyond the pool, busiest device: its reused staging slab (packed short runs;
        # at most one chunk); the destination pages are free pages of the pool, taken for its duration
        "precopy_peak_extra_bytes": max((x["staging"] for x in ahead), default=0),
    })
    fetched_ahead = [x for x in fetch_summaries if x is not None]
    breakdown.update({  # a split's weight prefetch while serving (zeros when it did not apply)
        "prefetch_ms": (max(x["t_end"] for x in fetched_ahead) - min(x["t_start"] for x in fetched_ahead)) * 1e3
        if fetched_ahead else 0.0,
        "prefetch_weight_bytes": sum(x["received"] for x in fetched_ahead),
        "prefetch_chunks": max((x["chunks"] for x in fetched_ahead), default=0),
        "prefetch_used": bool(staged),
        "prefetch_weight_bytes_copied": sum(e["weight_staged"] for e in everyone),  # in the pause, on device
    })
    if host_carry is not None:
        runner._host_carry.start()
    state = plan.states.get(me) if new_inst.leader == me else None
    placements = {base: [r.rid for r in st.running + st.waiting] for base, st in plan.states.items()}
    return TransformOutcome(ok=True, ranks=list(new_inst.devices), state=state, breakdown=breakdown,
                            placements=placements)


def _host_store(runner) -> Optional[HostPageStore]:
    """This rank's host KV store for its current pool (made now on a follower that never got a copy order),
    None without a host tier."""
    args = runner.server_args
    if not args.enable_hierarchical_cache or args.disable_radix_cache:
        return None
    settle_carry(runner)  # the previous transformation's re-layout, if still in flight
    store = getattr(runner, "_host_kv_store", None)
    if store is not None and store.pool is runner.kv_pool:
        return store
    capacity = args.hicache_bytes(runner.kv_pool_bytes) // runner.kv_pool.bytes_per_page
    return rank_store(runner, capacity) if capacity > 0 else None


def _plan_host(cmd: TransformCmd, states: Dict[int, InstanceState], plan: TransformPlan, layout: KVLayout,
               buffer_bytes: int, src: List[Instance], dst: List[Instance], max_bytes: int) -> Optional[HostCarryPlan]:
    """The host tier's carry-over (host_carry.py; None when some device has no store, nothing is on host or
    --gyges-host-carry-bytes is 0), and where a split sends the sessions kept on host and the hinted turns.
    Fills plan.states' host fields."""
    carry = None
    device_paths = {base: [toks for toks, _ in out.tree_paths] + [toks for _, toks, _, _ in out.session_pins]
                    for base, out in plan.states.items()}
    if buffer_bytes > 0 and max_bytes > 0 and any(st.host is not None and st.host.nodes for st in states.values()):
        try:
            carry = plan_host_carry(cmd.kind, src, dst, {b: st.host for b, st in states.items()}, layout,
                                    buffer_bytes, device_paths, KV_ROUND_BYTES, max_bytes)
        except ValueError as e:  # never refuses the transformation: what was on host is recomputed
            logger.warning("host KV tier not carried over (%s)", e)
            carry = None
    for base, out in plan.states.items():
        out.host = carry.tiers.get(base) if carry is not None else None
    if cmd.kind == "merge":
        out = plan.states[dst[0].base]
        for st in states.values():
            out.host_sessions.update(st.host_sessions)
            out.hinted.extend(st.hinted)
            out.prefetched_turns.update(st.prefetched_turns)
        return carry
    st = states[src[0].base]
    ps = layout.page_size
    keys = {base: path_first_pages(device_paths[base], ps) | first_page_keys(out.host)
            for base, out in plan.states.items()}
    pinned_at = {sid: base for base, out in plan.states.items() for sid, _, _, _ in out.session_pins}
    default = dst[0].base
    for sid, base in place_by_first_page(st.host_sessions, keys, pinned_at, default).items():
        plan.states[base].host_sessions[sid] = st.host_sessions[sid]
    hinted = dict(st.hinted)
    firsts = {k: tuple(h.tokens[:ps]) for k, h in hinted.items()}
    by_session = {k: pinned_at[h.session_id] for k, h in hinted.items() if h.session_id in pinned_at}
    for k, base in place_by_first_page(firsts, keys, by_session, default).items():
        plan.states[base].hinted.append((k, hinted[k]))
    host_at = {sid: base for base, out in plan.states.items() for sid in out.host_sessions}
    for sid, at in st.prefetched_turns.items():  # with the session's pinned pages
        plan.states[pinned_at.get(sid, host_at.get(sid, default))].prefetched_turns[sid] = at
    return carry


def _old_ranks(cmd: TransformCmd, me: int) -> List[int]:
    return next(list(i) for i in cmd.src_instances if me in i)


def check_model_can_take(cmd: TransformCmd, cfg) -> None:
    """Refuse TP degrees the weight layout was not padded for (any head count works up to G: heads are
    padded and KV heads replicated for every TP degree dividing G, gyges.heads)."""
    for inst in cmd.dst_instances:
        tp = len(inst)
        if cfg.weight_granularity % tp:
            raise ValueError(f"TP{tp} exceeds the weight layout's granularity {cfg.weight_granularity} "
                             f"(--gyges-max-tp)")
