"""Executes a Gyges transformation plan on one device: KV blocks and weight rows over the group's links.

    gyges.plans.KVPlan      --execute_kv_plan-->      bytes of the flat KV buffer moved between devices
                                                       (P2P on the device group: contiguous page runs
                                                       coalesced, long runs sent from / received into the
                                                       pool directly, short ones packed per peer; rounds
                                                       pipelined ROUNDS_IN_FLIGHT deep)
    gyges.plans.WeightPlan  --regroup_weights-->      inside the device's WeightStore arena: merge packs the
                                                       kept slices to the front (the rest becomes KV pages);
                                                       split moves them up and receives the missing rows
    ModelRunner.rebind                                model rebuilt on the new TPGroup (meta device, no
                                                       allocation) over the regrouped arena; KV pool
                                                       re-viewed at the new page size over the same bytes

Every device of the transformation runs the same plan in the same order, so messages between two
devices match by order (one tag per round / parameter).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from gyges.plans import KVLayout, KVPlan, ParamSpec, StagedRows, WeightPlan
from sglang.srt.distributed.parallel_state import TPGroup
from sglang.srt.mem_cache.kv_pool import HeadCentricKVPool
from sglang.srt.model_executor.weight_store import WeightStore, packed_layout, unique_parameters


@dataclass
class RegroupStats:
    """What one device measured while executing its part of a transformation."""

    kv_bytes_sent: int = 0
    kv_bytes_local: int = 0
    kv_seconds: float = 0.0
    kv_staging_peak_bytes: int = 0
    weight_bytes_received: int = 0
    weight_bytes_freed: int = 0
    weight_seconds: float = 0.0
    weight_transient_peak_bytes: int = 0
    weight_bytes_staged: int = 0  # rows a split fetched ahead, copied into place from the staging region


def kv_flat_bytes(pool: HeadCentricKVPool) -> torch.Tensor:
    """The pool's storage as one uint8 tensor [buffer_bytes] (a view, no copy)."""
    return pool.kv_buffer.view(-1).view(torch.uint8)


def pool_kv_layout(model_config, pool: HeadCentricKVPool) -> KVLayout:
    """The plans' view of the pool: its KV heads are the padded ones (gyges.heads), so every TP degree dividing G
    splits them evenly."""
    return KVLayout(model_config.heads.padded_kv_heads, model_config.num_layers, pool.page_size,
                    model_config.head_dim, torch.empty((), dtype=model_config.dtype).element_size())


# A contiguous run of KV at least this long is sent straight from the pool and, when nothing reads its destination,
# received straight into it; shorter runs to one peer are packed into one message (one indexed gather / scatter).
DIRECT_MIN_BYTES = 256 << 10
# Rounds posted before the oldest one is finished (its staged data written into place): the link keeps busy
# while the host copies. Staging: this many rounds' slabs.
ROUNDS_IN_FLIGHT = 4


@dataclass
class _Run:
    """Coalesced moves of one round between one (src, dst) device pair: contiguous on both sides."""

    src_offset: int
    dst_offset: int
    nbytes: int
    staged: bool  # its destination overlaps a range the plan reads: written only after the round's reads


@dataclass
class _Message:
    """One isend/irecv of a round: a direct run (a pool slice) or several short runs packed back to back."""

    peer: int
    runs: List[_Run]
    direct: bool

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.runs)


@dataclass
class _RoundInFlight:
    """What a posted round still has to do once its transfers complete."""

    works: list
    writes: List[tuple]  # (runs, buffer): staged data to put into the pool after the round's reads finished
    staging_bytes: int


def coalesce_runs(moves) -> List[_Run]:
    """Moves of one device pair (any order) -> runs, sorted by source offset, merging a move into the previous
    run when both its source and destination continue it (and staging agrees)."""
    runs: List[_Run] = []
    for m in sorted(moves, key=lambda m: m.src_offset):
        last = runs[-1] if runs else None
        if last is not None and last.staged == m.staged and last.src_offset + last.nbytes == m.src_offset and \
                last.dst_offset + last.nbytes == m.dst_offset:
            last.nbytes += m.nbytes
        else:
            runs.append(_Run(m.src_offset, m.dst_offset, m.nbytes, m.staged))
    return runs


