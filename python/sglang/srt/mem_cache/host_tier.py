"""Host-memory KV tier (SGLang's --enable-hierarchical-cache / --hicache-size): radix pages kept in host memory.

One job: hold KV pages that left the device pool, addressed by their prefix path (the token ids from the start
of the prompt up to the end of the page), byte-exact, within a byte budget, least recently used out first.

    device pool  --offload(path, page ids)-->  HostKVTier  (a trie of pages: one node per page_size tokens of
                                               the path; a node with a slot holds that page's bytes)
                 <--load(run, page ids)------   match(token_ids, start_page) -> the consecutive host pages that
                                                continue a device match
Who calls it (managers/req_kv.py): the radix cache's eviction offloads each evicted node's pages (write-back on
evict; a page already on host is not copied again), admission reloads what continues a device match, and the
hint logic offloads / prefetches hinted paths between turns.

Bytes: each rank of an instance keeps its own slice of every page (its KV heads), so the budget is per device,
like the device pool. The index (trie, LRU, slots) lives on the instance leader; the copies are HostKVCopy
orders that the leader applies to its HostPageStore and, on TP > 1, broadcasts first so that every follower
applies the same order to its own store (scheduler.follower_loop). Every rank's store hangs on its model
runner (rank_store), so a Gyges transformation finds it: mem_cache/host_carry.py re-lays the stores' bytes at
the new TP degree and the new leader's tier adopts the renumbered index (export / adopt).
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from gyges.topology import bitrev
from sglang.srt.mem_cache.host_carry import HostNode, HostTierState
from sglang.srt.mem_cache.kv_pool import HeadCentricKVPool


@dataclass
class HostKVCopy:
    """One copy between the device pool and the host slots, done by every rank on its own slice of the pages."""

    to_host: bool  # True: device pages -> host slots; False: host slots -> device pages
    pages: List[int]  # device page ids
    slots: List[int]  # host slots, one per page
    capacity_pages: int  # slots of the store (followers create theirs on the first order)


def pool_page_bytes(pool: HeadCentricKVPool) -> torch.Tensor:
    """The pool as [num_pages, bytes_per_page] uint8 (a view: writes go to the pool)."""
    return pool.kv_buffer.reshape(pool.num_pages, -1).view(torch.uint8)


def read_pages_all_heads(pool: HeadCentricKVPool, pages: List[int], tp_group) -> Optional[torch.Tensor]:
    """Every rank of the instance calls it: the pages' bytes with every KV head, on the leader (None elsewhere).

    uint8 [len(pages), all heads' page bytes] on CPU, head blocks in head order: shard rank R's slice (its
    pool's page) at columns [R * page_bytes, (R + 1) * page_bytes). The same bytes at any TP degree: a TP1
    pool's page is exactly this row, so KV read at one TP can be written at another (write_pages_all_heads)."""
    local = pool_page_bytes(pool).index_select(0, torch.tensor(pages, dtype=torch.int64,
                                                               device=pool.kv_buffer.device)).cpu()
    if tp_group.size == 1:
        return local
    import torch.distributed as dist

    parts = [torch.empty_like(local) for _ in range(tp_group.size)] if tp_group.is_leader else None
    dist.gather(local, parts, dst=tp_group.ranks[0], group=tp_group.cpu_group)
    if not tp_group.is_leader:
        return None
    bits = tp_group.size.bit_length() - 1
    return torch.cat([parts[bitrev(r, bits)] for r in range(tp_group.size)], dim=1)  # group rank -> shard order


def write_pages_all_heads(pool: HeadCentricKVPool, pages: List[int], kv: torch.Tensor, tp_group) -> None:
    """Every rank of the instance calls it with the same `kv` (read_pages_all_heads' layout): each writes its
    shard's heads into its pool's pages."""
    dev = pool_page_bytes(pool)
    width = dev.shape[1]
    if kv.shape[1] != width * tp_group.size:
        raise ValueError(f"the pages hold {kv.shape[1]} bytes of KV, this instance {width * tp_group.size} "
                         f"(a different model or page size)")
    r = tp_group.shard_rank
    dev[torch.tensor(pages, dtype=torch.int64, device=dev.device)] = kv[:, r * width:(r + 1) * width].to(dev.device)


class HostPageStore:
    """The bytes: capacity_pages host slots of one page of this rank's pool each."""

    def __init__(self, pool: HeadCentricKVPool, capacity_pages: int, flat: Optional[torch.Tensor] = None):
        """flat: host bytes to use (at least capacity_pages pages of the pool; a transformation's re-laid
        store), else allocated."""
        self.pool = pool
        self.capacity_pages = capacity_pages
        nbytes = capacity_pages * pool.bytes_per_page
        if flat is None:
            pin = pool.kv_buffer.is_cuda and torch.cuda.is_available()
            flat = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)  # pinned on CUDA for fast copies
        # [capacity_pages, bytes_per_page] uint8 in host memory: slot s is page s of a head-centric pool of this
        # rank's heads (the same layout as the device pool's pages)
        self.slots = flat[:nbytes].view(capacity_pages, pool.bytes_per_page)

    @property
    def flat(self) -> torch.Tensor:
        """The store's bytes, [capacity_pages * bytes_per_page] uint8 (a view)."""
        return self.slots.view(-1)

    def apply(self, op: HostKVCopy) -> None:
        if not op.pages:
            return
        dev = pool_page_bytes(self.pool)
        pages = torch.tensor(op.pages, dtype=torch.int64, device=dev.device)
        slots = torch.tensor(op.slots, dtype=torch.int64)
        if op.to_host:
            self.slots[slots] = dev.index_select(0, pages).to("cpu")
        else:
            dev[pages] = self.slots.index_select(0, slots).to(dev.device, non_blocking=False)


class _HostPage:
    """A trie node: one page of a prefix path. slot >= 0: its bytes are on host."""

    __slots__ = ("key", "parent", "children", "slot")

    def __init__(self, key: Tuple[int, ...], parent: Optional["_HostPage"]):
        self.key = key
        self.parent = parent
        self.children: Dict[Tuple[int, ...], "_HostPage"] = {}
        self.slot = -1


class HostKVTier:
    def __init__(self, budget_bytes: int, page_size: int, store: HostPageStore,
                 broadcast: Optional[Callable[[HostKVCopy], None]] = None):
        """budget_bytes: host bytes per device; store: this rank's bytes; broadcast: sends each copy order to the
        instance's other ranks first (TP > 1), None on TP1."""
        self.page_size = page_size
        self.page_bytes = store.pool.bytes_per_page
        self.capacity_pages = store.capacity_pages
        self.budget_bytes = budget_bytes
        self.store = store
        self.broadcast = broadcast
        self.root = _HostPage((), None)
        self._free_slots = list(range(self.capacity_pages - 1, -1, -1))
        self._lru: "OrderedDict[int, _HostPage]" = OrderedDict()  # slot -> node, least recently used first
        self._clock = itertools.count()
        self.offloaded_bytes = 0  # bytes copied device -> host
        self.loaded_bytes = 0  # bytes copied host -> device
        self.dropped_pages = 0  # pages dropped from host to stay within the budget

    @classmethod
    def for_pool(cls, budget_bytes: int, page_size: int, pool: HeadCentricKVPool,
                 broadcast: Optional[Callable[[HostKVCopy], None]] = None) -> Optional["HostKVTier"]:
        """A tier over this pool (None when the budget holds no page)."""
        capacity = int(budget_bytes) // pool.bytes_per_page
        if capacity < 1:
            return None
        return cls(int(budget_bytes), page_size, HostPageStore(pool, capacity), broadcast)

    @classmethod
    def for_runner(cls, budget_bytes: int, page_size: int, runner,
                   broadcast: Optional[Callable[[HostKVCopy], None]] = None,
                   carried: Optional[HostTierState] = None) -> Optional["HostKVTier"]:
        """The leader's tier over its runner's pool, with the store on the runner (rank_store) where a
        transformation finds it. carried: the index of a store a transformation re-laid (host_carry.py):
        that store and its capacity are kept, and its pages adopted."""
        store = getattr(runner, "_host_kv_store", None)
        if carried is not None and store is not None and store.pool is runner.kv_pool:
            tier = cls(store.capacity_pages * store.pool.bytes_per_page, page_size, store, broadcast)
            tier.adopt(carried)
        else:
            capacity = int(budget_bytes) // runner.kv_pool.bytes_per_page
            if capacity < 1:
                return None
            tier = cls(int(budget_bytes), page_size, rank_store(runner, capacity), broadcast)
        return tier

    # ---- queries ---------------------------------------------------------------------------------------
    @property
    def pages_held(self) -> int:
        return len(self._lru)

    def _pages_of(self, token_ids: Sequence[int], num_pages: int):
        ps = self.page_size
        for i in range(num_pages):
            yield tuple(token_ids[i * ps:(i + 1) * ps])

    def match(self, token_ids: Sequence[int], start_page: int, max_pages: int) -> List[_HostPage]:
        """The host pages at page indices start_page, start_page+1, ... of token_ids' path (consecutive, at most
        max_pages pages in all counted from 0); empty when page start_page is not on host."""
        node = self.root
        run: List[_HostPage] = []
        for i, key in enumerate(self._pages_of(token_ids, max_pages)):
            node = node.children.get(key)
            if node is None:
                break
            if i >= start_page:
                if node.slot < 0:
                    break
                run.append(node)
        return run

    def held_pages(self, token_ids: Sequence[int], num_pages: int) -> int:
        """How many of the first num_pages pages of token_ids' path are on host (leading pages on device or
        host not distinguished: the count of nodes with bytes along the path)."""
        node, n = self.root, 0
        for key in self._pages_of(token_ids, num_pages):
            node = node.children.get(key)
            if node is None:
                break
            n += node.slot >= 0
        return n

    # ---- copies ----------------------------------------------------------------------------------------
    def _copy(self, op: HostKVCopy) -> None:
        if self.broadcast is not None:
            self.broadcast(op)
        self.store.apply(op)

    def offload(self, path_tokens: Sequence[int], first_page: int, pages: Sequence[int]) -> int:
        """Keep device `pages` (pages first_page.. of path_tokens' path) on host. Pages already held are
        touched, not copied. Returns the bytes copied (fewer pages when the budget cannot make room)."""
        ps = self.page_size
        n_total = first_page + len(pages)
        if len(path_tokens) < n_total * ps or not pages:
            return 0
        node = self.root
        targets: List[Tuple[_HostPage, int]] = []
        for i, key in enumerate(self._pages_of(path_tokens, n_total)):
            child = node.children.get(key)
            if child is None:
                child = _HostPage(key, node)
                node.children[key] = child
            node = child
            if i >= first_page:
                targets.append((node, pages[i - first_page]))
        copy_pages, copy_slots = [], []
        for node, page in targets:
            if node.slot >= 0:
                self._lru.move_to_end(node.slot)
                continue
            slot = self._take_slot(protect=node)
            if slot is None:
                break
            node.slot = slot
            self._lru[slot] = node
            copy_pages.append(page)
            copy_slots.append(slot)
        self._prune(node)
        if copy_pages:
            self._copy(HostKVCopy(True, copy_pages, copy_slots, self.capacity_pages))
            self.offloaded_bytes += len(copy_pages) * self.page_bytes
        return len(copy_pages) * self.page_bytes

    def load(self, run: Sequence[_HostPage], pages: Sequence[int]) -> None:
        """Copy the host pages of `run` (from match) into device `pages`; they stay on host too (inclusive)."""
        if not run:
            return
        slots = [n.slot for n in run]
        for s in slots:
            self._lru.move_to_end(s)
        self._copy(HostKVCopy(False, list(pages), slots, self.capacity_pages))
        self.loaded_bytes += len(slots) * self.page_bytes

    def export(self) -> HostTierState:
        """The index as plain data (parents before children), for a transformation."""
        nodes: List[HostNode] = []
        stack = [(self.root, -1)]
        while stack:
            node, idx = stack.pop()
            for child in node.children.values():
                nodes.append((idx, child.key, child.slot))
                stack.append((child, len(nodes) - 1))
        return HostTierState(nodes, list(self._lru))

    def adopt(self, state: HostTierState) -> None:
        """Rebuild the index of a fresh tier from `state` (slots of this store, within its capacity)."""
        made: List[_HostPage] = []
        for parent, key, slot in state.nodes:
            up = made[parent] if parent >= 0 else self.root
            node = up.children.get(key)
            if node is None:
                node = _HostPage(key, up)
                up.children[key] = node
            if 0 <= slot < self.capacity_pages and node.slot < 0 and slot not in self._lru:
                node.slot = slot
                self._lru[slot] = node
            made.append(node)
        for slot in state.lru:  # least recently used first
            if slot in self._lru:
                self._lru.move_to_end(slot)
        held = set(self._lru)
        self._free_slots = [s for s in range(self.capacity_pages - 1, -1, -1) if s not in held]
        for node in reversed(made):
            self._prune(node)

    def clear(self) -> None:
        self.root = _HostPage((), None)
        self._free_slots = list(range(self.capacity_pages - 1, -1, -1))
        self._lru.clear()

    # ---- budget ----------------------------------------------------------------------------------------
    def _take_slot(self, protect: _HostPage) -> Optional[int]:
        """A free slot, dropping least recently used pages (and what hangs below them) if needed; never a page
        on the path to `protect` (the path being written)."""
        while not self._free_slots:
            victim = next((n for n in self._lru.values() if not self._is_ancestor(n, protect)), None)
            if victim is None:
                return None
            self._drop_subtree(victim)
        return self._free_slots.pop()

    @staticmethod
    def _is_ancestor(node: _HostPage, of: _HostPage) -> bool:
        while of is not None:
            if of is node:
                return True
            of = of.parent
        return False

    def _drop_subtree(self, node: _HostPage) -> None:
        """Forget node's bytes and everything below it (unreachable without it)."""
        stack = [node]
        while stack:
            n = stack.pop()
            stack.extend(n.children.values())
            if n.slot >= 0:
                del self._lru[n.slot]
                self._free_slots.append(n.slot)
                n.slot = -1
                self.dropped_pages += 1
        node.children = {}
        self._prune(node)

    def _prune(self, node: _HostPage) -> None:
        """Remove empty nodes (no bytes, no children) from node up."""
        while node is not self.root and node.parent is not None and node.slot < 0 and not node.children:
            parent = node.parent
            del parent.children[node.key]
            node.parent = None
            node = parent

    def stats(self) -> Dict[str, int]:
        return {"host_pages_held": self.pages_held, "host_capacity_pages": self.capacity_pages,
                "host_offloaded_bytes": self.offloaded_bytes, "host_loaded_bytes": self.loaded_bytes,
                "host_dropped_pages": self.dropped_pages}


class HostCarryInFlight:
    """One rank's re-layout of its host store after a transformation (host_carry.py), on a thread over the
    group's side CPU group while the new instance already serves: the store is not used meanwhile (the new
    leader attaches its tier when settle() returns the store)."""

    def __init__(self, plan, me: int, flat: torch.Tensor, group, new_pool: HeadCentricKVPool, capacity_pages: int,
                 max_round_bytes: int, timeout_s: float):
        import threading

        self.plan, self.me, self.flat, self.group = plan, me, flat, group
        self.new_pool, self.capacity_pages = new_pool, capacity_pages
        self.max_round_bytes, self.timeout_s = max_round_bytes, timeout_s
        self.error: Optional[BaseException] = None
        self.seconds = 0.0  # planning the moves + executing them, on the thread
        self.bytes_moved = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="host-kv-carry", daemon=True)

    def start(self) -> "HostCarryInFlight":
        """Every rank of the transformation starts it after the pause (its Python planning would contend for
        the GIL with the pause's last steps)."""
        self.thread.start()
        return self

    def _run(self) -> None:
        from datetime import timedelta

        from torch.distributed.distributed_c10d import _set_pg_timeout

        from sglang.srt.model_executor import regroup

        try:
            _set_pg_timeout(timedelta(seconds=self.timeout_s), self.group.side_group)
            t0 = time.perf_counter()
            kv_plan = self.plan.make_kv_plan()  # the same on every rank (pure)
            stats = regroup.RegroupStats()
            regroup.execute_kv_plan(kv_plan, self.me, self.flat, self.group.side_group, stats, self.max_round_bytes)
            self.seconds = time.perf_counter() - t0
            self.bytes_moved = kv_plan.kv_bytes_moved
        except BaseException as e:  # a peer died or hung: the tier starts empty (what was on host is recomputed)
            self.error = e
        finally:
            self.done.set()

    def settle(self) -> Optional[HostPageStore]:
        """Wait for the re-layout (at most the transformation timeout); the store at the new width, or None."""
        if not self.done.wait(self.timeout_s) or self.error is not None:
            return None
        return HostPageStore(self.new_pool, self.capacity_pages, flat=self.flat)


