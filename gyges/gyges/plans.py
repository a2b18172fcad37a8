"""Transformation plans: which byte ranges of KV cache and which weight rows go where (pure data).

Data flow: the controller decides `Topology.merge/split`; it calls `kv_merge_plan` / `kv_split_plan` with
every source instance's used pages and `weight_merge_plan` / `weight_split_plan` with the model's
parameter shapes; the workers execute the moves between two forward iterations; the schedulers rewrite
their page tables and radix trees with `merge_page_id` / `split_page_id` (or the plan's `page_map`).

KV layout (docs/CONTRACTS.md): a device's KV buffer is `buffer_bytes` long and, at TP t, is a sequence of
pages of `page_bytes(t) = (H/t) * head_block_bytes` bytes, head_block_bytes = L*2*page_size*head_dim*dtype.
Inside a page the rank's H/t heads are consecutive head blocks. TP rank R of an instance (base b, TP T)
lives on device b + bitrev(R) (gyges.topology) and holds heads [R*H/T, (R+1)*H/T).

Merge renumbering. Merge source instances (parts, TP t each, possibly mixed) into one instance of TP T.
For a part at base b_s with TP t: stride = T/t, slot = bitrev((b_s - b)/t, log2 stride), and
    old page p of that part  ->  new page p*stride + slot.
(For k TP-t parts of equal size, stride = k and slot = bitrev(s): for k = 2 this is p*k + s; for k = 4 the
parts 1 and 2 swap slots.) Byte arithmetic, on any device: new page q = p*stride + j occupies bytes
[q*P_T, (q+1)*P_T) = [p*P_t + j*P_T, p*P_t + (j+1)*P_T), the j-th of the `stride` equal sub-blocks of old
page p (P_t = stride*P_T). So every old page p is cut into `stride` sub-blocks and each becomes one new
page; nothing spills into another old page, and the buffer holds exactly stride times as many pages.
Device d of part s had TP rank r (heads [r*H/t, (r+1)*H/t) of its part's pages, i.e. `stride` head
groups of H/T heads); at TP T it gets rank R with R // stride == r and R % stride == slot(s) (bit
reversal maps the high bits of d - b to the low bits of R). So the heads d needs for its own part's page
p (heads of R) sit in sub-block R % stride = slot(s) of old page p: exactly where new page p*stride+slot
lives. They stay in place. The other stride-1 sub-blocks of d's old page p hold heads of ranks
r*stride + j' (j' != slot): they go to the device of rank r*stride + j' (which is in part s' with
slot(s') = j', and has the same old rank r), into its sub-block slot(s) -- and that device sends its
sub-block slot(s) back: every cross-device move is one half of a pairwise swap between devices with the
same old rank, page p on both. Split is the exact inverse: merged page q goes to the part whose slot is
q % stride, as page q // stride ("natural" placement).

Split placement rule. A running request's pages must all end on one part after a split, and pages beyond
a part's capacity do not exist there. `split_page_assignment` keeps a page at its natural place when its
group (request) goes to that part and the page fits; every other page is compacted into the lowest free
page id of its group's target part. The KV plan is computed from any such mapping.

Execution semantics of a KVPlan (also what `execute_kv_plan` does): moves are grouped in rounds, executed
in order. At the start of a round the sources of the round's `staged` moves are copied to a staging
buffer on their destination device; then the moves run in list order (unstaged ones first), staged moves
writing from staging. Moves whose ranges chain or form cycles (a swap) are always in the same round;
`staging_bytes` is the largest staged byte count of one device in one round. Rounds are packed up to
`max_staging_bytes` per device (a swap's two blocks are never split). Staging comes from the weight
memory the same transformation frees.

Weights (docs/CONTRACTS.md): every sharded parameter has `rows` (padded) rows split into G fine shards;
TP rank r of TP t holds fine shards [r*G/t, (r+1)*G/t), one contiguous row block. Because a device's new
rank's shard is inside its old shard on a merge (and contains it on a split), a merge keeps one sub-block
in place and frees the rest (bytes returned to the KV pool); a split keeps its block and receives the rest
from the peers that hold it, with no extra peak memory beyond the final weight footprint (the KV split
moves KV out of that memory first).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from gyges.topology import Instance, bitrev, log2_exact

PageKey = Tuple[int, int]  # (instance index in its list, page id)


# =====================================================================================================
# KV cache
# =====================================================================================================
@dataclass(frozen=True)
class KVLayout:
    num_kv_heads: int  # H, all KV heads of the model as stored (padded: gyges.heads.HeadLayout.padded_kv_heads)
    num_layers: int
    page_size: int
    head_dim: int
    dtype_bytes: int

    @property
    def head_block_bytes(self) -> int:
        """Bytes of one KV head of one page: [layers][K|V][page_size][head_dim]."""
        return self.num_layers * 2 * self.page_size * self.head_dim * self.dtype_bytes

    def heads_local(self, tp: int) -> int:
        if tp < 1 or self.num_kv_heads % tp:
            raise ValueError(
                f"{self.num_kv_heads} KV heads cannot be split over tp={tp}; pad them first "
                f"(padding and KV-head replication for every TP up to G: gyges.heads.pad_heads)")
        return self.num_kv_heads // tp

    def page_bytes(self, tp: int) -> int:
        return self.heads_local(tp) * self.head_block_bytes

    def pages_per_device(self, buffer_bytes: int, tp: int) -> int:
        return buffer_bytes // self.page_bytes(tp)

    def head_location(self, inst: Instance, page: int, head: int) -> Tuple[int, int]:
        """(device, byte offset) of head `head` of page `page` of instance `inst`."""
        hl = self.heads_local(inst.tp)
        rank = head // hl
        return inst.device_of_rank(rank), page * self.page_bytes(inst.tp) + (head % hl) * self.head_block_bytes


def page_slot(part: Instance, group: Instance) -> Tuple[int, int]:
    """(stride, slot): page p of `part` is page p*stride + slot of the merged `group`."""
    if not group.contains(part):
        raise ValueError(f"instance {list(part.devices)} is not inside {list(group.devices)}")
    stride = group.tp // part.tp
    return stride, bitrev((part.base - group.base) // part.tp, log2_exact(stride))


def merge_page_id(page: int, part: Instance, merged: Instance) -> int:
    stride, slot = page_slot(part, merged)
    return page * stride + slot


def split_page_id(page: int, merged: Instance, parts: Sequence[Instance]) -> Tuple[int, int]:
    """Natural inverse of merge_page_id: (index into parts, page id there)."""
    return split_page_mapping(merged, parts)(page)


def split_page_mapping(merged: Instance, parts: Sequence[Instance]) -> Callable[[int], Tuple[int, int]]:
    """split_page_id for many pages: the parts' (stride, slot) computed once."""
    slots = [(i,) + page_slot(part, merged) for i, part in enumerate(parts)]

    def natural(page: int) -> Tuple[int, int]:
        for i, stride, slot in slots:
            if page % stride == slot:
                return i, page // stride
        raise ValueError(f"parts {[list(p.devices) for p in parts]} do not tile {list(merged.devices)}")

    return natural


