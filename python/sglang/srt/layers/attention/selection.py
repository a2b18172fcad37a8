"""Which attention backend a ModelRunner uses (--attention-backend).

    create_attention_backend(name, device, dtype) -> AttentionBackend
        "torch_native"  TorchNativeAttnBackend: torch ops (gather + SDPA), any device and dtype; the reference
        "cpu"           CpuPagedAttnBackend: sgl_kernel's C++/OpenMP paged attention (CPU, float32 / bfloat16)
        None            the best available for the device: "cpu" on CPU when sgl_kernel's extension builds and
                        the dtype is supported, else "torch_native"
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from sglang.srt.layers.attention.base import AttentionBackend

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("torch_native", "cpu")


def resolve_attention_backend(name: Optional[str], device, dtype: torch.dtype) -> str:
    from sglang.srt.layers.attention.cpu_backend import SUPPORTED_DTYPES

    device = torch.device(device)
    if name is not None:
        if name not in ATTENTION_BACKENDS:
            raise ValueError(f"--attention-backend {name!r}: expected one of {ATTENTION_BACKENDS}")
        if name == "cpu" and (device.type != "cpu" or dtype not in SUPPORTED_DTYPES):
            raise ValueError(f"--attention-backend cpu runs on CPU in {[str(d) for d in SUPPORTED_DTYPES]}; "
                             f"this worker is on {device} in {dtype}")
        return name
    if device.type == "cpu" and dtype in SUPPORTED_DTYPES:
        from sglang.srt.distributed.parallel_state import sgl_kernel_builds

        if sgl_kernel_builds("sgl_kernel_paged_attention"):
            return "cpu"
        logger.warning("sgl_kernel's CPU paged attention is not installed or does not build here: using torch_native "
                       "attention")
    return "torch_native"


def create_attention_backend(name: Optional[str], device, dtype: torch.dtype) -> AttentionBackend:
    resolved = resolve_attention_backend(name, device, dtype)
    if resolved == "cpu":
        from sglang.srt.layers.attention.cpu_backend import CpuPagedAttnBackend

        return CpuPagedAttnBackend()
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    return TorchNativeAttnBackend()
