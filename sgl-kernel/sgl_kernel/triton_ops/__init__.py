"""sgl_kernel's Triton kernels (for CUDA; on CPU they run in Triton's interpreter under TRITON_INTERPRET=1).

Importing this package does not import triton: the kernel modules are imported on first use, so sgl_kernel works
where triton is not installed.
    paged_attention   store_kv, decode_attention, extend_attention over the head-centric pool (layouts there)
    block_copy        copy_runs / gather_runs / scatter_runs: byte runs of a flat pool (Gyges transformations)
    reference         the torch implementations they are tested against (no triton)
attention_kernels() / copy_kernels() import and return the first two.

    triton_available()  triton is importable
    interpreting()      the kernels run in Triton's interpreter (TRITON_INTERPRET=1 when their module was imported:
                        triton reads it when a @triton.jit function is defined, so a process may set it, import the
                        kernels and restore it)
    usable_on(device)   the kernels can run on tensors of that device: CUDA with triton, or any device while
                        interpreting
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from types import ModuleType

import torch


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or stubbed-out triton
        return False


def interpreting() -> bool:
    """The kernels run in Triton's interpreter: as they were defined if already imported, else as they would be."""
    loaded = sys.modules.get("sgl_kernel.triton_ops.paged_attention")
    if loaded is not None:
        return loaded.INTERPRETED
    if not triton_available():
        return False
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # older triton: the environment variable itself
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def usable_on(device) -> bool:
    device = torch.device(device)
    if not triton_available():
        return False
    return interpreting() or (device.type == "cuda" and torch.cuda.is_available())


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"sgl_kernel.triton_ops.{name}")


def attention_kernels() -> ModuleType:
    """The Triton paged-attention module, sgl_kernel.triton_ops.paged_attention (imports triton)."""
    return _module("paged_attention")


def copy_kernels() -> ModuleType:
    """The Triton page-block copy module, sgl_kernel.triton_ops.block_copy (imports triton)."""
    return _module("block_copy")


__all__ = ["attention_kernels", "copy_kernels", "interpreting", "triton_available", "usable_on"]