def merge_page_mapping(part: Instance, merged: Instance) -> Callable[[int], int]:
    """A callable for RadixCache.rebase / page-table rewriting of one part's pages."""
    stride, slot = page_slot(part, merged)
    return lambda p: p * stride + slot


def remap_page_table(table: Sequence[Sequence[int]], mapping) -> List[List[int]]:
    get = mapping.__getitem__ if isinstance(mapping, Mapping) else mapping
    return [[get(p) for p in row] for row in table]


@dataclass(frozen=True)
class KVMove:
    src_device: int
    src_offset: int  # byte offset in the source device's KV buffer
    dst_device: int
    dst_offset: int
    nbytes: int
    round: int = 0
    staged: bool = False  # source read into staging at the start of the round

    @property
    def src_range(self) -> Tuple[int, int, int]:
        return self.src_device, self.src_offset, self.src_offset + self.nbytes

    @property
    def dst_range(self) -> Tuple[int, int, int]:
        return self.dst_device, self.dst_offset, self.dst_offset + self.nbytes


@dataclass
class KVPlan:
    src_instances: Tuple[Instance, ...]
    dst_instances: Tuple[Instance, ...]
    page_map: Dict[PageKey, PageKey]  # (src instance idx, page) -> (dst instance idx, page)
    moves: List[KVMove]  # execution order (rounds ascending)
    num_rounds: int
    kv_bytes_moved: int
    kv_bytes_in_place: int  # bytes of used pages that stay where they are
    staging_bytes: int  # max staged bytes on one device in one round
    staging_bytes_per_swap: int  # the smallest staging any execution of these moves can need

    def rounds(self) -> List[List[KVMove]]:
        out: List[List[KVMove]] = [[] for _ in range(self.num_rounds)]
        for m in self.moves:
            out[m.round].append(m)
        return out


