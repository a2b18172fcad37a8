"""The host KV tier across a Gyges merge or split: what was kept on host stays there, at the new layout.

Each rank's HostPageStore is a head-centric pool of its own (slot = page, the rank's KV heads of it), so its
bytes are re-laid exactly as the device pool's are, with the same plans, and only the index is renumbered:

    gather   (gyges_transform's state all-gather) each rank's store bytes; each source leader's InstanceState
             carries its tier's index (HostTierState) and the sessions it keeps on host
    plan     plan_host_carry, the same on every device, over the first `buffer_bytes` of every store (the
             smallest store of the transformation's devices):
               merge  the parts' tries are merged into one (a page on host in two parts is kept once); slot s
                      of part i becomes merged slot merge_page_id(s) (gyges.plans.kv_merge_plan)
               split  each first-page subtree of the trie goes to one part: where the device cache's path or
                      pinned session with that first page went, else the part with the most room left; a subtree
                      that fits no part is dropped; gyges.plans.split_page_assignment / kv_split_plan
             (the index in the pause; the head-block moves, make_kv_plan, later on the thread)
    execute  after the pause, on a thread over the group's side CPU group while the new instances serve
             (host_tier.HostCarryInFlight): the moves, then regroup.execute_kv_plan (host memory: gloo)
    adopt    every rank's store becomes a view of the same bytes at its new page width; the new leader's tier
             adopts the renumbered index when its thread is done (HostKVTier.adopt)

Pure planning (no torch): plan_host_carry and the trie helpers take plain data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from gyges.plans import KVLayout, KVPlan, kv_merge_plan, kv_split_plan, merge_page_mapping, split_page_assignment
from gyges.topology import Instance

HostNode = Tuple[int, Tuple[int, ...], int]  # (parent's index in the list or -1 for the root, page's tokens, slot)


@dataclass
class HostTierState:
    """A host tier's index as plain data (the page bytes stay in the ranks' stores)."""

    # Trie nodes, every parent before its children: (parent index or -1, the page's token ids, slot or -1
    # for a page that is not on host, e.g. still on device while later pages of its path are on host).
    nodes: List[HostNode] = field(default_factory=list)
    # Slots, least recently used first.
    lru: List[int] = field(default_factory=list)


@dataclass
class HostCarryPlan:
    tiers: Dict[int, HostTierState]  # resulting instance (base device) -> its tier's index, slots renumbered
    buffer_bytes: int  # bytes of every store the plan covers (the smallest store)
    pages_kept: int
    pages_dropped: int  # on host before, not after (no room on the part they went to, or beyond buffer_bytes)
    page_bytes: int  # bytes of one page with every KV head
    make_kv_plan: Callable[[], KVPlan]  # the stores' head-block moves (offsets within each rank's store bytes);
    #                                     the costly part, computed off the pause (HostCarryInFlight)

    @property
    def bytes_kept(self) -> int:
        """Bytes of the pages carried over, all devices together."""
        return self.pages_kept * self.page_bytes


class _Trie:
    """Merging tries by page key: one node per path, a slot kept once."""

    def __init__(self):
        self.nodes: List[List] = []  # [parent index, key, slot]
        self.children: Dict[Tuple[int, Tuple[int, ...]], int] = {}

    def child(self, parent: int, key: Tuple[int, ...]) -> int:
        idx = self.children.get((parent, key))
        if idx is None:
            idx = len(self.nodes)
            self.nodes.append([parent, key, -1])
            self.children[(parent, key)] = idx
        return idx


def _slots_in_range(st: HostTierState, capacity: int) -> List[int]:
    return [s for _, _, s in st.nodes if 0 <= s < capacity]


def path_first_pages(paths: Sequence[Sequence[int]], page_size: int) -> set:
    """The first pages (token ids) of token paths at least a page long."""
    return {tuple(p[:page_size]) for p in paths if len(p) >= page_size}


def plan_host_carry(kind: str, src: Sequence[Instance], dst: Sequence[Instance],
                    tiers: Dict[int, Optional[HostTierState]], layout: KVLayout, buffer_bytes: int,
                    device_paths: Optional[Dict[int, List[Sequence[int]]]] = None,
                    max_staging_bytes: Optional[int] = None, max_bytes: Optional[int] = None) -> HostCarryPlan:
    """tiers: source instance base -> its tier's index (None: nothing on host). device_paths (splits):
    resulting instance base -> token paths of the device cache and sessions it took (where host pages that
    continue them are worth keeping). max_bytes: per device, only the most recently used pages of each source
    that fit are carried (the pause moves at most about that much); None: all."""
    src = sorted(src, key=lambda i: i.base)
    dst = sorted(dst, key=lambda i: i.base)
    before = sum(len([s for _, _, s in t.nodes if s >= 0]) for t in tiers.values() if t is not None)
    if max_bytes is not None:
        tiers = {b: _most_recent(t, max_bytes // layout.page_bytes(next(i.tp for i in src if i.base == b)))
                 if t is not None else None for b, t in tiers.items()}
    if kind == "merge":
        return _plan_merge(src, dst[0], tiers, layout, buffer_bytes, before, max_staging_bytes)
    if kind == "split":
        return _plan_split(src[0], dst, tiers.get(src[0].base), layout, buffer_bytes, device_paths or {}, before,
                           max_staging_bytes)
    raise ValueError(f"unknown transformation kind {kind!r}")


def _plan_merge(parts, merged, tiers, layout, buffer_bytes, before, max_staging_bytes) -> HostCarryPlan:
    trie = _Trie()
    kept: List[List[int]] = []
    lru_by_part: List[List[int]] = []
    for part in parts:
        st = tiers.get(part.base)
        mine: List[int] = []
        lru: List[int] = []
        if st is not None:
            capacity = layout.pages_per_device(buffer_bytes, part.tp)
            f = merge_page_mapping(part, merged)
            index: List[int] = []
            new_slot: Dict[int, int] = {}
            for parent, key, slot in st.nodes:
                idx = trie.child(index[parent] if parent >= 0 else -1, key)
                index.append(idx)
                if 0 <= slot < capacity and trie.nodes[idx][2] < 0:
                    trie.nodes[idx][2] = f(slot)
                    new_slot[slot] = f(slot)
                    mine.append(slot)
            lru = [new_slot[s] for s in st.lru if s in new_slot]
        kept.append(mine)
        lru_by_part.append(lru)
    lru = [s for group in zip(*_padded(lru_by_part)) for s in group if s is not None]  # interleaved by age
    out = HostTierState([(p, k, s) for p, k, s in trie.nodes], lru)
    n = sum(len(k) for k in kept)
    return HostCarryPlan({merged.base: _pruned(out)}, buffer_bytes, n, before - n, layout.page_bytes(1),
                         lambda: kv_merge_plan(layout, buffer_bytes, parts, kept, max_staging_bytes))


def _most_recent(st: HostTierState, pages: int) -> HostTierState:
    """st with only its `pages` most recently used pages (the others' nodes keep no slot)."""
    keep = set(st.lru[len(st.lru) - pages:]) if pages > 0 else set()
    if len(keep) == len(st.lru):
        return st
    return HostTierState([(p, k, s if s in keep else -1) for p, k, s in st.nodes], [s for s in st.lru if s in keep])


def _padded(lists: List[List[int]]) -> List[List[Optional[int]]]:
    width = max((len(x) for x in lists), default=0)
    return [x + [None] * (width - len(x)) for x in lists]


def _plan_split(merged, parts, st, layout, buffer_bytes, device_paths, before, max_staging_bytes) -> HostCarryPlan:
    empty = {p.base: HostTierState() for p in parts}
    if st is None or not st.nodes:
        return HostCarryPlan(empty, buffer_bytes, 0, before, layout.page_bytes(1),
                             lambda: kv_split_plan(layout, buffer_bytes, merged, parts, used_pages=[]))
    capacity = layout.pages_per_device(buffer_bytes, merged.tp)
    children: Dict[int, List[int]] = {}
    for i, (parent, _, _) in enumerate(st.nodes):
        children.setdefault(parent, []).append(i)
    # One group per first page: the subtree below it (a page on host is useful only after its path's pages).
    groups: List[List[int]] = []
    for top in children.get(-1, []):
        stack, members = [top], []
        while stack:
            i = stack.pop()
            members.append(i)
            stack.extend(children.get(i, []))
        groups.append(sorted(members))
    ps = layout.page_size
    wants = {p.base: path_first_pages(device_paths.get(p.base, []), ps) for p in parts}
    room = [layout.pages_per_device(buffer_bytes, p.tp) for p in parts]
    used = [0] * len(parts)
    page_groups: List[Tuple[int, List[int]]] = []
    node_part: Dict[int, int] = {}
    for g in sorted(groups, key=lambda g: -len(g)):
        slots = [st.nodes[i][2] for i in g if 0 <= st.nodes[i][2] < capacity]
        key = st.nodes[g[0]][1]
        fits = [j for j in range(len(parts)) if room[j] - used[j] >= len(slots)]
        if not fits:
            continue
        j = min(fits, key=lambda j: (key not in wants[parts[j].base], used[j] - room[j], j))
        used[j] += len(slots)
        page_groups.append((j, slots))
        for i in g:
            node_part[i] = j
    assignment = split_page_assignment(layout, buffer_bytes, merged, parts, page_groups)
    index: Dict[int, int] = {}  # node -> its index in its part's list
    part_nodes: List[List[HostNode]] = [[] for _ in parts]
    for i, (parent, key, slot) in enumerate(st.nodes):  # one pass: parents stay before children
        j = node_part.get(i)
        if j is None:
            continue
        index[i] = len(part_nodes[j])
        part_nodes[j].append((index[parent] if parent >= 0 else -1, key,
                              assignment[slot][1] if slot in assignment else -1))
    part_lru: List[List[int]] = [[] for _ in parts]
    for slot in st.lru:
        if slot in assignment:
            j, new = assignment[slot]
            part_lru[j].append(new)
    tiers = {part.base: _pruned(HostTierState(part_nodes[j], part_lru[j])) for j, part in enumerate(parts)}
    n = len(assignment)
    return HostCarryPlan(tiers, buffer_bytes, n, before - n, layout.page_bytes(1),
                         lambda: kv_split_plan(layout, buffer_bytes, merged, parts, assignment=assignment,
                                               max_staging_bytes=max_staging_bytes))


def _pruned(st: HostTierState) -> HostTierState:
    """Without the nodes that neither hold a page nor lead to one (parents stay before children)."""
    keep = [s >= 0 for _, _, s in st.nodes]
    for i in range(len(st.nodes) - 1, -1, -1):
        parent = st.nodes[i][0]
        if keep[i] and parent >= 0:
            keep[parent] = True
    index: Dict[int, int] = {}
    nodes: List[HostNode] = []
    for i, (parent, key, slot) in enumerate(st.nodes):
        if keep[i]:
            index[i] = len(nodes)
            nodes.append((index[parent] if parent >= 0 else -1, key, slot))
    return HostTierState(nodes, list(st.lru))


def first_page_keys(st: Optional[HostTierState]) -> set:
    """The first pages (token ids) of the paths the tier holds pages of."""
    return {key for parent, key, _ in (st.nodes if st is not None else []) if parent < 0}


def place_by_first_page(first_pages: Dict[str, Tuple[int, ...]], keys_by_part: Dict[int, set],
                        fallback: Dict[str, int], default: int) -> Dict[str, int]:
    """A split's placement of what follows a path (a session kept on host, a hinted turn): the part whose cache
    (device or host) took the path's first page, else fallback[name] (e.g. where its pinned pages went), else
    default."""
    out = {}
    for name, key in first_pages.items():
        part = next((base for base, keys in sorted(keys_by_part.items()) if key in keys), None)
        out[name] = part if part is not None else fallback.get(name, default)
    return out
