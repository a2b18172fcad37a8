"""Executes a Gyges transformation plan on one device: KV blocks and weight rows over the group's links.

    gyges.plans.KVPlan      --execute_kv_plan-->      bytes of the flat KV buffer moved between devices
                                                       (P2P isend/irecv on the device group, one message per
                                                       peer per round, sources snapshotted at round start)
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
from typing import Dict, List

import torch
import torch.distributed as dist

from gyges.plans import KVPlan, ParamSpec, WeightPlan
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


def kv_flat_bytes(pool: HeadCentricKVPool) -> torch.Tensor:
    """The pool's storage as one uint8 tensor [buffer_bytes] (a view, no copy)."""
    return pool.kv_buffer.view(-1).view(torch.uint8)


def execute_kv_plan(plan: KVPlan, me: int, flat: torch.Tensor, device_group, stats: RegroupStats) -> None:
    """Apply this device's side of `plan` to its flat KV buffer (global ranks = device ids)."""
    t0 = time.perf_counter()
    for r, moves in enumerate(plan.rounds()):
        out_moves: Dict[int, List] = {}  # dst device -> moves this device sends, plan order
        in_moves: Dict[int, List] = {}  # src device -> moves this device receives
        local = []
        for m in moves:
            if m.src_device == me and m.dst_device == me:
                local.append(m)
            elif m.src_device == me:
                out_moves.setdefault(m.dst_device, []).append(m)
            elif m.dst_device == me:
                in_moves.setdefault(m.src_device, []).append(m)
        # Snapshot every source range first: moves of one round read the bytes as they were at its start.
        local_src = gather_blocks(flat, [m.src_offset for m in local], [m.nbytes for m in local])
        send_bufs = {d: gather_blocks(flat, [m.src_offset for m in ms], [m.nbytes for m in ms])
                     for d, ms in out_moves.items()}
        recv_bufs = {s: torch.empty(sum(m.nbytes for m in ms), dtype=torch.uint8) for s, ms in in_moves.items()}
        staging = local_src.numel() + sum(b.numel() for b in send_bufs.values()) + \
            sum(b.numel() for b in recv_bufs.values())
        stats.kv_staging_peak_bytes = max(stats.kv_staging_peak_bytes, staging)
        works = [dist.isend(buf, dst=d, group=device_group, tag=r) for d, buf in sorted(send_bufs.items())]
        works += [dist.irecv(buf, src=s, group=device_group, tag=r) for s, buf in sorted(recv_bufs.items())]
        for w in works:
            w.wait()
        scatter_blocks(flat, [m.dst_offset for m in local], [m.nbytes for m in local], local_src)
        for s, ms in in_moves.items():
            scatter_blocks(flat, [m.dst_offset for m in ms], [m.nbytes for m in ms], recv_bufs[s])
        stats.kv_bytes_sent += sum(b.numel() for b in send_bufs.values())
        stats.kv_bytes_local += sum(m.nbytes for m in local)
    stats.kv_seconds += time.perf_counter() - t0


def _uniform_block(flat: torch.Tensor, offsets: List[int], sizes: List[int]) -> int:
    """The common block size when every range is one aligned block of it (then one indexed copy moves them
    all), else 0."""
    if not sizes:
        return 0
    b = sizes[0]
    if b == 0 or flat.numel() % b or any(n != b for n in sizes) or any(o % b for o in offsets):
        return 0
    return b


def gather_blocks(flat: torch.Tensor, offsets: List[int], sizes: List[int]) -> torch.Tensor:
    """Concatenated copy of the byte ranges [offsets[i], offsets[i] + sizes[i]) of `flat`."""
    b = _uniform_block(flat, offsets, sizes)
    if b:
        idx = torch.tensor([o // b for o in offsets], dtype=torch.int64, device=flat.device)
        return flat.view(-1, b)[idx].reshape(-1)  # [len(offsets) * b] one gather
    if not sizes:
        return torch.empty(0, dtype=torch.uint8, device=flat.device)
    return torch.cat([flat[o:o + n] for o, n in zip(offsets, sizes)])


def scatter_blocks(flat: torch.Tensor, offsets: List[int], sizes: List[int], data: torch.Tensor) -> None:
    """Write `data` (ranges back to back) into the byte ranges of `flat`."""
    b = _uniform_block(flat, offsets, sizes)
    if b:
        idx = torch.tensor([o // b for o in offsets], dtype=torch.int64, device=flat.device)
        flat.view(-1, b)[idx] = data.view(-1, b)  # one scatter
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
                    new_model: torch.nn.Module, device_group, stats: RegroupStats) -> None:
    """Regroup this device's weights inside its arena and bind `new_model` (meta) to them.

    Merge (every new shard inside the old one): pack each kept slice to the front, in offset order.
    Split (every old shard inside the new one): move each kept block up to its new place, last parameter
    first, then receive the missing rows from the peers directly into place (the peers send from their
    own moved blocks). The KV that lived where the weights grow was moved out by the split's KV plan.
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
        sends = [(dev, rv) for dev, dp in sorted(plan.devices.items()) for rv in dp.recv if rv.src_device == me]
        for tag, (name, _) in enumerate(old_params):
            target = new_params[name]
            keep = keeps[name]
            works = []
            for dev, rv in sends:
                if rv.param == name:
                    at = keep.new_local_start + (rv.src_local_start - keep.old_local_start)
                    works.append(dist.isend(target.data[at:at + rv.end - rv.start], dst=dev, group=device_group,
                                            tag=tag))
            for rv in mine.recv:
                if rv.param == name:
                    works.append(dist.irecv(target.data[rv.dst_local_start:rv.dst_local_start + rv.end - rv.start],
                                            src=rv.src_device, group=device_group, tag=tag))
                    stats.weight_bytes_received += rv.nbytes
            for w in works:
                w.wait()
    stats.weight_bytes_freed += max(0, old_end - new_end)
    stats.weight_seconds += time.perf_counter() - t0


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