def _overlapping_pairs(a: List[Tuple[int, int, int, int]], b: List[Tuple[int, int, int, int]]):
    """Pairs (id_a, id_b) whose intervals overlap; entries are (device, start, end, id), and intervals
    within a (and within b) are pairwise disjoint, so a two-pointer sweep per device finds them all."""
    by_dev: Dict[int, Tuple[list, list]] = {}
    for x in a:
        by_dev.setdefault(x[0], ([], []))[0].append(x)
    for y in b:
        by_dev.setdefault(y[0], ([], []))[1].append(y)
    for xs, ys in by_dev.values():
        xs.sort()
        ys.sort()
        i = j = 0
        while i < len(xs) and j < len(ys):
            _, s1, e1, id1 = xs[i]
            _, s2, e2, id2 = ys[j]
            if e1 <= s2:
                i += 1
            elif e2 <= s1:
                j += 1
            else:
                yield id1, id2
                if e1 <= e2:
                    i += 1
                else:
                    j += 1


def kv_regroup_plan(layout: KVLayout, buffer_bytes: int, src_instances: Sequence[Instance],
                    dst_instances: Sequence[Instance], page_map: Mapping[PageKey, PageKey],
                    max_staging_bytes: Optional[int] = None) -> KVPlan:
    """Moves that take every page in page_map from its source instance to its destination page, for
    any re-partition of the same devices. Pages not in page_map are unused (their bytes are free)."""
    src_instances, dst_instances = tuple(src_instances), tuple(dst_instances)
    src_devs = sorted(d for i in src_instances for d in i.devices)
    dst_devs = sorted(d for i in dst_instances for d in i.devices)
    if src_devs != dst_devs or len(set(src_devs)) != len(src_devs):
        raise ValueError(f"source devices {src_devs} and destination devices {dst_devs} differ")
    H = layout.num_kv_heads
    for inst in src_instances + dst_instances:
        layout.heads_local(inst.tp)
    src_pages = [layout.pages_per_device(buffer_bytes, i.tp) for i in src_instances]
    dst_pages = [layout.pages_per_device(buffer_bytes, i.tp) for i in dst_instances]
    seen_dst = set()
    for (si, p), (di, q) in page_map.items():
        if not 0 <= p < src_pages[si]:
            raise ValueError(f"source page {p} of instance {si} out of range")
        if not 0 <= q < dst_pages[di]:
            raise ValueError(f"destination page {q} of instance {di} out of range (pool too small)")
        if (di, q) in seen_dst:
            raise ValueError(f"two pages map to destination page {q} of instance {di}")
        seen_dst.add((di, q))

    hb = layout.head_block_bytes
    # Per (source, destination) instance pair, where each moved head block lies does not depend on the pages:
    # head block h0 of page p is at (device, p * page_bytes + offset). One table per pair, then arithmetic.
    blocks: Dict[Tuple[int, int], Tuple[int, int, int, List[Tuple[int, int, int, int]]]] = {}

    def pair_blocks(si: int, di: int):
        src, dst = src_instances[si], dst_instances[di]
        chunk = H // max(src.tp, dst.tp)
        heads = []
        for h0 in range(0, H, chunk):
            sd, so = layout.head_location(src, 0, h0)
            dd, do = layout.head_location(dst, 0, h0)
            heads.append((sd, so, dd, do))
        return layout.page_bytes(src.tp), layout.page_bytes(dst.tp), chunk * hb, heads

    raw: List[Tuple[int, int, int, int, int]] = []
    in_place = 0
    for (si, p), (di, q) in sorted(page_map.items()):
        key = (si, di)
        if key not in blocks:
            blocks[key] = pair_blocks(si, di)
        src_pb, dst_pb, nbytes, heads = blocks[key]
        sbase, dbase = p * src_pb, q * dst_pb
        for sd, so, dd, do in heads:
            so += sbase
            do += dbase
            if sd == dd and so == do:
                in_place += nbytes
            else:
                raw.append((sd, so, dd, do, nbytes))

    # Hazards: a move whose destination overlaps a range some move reads. Such moves are staged, and
    # both ends go in one round (union-find over the hazard graph).
    n = len(raw)
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    staged = [False] * n
    srcs = [(m[0], m[1], m[1] + m[4], i) for i, m in enumerate(raw)]
    dsts = [(m[2], m[3], m[3] + m[4], i) for i, m in enumerate(raw)]
    for wi, ri in _overlapping_pairs(dsts, srcs):
        staged[wi] = True
        parent[find(wi)] = find(ri)
    components: Dict[int, List[int]] = {}
    for i in range(n):
        components.setdefault(find(i), []).append(i)

    def staged_bytes_by_device(idxs):
        out: Dict[int, int] = {}
        for i in idxs:
            if staged[i]:
                out[raw[i][2]] = out.get(raw[i][2], 0) + raw[i][4]
        return out

    rounds: List[List[int]] = []
    round_load: Dict[int, int] = {}
    min_staging = 0
    for comp in sorted(components.values(), key=min):
        load = staged_bytes_by_device(comp)
        min_staging = max([min_staging] + list(load.values()))
        fits = max_staging_bytes is None or all(
            round_load.get(d, 0) + b <= max_staging_bytes for d, b in load.items())
        if not rounds or not fits:
            rounds.append([])
            round_load = {}
        rounds[-1].extend(comp)
        for d, b in load.items():
            round_load[d] = round_load.get(d, 0) + b

    moves: List[KVMove] = []
    staging = 0
    for r, idxs in enumerate(rounds):
        idxs = sorted(idxs, key=lambda i: (staged[i], i))
        for i in idxs:
            sd, so, dd, do, nb = raw[i]
            moves.append(KVMove(sd, so, dd, do, nb, r, staged[i]))
        staging = max([staging] + list(staged_bytes_by_device(idxs).values()))
    return KVPlan(src_instances, dst_instances, dict(page_map), moves, len(rounds),
                  sum(m[4] for m in raw), in_place, staging, min_staging)