def round_messages(runs: List[_Run], peer: int) -> List[_Message]:
    """The messages one device pair exchanges in a round (computed identically on both ends): every run of at
    least DIRECT_MIN_BYTES alone, then the short ones packed into one message."""
    direct = [_Message(peer, [r], True) for r in runs if r.nbytes >= DIRECT_MIN_BYTES]
    short = [r for r in runs if r.nbytes < DIRECT_MIN_BYTES]
    return direct + ([_Message(peer, short, False)] if short else [])


def _post(ops: List[tuple], device_group) -> list:
    """ops: (isend|irecv, tensor, peer, tag). NCCL gets one batch_isend_irecv (one grouped launch); other backends
    (gloo) take the point-to-point calls one by one."""
    if not ops:
        return []
    if dist.get_backend(device_group) == "nccl":
        return dist.batch_isend_irecv([dist.P2POp(op, t, peer, device_group, tag) for op, t, peer, tag in ops])
    return [op(t, peer, group=device_group, tag=tag) for op, t, peer, tag in ops]


class StagingSlabs:
    """Reusable staging buffers on the pool's device, one per round in flight (round r uses slab r % n: round
    r + n starts only after round r finished). Reuse matters on CPU: fresh pages fault on first write."""

    def __init__(self, device: torch.device, n: int):
        self.device = device
        self.slabs: List[torch.Tensor] = [torch.empty(0, dtype=torch.uint8, device=device) for _ in range(n)]

    def take(self, parity: int, nbytes: int) -> torch.Tensor:
        if self.slabs[parity].numel() < nbytes:
            self.slabs[parity] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)  # [nbytes] staging
        return self.slabs[parity][:nbytes]

    @property
    def nbytes(self) -> int:
        return sum(x.numel() for x in self.slabs)


def _start_round(moves, me: int, flat: torch.Tensor, device_group, tag: int, stats: RegroupStats,
                 slabs: StagingSlabs) -> _RoundInFlight:
    """Post one round: direct runs are sent from / received into the pool, short runs packed; staged destinations
    receive into staging (slab tag % ROUNDS_IN_FLIGHT, on flat.device) that _finish_round writes into place."""
    out_moves: Dict[int, List] = {}
    in_moves: Dict[int, List] = {}
    local = []
    for m in moves:
        if m.src_device == me and m.dst_device == me:
            local.append(m)
        elif m.src_device == me:
            out_moves.setdefault(m.dst_device, []).append(m)
        elif m.dst_device == me:
            in_moves.setdefault(m.src_device, []).append(m)
    local_runs = coalesce_runs(local)
    sends = [msg for dst, ms in sorted(out_moves.items()) for msg in round_messages(coalesce_runs(ms), dst)]
    recvs = [msg for src, ms in sorted(in_moves.items()) for msg in round_messages(coalesce_runs(ms), src)]
    staged_recv = [not (msg.direct and not msg.runs[0].staged) for msg in recvs]
    need = sum(r.nbytes for r in local_runs if r.staged) + sum(m.nbytes for m in sends if not m.direct) + \
        sum(m.nbytes for m, st in zip(recvs, staged_recv) if st)
    slab = slabs.take(tag % len(slabs.slabs), need)
    pos = 0

    def carve(n: int) -> torch.Tensor:
        nonlocal pos
        pos += n
        return slab[pos - n:pos]

    writes: List[tuple] = []
    # Local runs: staged ones read now and written after the round's reads; the others copy at once (their
    # destination is read by no move, their source is written only by this round's staged writes, later).
    for run in local_runs:
        src = flat[run.src_offset:run.src_offset + run.nbytes]
        if run.staged:
            snap = carve(run.nbytes)
            snap.copy_(src)
            writes.append(([run], snap))
        else:
            flat[run.dst_offset:run.dst_offset + run.nbytes].copy_(src)
        stats.kv_bytes_local += run.nbytes
    ops = []
    for msg in sends:
        if msg.direct:
            r = msg.runs[0]
            buf = flat[r.src_offset:r.src_offset + r.nbytes]  # no copy
        else:
            buf = gather_blocks(flat, [r.src_offset for r in msg.runs], [r.nbytes for r in msg.runs],
                                out=carve(msg.nbytes))
        ops.append((dist.isend, buf, msg.peer, tag))
        stats.kv_bytes_sent += msg.nbytes
    for msg, staged in zip(recvs, staged_recv):
        if staged:
            buf = carve(msg.nbytes)
            writes.append((msg.runs, buf))
        else:
            r = msg.runs[0]
            buf = flat[r.dst_offset:r.dst_offset + r.nbytes]  # straight into the pool
        ops.append((dist.irecv, buf, msg.peer, tag))
    return _RoundInFlight(_post(ops, device_group), writes, need)


