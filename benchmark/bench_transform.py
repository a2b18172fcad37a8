"""Gyges merge (2 x TP1 -> TP2) and split (TP2 -> 2 x TP1): time, bytes and peak memory against the bounds
and against the naive ways (token-major KV gather, unpadded weight re-slicing, restart with reload).

Two parts:

1. engine    the tiny demo model through the real `sglang.Engine(dp_size=2, enable_gyges=True, device="cpu")`:
             --engine-prompts prompts of --engine-prompt-len tokens are prefilled and stay in the radix cache,
             then `engine.gyges_transform([0, 1], 2)` / `([0, 1], 1)` alternate --repeats times; the table
             shows the returned breakdown of the fastest merge and split (kv/weight bytes and ms, pause,
             peak extra bytes as the workers report them).

2. executor  per model shape (tiny demo, Llama-3-8B, Qwen2.5-32B), 2 processes (torch.multiprocessing.spawn,
             gloo over tcp://127.0.0.1, 1 torch thread each) run the project's own executor on real buffers:
    KV       a flat KV buffer per device holding --kv-tokens tokens (per TP1 instance) of used pages, with ALL
             the model's layers (head-centric pages [heads][layers][K|V][page_size][head_dim]);
      gyges        gyges.plans.kv_merge_plan / kv_split_plan (KV_ROUND_BYTES rounds, as the runtime) +
                   regroup.execute_kv_plan: each device keeps its heads in place and swaps the other half of
                   every page with its peer (runs sent straight from the pool, received into staging that is
                   copied into place while the next round is on the wire).
      token-major  the same KV in SGLang's layout (per layer [K|V][tokens][heads][head_dim]): per layer, gather
                   the peer's heads of every token (strided copy into a send buffer), send/recv with the same
                   gloo P2P, scatter into the new layer buffer (a merge halves the heads per token slot, so every
                   layer is re-laid out: new buffer per layer, old one freed).
    weights  --weight-layers decoder layers of the runtime's own LlamaDecoderLayer (Qwen2: QKV bias) built from
             a ModelConfig of the model's shapes, loaded with the runtime's loader from a safetensors checkpoint
             of random bf16 weights; reported per layer and extrapolated to the full model by weight bytes
             (embedding + lm_head included at the same bytes/s).
      gyges        regroup.param_specs + gyges.plans.weight_regroup_plan + regroup.regroup_weights on the padded
                   shard-major parameters (new model built on the meta device, as gyges_transform does).
      unpadded     SGLang's standard TP layout (fused [q_r; k_r; v_r], [gate_r; up_r], o_proj / down_proj as
                   [out, in] column shards): a split all-gathers every parameter's shards and re-assembles the
                   full HF tensor; a merge re-slices the full local tensor (strided for o/down, 3 pieces for QKV).
      restart      the checkpoint written above: allocate the target-TP layers and load them with the runtime's
                   safetensors loader (page cache warm: a lower bound), then recompute the cached KV:
                   tiny demo -> the runtime's ModelRunner prefills the cached prompts (real throughput);
                   big shapes -> the loaded layer's own projections timed on a --prefill-chunk token chunk
                   (+ torch SDPA over one --restart-req-len request), scaled to the cached tokens and layers.

Bounds (measured in the same run, both processes at once): P2P = gloo isend/irecv of a 256 MiB buffer in both
directions between the two processes (bytes per second one way); copy = a 256 MiB tensor copy_ (bytes copied
per second). bound = bytes the busiest device must send / P2P (transformations), checkpoint bytes a device
reads / copy (restart, plus nothing for the recompute). A Gyges merge moves no weight bytes: bound 0.
Peak extra = VmHWM (reset through /proc/self/clear_refs) minus max(RSS before, RSS after), max over devices.

Outputs: markdown tables on stdout; under --result-dir (default benchmark/results/, gitignored)
bench_transform.json, bench_transform.md, bench_transform.png.

    python benchmark/bench_transform.py                                   # everything, ~4-5 min on 2 cores
    python benchmark/bench_transform.py --models llama3-8b --kv-tokens 4096 --skip-engine --repeats 2
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import os
import platform
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import cpu_model_name  # noqa: E402

MIB = 1 << 20

# Shapes (HF config values). "layers" is the full model's depth.
SHAPES = {
    "tiny-demo": dict(arch="llama", hidden=64, heads=4, kv_heads=2, head_dim=16, inter=172, vocab=None,
                      layers=2, dtype="float32", qkv_bias=False),
    "llama3-8b": dict(arch="llama", hidden=4096, heads=32, kv_heads=8, head_dim=128, inter=14336, vocab=128256,
                      layers=32, dtype="bfloat16", qkv_bias=False),
    "qwen2.5-32b": dict(arch="qwen2", hidden=5120, heads=40, kv_heads=8, head_dim=128, inter=27648,
                        vocab=152064, layers=64, dtype="bfloat16", qkv_bias=True),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--kv-tokens", type=int, default=8192,
                   help="cached tokens per TP1 instance for the big shapes (the merged TP2 instance holds 2x)")
    p.add_argument("--weight-layers", type=int, default=1, help="decoder layers instantiated for the big shapes")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="merge+split pairs per method (best one reported)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="tokens per timed chunk of the big-shape recompute")
    p.add_argument("--restart-req-len", type=int, default=1024, help="request length for the recompute's attention")
    p.add_argument("--engine-prompts", type=int, default=32)
    p.add_argument("--engine-prompt-len", type=int, default=256)
    p.add_argument("--precopy-chunk-bytes", type=int, default=64 << 10,
                   help="--gyges-precopy-chunk-bytes of the engine run with pre-copy")
    p.add_argument("--prefetch-chunk-bytes", type=int, default=1 << 20,
                   help="--gyges-prefetch-chunk-bytes of the prefetched splits (engine run with pre-copy, and the "
                        "big shapes' 'weights prefetched' split)")
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--skip-executor", action="store_true")
    p.add_argument("--demo-dir", default=os.path.join(tempfile.gettempdir(), "sglang-bench-transform-demo"))
    p.add_argument("--result-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------
# memory / timing helpers
# ---------------------------------------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class PeakMeter:
    """Peak RSS beyond max(RSS before, RSS after) over a region (VmHWM reset through clear_refs)."""

    def __enter__(self):
        gc.collect()
        self.before = _status_kib("VmRSS") * 1024
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        return self

    def __exit__(self, *exc):
        self.hwm = _status_kib("VmHWM") * 1024
        gc.collect()
        self.after = _status_kib("VmRSS") * 1024
        self.extra = max(0, self.hwm - max(self.before, self.after))
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather(obj):
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


# ---------------------------------------------------------------------------------------------------------
# bandwidths
# ---------------------------------------------------------------------------------------------------------
def measure_bandwidths(rank: int, nbytes: int = 256 * MIB, repeats: int = 3,
                       message_bytes=(256 * MIB, 4 * MIB, 1 * MIB)) -> Dict[str, float]:
    """copy: one tensor copy_; p2p_bidir: both processes send nbytes to each other at once (isend/irecv), as
    messages of each of message_bytes, best over sizes and repeats (bytes per second one way);
    p2p_unidir: one blocking send of nbytes."""
    import torch.distributed as dist

    peer = 1 - rank
    a = torch.full((nbytes,), rank, dtype=torch.uint8)
    b = torch.empty_like(a)
    b.copy_(a)
    copy_best = uni_best = float("inf")
    p2p_best = {m: float("inf") for m in message_bytes}
    for _ in range(repeats):
        dist.barrier()
        t = time.perf_counter()
        b.copy_(a)
        copy_best = min(copy_best, time.perf_counter() - t)
    for _ in range(repeats):
        for m in message_bytes:  # interleaved: a shared machine's drift hits every size alike
            dist.barrier()
            t = time.perf_counter()
            works = []
            for o in range(0, nbytes, m):
                works += [dist.isend(a[o:o + m], peer, tag=1), dist.irecv(b[o:o + m], peer, tag=1)]
            for w in works:
                w.wait()
            p2p_best[m] = min(p2p_best[m], time.perf_counter() - t)
    assert int(b[0]) == peer
    for _ in range(repeats):
        dist.barrier()
        t = time.perf_counter()
        if rank == 0:
            dist.send(a, 1, tag=2)
        else:
            dist.recv(b, 0, tag=2)
        uni_best = min(uni_best, time.perf_counter() - t)
    mine = {"copy": nbytes / copy_best, "p2p_bidir": nbytes / min(p2p_best.values()),
            "p2p_unidir": nbytes / uni_best}
    mine.update({f"p2p_bidir_{m // MIB}MiB_messages": nbytes / t for m, t in p2p_best.items()})
    allr = _gather(mine)
    return {k: min(r[k] for r in allr) for k in mine}


# ---------------------------------------------------------------------------------------------------------
# model pieces built from the runtime's own classes
# ---------------------------------------------------------------------------------------------------------
def model_config(shape: Dict, num_layers: int, tp: int, vocab: int):
    from sglang.srt.configs.model_config import ModelConfig

    hf = SimpleNamespace(attention_bias=False, mlp_bias=False)
    return ModelConfig(hf_config=hf, architecture="LlamaForCausalLM" if shape["arch"] == "llama" else
                       "Qwen2ForCausalLM", vocab_size=vocab, hidden_size=shape["hidden"],
                       intermediate_size=shape["inter"], num_layers=num_layers, num_attention_heads=shape["heads"],
                       num_kv_heads=shape["kv_heads"], head_dim=shape["head_dim"], context_len=4096,
                       dtype=_dtype(shape["dtype"]), rms_norm_eps=1e-6, tie_word_embeddings=False,
                       rope={"rope_type": "default", "rope_theta": 10000.0}, tp_size=tp, weight_granularity=2)


def layer_stack(cfg, tp_group, device, qkv_bias: bool):
    """The runtime's decoder layers (padded shard-major parameters), without embedding / lm_head."""
    from torch import nn

    from sglang.srt.layers.rotary_embedding import RotaryEmbedding
    from sglang.srt.models.llama import LlamaDecoderLayer

    flags = {"qkv_bias": qkv_bias, "o_bias": False, "qk_norm": False, "mlp_bias": False}

    class LayerStack(nn.Module):
        def __init__(self):
            super().__init__()
            self.rotary = RotaryEmbedding(cfg.head_dim, cfg.context_len, cfg.rope, device)
            self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i, tp_group, self.rotary, flags, device)
                                        for i in range(cfg.num_layers))

        def weight_targets(self):
            out = {}
            for i, layer in enumerate(self.layers):
                out.update(layer.weight_targets(f"model.layers.{i}"))
            return out

    return LayerStack().eval()