def kv_merge_plan(layout: KVLayout, buffer_bytes: int, parts: Sequence[Instance],
                  used_pages: Sequence[Iterable[int]], max_staging_bytes: Optional[int] = None) -> KVPlan:
    """Merge `parts` (sorted by device) into one instance; used_pages[i] are the used pages of parts[i]."""
    parts = tuple(sorted(parts, key=lambda i: i.base))
    if len(used_pages) != len(parts):
        raise ValueError("used_pages needs one page list per part")
    merged = Instance.of(d for p in parts for d in p.devices)
    page_map = {}
    for si, (part, pages) in enumerate(zip(parts, used_pages)):
        for p in pages:
            page_map[(si, p)] = (0, merge_page_id(p, part, merged))
    return kv_regroup_plan(layout, buffer_bytes, parts, (merged,), page_map, max_staging_bytes)


def split_page_assignment(layout: KVLayout, buffer_bytes: int, merged: Instance, parts: Sequence[Instance],
                          page_groups: Sequence[Tuple[int, Sequence[int]]],
                          first_page: Optional[Sequence[int]] = None,
                          fixed: Optional[Mapping[int, PageKey]] = None) -> Dict[int, PageKey]:
    """Where each used merged page goes on a split: page_groups are (target part index, pages) for each
    request / cached path whose pages must stay together. A page in `fixed` whose entry names its target
    part (and is in range) goes there: its KV was copied there ahead (split_precopy_slots). Any other page
    stays at its natural place (split_page_id) when that is its target part, in range and not fixed to
    another page; otherwise it takes the lowest free page id of the target part. first_page[i]: pages below
    it are reserved on part i (weights grow back into them on a split), so KV there is moved out. Raises
    ValueError when a part runs out of pages."""
    parts = tuple(parts)
    capacity = [layout.pages_per_device(buffer_bytes, p.tp) for p in parts]
    lowest = list(first_page) if first_page is not None else [0] * len(parts)
    out: Dict[int, PageKey] = {}
    taken = [set() for _ in parts]
    pending: List[Tuple[int, int]] = []
    seen: set = set()  # pages met so far (a set: the split of a large cache has tens of thousands of pages)
    natural = split_page_mapping(merged, parts)
    fixed = fixed or {}
    for target, pages in page_groups:  # the pages copied ahead first: the natural places must avoid them
        for q in pages:
            if q in seen:
                raise ValueError(f"merged page {q} appears in two groups")
            seen.add(q)
            at = fixed.get(q)
            if at is not None and at[0] == target and lowest[target] <= at[1] < capacity[target] \
                    and at[1] not in taken[target]:
                out[q] = (target, at[1])
                taken[target].add(at[1])
    for target, pages in page_groups:
        for q in pages:
            if q in out:
                continue
            nat, p = natural(q)
            if nat == target and lowest[target] <= p < capacity[target] and p not in taken[target]:
                out[q] = (target, p)
                taken[target].add(p)
            else:
                pending.append((target, q))
    next_free = list(lowest)
    for target, q in pending:
        p = next_free[target]
        while p in taken[target]:
            p += 1
        if p >= capacity[target]:
            need = sum(len(pages) for t, pages in page_groups if t == target)
            raise ValueError(f"the requests and cache assigned to devices {list(parts[target].devices)} need "
                             f"{need} KV pages, more than the {capacity[target] - lowest[target]} that instance "
                             f"would have (no free page left for the split)")
        taken[target].add(p)
        next_free[target] = p + 1
        out[q] = (target, p)
    return out