def settle_carry(runner) -> Optional[HostPageStore]:
    """Finish this rank's host re-layout in flight, if any (waits for it): its store becomes the runner's."""
    carry = getattr(runner, "_host_carry", None)
    if carry is None:
        return None
    runner._host_carry = None
    store = carry.settle()
    runner.host_carry_last = {"host_carry_ms": carry.seconds * 1e3, "host_carry_bytes_moved": carry.bytes_moved}
    if store is not None and store.pool is runner.kv_pool:
        runner._host_kv_store = store
        return store
    import logging

    logging.getLogger(__name__).warning("host KV tier not carried over: %s",
                                        carry.error or "the re-layout did not finish in time")
    runner._host_kv_store = None
    return None


def rank_store(runner, capacity_pages: int) -> HostPageStore:
    """This rank's HostPageStore for its runner's current pool, kept on the runner: created on the leader's
    first order (on followers), kept when a transformation re-laid it for the new pool (host_carry.py; a
    re-layout in flight is waited for first), else made afresh after a transformation gave the runner another
    pool."""
    settle_carry(runner)
    store = getattr(runner, "_host_kv_store", None)
    if store is None or store.pool is not runner.kv_pool or store.capacity_pages != capacity_pages:
        store = HostPageStore(runner.kv_pool, capacity_pages)
        runner._host_kv_store = store
    return store
