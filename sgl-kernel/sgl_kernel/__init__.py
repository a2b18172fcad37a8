"""sgl_kernel: this project's CPU kernels, torch C++ extensions compiled from csrc/ at first use (see _build).

    shm_comm()  -> module with ShmGroup(name, create, rank, size, chunk_bytes): shared-memory all-reduce (sum)
                   and all-gather for the ranks of one tensor-parallel group on one host (csrc/shm_comm.cpp)
    paged_attention_ext() -> module with paged_attention(q, k, v, kv_buffer, layer, page_table, prefix_lens,
                   extend_lens, scale) -> out: stores the new tokens' K/V into the head-centric pool and runs causal
                   attention over it in place (decode and chunked prefill mixed, GQA; csrc/paged_attention.cpp)
    triton_ops     Triton kernels for CUDA (paged decode / extend attention over the same pool, the page-block copy
                   of transformations); imported on first use, so this package needs no triton (triton_ops/__init__)

Each op keeps a torch / torch.distributed implementation in sglang as its reference and fallback.
"""

from __future__ import annotations

from sgl_kernel._build import available, load


def shm_comm():
    """The shared-memory collectives extension (built on first call, ~30 s; cached afterwards)."""
    return load("sgl_kernel_shm_comm")


def paged_attention_ext():
    """The CPU paged-attention extension (built on first call, ~1 min; cached afterwards)."""
    return load("sgl_kernel_paged_attention")


__all__ = ["available", "load", "paged_attention_ext", "shm_comm"]