def _finish_round(rnd: _RoundInFlight, flat: torch.Tensor, waited: bool = False) -> None:
    """Wait for the round's transfers (unless the caller already did: a gloo Work's second wait() hangs) and
    write its staged data into place."""
    if not waited:
        for w in rnd.works:
            w.wait()
    for runs, buf in rnd.writes:
        scatter_blocks(flat, [r.dst_offset for r in runs], [r.nbytes for r in runs], buf)


def executor_rounds(plan: KVPlan, max_round_bytes: int) -> List[List]:
    """The plan's rounds as the executor runs them (the same list on every device): each plan round's unstaged
    moves first, cut into chunks in which no device sends plus receives more than max_round_bytes (a chunk
    holds at least one move), then its staged moves as one round (the plan bounds their bytes). Unstaged moves
    may run early: their destinations are read by no move, and their sources are written only by the staged
    moves of their own round, which run after them."""
    out: List[List] = []
    for moves in plan.rounds():
        chunk: List = []
        load: Dict[int, int] = {}
        for m in moves:
            if m.staged:
                continue
            ends = {m.src_device, m.dst_device}
            if chunk and any(load.get(d, 0) + m.nbytes > max_round_bytes for d in ends):
                out.append(chunk)
                chunk, load = [], {}
            chunk.append(m)
            for d in ends:
                load[d] = load.get(d, 0) + m.nbytes
        if chunk:
            out.append(chunk)
        staged = [m for m in moves if m.staged]
        if staged:
            out.append(staged)
    return out


def execute_kv_plan(plan: KVPlan, me: int, flat: torch.Tensor, device_group, stats: RegroupStats,
                    max_round_bytes: Optional[int] = None) -> None:
    """Apply this device's side of `plan` to its flat KV buffer (global ranks = device ids).

    Rounds (executor_rounds; max_round_bytes defaults to the plan's staging bytes, at least 1 MiB) are pipelined
    ROUNDS_IN_FLIGHT deep: the next rounds are grouped, packed and posted before round r's staged data is
    written into place. That is safe because the plan puts every hazard (a destination overlapping a source)
    inside one plan round, so two rounds never touch each other's ranges except as executor_rounds allows.
    Peak staging: ROUNDS_IN_FLIGHT slabs (StagingSlabs), reused from round to round.
    """
    t0 = time.perf_counter()
    cap = max_round_bytes if max_round_bytes is not None else max(plan.staging_bytes, 1 << 20)
    in_flight: List[_RoundInFlight] = []
    slabs = StagingSlabs(flat.device, ROUNDS_IN_FLIGHT)
    for r, moves in enumerate(executor_rounds(plan, cap)):
        in_flight.append(_start_round(moves, me, flat, device_group, r, stats, slabs))
        stats.kv_staging_peak_bytes = max(stats.kv_staging_peak_bytes, slabs.nbytes)
        if len(in_flight) == ROUNDS_IN_FLIGHT:
            _finish_round(in_flight.pop(0), flat)
    for rnd in in_flight:
        _finish_round(rnd, flat)
    stats.kv_seconds += time.perf_counter() - t0