def kv_split_plan(layout: KVLayout, buffer_bytes: int, merged: Instance, parts: Sequence[Instance],
                  used_pages: Optional[Iterable[int]] = None,
                  assignment: Optional[Mapping[int, PageKey]] = None,
                  max_staging_bytes: Optional[int] = None) -> KVPlan:
    """Split `merged` into `parts`. Either used_pages (natural placement: page q -> split_page_id(q)) or an
    explicit assignment {merged page: (part index, page)} (see split_page_assignment)."""
    parts = tuple(sorted(parts, key=lambda i: i.base))
    if (used_pages is None) == (assignment is None):
        raise ValueError("give exactly one of used_pages and assignment")
    if assignment is None:
        natural = split_page_mapping(merged, parts)
        assignment = {q: natural(q) for q in used_pages}
    page_map = {(0, q): tuple(dst) for q, dst in assignment.items()}
    return kv_regroup_plan(layout, buffer_bytes, (merged,), parts, page_map, max_staging_bytes)


def split_precopy_slots(merged: Instance, parts: Sequence[Instance], free_runs: Sequence[Tuple[int, int]],
                        candidates: Sequence[Tuple[int, int]], first_page: Sequence[int], capacity: Sequence[int],
                        max_pages: int) -> Tuple[List[int], Dict[int, PageKey]]:
    """Destinations for copying a split's KV ahead, while the merged instance still serves.

    candidates: (merged page, target part index), in the order they should get a destination. free_runs: the
    merged pool's free pages as [lo, hi) runs. Returns (merged pages to reserve, {merged page: (part, page)}).

    An aligned block of S = merged.tp // min(part tp) merged pages [j*S, (j+1)*S) is the same bytes on every
    device as the pages [j*S/s, (j+1)*S/s) of each part of stride s = merged.tp // part.tp, so one free block
    gives every part S/s destination pages at once (on its own devices), none of which any used page overlaps.
    A block is used only when every part page it gives is in [first_page[i], capacity[i]) (above the part's
    weights, below its pool's end); at most max_pages merged pages are reserved, lowest blocks first, and only
    as many blocks as the candidates need."""
    parts = tuple(parts)
    strides = [merged.tp // p.tp for p in parts]
    S = max(strides)
    want = [[q for q, t in candidates if t == i] for i in range(len(parts))]
    need_blocks = max((-(-len(w) * strides[i] // S) for i, w in enumerate(want)), default=0)
    blocks: List[int] = []
    limit = min(need_blocks, max_pages // S)
    # Blocks j in [start, end) lie above every part's weights and inside every part's pool.
    start = max(-(-first_page[i] * s // S) for i, s in enumerate(strides))
    end = min((capacity[i] * s) // S for i, s in enumerate(strides))
    for lo, hi in free_runs:
        j = max(-(-lo // S), start)
        while (j + 1) * S <= hi and j < end and len(blocks) < limit:
            blocks.append(j)
            j += 1
    out: Dict[int, PageKey] = {}
    for i, s in enumerate(strides):
        slots = (p for j in blocks for p in range(j * S // s, (j + 1) * S // s))
        for q, p in zip(want[i], slots):
            out[q] = (i, p)
    return [q for j in blocks for q in range(j * S, (j + 1) * S)], out


def execute_kv_plan(plan: KVPlan, buffers: Dict[int, bytearray]) -> None:  # or lists (slices copy)
    """Reference executor (the semantics every real executor must match): applies the plan in place."""
    by_round: Dict[int, List[KVMove]] = {}
    for m in plan.moves:
        by_round.setdefault(m.round, []).append(m)
    for r in sorted(by_round):
        staging = {id(m): buffers[m.src_device][m.src_offset:m.src_offset + m.nbytes]
                   for m in by_round[r] if m.staged}
        for m in by_round[r]:
            data = staging[id(m)] if m.staged else buffers[m.src_device][m.src_offset:m.src_offset + m.nbytes]
            buffers[m.dst_device][m.dst_offset:m.dst_offset + m.nbytes] = data


# =====================================================================================================
# Weights
# =====================================================================================================
@dataclass(frozen=True)
class ParamSpec:
    name: str
    rows: int  # padded rows of the full parameter along its split dimension (a multiple of G)
    row_bytes: int  # bytes of one row (cols * dtype bytes)
    sharded: bool = True  # False: replicated (norms, ...), every rank keeps all of it


@dataclass(frozen=True)
class RowKeep:
    param: str
    start: int  # global rows [start, end)
    end: int
    old_local_start: int  # row index inside the device's tensor before
    new_local_start: int  # and after


@dataclass(frozen=True)
class RowFree:
    param: str
    old_local_start: int
    old_local_end: int
    nbytes: int


@dataclass(frozen=True)
class RowRecv:
    param: str
    start: int  # global rows [start, end)
    end: int
    src_device: int
    src_local_start: int  # row index in the peer's (old) tensor
    dst_local_start: int  # row index in this device's new tensor
    nbytes: int


@dataclass
class DeviceWeightPlan:
    device: int
    old_rank: int
    old_tp: int
    new_rank: int
    new_tp: int
    keep: List[RowKeep] = field(default_factory=list)
    free: List[RowFree] = field(default_factory=list)
    recv: List[RowRecv] = field(default_factory=list)

    @property
    def freed_bytes(self) -> int:
        return sum(f.nbytes for f in self.free)

    @property
    def received_bytes(self) -> int:
        return sum(r.nbytes for r in self.recv)


@dataclass
class WeightPlan:
    granularity: int  # G
    devices: Dict[int, DeviceWeightPlan]
    weight_bytes_moved: int  # received over links, all devices
    weight_bytes_freed: int  # returned to the KV pools, all devices
    peak_extra_bytes: int  # beyond max(old, new) footprint on any device


def _shard_rows(p: ParamSpec, G: int, tp: int, rank: int) -> Tuple[int, int]:
    rows_per_rank = p.rows // tp
    return rank * rows_per_rank, (rank + 1) * rows_per_rank


def weight_regroup_plan(params: Sequence[ParamSpec], G: int, src_instances: Sequence[Instance],
                        dst_instances: Sequence[Instance]) -> WeightPlan:
    """Per device: the rows it keeps (in place), frees, and receives (from which peer) when the
    instances change from src_instances to dst_instances over the same devices."""
    if G < 1 or G & (G - 1):
        raise ValueError(f"weight granularity G={G} must be a power of two")
    for inst in tuple(src_instances) + tuple(dst_instances):
        if G % inst.tp:
            raise ValueError(f"tp={inst.tp} exceeds the weight shard granularity G={G}")
    for p in params:
        if p.sharded and p.rows % G:
            raise ValueError(f"parameter {p.name}: {p.rows} rows are not padded to a multiple of G={G}")
    old_of = {d: i for i in src_instances for d in i.devices}
    new_of = {d: i for i in dst_instances for d in i.devices}
    if sorted(old_of) != sorted(new_of):
        raise ValueError("source and destination instances cover different devices")
    plans: Dict[int, DeviceWeightPlan] = {}
    peak = 0
    for d in sorted(old_of):
        oi, ni = old_of[d], new_of[d]
        dp = DeviceWeightPlan(d, oi.shard_rank(d), oi.tp, ni.shard_rank(d), ni.tp)
        for p in params:
            if not p.sharded:
                dp.keep.append(RowKeep(p.name, 0, p.rows, 0, 0))
                continue
            o0, o1 = _shard_rows(p, G, oi.tp, dp.old_rank)
            n0, n1 = _shard_rows(p, G, ni.tp, dp.new_rank)
            k0, k1 = max(o0, n0), min(o1, n1)
            if k0 < k1:
                dp.keep.append(RowKeep(p.name, k0, k1, k0 - o0, k0 - n0))
            for a, b in ((o0, min(o1, n0)), (max(o0, n1), o1)):  # old rows outside the new shard
                if a < b:
                    dp.free.append(RowFree(p.name, a - o0, b - o0, (b - a) * p.row_bytes))
            for a, b in ((n0, min(n1, o0)), (max(n0, o1), n1)):  # new rows outside the old shard
                # The peers that held rows [a, b) before: old instances are aligned, so look among the
                # old instance that contains this device's new instance or is contained in it.
                row = a
                while row < b:
                    src_inst = next(i for i in src_instances if i.contains(ni) or ni.contains(i))
                    per = p.rows // src_inst.tp
                    r = row // per
                    end = min(b, (r + 1) * per)
                    src_dev = src_inst.device_of_rank(r)
                    dp.recv.append(RowRecv(p.name, row, end, src_dev, row - r * per, row - n0,
                                           (end - row) * p.row_bytes))
                    row = end
        if dp.free and dp.recv:
            peak = max(peak, min(dp.freed_bytes, dp.received_bytes))
        plans[d] = dp
    moved = sum(dp.received_bytes for dp in plans.values())
    freed = sum(dp.freed_bytes for dp in plans.values())
    return WeightPlan(G, plans, moved, freed, peak)


def weight_merge_plan(params: Sequence[ParamSpec], G: int, parts: Sequence[Instance]) -> WeightPlan:
    merged = Instance.of(d for p in parts for d in p.devices)
    return weight_regroup_plan(params, G, parts, (merged,))


def weight_split_plan(params: Sequence[ParamSpec], G: int, merged: Instance,
                      parts: Sequence[Instance]) -> WeightPlan:
    return weight_regroup_plan(params, G, (merged,), parts)


# ------------------------------------------------------------------------------------------------------
# Weight prefetch ahead of a split (the rows a part lacks, fetched while the merged instance serves)
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StagedRows:
    """Rows of `param` that `dst_device` fetches ahead of a split: the sender reads them from its current
    shard, the receiver writes them to its staging region and copies them into place in the pause."""
    param: str
    dst_device: int
    src_device: int
    src_local_start: int  # first row in the sender's current (old) tensor
    dst_local_start: int  # first row in the receiver's new tensor
    rows: int
    staging_offset: int  # byte offset inside the receiver's staging region
    nbytes: int


@dataclass
class WeightPrefetchPlan:
    chunks: List[List[StagedRows]]  # posted one chunk at a time; a chunk receives <= chunk_bytes per device
    staging_bytes: Dict[int, int]  # device -> bytes of its staging region (aligned pieces, end to end)

    @property
    def max_staging_bytes(self) -> int:
        return max(self.staging_bytes.values(), default=0)

    @property
    def bytes_fetched(self) -> int:
        return sum(s.nbytes for c in self.chunks for s in c)


def weight_prefetch_plan(plan: WeightPlan, chunk_bytes: int, align: int = 64) -> WeightPrefetchPlan:
    """Cut every device's received rows (`plan`, a split's weight plan) into pieces of at most chunk_bytes
    (at least one row), place each at an `align`-ed offset of its receiver's staging region, and group the
    pieces into chunks that receive at most chunk_bytes per device (a piece never straddles two chunks)."""
    if chunk_bytes <= 0 or align <= 0:
        raise ValueError(f"chunk_bytes ({chunk_bytes}) and align ({align}) must be positive")
    per_device: Dict[int, List[StagedRows]] = {d: [] for d in plan.devices}
    staging: Dict[int, int] = {d: 0 for d in plan.devices}
    for d, dp in sorted(plan.devices.items()):
        pieces = per_device[d]
        for rv in dp.recv:
            rows = rv.end - rv.start
            row_bytes = rv.nbytes // rows
            per_piece = max(1, chunk_bytes // row_bytes)
            for r in range(0, rows, per_piece):
                n = min(per_piece, rows - r)
                off = -(-staging[d] // align) * align
                pieces.append(StagedRows(rv.param, d, rv.src_device, rv.src_local_start + r,
                                         rv.dst_local_start + r, n, off, n * row_bytes))
                staging[d] = off + n * row_bytes
    # Round-robin over the receivers: every chunk keeps all devices' links busy, not one device's at a time.
    longest = max((len(v) for v in per_device.values()), default=0)
    pieces = [v[i] for i in range(longest) for _, v in sorted(per_device.items()) if i < len(v)]
    chunks: List[List[StagedRows]] = []
    load: Dict[int, int] = {}
    for piece in pieces:
        if not chunks or (load.get(piece.dst_device, 0) and load[piece.dst_device] + piece.nbytes > chunk_bytes):
            chunks.append([])
            load = {}
        chunks[-1].append(piece)
        load[piece.dst_device] = load.get(piece.dst_device, 0) + piece.nbytes
    return WeightPrefetchPlan(chunks, staging)
