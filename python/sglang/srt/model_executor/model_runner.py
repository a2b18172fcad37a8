"""ModelRunner: one rank's model, weights and KV pool; runs a ForwardBatch to logits.

Data flow at start-up (nothing is allocated twice: the weights exist only inside the arena):
    budget = local_memory_budget(): (CPU: server_args.device_memory_bytes(); CUDA: free memory, measured
        before anything of the model is allocated) * mem_fraction_static; the worker passes the MIN over the
        world group (parallel_state.world_min), so every device of the host sizes the same arena and
        computes the same Gyges plans; without it (tests, benchmarks) the MIN over the TP group
    ModelConfig + TPGroup --registry--> model on the meta device (shapes only, no memory)
        -> buffers (rotary cos/sin caches) computed on `device` (materialize_buffers)
    plan_arena(budget, packed weight bytes, buffer bytes, page bytes) -> ArenaPlan
        arena = weight pages + KV pages, a multiple of the TP1 page, arena + buffers <= budget
        (KV pages capped by max_total_tokens // page_size)  -> ValueError if not even 1 KV page fits
    WeightStore(arena_bytes) allocated once on `device`; the meta parameters become views of it (bind),
        the weight region zeroed (padding rows), load_weights (safetensors -> the views, one tensor's rows
        at a time) -> HeadCentricKVPool over the same arena
    peak bytes at start-up = budget + one checkpoint tensor's rows (test/test_startup_memory.py)
Per iteration:
    forward(batch): backend.prepare(batch) once -> model(...) writes K/V, returns hidden
        -> logits rows -> float32 [num_logit_rows, vocab_size], identical on every rank
    forward_with_hidden(batch): the same, plus the hidden states of those rows (embedding requests)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.distributed.parallel_state import TPGroup
from sglang.srt.layers.attention.selection import create_attention_backend
from sglang.srt.layers.rotary_embedding import RotaryEmbedding
from sglang.srt.mem_cache.kv_pool import HeadCentricKVPool
from sglang.srt.model_executor.forward_batch import ForwardBatch
from sglang.srt.model_executor.model_loader import load_weights
from sglang.srt.model_executor.weight_store import WeightStore, packed_layout
from sglang.srt.models.registry import get_model_class

logger = logging.getLogger(__name__)


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's parameters and buffers, each storage counted once (tied weights)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


@dataclass(frozen=True)
class ArenaPlan:
    """One device's arena at start-up: a pure function of the budget and the model's shapes, so devices
    given the same budget get the same arena, page count and (later) the same transformation plans."""

    budget_bytes: int  # what the arena plus the model's buffers may take
    arena_bytes: int  # [weights | KV pages], a multiple of tp1_page_bytes
    page_bytes: int  # one KV page at the start-up TP degree
    tp1_page_bytes: int  # page_bytes * tp_size: a page at TP1 (every TP degree's pages tile the arena)
    weight_pages: int  # pages overlapping the packed weights (reserved)
    kv_pages: int  # pages free for KV = arena_bytes // page_bytes - weight_pages (>= 1)


def plan_arena(budget_bytes: int, weights_end: int, buffer_bytes: int, page_bytes: int, tp_size: int,
               page_size: int, max_total_tokens: Optional[int] = None,
               mem_fraction_static: Optional[float] = None) -> ArenaPlan:
    """Size the arena: packed weights rounded up to whole pages, then as many KV pages as the budget holds
    after the buffers (capped by max_total_tokens // page_size), the whole rounded to TP1 pages without
    passing the budget. Raises ValueError when not one KV page fits or the cap is below one page."""
    weight_pages = -(-weights_end // page_bytes)
    kv_pages = max(budget_bytes - buffer_bytes - weight_pages * page_bytes, 0) // page_bytes
    if kv_pages < 1:
        frac = f"mem_fraction_static={mem_fraction_static}" if mem_fraction_static is not None else "the fraction"
        raise ValueError(
            f"no room for the KV cache: weights take {weights_end + buffer_bytes} bytes of the {budget_bytes} "
            f"byte budget (device memory x {frac}), and one KV page needs {page_bytes} bytes; raise "
            f"--device-memory or --mem-fraction-static, or use a larger --tp-size")
    if max_total_tokens:
        if max_total_tokens < page_size:
            raise ValueError(f"--max-total-tokens {max_total_tokens} is smaller than one page ({page_size} tokens)")
        kv_pages = min(kv_pages, int(max_total_tokens) // page_size)
    tp1 = page_bytes * tp_size
    arena = -(-(weight_pages + kv_pages) * page_bytes // tp1) * tp1
    if arena + buffer_bytes > budget_bytes:  # rounding up to TP1 pages passed the budget: round down instead
        arena -= tp1
    kv_pages = arena // page_bytes - weight_pages
    if kv_pages < 1:
        raise ValueError(f"no room for the KV cache: the {budget_bytes} byte budget holds the weights "
                         f"({weight_pages} pages of {page_bytes} bytes) but no whole TP1 page ({tp1} bytes) "
                         f"after them; raise --device-memory or --mem-fraction-static")
    return ArenaPlan(budget_bytes, arena, page_bytes, tp1, weight_pages, kv_pages)


def local_memory_budget(server_args, device: torch.device) -> int:
    """This device's budget for weights + KV: (CUDA: free memory now; CPU: --device-memory) x
    mem_fraction_static. On CUDA call it before the model allocates anything (the communicators come first,
    parallel_state.create_aligned_groups warms them, so their buffers are already taken)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = server_args.device_memory_bytes()
    return int(free * server_args.mem_fraction_static)


def materialize_buffers(model: torch.nn.Module, model_config: ModelConfig, device: torch.device) -> None:
    """Compute on `device` the buffers of a model built on the meta device (the rotary cos/sin caches,
    [context_len, head_dim/2] float32 each, shared by every layer). Raises on a buffer it cannot build."""
    for module in model.modules():
        if isinstance(module, RotaryEmbedding) and module.cos_cache.is_meta:
            built = RotaryEmbedding(module.head_dim, module.cos_cache.shape[0], model_config.rope, device)
            module._buffers.update(built._buffers)
    left = [name for name, buf in model.named_buffers() if buf.is_meta]
    if left:
        raise RuntimeError(f"buffers {left} of {type(model).__name__} have no builder in materialize_buffers")


def buffer_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's buffers (outside the arena), each storage once."""
    seen, total = set(), 0
    for b in model.buffers():
        if b.data_ptr() not in seen:
            seen.add(b.data_ptr())
            total += b.numel() * b.element_size()
    return total


class ModelRunner:
    def __init__(self, server_args, model_config: ModelConfig, tp_group: TPGroup, device="cpu",
                 show_progress: bool = True, memory_budget: Optional[int] = None):
        """memory_budget: bytes for weights + KV agreed by every device (the worker passes the world MIN of
        local_memory_budget); None: this device's own budget, MIN over the TP group."""
        self.server_args = server_args
        self.model_config = model_config
        self.tp_group = tp_group
        self.device = torch.device(device)
        self.page_size = int(server_args.page_size)
        if self.device.type == "cpu" and server_args.cpu_threads_per_worker:
            torch.set_num_threads(int(server_args.cpu_threads_per_worker))

        if memory_budget is None:
            memory_budget = local_memory_budget(server_args, self.device)
            if tp_group.size > 1:  # page ids are instance-wide: every rank sizes the same arena
                memory_budget = self._min_over_group(memory_budget)
        self.model = get_model_class(model_config.architecture)(model_config, tp_group, torch.device("meta"))
        self.model.eval()
        materialize_buffers(self.model, model_config, self.device)
        offsets, weights_end = packed_layout(self.model)
        self.arena_plan = plan_arena(memory_budget, weights_end, buffer_bytes(self.model), self._page_bytes(),
                                     tp_group.size, self.page_size, server_args.max_total_tokens,
                                     server_args.mem_fraction_static)

        # One arena holds the weights (packed at the front) and the KV pages (DESIGN §4-5), allocated once;
        # the weights are loaded straight into their views.
        self.weight_store = WeightStore(self.arena_plan.arena_bytes, self.device)
        self.weight_store.bind(self.model, offsets, weights_end)
        self.weight_store.arena[:weights_end].zero_()  # padding rows and alignment gaps are zeros
        load_weights(self.model, server_args.model_path, show_progress=show_progress and tp_group.rank == 0)
        self.kv_pool = HeadCentricKVPool.over_bytes(self.weight_store.arena, self.page_size,
                                                    model_config.kv_heads_per_rank(tp_group.size),
                                                    model_config.num_layers, model_config.head_dim,
                                                    model_config.dtype)
        self._update_capacity()
        self.attn_backend = create_attention_backend(server_args.attention_backend, self.device, model_config.dtype)
        heads = model_config.heads
        if not heads.is_identity and tp_group.rank == 0:
            logger.info("heads padded for TP up to %d: %d -> %d query heads (zeros), %d -> %d KV heads (copies); "
                        "KV cache %.2fx", heads.granularity, heads.num_heads, heads.padded_heads, heads.num_kv_heads,
                        heads.padded_kv_heads, heads.padded_kv_heads / heads.num_kv_heads)
        logger.info("rank %d/%d: budget %d bytes, arena %d bytes (weights %d bytes, KV pool %d pages x %d tokens, "
                    "%d bytes)", tp_group.rank, tp_group.size, memory_budget, self.weight_store.arena_bytes,
                    self.weight_bytes, self.num_pages - self.reserved_pages, self.page_size, self.kv_pool_bytes)

    def _page_bytes(self) -> int:
        cfg = self.model_config
        return HeadCentricKVPool.page_bytes(self.page_size, cfg.kv_heads_per_rank(self.tp_group.size),
                                            cfg.num_layers, cfg.head_dim, cfg.dtype)

    def _update_capacity(self) -> None:
        self.num_pages = self.kv_pool.num_pages  # page ids span the whole arena
        self.reserved_pages = self.weight_store.reserved_pages(self.kv_pool.bytes_per_page)  # weights
        self.max_total_num_tokens = (self.num_pages - self.reserved_pages) * self.page_size
        self.kv_pool_bytes = (self.num_pages - self.reserved_pages) * self.kv_pool.bytes_per_page
        self.weight_bytes = module_bytes(self.model)

    def _min_over_group(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        return int(self.tp_group.all_reduce(t, op="min").item())

    # ---- Gyges ---------------------------------------------------------------------------------------
    def capacity_by_tp(self, max_tp: int) -> dict:
        """{tp: capacity_tokens_at_tp(tp)} for every power of two up to max_tp (computed once)."""
        if getattr(self, "_capacity_by_tp", None) is None:
            self._capacity_by_tp = {t: self.capacity_tokens_at_tp(t) for t in (1, 2, 4, 8, 16, 32, 64) if t <= max_tp}
        return self._capacity_by_tp

    def capacity_tokens_at_tp(self, tp: int) -> int:
        """KV tokens of an instance of TP `tp` formed from devices like this one (per device arena, weights
        re-sharded and packed): what a merge up to `tp` would give."""
        from sglang.srt.model_executor.regroup import build_model_on_meta, new_model_config

        cfg = new_model_config(self.model_config, tp)
        meta = build_model_on_meta(type(self.model), cfg, TPGroup(rank=0, size=tp, ranks=list(range(tp))))
        _, weights_end = packed_layout(meta)
        page = HeadCentricKVPool.page_bytes(self.page_size, cfg.kv_heads_per_rank(tp), cfg.num_layers,
                                            cfg.head_dim, cfg.dtype)
        pages = self.weight_store.arena_bytes // page - -(-weights_end // page)
        return max(0, pages) * self.page_size


    def rebind(self, model, tp_group: TPGroup, model_config: ModelConfig, kv_pool: HeadCentricKVPool) -> None:
        """Adopt a regrouped model and re-viewed KV pool after a transformation (model_executor/regroup.py)."""
        self.model = model
        self.tp_group = tp_group
        self.model_config = model_config
        self.kv_pool = kv_pool
        self._update_capacity()

    # ---- forward -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Write the new tokens' K/V into the pool; return float32 logits [num_logit_rows, vocab_size]."""
        return self.forward_with_hidden(batch)[0]

    @torch.inference_mode()
    def forward_with_hidden(self, batch: ForwardBatch):
        """forward(), and the final hidden states (after the last norm) of the same rows:
        -> (float32 logits [num_logit_rows, vocab_size], hidden [num_logit_rows, hidden_size] in the model dtype),
        identical on every rank (what /v1/embeddings pools)."""
        host = batch.to("cpu") if batch.input_ids.device.type != "cpu" else batch
        self.attn_backend.prepare(host, self.kv_pool, self.device)
        dev = host.to(self.device) if self.device.type != "cpu" else host
        hidden = self.model(dev.input_ids, dev.positions, dev, self.attn_backend, self.kv_pool)  # [T, hidden]
        return self.model.compute_logits(hidden, dev.logits_indices), hidden[dev.logits_indices]