# Up to this many ranges (or ranges this long on average) are copied one by one with copy_ (a memcpy each);
# more, shorter uniform ranges take one indexed copy over the widest word the ranges align to.
_LOOP_MAX_RANGES = 64
_LOOP_MIN_AVG_BYTES = 64 << 10


def _uniform_words(flat: torch.Tensor, offsets: List[int], sizes: List[int],
                   packed: torch.Tensor) -> Optional[torch.Tensor]:
    """flat viewed as [blocks, words of the block] when every range is one aligned block of a common size,
    in the widest integer dtype dividing everything, `packed` (the ranges back to back) included (CPU indexed
    copies of uint8 run ~8x slower than of int64), else None."""
    if not sizes:
        return None
    b = sizes[0]
    if b == 0 or flat.numel() % b or any(n != b for n in sizes) or any(o % b for o in offsets):
        return None
    for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        w = dtype.itemsize
        if b % w == 0 and flat.storage_offset() % w == 0 and packed.storage_offset() % w == 0:
            return flat.view(dtype).view(-1, b // w)
    return None


def _copy_one_by_one(sizes: List[int]) -> bool:
    return len(sizes) <= _LOOP_MAX_RANGES or sum(sizes) >= _LOOP_MIN_AVG_BYTES * len(sizes)


def gather_blocks(flat: torch.Tensor, offsets: List[int], sizes: List[int],
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Concatenated copy of the byte ranges [offsets[i], offsets[i] + sizes[i]) of `flat` (into `out`, uint8
    [sum(sizes)], when given)."""
    total = sum(sizes)
    if out is None:
        out = torch.empty(total, dtype=torch.uint8, device=flat.device)  # [sum(sizes)]
    words = None if _copy_one_by_one(sizes) else _uniform_words(flat, offsets, sizes, out)
    if words is not None:
        b = sizes[0]
        idx = torch.tensor([o // b for o in offsets], dtype=torch.int64, device=flat.device)
        torch.index_select(words, 0, idx, out=out.view(words.dtype).view(len(offsets), -1))  # one gather
        return out
    pos = 0
    for o, n in zip(offsets, sizes):
        out[pos:pos + n].copy_(flat[o:o + n])
        pos += n
    return out


def scatter_blocks(flat: torch.Tensor, offsets: List[int], sizes: List[int], data: torch.Tensor) -> None:
    """Write `data` (ranges back to back) into the byte ranges of `flat`."""
    words = None if _copy_one_by_one(sizes) else _uniform_words(flat, offsets, sizes, data)
    if words is not None:
        b = sizes[0]
        idx = torch.tensor([o // b for o in offsets], dtype=torch.int64, device=flat.device)
        words.index_copy_(0, idx, data.view(words.dtype).view(len(offsets), -1))  # one scatter
        return
    pos = 0
    for o, n in zip(offsets, sizes):
        flat[o:o + n].copy_(data[pos:pos + n])
        pos += n


def param_specs(old_model: torch.nn.Module, new_model: torch.nn.Module, old_tp: int) -> List[ParamSpec]:
    """ParamSpecs for the weight plan: a parameter is sharded iff its first dimension changes with TP."""
    new_params = dict(unique_parameters(new_model))
    specs = []
    for name, p in unique_parameters(old_model):
        q = new_params[name]
        sharded = tuple(q.shape) != tuple(p.shape)
        specs.append(ParamSpec(name, p.shape[0] * old_tp if sharded else p.shape[0], _row_bytes(p), sharded))
    return specs


def _row_bytes(p: torch.Tensor) -> int:
    return (p[0].numel() if p.dim() > 1 else 1) * p.element_size()


def regroup_weights(plan: WeightPlan, me: int, store: WeightStore, old_model: torch.nn.Module,
                    new_model: torch.nn.Module, device_group, stats: RegroupStats, prefetched=None) -> None:
    """Regroup this device's weights inside its arena and bind `new_model` (meta) to them.

    Merge (every new shard inside the old one): pack each kept slice to the front, in offset order.
    Split (every old shard inside the new one): move each kept block up to its new place, last parameter
    first, then receive the missing rows from the peers directly into place (the peers send from their
    own moved blocks). The KV that lived where the weights grow was moved out by the split's KV plan.
    prefetched (a split's completed managers.weight_prefetch.WeightPrefetch, on every device alike): the missing
    rows were fetched while serving into a staging region above the new weights; they are copied into place
    on the device and nothing crosses the links.
    """
    t0 = time.perf_counter()
    mine = plan.devices[me]
    keeps = {k.param: k for k in mine.keep}
    old_params = unique_parameters(old_model)
    new_offsets, new_end = packed_layout(new_model)
    growing = any(dp.recv for dp in plan.devices.values())
    order = list(reversed(old_params)) if growing else old_params
    for name, old in order:
        keep = keeps[name]
        rb = _row_bytes(old)
        src = store.offsets[name] + keep.old_local_start * rb
        dst = new_offsets[name] + keep.new_local_start * rb
        staged = store.move(src, dst, (keep.end - keep.start) * rb)
        stats.weight_transient_peak_bytes = max(stats.weight_transient_peak_bytes, staged)
    old_end = store.weights_end
    store.bind(new_model, new_offsets, new_end)
    new_params = dict(unique_parameters(new_model))  # now views of the arena
    if growing:
        transfers = _received_rows(plan)
        if prefetched is not None:
            stats.weight_bytes_staged += prefetched.copy_into_place(new_params)
            transfers = prefetched.pause_pieces  # rows the staging region had no room for
        # Every parameter's rows are posted at once (one tag per parameter, pieces in one order on every
        # device) and waited for together: the sends read the blocks moved above, the receives write rows no
        # send reads, so nothing orders them.
        tags = {name: tag for tag, (name, _) in enumerate(old_params)}
        ops = []
        for t in transfers:
            target = new_params[t.param]
            if t.src_device == me:
                keep = keeps[t.param]
                at = keep.new_local_start + (t.src_local_start - keep.old_local_start)
                ops.append((dist.isend, target.data[at:at + t.rows], t.dst_device, tags[t.param]))
            if t.dst_device == me:
                ops.append((dist.irecv, target.data[t.dst_local_start:t.dst_local_start + t.rows], t.src_device,
                            tags[t.param]))
                stats.weight_bytes_received += t.nbytes
        for w in _post(ops, device_group):
            w.wait()
    stats.weight_bytes_freed += max(0, old_end - new_end)
    stats.weight_seconds += time.perf_counter() - t0


def _received_rows(plan: WeightPlan) -> List[StagedRows]:
    """Every device's received rows as transfers (rows [start, end) of a RowRecv: one piece each)."""
    return [StagedRows(rv.param, dev, rv.src_device, rv.src_local_start, rv.dst_local_start, rv.end - rv.start, -1,
                       rv.nbytes) for dev, dp in sorted(plan.devices.items()) for rv in dp.recv]


def build_model_on_meta(model_cls, model_config, tp_group: TPGroup) -> torch.nn.Module:
    return model_cls(model_config, tp_group, torch.device("meta")).eval()


def adopt_buffers(old_model: torch.nn.Module, new_model: torch.nn.Module) -> None:
    """Buffers (rotary caches) do not depend on TP: the new model uses the old model's tensors."""
    for name, buf in old_model.named_buffers():
        module_path, _, leaf = name.rpartition(".")
        module = new_model.get_submodule(module_path) if module_path else new_model
        module._buffers[leaf] = buf


def reshape_pool(pool: HeadCentricKVPool, local_kv_heads: int) -> HeadCentricKVPool:
    """The same bytes viewed as pages of `local_kv_heads` heads (more, smaller pages after a merge)."""
    return HeadCentricKVPool.over_bytes(kv_flat_bytes(pool), pool.page_size, local_kv_heads, pool.num_layers,
                                        pool.head_dim, pool.dtype)


def new_model_config(model_config, tp_size: int):
    return dataclasses.replace(model_config, tp_size=tp_size)
