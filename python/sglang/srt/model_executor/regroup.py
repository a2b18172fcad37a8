"""Executes a Gyges transformation plan on one device: KV blocks and weight rows over the group's links.

    gyges.plans.KVPlan      --execute_kv_plan-->      bytes of the flat KV buffer moved between devices
                                                       (P2P isend/irecv on the device group, one message per
                                                       peer per round, sources snapshotted at round start)
    gyges.plans.WeightPlan  --regroup_weights-->      each sharded parameter replaced by its new shard: kept
                                                       rows in place (sliced), missing rows received from peers
    ModelRunner             --rebind_runner-->        model rebuilt on the new TPGroup (meta device, no
                                                       allocation) around the regrouped tensors; KV pool
                                                       re-viewed at the new page size over the same bytes

Every device of the transformation runs the same plan in the same order, so messages between two
devices match by order (one tag per round / parameter).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist

from gyges.plans import KVPlan, ParamSpec, WeightPlan
from sglang.srt.distributed.parallel_state import TPGroup
from sglang.srt.mem_cache.kv_pool import HeadCentricKVPool


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
        local_src = [flat[m.src_offset:m.src_offset + m.nbytes].clone() for m in local]
        send_bufs = {d: torch.cat([flat[m.src_offset:m.src_offset + m.nbytes] for m in ms]) for d, ms in out_moves.items()}
        recv_bufs = {s: torch.empty(sum(m.nbytes for m in ms), dtype=torch.uint8) for s, ms in in_moves.items()}
        staging = sum(b.numel() for b in local_src) + sum(b.numel() for b in send_bufs.values()) + \
            sum(b.numel() for b in recv_bufs.values())
        stats.kv_staging_peak_bytes = max(stats.kv_staging_peak_bytes, staging)
        works = [dist.isend(buf, dst=d, group=device_group, tag=r) for d, buf in sorted(send_bufs.items())]
        works += [dist.irecv(buf, src=s, group=device_group, tag=r) for s, buf in sorted(recv_bufs.items())]
        for w in works:
            w.wait()
        for m, data in zip(local, local_src):
            flat[m.dst_offset:m.dst_offset + m.nbytes].copy_(data)
        for s, ms in in_moves.items():
            off = 0
            for m in ms:
                flat[m.dst_offset:m.dst_offset + m.nbytes].copy_(recv_bufs[s][off:off + m.nbytes])
                off += m.nbytes
        stats.kv_bytes_sent += sum(b.numel() for b in send_bufs.values())
        stats.kv_bytes_local += sum(m.nbytes for m in local)
    stats.kv_seconds += time.perf_counter() - t0


def unique_parameters(model: torch.nn.Module) -> List[Tuple[str, torch.nn.Parameter]]:
    """(name, parameter) in a fixed order, tied parameters once."""
    return list(model.named_parameters(remove_duplicate=True))


def param_specs(old_model: torch.nn.Module, new_model: torch.nn.Module, old_tp: int) -> List[ParamSpec]:
    """ParamSpecs for the weight plan: a parameter is sharded iff its first dimension changes with TP."""
    new_params = dict(new_model.named_parameters(remove_duplicate=True))
    specs = []
    for name, p in unique_parameters(old_model):
        q = new_params[name]
        row_bytes = p[0].numel() * p.element_size() if p.dim() > 1 else p.element_size()
        sharded = tuple(q.shape) != tuple(p.shape)
        specs.append(ParamSpec(name, p.shape[0] * old_tp if sharded else p.shape[0], row_bytes, sharded))
    return specs


def regroup_weights(plan: WeightPlan, me: int, old_model: torch.nn.Module, new_model: torch.nn.Module,
                    device_group, stats: RegroupStats) -> None:
    """Give every parameter of `new_model` (built on the meta device) its regrouped tensor."""
    t0 = time.perf_counter()
    mine = plan.devices[me]
    keeps = {k.param: k for k in mine.keep}
    recvs: Dict[str, List] = {}
    for rv in mine.recv:
        recvs.setdefault(rv.param, []).append(rv)
    sends: Dict[str, List[Tuple[int, object]]] = {}  # param -> [(dst device, RowRecv)]
    for dev, dp in sorted(plan.devices.items()):
        for rv in dp.recv:
            if rv.src_device == me:
                sends.setdefault(rv.param, []).append((dev, rv))
    new_params = dict(new_model.named_parameters(remove_duplicate=True))
    replacements: Dict[int, torch.nn.Parameter] = {}  # id(meta parameter) -> regrouped parameter
    for tag, (name, old) in enumerate(unique_parameters(old_model)):
        target = new_params[name]
        old_data = old.data
        keep = keeps.get(name)
        rows_new = target.shape[0]
        works = []
        for dst, rv in sends.get(name, []):
            rows = rv.end - rv.start
            works.append(dist.isend(old_data[rv.src_local_start:rv.src_local_start + rows].contiguous(), dst=dst,
                                    group=device_group, tag=tag))
        if tuple(target.shape) == tuple(old_data.shape) and keep is not None and keep.new_local_start == 0 \
                and keep.old_local_start == 0:
            new_data = old_data  # replicated (or unchanged): nothing to do
        elif not recvs.get(name) and keep is not None:
            # Merge: the new shard is a slice of the old one; copy it out so the old storage is freed.
            new_data = old_data[keep.old_local_start:keep.old_local_start + rows_new].clone()
            stats.weight_transient_peak_bytes = max(stats.weight_transient_peak_bytes,
                                                    new_data.numel() * new_data.element_size())
        else:
            # Split: grow to the new shard, keep our rows, receive the rest.
            new_data = torch.empty(tuple(target.shape), dtype=old_data.dtype, device=old_data.device)
            stats.weight_transient_peak_bytes = max(stats.weight_transient_peak_bytes,
                                                    new_data.numel() * new_data.element_size())
            if keep is not None:
                n = keep.end - keep.start
                new_data[keep.new_local_start:keep.new_local_start + n].copy_(
                    old_data[keep.old_local_start:keep.old_local_start + n])
            for rv in recvs.get(name, []):
                rows = rv.end - rv.start
                buf = torch.empty((rows,) + tuple(target.shape[1:]), dtype=old_data.dtype, device=old_data.device)
                works.append((dist.irecv(buf, src=rv.src_device, group=device_group, tag=tag), buf, rv))
        for w in works:
            if isinstance(w, tuple):
                w[0].wait()
                buf, rv = w[1], w[2]
                new_data[rv.dst_local_start:rv.dst_local_start + buf.shape[0]].copy_(buf)
                stats.weight_bytes_received += buf.numel() * buf.element_size()
            else:
                w.wait()
        replacements[id(target)] = torch.nn.Parameter(new_data, requires_grad=False)
    # Install (tied parameters appear in several modules: replace every reference).
    for module in new_model.modules():
        for leaf, param in list(module._parameters.items()):
            if param is not None and id(param) in replacements:
                module._parameters[leaf] = replacements[id(param)]
    stats.weight_bytes_freed += mine.freed_bytes
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
    flat = kv_flat_bytes(pool)
    page_bytes = HeadCentricKVPool.page_bytes(pool.page_size, local_kv_heads, pool.num_layers, pool.head_dim,
                                              pool.dtype)
    num_pages = flat.numel() // page_bytes
    new = HeadCentricKVPool.__new__(HeadCentricKVPool)
    new.num_pages, new.page_size, new.local_kv_heads = num_pages, pool.page_size, local_kv_heads
    new.num_layers, new.head_dim, new.dtype, new.device = pool.num_layers, pool.head_dim, pool.dtype, pool.device
    # [num_pages, local_kv_heads, num_layers, 2, page_size, head_dim] over the same storage
    new.kv_buffer = flat[:num_pages * page_bytes].view(pool.dtype).view(
        num_pages, local_kv_heads, pool.num_layers, 2, pool.page_size, pool.head_dim)
    return new


def new_model_config(model_config, tp_size: int):
    return dataclasses.replace(model_config, tp_size=tp_size)