def hf_layer_tensors(shape: Dict, layer: int, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    h, hq, hkv, d, i = shape["hidden"], shape["heads"], shape["kv_heads"], shape["head_dim"], shape["inter"]
    dt = _dtype(shape["dtype"])
    pre = f"model.layers.{layer}."
    shapes = {"self_attn.q_proj.weight": (hq * d, h), "self_attn.k_proj.weight": (hkv * d, h),
              "self_attn.v_proj.weight": (hkv * d, h), "self_attn.o_proj.weight": (h, hq * d),
              "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i),
              "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}
    if shape["qkv_bias"]:
        shapes.update({"self_attn.q_proj.bias": (hq * d,), "self_attn.k_proj.bias": (hkv * d,),
                       "self_attn.v_proj.bias": (hkv * d,)})
    out = {}
    for name, s in shapes.items():
        t = torch.empty(s, dtype=torch.float32)
        t.normal_(0, 0.02, generator=gen)
        out[pre + name] = t.to(dt)
    return out


def naive_from_hf(hf: Dict[str, torch.Tensor], shape: Dict, layers: int) -> Dict[str, torch.Tensor]:
    """SGLang's standard TP1 layout: fused qkv [q; k; v], fused gate_up [gate; up], o / down as [out, in]."""
    out = {}
    for l in range(layers):
        p = f"model.layers.{l}."
        out[p + "qkv"] = torch.cat([hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        if shape["qkv_bias"]:
            out[p + "qkv_bias"] = torch.cat([hf[p + f"self_attn.{x}_proj.bias"] for x in "qkv"])
        out[p + "o"] = hf[p + "self_attn.o_proj.weight"].clone()
        out[p + "gate_up"] = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
        out[p + "down"] = hf[p + "mlp.down_proj.weight"].clone()
        out[p + "ln1"] = hf[p + "input_layernorm.weight"].clone()
        out[p + "ln2"] = hf[p + "post_attention_layernorm.weight"].clone()
    return out


def _fused_parts(name: str, shape: Dict) -> Optional[List[int]]:
    """Full row sizes of the fused parts of a naive parameter (None: split along columns or replicated)."""
    d = shape["head_dim"]
    if name.endswith("qkv") or name.endswith("qkv_bias"):
        return [shape["heads"] * d, shape["kv_heads"] * d, shape["kv_heads"] * d]
    if name.endswith("gate_up"):
        return [shape["inter"], shape["inter"]]
    return None


def naive_merge(params: Dict[str, torch.Tensor], shape: Dict, rank: int) -> None:
    """TP1 (full tensors) -> TP2 rank `rank`: re-slice every parameter; nothing crosses the link."""
    for name in list(params):
        full = params[name]
        parts = _fused_parts(name, shape)
        if parts is not None:
            pieces, off = [], 0
            for s in parts:
                pieces.append(full[off + rank * s // 2: off + (rank + 1) * s // 2])
                off += s
            new = torch.cat(pieces)
        elif name.endswith(".o") or name.endswith(".down"):
            cols = full.shape[1] // 2
            new = full[:, rank * cols:(rank + 1) * cols].contiguous()  # strided: every row contributes
        else:
            continue  # norms: replicated
        params[name] = new
        del full


def naive_split(params: Dict[str, torch.Tensor], shape: Dict, group) -> int:
    """TP2 shards -> full TP1 tensors on every device: all-gather each parameter, re-assemble. Returns bytes
    this device received."""
    import torch.distributed as dist

    received = 0
    for name in list(params):
        shard = params[name]
        parts = _fused_parts(name, shape)
        col = name.endswith(".o") or name.endswith(".down")
        if parts is None and not col:
            continue
        gathered = [torch.empty_like(shard) for _ in range(2)]
        dist.all_gather(gathered, shard, group=group)
        received += shard.numel() * shard.element_size()
        if parts is not None:
            halves = [list(torch.split(g, [s // 2 for s in parts])) for g in gathered]
            new = torch.cat([halves[r][j] for j in range(len(parts)) for r in range(2)])
        else:
            new = torch.cat(gathered, dim=1)
        params[name] = new
        del shard, gathered
    return received


# ---------------------------------------------------------------------------------------------------------
# one shape in both worker processes
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Timed:
    ms: float
    link_bytes: int  # sent by this device over the link
    peak_extra: int
    extra: Dict

    def as_dict(self):
        return {"ms": self.ms, "link_bytes": self.link_bytes, "peak_extra": self.peak_extra, **self.extra}


def _best(runs: List[List[Dict]]) -> Dict:
    """runs[rep][rank] -> the rep whose slowest device was fastest; peak extra: max over everything."""
    per_rep = [max(r["ms"] for r in rep) for rep in runs]
    i = min(range(len(runs)), key=per_rep.__getitem__)
    rep = runs[i]
    out = {"ms": per_rep[i], "ms_all_reps": per_rep,
           "link_bytes_total": sum(r["link_bytes"] for r in rep),
           "link_bytes_max_device": max(r["link_bytes"] for r in rep),
           "peak_extra": max(r["peak_extra"] for rep_ in runs for r in rep_)}
    for k in rep[0]:
        if k not in ("ms", "link_bytes", "peak_extra"):
            out[k] = max(r[k] for r in rep)
    return out


def bench_kv(shape: Dict, args, rank: int, tokens: int, group) -> Dict:
    import torch.distributed as dist

    from gyges.plans import KVLayout, kv_merge_plan, kv_split_plan
    from gyges.topology import Instance
    from sglang.srt.managers.gyges_transform import KV_ROUND_BYTES
    from sglang.srt.model_executor import regroup

    H, L, D, ps = shape["kv_heads"], shape["layers"], shape["head_dim"], args.page_size
    elem = _dtype(shape["dtype"]).itemsize
    layout = KVLayout(H, L, ps, D, elem)
    n_pages = -(-tokens // ps)
    buffer_bytes = n_pages * layout.page_bytes(1)
    parts, merged = [Instance.of([0]), Instance.of([1])], Instance.of([0, 1])
    out: Dict = {"kv_tokens_per_instance": n_pages * ps, "kv_layers": L, "kv_bytes_per_device": buffer_bytes}

    # ---- gyges: head-centric pages, the project's plans and executor ----
    t = time.perf_counter()
    mplan = kv_merge_plan(layout, buffer_bytes, parts, [range(n_pages), range(n_pages)], KV_ROUND_BYTES)
    merge_plan_ms = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    splan = kv_split_plan(layout, buffer_bytes, merged, parts, used_pages=range(2 * n_pages),
                          max_staging_bytes=KV_ROUND_BYTES)
    split_plan_ms = (time.perf_counter() - t) * 1e3
    n32 = buffer_bytes // 4
    flat = torch.empty(buffer_bytes, dtype=torch.uint8)
    words = flat.view(torch.int32)
    torch.arange(n32, dtype=torch.int32, out=words).mul_(2).add_(rank)  # word i of device r = 2*i + r

    def pattern(lo: int, hi: int, r: int) -> torch.Tensor:
        return torch.arange(lo, hi, dtype=torch.int32).mul_(2).add_(r)

    runs = {"merge": [], "split": []}
    for rep in range(args.repeats):
        for kind, plan in (("merge", mplan), ("split", splan)):
            stats = regroup.RegroupStats()
            dist.barrier()
            with PeakMeter() as pm:
                regroup.execute_kv_plan(plan, rank, flat, group, stats, KV_ROUND_BYTES)
            runs[kind].append(_gather({"ms": stats.kv_seconds * 1e3, "link_bytes": stats.kv_bytes_sent,
                                       "peak_extra": pm.extra, "staging_reported": stats.kv_staging_peak_bytes}))
            if rep == 0 and kind == "merge":  # device r keeps sub-block r of its page p, gets the peer's
                P1 = layout.page_bytes(1) // 4
                for p in (0, n_pages // 2, n_pages - 1):
                    mine = words[p * P1 + rank * P1 // 2: p * P1 + (rank + 1) * P1 // 2]
                    theirs = words[p * P1 + (1 - rank) * P1 // 2: p * P1 + (2 - rank) * P1 // 2]
                    assert torch.equal(mine, pattern(p * P1 + rank * P1 // 2, p * P1 + (rank + 1) * P1 // 2, rank))
                    assert torch.equal(theirs, pattern(p * P1 + rank * P1 // 2, p * P1 + (rank + 1) * P1 // 2,
                                                       1 - rank)), "merged page holds the wrong KV"
            if rep == 0 and kind == "split":  # a round trip restores every byte
                step = 16 * MIB
                for lo in range(0, n32, step):
                    hi = min(n32, lo + step)
                    assert torch.equal(words[lo:hi], pattern(lo, hi, rank)), "merge+split did not round-trip"
    out["gyges"] = {k: _best(v) for k, v in runs.items()}
    out["gyges"]["merge"].update(plan_ms=merge_plan_ms, rounds=mplan.num_rounds, moves=len(mplan.moves),
                                 bytes_in_place=mplan.kv_bytes_in_place, plan_bytes=mplan.kv_bytes_moved)
    out["gyges"]["split"].update(plan_ms=split_plan_ms, rounds=splan.num_rounds, moves=len(splan.moves),
                                 bytes_in_place=splan.kv_bytes_in_place, plan_bytes=splan.kv_bytes_moved)
    del flat, words, mplan, splan
    gc.collect()

    # ---- token-major: SGLang's per-layer [K|V][tokens][heads][dim] ----
    dt = _dtype(shape["dtype"])
    N = n_pages * ps
    h2 = H // 2
    head_ids = torch.arange(H, dtype=torch.float32).view(1, 1, H, 1)
    kv = []
    for layer in range(L):
        t_ = torch.empty((2, N, H, D), dtype=dt)
        t_.copy_((head_ids + 100 * rank + 1000 * (layer % 8)).expand(2, N, H, D))
        kv.append(t_)
    mine_h, peer_h = slice(rank * h2, (rank + 1) * h2), slice((1 - rank) * h2, (2 - rank) * h2)
    peer = 1 - rank

    def tm_merge():
        sent = 0
        for layer in range(L):
            old = kv[layer]
            send = old[:, :, peer_h].contiguous()  # strided gather: h2 of H heads of every token
            recv = torch.empty_like(send)
            works = [dist.isend(send, peer, group=group, tag=layer), dist.irecv(recv, peer, group=group, tag=layer)]
            new = torch.empty((2, 2 * N, h2, D), dtype=dt)  # merged instance: 2N token slots, H/2 heads
            new[:, rank * N:(rank + 1) * N].copy_(old[:, :, mine_h])  # own tokens, own heads (strided read)
            for w in works:
                w.wait()
            new[:, peer * N:(peer + 1) * N].copy_(recv)
            kv[layer] = new
            sent += send.numel() * send.element_size()
            del old, send, recv, new
        return sent

    def tm_split():
        sent = 0
        for layer in range(L):
            old = kv[layer]  # [2, 2N, H/2, D]: tokens of part 0 then part 1, heads of this rank
            send = old[:, peer * N:(peer + 1) * N]  # the peer's tokens (contiguous per K / V)
            send = send.contiguous()
            recv = torch.empty_like(send)
            works = [dist.isend(send, peer, group=group, tag=layer), dist.irecv(recv, peer, group=group, tag=layer)]
            new = torch.empty((2, N, H, D), dtype=dt)
            new[:, :, mine_h].copy_(old[:, rank * N:(rank + 1) * N])  # strided write
            for w in works:
                w.wait()
            new[:, :, peer_h].copy_(recv)  # strided scatter
            kv[layer] = new
            sent += send.numel() * send.element_size()
            del old, send, recv, new
        return sent

    runs = {"merge": [], "split": []}
    for rep in range(args.repeats):
        for kind, fn in (("merge", tm_merge), ("split", tm_split)):
            dist.barrier()
            with PeakMeter() as pm:
                t = time.perf_counter()
                sent = fn()
                ms = (time.perf_counter() - t) * 1e3
            runs[kind].append(_gather({"ms": ms, "link_bytes": sent, "peak_extra": pm.extra}))
            if rep == 0 and kind == "merge":
                x = kv[0]
                assert float(x[0, rank * N, 0, 0]) == float(rank * h2 + 100 * rank)
                assert float(x[1, peer * N + N - 1, 0, 0]) == float(rank * h2 + 100 * peer)
    x = kv[L - 1]
    assert torch.equal(x[0, 0, :, 0].float(), (torch.arange(H) + 100 * rank + 1000 * ((L - 1) % 8)).to(dt).float())
    out["token_major"] = {k: _best(v) for k, v in runs.items()}
    del kv, x
    gc.collect()
    return out


def bench_weights(shape: Dict, args, rank: int, layers: int, vocab: int, ckpt_dir: str, group) -> Dict:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from gyges.plans import weight_regroup_plan
    from gyges.topology import Instance
    from sglang.srt.distributed.parallel_state import get_tp_group
    from sglang.srt.model_executor import regroup
    from sglang.srt.model_executor.model_loader import load_weights
    from sglang.srt.model_executor.model_runner import module_bytes

    tp1, tp2 = get_tp_group([rank]), get_tp_group([0, 1])
    cfg1, cfg2 = model_config(shape, layers, 1, vocab), model_config(shape, layers, 2, vocab)
    parts, merged = [Instance.of([0]), Instance.of([1])], Instance.of([0, 1])
    out: Dict = {}

    # checkpoint of random weights (rank 0 writes, page cache shared)
    if rank == 0:
        gen = torch.Generator().manual_seed(0)
        hf = {}
        for layer in range(layers):
            hf.update(hf_layer_tensors(shape, layer, gen))
        os.makedirs(ckpt_dir, exist_ok=True)
        save_file(hf, os.path.join(ckpt_dir, "model.safetensors"))
        del hf
    dist.barrier()
    ckpt_bytes = os.path.getsize(os.path.join(ckpt_dir, "model.safetensors"))

    model = layer_stack(cfg1, tp1, "cpu", shape["qkv_bias"])
    load_weights(model, ckpt_dir, show_progress=False)
    out["layer_weight_bytes_tp1"] = module_bytes(model) - sum(b.numel() * b.element_size() for b in model.buffers())
    probe_name = "layers.0.mlp.gate_up_proj.weight"
    probe = dict(model.named_parameters())[probe_name].float().sum(dim=1)  # per-row checksums

    # ---- gyges: padded shard-major, the project's plan and regroup ----
    # regroup_weights regroups inside a WeightStore arena (the runtime's ModelRunner.weight_store) when it
    # takes one; older revisions replaced the parameters by new tensors.
    store = None
    if "store" in inspect.signature(regroup.regroup_weights).parameters:
        from sglang.srt.model_executor.weight_store import WeightStore, packed_layout

        # The TP1 weights fill its front; TP2 packs to the front; a prefetched split stages the rows it lacks
        # above the TP1 weights (KV pages in the runtime), at most the TP1 weights' size.
        tp1_end = packed_layout(model)[1]
        store = WeightStore(2 * tp1_end, "cpu")
        store.adopt(model)
        gc.collect()
    out["weight_store"] = store is not None

    def gyges_step(old_model, kind):
        new_cfg, new_group, old_tp, src, dst = ((cfg2, tp2, 1, parts, [merged]) if kind == "merge" else
                                                (cfg1, tp1, 2, [merged], parts))
        stats = regroup.RegroupStats()
        dist.barrier()
        fetch = {}
        with PeakMeter() as pm:
            t = time.perf_counter()
            new_model = layer_stack(new_cfg, new_group, torch.device("meta"), shape["qkv_bias"])
            specs = regroup.param_specs(old_model, new_model, old_tp)
            plan = weight_regroup_plan(specs, 2, src, dst)
            plan_ms = (time.perf_counter() - t) * 1e3
            prefetched = None
            if kind == "split_prefetched":  # the rows fetched as the merged instance would while serving
                from sglang.srt.managers.io_struct import TransformCmd
                from sglang.srt.managers.weight_prefetch import WeightPrefetch, take_prefetched

                cmd = TransformCmd("bench", "split", [[0, 1]], [[0], [1]], time.time())
                prefetched = WeightPrefetch(cmd, rank, old_model, new_model, plan, store, group,
                                            args.prefetch_chunk_bytes)
                prefetched.start(tp1_end, prefetched.plan.max_staging_bytes)
                take_prefetched("bench")
                dist.barrier()
                t = time.perf_counter()
                for c in range(len(prefetched.chunks)):
                    prefetched.step(c)
                fetch = {"fetch_ms": (time.perf_counter() - t) * 1e3, "fetched_bytes": prefetched.bytes_received,
                         "chunks": len(prefetched.chunks)}
                dist.barrier()
            if store is not None:
                regroup.regroup_weights(plan, rank, store, old_model, new_model, group, stats, prefetched=prefetched)
            else:
                regroup.regroup_weights(plan, rank, old_model, new_model, group, stats)
            regroup.adopt_buffers(old_model, new_model)
            del old_model
        res = {"ms": stats.weight_seconds * 1e3, "link_bytes": stats.weight_bytes_received, "peak_extra": pm.extra,
               "plan_ms": plan_ms, "transient_reported": stats.weight_transient_peak_bytes,
               "plan_peak_extra": plan.peak_extra_bytes, "freed": stats.weight_bytes_freed,
               "copied_bytes": stats.weight_bytes_staged, **fetch}
        return new_model, res

    model, _ = gyges_step(model, "merge")  # warm-up pair (first-call costs), not timed
    model, _ = gyges_step(model, "split")
    kinds = ("merge", "split", "merge", "split_prefetched") if store is not None else ("merge", "split")
    runs = {k: [] for k in kinds}
    correct = {k: True for k in kinds}
    for rep in range(args.repeats):
        for kind in kinds:
            model, res = gyges_step(model, kind)
            got = dict(model.named_parameters())[probe_name].float().sum(dim=1)
            rows = got.shape[0]
            want = probe[rank * rows:(rank + 1) * rows] if kind == "merge" else probe
            res["correct"] = bool(torch.equal(got, want))
            runs[kind].append(_gather(res))
            correct[kind] &= all(r["correct"] for r in runs[kind][-1])
            if store is not None and kind == "merge":
                # the freed tail of the arena becomes KV pages: scribble over it as KV writes would, so a split
                # can only restore the other half by receiving it
                store.arena[store.weights_end:].fill_(0x5A)
    if rank == 0 and not all(correct.values()):
        print(f"  WARNING: gyges weight regroup gave wrong weights: {correct}", flush=True)
    out["gyges"] = {k: _best(v) for k, v in runs.items()}
    for k in correct:
        out["gyges"][k]["correct"] = correct[k]
    del model, store
    gc.collect()

    # ---- unpadded: SGLang's standard TP layout, all-gather + re-slice ----
    from safetensors.torch import load_file

    params = naive_from_hf(load_file(os.path.join(ckpt_dir, "model.safetensors")), shape, layers)
    runs = {"merge": [], "split": []}
    for rep in range(args.repeats):
        for kind in ("merge", "split"):
            dist.barrier()
            with PeakMeter() as pm:
                t = time.perf_counter()
                if kind == "merge":
                    naive_merge(params, shape, rank)
                    recv = 0
                else:
                    recv = naive_split(params, shape, group)
                ms = (time.perf_counter() - t) * 1e3
            runs[kind].append(_gather({"ms": ms, "link_bytes": recv, "peak_extra": pm.extra}))
    assert tuple(params["model.layers.0.gate_up"].shape) == (2 * shape["inter"], shape["hidden"])
    out["unpadded"] = {k: _best(v) for k, v in runs.items()}
    del params
    gc.collect()

    # ---- restart: allocate the target TP's layers and load the checkpoint with the runtime's loader ----
    runs = {"merge": [], "split": []}
    recompute = {}
    for rep in range(args.repeats):
        for kind in ("merge", "split"):
            cfg, grp = (cfg2, tp2) if kind == "merge" else (cfg1, tp1)
            dist.barrier()
            with PeakMeter() as pm:
                t = time.perf_counter()
                m = layer_stack(cfg, grp, "cpu", shape["qkv_bias"])
                load_weights(m, ckpt_dir, show_progress=False)
                ms = (time.perf_counter() - t) * 1e3
            loaded = module_bytes(m) - sum(b.numel() * b.element_size() for b in m.buffers())
            runs[kind].append(_gather({"ms": ms, "link_bytes": 0, "peak_extra": pm.extra, "loaded_bytes": loaded}))
            if rep == 0 and shape.get("time_recompute", True):
                recompute[kind] = time_layer_compute(m, cfg, shape, args, grp)
            del m
            gc.collect()
    out["restart_load"] = {k: _best(v) for k, v in runs.items()}
    out["restart_recompute_per_layer"] = recompute
    out["checkpoint_bytes"] = ckpt_bytes
    dist.barrier()
    if rank == 0:
        os.remove(os.path.join(ckpt_dir, "model.safetensors"))
    return out


@torch.inference_mode()
def time_layer_compute(model, cfg, shape: Dict, args, tp_group) -> Dict:
    """Time one decoder layer's projections (the loaded module's own layers, all-reduce included) on a chunk
    of tokens and SDPA over one request; the caller scales to the cached tokens."""
    layer = model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    T, R = args.prefill_chunk, args.restart_req_len
    dt = cfg.dtype
    x = torch.randn(T, cfg.hidden_size).to(dt)
    hq, hkv = cfg.num_attention_heads // tp_group.size, cfg.num_kv_heads // tp_group.size
    best = float("inf")
    for _ in range(2):
        tp_group.barrier()
        t = time.perf_counter()
        q, k, v = attn.qkv_proj(x)
        o = attn.o_proj(q.reshape(T, hq * cfg.head_dim))
        y = mlp(o)
        best = min(best, time.perf_counter() - t)
    q = torch.randn(1, hq, R, cfg.head_dim).to(dt)
    kk = torch.randn(1, hkv, R, cfg.head_dim).to(dt).repeat_interleave(hq // hkv, dim=1)
    best_attn = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        torch.nn.functional.scaled_dot_product_attention(q, kk, kk, is_causal=True)
        best_attn = min(best_attn, time.perf_counter() - t)
    del y
    return {"chunk_tokens": T, "chunk_ms": best * 1e3, "req_len": R, "attn_req_ms": best_attn * 1e3}


def bench_tiny_restart(args, rank: int, model_path: str, group) -> Dict:
    """Restart the tiny demo model with the runtime's ModelRunner: construct + load, then prefill the cached
    prompts (merge: one TP2 instance recomputes all of them; split: each TP1 instance recomputes its half)."""
    import torch.distributed as dist

    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.distributed.parallel_state import get_tp_group
    from sglang.srt.model_executor.forward_batch import ForwardBatch
    from sglang.srt.model_executor.model_runner import ModelRunner
    from sglang.srt.server_args import ServerArgs

    n, plen, ps = args.engine_prompts, args.engine_prompt_len, args.page_size
    prompts = engine_prompts(args, 512)
    out = {}
    for kind in ("merge", "split"):
        tp = 2 if kind == "merge" else 1
        grp = get_tp_group([0, 1]) if tp == 2 else get_tp_group([rank])
        mine = prompts if tp == 2 else prompts[rank::2]
        ppr = -(-plen // ps)
        best = {}
        for rep in range(args.repeats):
            dist.barrier()
            t0 = time.perf_counter()
            sa = ServerArgs(model_path=model_path, tp_size=tp, page_size=ps, dtype="float32",
                            max_total_tokens=(len(mine) + 1) * ppr * ps, cpu_threads_per_worker=1)
            runner = ModelRunner(sa, ModelConfig.from_server_args(sa), grp, "cpu", show_progress=False)
            t1 = time.perf_counter()
            for b in range(0, len(mine), 8):
                batch = mine[b:b + 8]
                pages = [list(range(1 + (b + j) * ppr, 1 + (b + j + 1) * ppr)) for j in range(len(batch))]
                runner.forward(ForwardBatch.build(batch, [0] * len(batch), pages, logits="last"))
            t2 = time.perf_counter()
            res = {"load_ms": (t1 - t0) * 1e3, "recompute_ms": (t2 - t1) * 1e3, "ms": (t2 - t0) * 1e3,
                   "recompute_tokens": len(mine) * plen, "loaded_bytes": runner.weight_bytes}
            allr = _gather(res)
            slowest = max(allr, key=lambda r: r["ms"])
            if not best or slowest["ms"] < best["ms"]:
                best = dict(slowest)
            del runner
            gc.collect()
        out[kind] = best
    return out


def _worker(rank: int, port: int, args, jobs: List[Dict], out_file: str) -> None:
    from sglang.srt.distributed.parallel_state import (create_aligned_groups, destroy_distributed, get_tp_group,
                                                       init_distributed)

    torch.set_num_threads(1)
    init_distributed(2, rank, f"tcp://127.0.0.1:{port}", "gloo")
    create_aligned_groups(2)
    group = get_tp_group([0, 1]).device_group
    result = {"bandwidth": measure_bandwidths(rank), "shapes": {}}
    if rank == 0:
        bw = result["bandwidth"]
        print(f"  copy {bw['copy'] / 1e9:.2f} GB/s, gloo P2P {bw['p2p_bidir'] / 1e9:.2f} GB/s each way "
              f"(bidirectional), {bw['p2p_unidir'] / 1e9:.2f} GB/s one way", flush=True)
    for job in jobs:
        name, shape = job["name"], dict(job["shape"])
        t = time.perf_counter()
        res = {"kv": bench_kv(shape, args, rank, job["kv_tokens"], group)}
        res["weights"] = bench_weights(shape, args, rank, job["weight_layers"], job["vocab"], job["ckpt_dir"], group)
        if job.get("demo_path"):
            res["tiny_restart"] = bench_tiny_restart(args, rank, job["demo_path"], group)
        result["shapes"][name] = res
        if rank == 0:
            print(f"  {name}: done in {time.perf_counter() - t:.1f} s", flush=True)
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(result, f)
    get_tp_group([0, 1]).barrier()
    destroy_distributed()


# ---------------------------------------------------------------------------------------------------------
# part 1: the real engine
# ---------------------------------------------------------------------------------------------------------
def engine_prompts(args, vocab: int) -> List[List[int]]:
    g = torch.Generator().manual_seed(5)
    return [[1] + torch.randint(3, vocab - 12, (args.engine_prompt_len - 1,), generator=g).tolist()
            for _ in range(args.engine_prompts)]


def build_demo(args) -> str:
    from sglang.srt.demo_model import DemoModelSpec, make_demo_model

    return make_demo_model(args.demo_dir, DemoModelSpec(arch="llama"))


def transform_while_streaming(eng, prompt: List[int], tp: int) -> Dict:
    """Merge (tp=2) or split (tp=1) devices 0 and 1 while one request decodes (streamed, one token per chunk) from
    before the order until 0.3 s after the transformation (then it is dropped, i.e. aborted): the breakdown plus
    the token gaps that request saw: median before, the largest while the instances copy ahead (pre-copy or weight
    prefetch, from the order to the pause), the largest around the pause, and the median while copying ahead."""
    import threading

    times: List[float] = []
    stop_after: List[float] = []  # set once the transformation returned

    def consume():
        for _ in eng.generate(input_ids=prompt, stream=True, sampling_params={
                "max_new_tokens": 3000, "temperature": 0, "ignore_eos": True}):
            times.append(time.perf_counter())
            if stop_after and times[-1] > stop_after[0]:
                break  # closing the stream aborts the request

    t = threading.Thread(target=consume)
    t.start()
    while len(times) < 100:
        if not t.is_alive():
            raise RuntimeError("the streamed request ended before its 100th token")
        time.sleep(0.01)
    t0 = time.perf_counter()
    bd = eng.gyges_transform([0, 1], tp)
    t1 = time.perf_counter()
    stop_after.append(t1 + 0.3)
    t.join()
    gaps = [(b - a) * 1e3 for a, b in zip(times, times[1:])]
    ends = times[1:]
    before = sorted(g for g, e in zip(gaps, ends) if e < t0)
    ahead_ms = max(bd.get("precopy_ms", 0.0), bd.get("prefetch_ms", 0.0))  # the two run side by side
    pre_end = t1 - (bd["pause_ms"] + bd.get("report_ms", 0.0)) / 1e3  # when the pause started, from the end
    during = sorted(g for g, e in zip(gaps, ends) if t0 < e <= pre_end) if ahead_ms else []
    around = [g for g, e in zip(gaps, ends) if pre_end < e <= t1 + 0.3]
    after = sorted(g for g, e in zip(gaps, ends) if t1 + 0.05 < e)
    step = before[len(before) // 2]
    merged_step = after[len(after) // 2] if tp > 1 and after else step  # the goal counts merged decode steps
    return {"breakdown": bd, "gap_before_ms": step, "merged_step_ms": merged_step,
            "max_gap_ms": max(around, default=0.0), "max_gap_ahead_ms": max(during, default=0.0),
            "gap_during_precopy_ms": during[len(during) // 2] if during else None,
            "pause_in_steps": max(around, default=0.0) / merged_step}


def bench_engine(args, path: str) -> Dict:
    import sglang

    out: Dict = {}
    for mode, chunk, fetch in (("stop-and-copy", 0, 0),
                               ("pre-copy", args.precopy_chunk_bytes, args.prefetch_chunk_bytes)):
        eng = sglang.Engine(model_path=path, dp_size=2, enable_gyges=True, device="cpu", page_size=args.page_size,
                            log_level="warning", gyges_precopy_chunk_bytes=chunk, gyges_prefetch_chunk_bytes=fetch)
        try:
            prompts = engine_prompts(args, 512)
            eng.generate(input_ids=prompts, sampling_params={"max_new_tokens": 1, "temperature": 0})
            merges, splits, streamed, streamed_splits = [], [], [], []
            for _ in range(args.repeats):
                merges.append(eng.gyges_transform([0, 1], 2))
                splits.append(eng.gyges_transform([0, 1], 1))
            for _ in range(args.repeats):
                streamed.append(transform_while_streaming(eng, prompts[0][:64], 2))
                streamed_splits.append(transform_while_streaming(eng, prompts[1][:64], 1))
                splits.append(streamed_splits[-1]["breakdown"])
            check = eng.generate(input_ids=prompts[3], sampling_params={"max_new_tokens": 1, "temperature": 0})
            cached = check["meta_info"]["cached_tokens"]
        finally:
            eng.shutdown()
        pick = lambda bds: min(bds, key=lambda b: b["pause_ms"])  # noqa: E731
        out[mode] = {"merge": pick(merges), "split": pick(splits), "all_merges": merges, "all_splits": splits,
                     "cached_tokens_after": cached,
                     "streamed": min(streamed, key=lambda x: x["max_gap_ms"]), "all_streamed": streamed,
                     "streamed_split": min(streamed_splits, key=lambda x: x["max_gap_ms"]),
                     "all_streamed_splits": streamed_splits}
    out.update(out["stop-and-copy"])  # the main table's engine rows
    return out


def _token_gap_cells(x: Dict) -> str:
    """The streamed request's columns: decode step before, merged instance's step, largest gap at the pause, that
    gap in merged decode steps, step while copying ahead, largest gap while copying ahead."""
    during = x["gap_during_precopy_ms"]
    ahead = f"{x['max_gap_ahead_ms']:.1f}" if during is not None else "n/a"
    return (f"{x['gap_before_ms']:.1f} | {x['merged_step_ms']:.1f} | {x['max_gap_ms']:.1f} | "
            f"{x['pause_in_steps']:.1f} | {'n/a' if during is None else f'{during:.1f}'} | {ahead} |")


def engine_pause_table(engine: Dict) -> str:
    """Stop-and-copy vs pre-copy merges (and splits without / with the weight prefetch) of the tiny demo through
    the Engine: what a decoding request sees."""
    head = ("| merge | pause ms | pre-copy ms | KV bytes in the pause | KV bytes pre-copied | pages kept / pre-copied | "
            "decode step before ms | merged step ms | largest token gap at the pause ms | = merged steps | "
            "step during pre-copy ms | largest gap during pre-copy ms |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for mode in ("stop-and-copy", "pre-copy"):
        x = engine[mode]["streamed"]
        b = x["breakdown"]
        lines.append(f"| {mode} | {b['pause_ms']:.1f} | {b['precopy_ms']:.1f} | {b['kv_bytes']:,} | "
                     f"{b['precopy_kv_bytes']:,} | {b['precopy_pages_kept']} / {b['precopy_pages']} | "
                     + _token_gap_cells(x))
    head = ("| split | pause ms | KV bytes in the pause | KV ms | pages kept / pre-copied | weight bytes received "
            "in the pause | weight ms | ahead ms (KV / weights) | decode step before ms | merged step ms | "
            "largest token gap at the pause ms | = merged steps | step during pre-copy ms | "
            "largest gap during pre-copy ms |")
    lines += ["", head, "|" + "---|" * (head.count("|") - 1)]
    for mode, label in (("stop-and-copy", "stop-and-copy"), ("pre-copy", "KV pre-copied, weights prefetched")):
        x = engine[mode].get("streamed_split")
        if x is None:
            continue
        b = x["breakdown"]
        lines.append(f"| {label} | {b['pause_ms']:.1f} | {b['kv_bytes']:,} | {b['kv_ms']:.1f} | "
                     f"{b['precopy_pages_kept']} / {b['precopy_pages']} | {b['weight_bytes']:,} | "
                     f"{b['weight_ms']:.1f} | {b['precopy_ms']:.0f} / {b.get('prefetch_ms', 0.0):.0f} | "
                     + _token_gap_cells(x))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------
def full_weight_bytes(shape: Dict, vocab: int, elem: int) -> int:
    h, hq, hkv, d, i = shape["hidden"], shape["heads"], shape["kv_heads"], shape["head_dim"], shape["inter"]
    per_layer = (h * (hq + 2 * hkv) * d + hq * d * h + 3 * h * i + 2 * h) + (
        (hq + 2 * hkv) * d if shape["qkv_bias"] else 0)
    return (shape["layers"] * per_layer + 2 * vocab * h + h) * elem


def summarize(result: Dict, args, engine: Optional[Dict], jobs: List[Dict]) -> List[Dict]:
    """Rows: model x op x method, full-model numbers (KV measured at full depth; weights scaled by bytes)."""
    bw = result["bandwidth"]
    p2p, copy = bw["p2p_bidir"], bw["copy"]
    rows = []
    if engine:
        for op in ("merge", "split"):
            b = engine[op]
            sent_max = (b["kv_bytes"] + b["weight_bytes"]) / 2
            rows.append({"model": "tiny-demo (Engine)", "op": op, "method": "gyges (engine breakdown)",
                         "kv_bytes": b["kv_bytes"], "kv_ms": b["kv_ms"], "w_bytes": b["weight_bytes"],
                         "w_ms": b["weight_ms"], "bytes": b["kv_bytes"] + b["weight_bytes"],
                         "ms": b["pause_ms"], "bound_ms": sent_max / p2p * 1e3,
                         "peak_extra": b["peak_extra_bytes"], "note": f"pause; planning {b['planning_ms']:.1f} ms"})
    for job in jobs:
        name, shape = job["name"], job["shape"]
        r = result["shapes"][name]
        kv, w = r["kv"], r["weights"]
        elem = _dtype(shape["dtype"]).itemsize
        factor = full_weight_bytes(shape, job["vocab"], elem) / w["layer_weight_bytes_tp1"]
        for op in ("merge", "split"):
            g_kv, t_kv = kv["gyges"][op], kv["token_major"][op]
            g_w, n_w = w["gyges"][op], w["unpadded"][op]
            rl = w["restart_load"][op]

            def row(method, kvr, wr, plan_ms=0.0, note=""):
                kvb, wb = kvr["link_bytes_total"], wr["link_bytes_total"] * factor
                sent_max = kvr["link_bytes_max_device"] + wr["link_bytes_max_device"] * factor
                ms = kvr["ms"] + wr["ms"] * factor + plan_ms
                return {"model": name, "op": op, "method": method, "kv_bytes": kvb, "kv_ms": kvr["ms"],
                        "w_bytes": wb, "w_ms": wr["ms"] * factor, "bytes": kvb + wb, "ms": ms,
                        "bound_ms": sent_max / p2p * 1e3, "peak_extra": max(kvr["peak_extra"],
                                                                             wr["peak_extra"] * factor),
                        "note": note}

            plan_ms = g_kv["plan_ms"] + g_w["plan_ms"] * factor
            bad = "" if g_w.get("correct", True) else "WRONG WEIGHTS after the regroup (see README); "
            rows.append(row("gyges: head-centric KV + shard-major weights", g_kv, g_w, plan_ms,
                            f"{bad}incl. planning {plan_ms:.0f} ms"))
            if op == "split" and "split_prefetched" in w["gyges"]:
                g_wp = w["gyges"]["split_prefetched"]
                bad_p = "" if g_wp.get("correct", True) else "WRONG WEIGHTS; "
                rows.append(row("gyges, weights prefetched while serving: the pause", g_kv, g_wp, plan_ms,
                                f"{bad_p}prefetch before the pause {g_wp['fetch_ms'] * factor:,.0f} ms "
                                f"({_b(g_wp['fetched_bytes'] * factor)} / device); the pause copies them"))
            rows.append(row("token-major KV gather + unpadded re-slice", t_kv, n_w))
            rows.append(row("  KV only: gyges", g_kv, {"link_bytes_total": 0, "link_bytes_max_device": 0, "ms": 0,
                                                       "peak_extra": 0}, g_kv["plan_ms"]))
            rows.append(row("  KV only: token-major gather", t_kv, {"link_bytes_total": 0, "link_bytes_max_device": 0,
                                                                    "ms": 0, "peak_extra": 0}))
            zero = {"link_bytes_total": 0, "link_bytes_max_device": 0, "ms": 0, "peak_extra": 0}
            rows.append(row("  weights only: gyges shard-major", zero, g_w, g_w["plan_ms"] * factor, bad))
            rows.append(row("  weights only: unpadded all-gather/re-slice", zero, n_w))
            # restart
            load_ms = rl["ms"] * factor
            loaded = rl["loaded_bytes"] * factor
            if "tiny_restart" in r:
                tr = r["tiny_restart"][op]
                rec_ms, load_ms = tr["recompute_ms"], tr["load_ms"]
                loaded = tr["loaded_bytes"]
                how = f"ModelRunner: load + prefill of {tr['recompute_tokens']} tokens per instance"
            else:
                rc = w["restart_recompute_per_layer"][op]
                tokens = kv["kv_tokens_per_instance"] * (2 if op == "merge" else 1)
                rec_ms = shape["layers"] * (tokens / rc["chunk_tokens"] * rc["chunk_ms"] +
                                            tokens / rc["req_len"] * rc["attn_req_ms"])
                how = (f"load scaled by bytes; recompute {tokens} tokens = layer matmuls timed on "
                       f"{rc['chunk_tokens']} tokens x {shape['layers']} layers")
            rows.append({"model": name, "op": op, "method": "restart: reload safetensors + recompute KV",
                         "kv_bytes": 0, "kv_ms": rec_ms, "w_bytes": 2 * loaded, "w_ms": load_ms,
                         "bytes": 2 * loaded, "ms": load_ms + rec_ms, "bound_ms": loaded / copy * 1e3,
                         "peak_extra": rl["peak_extra"] * factor, "note": how})
    for r in rows:
        r["ratio"] = r["ms"] / r["bound_ms"] if r["bound_ms"] > 0 else None
    return rows


def _b(n: float) -> str:
    for unit, s in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= s:
            return f"{n / s:.2f} {unit}"
    return f"{n:.0f} B"


def markdown_table(rows: List[Dict]) -> str:
    head = ("| model | op | method | bytes moved | KV ms | weight ms | time ms | bound ms | time/bound | "
            "peak extra | note |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ratio = f"{r['ratio']:.1f}x" if r["ratio"] is not None else "n/a (bound 0)"
        lines.append(f"| {r['model']} | {r['op']} | {r['method']} | {_b(r['bytes'])} | {r['kv_ms']:,.0f} | "
                     f"{r['w_ms']:,.0f} | {r['ms']:,.0f} | {r['bound_ms']:,.0f} | {ratio} | {_b(r['peak_extra'])} | "
                     f"{r.get('note', '')} |")
    return "\n".join(lines)


def kv_rate_table(result: Dict, jobs: List[Dict]) -> str:
    """KV only, per model and op: bytes the busiest device sends per second, the executor against the
    token-major gather on the same bytes and against the P2P bandwidth measured in the same run."""
    bw = result["bandwidth"]
    p2p = bw["p2p_bidir"]
    head = "| model | op | method | KV bytes sent / device | ms | GB/s one way | x P2P | peak extra bytes |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for job in jobs:
        kv = result["shapes"][job["name"]]["kv"]
        for op in ("merge", "split"):
            sent = kv["gyges"][op]["link_bytes_max_device"]
            for method, key in (("gyges executor", "gyges"), ("token-major gather", "token_major")):
                x = kv[key][op]
                rate = x["link_bytes_max_device"] / (x["ms"] / 1e3) if x["ms"] > 0 else float("inf")
                lines.append(f"| {job['name']} | {op} | {method} | {x['link_bytes_max_device']:,} | {x['ms']:,.1f} | "
                             f"{rate / 1e9:.2f} | {rate / p2p:.2f} | {x['peak_extra']:,} |")
            lines.append(f"| {job['name']} | {op} | P2P measured (bound) | {sent:,} | {sent / p2p * 1e3:,.1f} | "
                         f"{p2p / 1e9:.2f} | 1.00 | 0 |")
    sizes = ", ".join(f"{k.split('_')[2]} {v / 1e9:.2f}" for k, v in bw.items() if k.startswith("p2p_bidir_"))
    return "\n".join(lines) + f"\n\nP2P both ways at once, GB/s one way, by message size: {sizes}"


def per_layer_table(result: Dict, jobs: List[Dict]) -> str:
    head = "| model | op | method | weight bytes moved / layer | ms / layer | peak extra / layer | reported by runtime |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for job in jobs:
        w = result["shapes"][job["name"]]["weights"]
        n = job["weight_layers"]
        for op in ("merge", "split"):
            methods = [("gyges", "gyges", op), ("unpadded", "unpadded", op), ("restart load", "restart_load", op)]
            if op == "split" and "split_prefetched" in w["gyges"]:
                methods.insert(1, ("gyges prefetched: the pause", "gyges", "split_prefetched"))
            for method, key, kind in methods:
                x = w[key][kind]
                rep = ""
                if key == "gyges":
                    rep = f"transient {_b(x['transient_reported'] / n)}, plan peak {_b(x['plan_peak_extra'] / n)}"
                if kind == "split_prefetched":
                    rep += (f"; before the pause: {_b(x['fetched_bytes'] / n)} fetched in {x['fetch_ms'] / n:,.1f} ms "
                            f"({x['chunks']} chunks)")
                lines.append(f"| {job['name']} | {op} | {method} | {_b(x['link_bytes_total'] / n)} | "
                             f"{x['ms'] / n:,.1f} | {_b(x['peak_extra'] / n)} | {rep} |")
    return "\n".join(lines)


def plot(rows: List[Dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [("gyges", "gyges (head-centric KV + shard-major weights)", "tab:green"),
               ("token-major", "token-major KV + unpadded weights", "tab:orange"),
               ("restart", "restart (reload + recompute)", "tab:red")]
    groups = []
    for r in rows:
        if r["method"].startswith("  "):
            continue
        key = (r["model"], r["op"])
        if key not in groups:
            groups.append(key)
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(groups)), 5))
    width = 0.27
    for j, (prefix, label, color) in enumerate(methods):
        xs, ys, bounds = [], [], []
        for i, key in enumerate(groups):
            r = next((r for r in rows if (r["model"], r["op"]) == key and r["method"].startswith(prefix)), None)
            if r is None:
                continue
            xs.append(i + (j - 1) * width)
            ys.append(max(r["ms"], 1e-2))
            bounds.append(r["bound_ms"])
        ax.bar(xs, ys, width, label=label, color=color)
        ax.scatter(xs, [max(b, 1e-2) for b in bounds], marker="_", s=300, color="black", zorder=3,
                   label="bound (bytes / measured bandwidth)" if j == 0 else None)
    ax.set_yscale("log")
    ax.set_xticks(range(len(groups)), [f"{m}\n{o}" for m, o in groups], fontsize=8)
    ax.set_ylabel("time, ms (full model; log)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine_info() -> Dict:
    cpu = cpu_model_name()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.is_available()}


def main(argv=None) -> None:
    import torch.multiprocessing as mp

    args = parse_args(argv)
    os.makedirs(args.result_dir, exist_ok=True)
    t_all = time.perf_counter()
    demo_path = build_demo(args) if ("tiny-demo" in args.models or not args.skip_engine) else None
    engine = None
    if not args.skip_engine:
        print("engine: tiny demo model, dp_size=2, enable_gyges ...", flush=True)
        engine = bench_engine(args, demo_path)
        for op in ("merge", "split"):
            b = engine[op]
            print(f"  {op}: kv {_b(b['kv_bytes'])} {b['kv_ms']:.1f} ms, weights {_b(b['weight_bytes'])} "
                  f"{b['weight_ms']:.1f} ms, pause {b['pause_ms']:.1f} ms, total {b['total_ms']:.1f} ms, "
                  f"peak extra {_b(b['peak_extra_bytes'])}", flush=True)
    jobs = []
    tmp = tempfile.mkdtemp(prefix="bench-transform-")
    for name in args.models:
        shape = dict(SHAPES[name])
        if name == "tiny-demo":
            cfg = json.load(open(os.path.join(demo_path, "config.json")))
            shape["vocab"] = cfg["vocab_size"]
            kv_tokens = args.engine_prompts * args.engine_prompt_len // 2
            layers = shape["layers"]
        else:
            kv_tokens, layers = args.kv_tokens, args.weight_layers
        jobs.append({"name": name, "shape": shape, "kv_tokens": kv_tokens, "weight_layers": layers,
                     "vocab": shape["vocab"], "ckpt_dir": os.path.join(tmp, name),
                     "demo_path": demo_path if name == "tiny-demo" else None})
    result = {"bandwidth": {}, "shapes": {}}
    if not args.skip_executor and jobs:
        print("executor: 2 processes, gloo over loopback, 1 torch thread each ...", flush=True)
        out_file = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(_free_port(), args, jobs, out_file), nprocs=2, join=True)
        with open(out_file) as f:
            result = json.load(f)
    if not result["bandwidth"]:
        jobs = []
        result["bandwidth"] = {"p2p_bidir": float("inf"), "copy": float("inf")}
    rows = summarize(result, args, engine, jobs)
    table = markdown_table(rows)
    layer_table = per_layer_table(result, jobs) if jobs else ""
    kv_table = kv_rate_table(result, jobs) if jobs else ""
    pause_table = f"\n\nmerges and splits while a request decodes (tiny demo, Engine):\n\n{engine_pause_table(engine)}" if engine else ""
    bw = result["bandwidth"]
    info = machine_info()
    header = (f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} (CPU only, no GPU); "
              f"2 processes x 1 thread, gloo over loopback: P2P {bw.get('p2p_bidir', 0) / 1e9:.2f} GB/s each way, "
              f"copy {bw.get('copy', 0) / 1e9:.2f} GB/s")
    cmd = "python benchmark/bench_transform.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = (f"{header}\n\ncommand: `{cmd.strip()}`\n\n{table}{pause_table}\n\nKV moves (executor vs token-major vs the link):\n\n"
          f"{kv_table}\n\nper decoder layer (weights):\n\n{layer_table}\n")
    print("\n" + md)
    with open(os.path.join(args.result_dir, "bench_transform.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.result_dir, "bench_transform.json"), "w") as f:
        json.dump({"args": vars(args), "machine": info, "engine": engine, "executor": result, "jobs": jobs,
                   "rows": rows, "command": cmd.strip()}, f, indent=1, default=str)
    if not args.no_plot:
        plot(rows, os.path.join(args.result_dir, "bench_transform.png"), header)
    print(f"total {time.perf_counter() - t_all:.0f} s; results in {args.result_dir}")


if __name__ == "__main__":
    main()
