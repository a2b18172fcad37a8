"""ModelRunner: one rank's model, weights and KV pool; runs a ForwardBatch to logits.

Data flow at start-up:
    ModelConfig + TPGroup --registry--> model (zeroed local shards on `device`)
    budget = (CPU: server_args.device_memory_bytes(); CUDA: free memory) * mem_fraction_static
    pool bytes = budget - weight bytes (params + buffers of this rank)  -> ValueError if < 1 page
    num_pages = pool bytes // bytes_per_page  (capped by max_total_tokens // page_size; min over the TP group,
        so page ids mean the same on every rank)
    load_weights (safetensors -> local shards) -> HeadCentricKVPool(num_pages, ...)
Per iteration:
    forward(batch): backend.prepare(batch) once -> model(...) writes K/V, returns hidden
        -> logits rows -> float32 [num_logit_rows, vocab_size], identical on every rank
    forward_with_hidden(batch): the same, plus the hidden states of those rows (embedding requests)
"""

from __future__ import annotations

import logging

import torch

from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.distributed.parallel_state import TPGroup
from sglang.srt.layers.attention.selection import create_attention_backend
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


class ModelRunner:
    def __init__(self, server_args, model_config: ModelConfig, tp_group: TPGroup, device="cpu",
                 show_progress: bool = True):
        self.server_args = server_args
        self.model_config = model_config
        self.tp_group = tp_group
        self.device = torch.device(device)
        self.page_size = int(server_args.page_size)
        if self.device.type == "cpu" and server_args.cpu_threads_per_worker:
            torch.set_num_threads(int(server_args.cpu_threads_per_worker))

        budget = self._memory_budget()
        self.model = get_model_class(model_config.architecture)(model_config, tp_group, self.device)
        self.model.eval()
        self.weight_bytes = module_bytes(self.model)
        usable_pages = self._num_pages(budget)  # KV pages the budget allows after the weights
        load_weights(self.model, server_args.model_path, show_progress=show_progress and tp_group.rank == 0)

        # One arena holds the weights (packed at the front) and the KV pages (DESIGN §4-5).
        self.weight_store = WeightStore(self._arena_bytes(usable_pages), self.device)
        self.weight_store.adopt(self.model)
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
        logger.info("rank %d/%d: weights %d bytes, KV pool %d pages x %d tokens (%d bytes)", tp_group.rank,
                    tp_group.size, self.weight_bytes, self.num_pages - self.reserved_pages, self.page_size,
                    self.kv_pool_bytes)

    def _arena_bytes(self, usable_pages: int) -> int:
        """Packed weights rounded up to whole pages, plus `usable_pages` pages, in whole TP1 pages (so that
        every TP degree's pages tile the arena exactly)."""
        cfg = self.model_config
        page = HeadCentricKVPool.page_bytes(self.page_size, cfg.kv_heads_per_rank(self.tp_group.size),
                                            cfg.num_layers, cfg.head_dim, cfg.dtype)
        tp1_page = page * self.tp_group.size
        _, weights_end = packed_layout(self.model)
        want = (-(-weights_end // page) + usable_pages) * page
        return -(-want // tp1_page) * tp1_page

    def _update_capacity(self) -> None:
        self.num_pages = self.kv_pool.num_pages  # page ids span the whole arena
        self.reserved_pages = self.weight_store.reserved_pages(self.kv_pool.bytes_per_page)  # weights
        self.max_total_num_tokens = (self.num_pages - self.reserved_pages) * self.page_size
        self.kv_pool_bytes = (self.num_pages - self.reserved_pages) * self.kv_pool.bytes_per_page
        self.weight_bytes = module_bytes(self.model)

    # ---- memory ------------------------------------------------------------------------------------
    def _memory_budget(self) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
        else:
            free = self.server_args.device_memory_bytes()
        return int(free * self.server_args.mem_fraction_static)

    def _num_pages(self, budget: int) -> int:
        cfg = self.model_config
        per_page = HeadCentricKVPool.page_bytes(self.page_size, cfg.kv_heads_per_rank(self.tp_group.size),
                                                cfg.num_layers, cfg.head_dim, cfg.dtype)
        pool_bytes = budget - self.weight_bytes
        num_pages = max(pool_bytes, 0) // per_page
        if num_pages < 1:
            raise ValueError(
                f"no room for the KV cache: weights take {self.weight_bytes} bytes of the {budget} byte budget "
                f"(device memory x mem_fraction_static={self.server_args.mem_fraction_static}), and one KV page "
                f"needs {per_page} bytes; raise --device-memory or --mem-fraction-static, or use a larger --tp-size")
        cap = self.server_args.max_total_tokens
        if cap:
            if cap < self.page_size:
                raise ValueError(f"--max-total-tokens {cap} is smaller than one page ({self.page_size} tokens)")
            num_pages = min(num_pages, int(cap) // self.page_size)
        if self.tp_group.size > 1:  # page ids are instance-wide: every rank keeps the smallest count
            num_pages = self._min_over_group(num_pages)
        return num_pages

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
