"""Which attention backend a ModelRunner uses (--attention-backend).

    create_attention_backend(name, device, dtype) -> AttentionBackend
        "torch_native"  TorchNativeAttnBackend: torch ops (gather + SDPA), any device and dtype; the reference
        "cpu"           CpuPagedAttnBackend: sgl_kernel's C++/OpenMP paged attention (CPU, float32 / bfloat16)
        "triton"        TritonAttnBackend: sgl_kernel's Triton paged attention (CUDA; float32 / bfloat16 / float16;
                        on CPU only in Triton's interpreter, TRITON_INTERPRET=1, for tests)
        None            the best available for the device: "cpu" on CPU when sgl_kernel's extension builds and
                        the dtype is supported, "triton" on CUDA when triton is importable, else "torch_native"
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from sglang.srt.layers.attention.base import AttentionBackend

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("torch_native", "cpu", "triton")


def _triton_usable(device) -> bool:
    """sgl_kernel's Triton kernels can run on this device (never raises: no sgl_kernel / triton -> False)."""
    try:
        from sgl_kernel.triton_ops import usable_on
    except ImportError:
        return False
    return usable_on(device)


def resolve_attention_backend(name: Optional[str], device, dtype: torch.dtype) -> str:
    from sglang.srt.layers.attention.cpu_backend import SUPPORTED_DTYPES

    device = torch.device(device)
    if name is not None:
        if name not in ATTENTION_BACKENDS:
            raise ValueError(f"--attention-backend {name!r}: expected one of {ATTENTION_BACKENDS}")
        if name == "cpu" and (device.type != "cpu" or dtype not in SUPPORTED_DTYPES):
            raise ValueError(f"--attention-backend cpu runs on CPU in {[str(d) for d in SUPPORTED_DTYPES]}; "
                             f"this worker is on {device} in {dtype}")
        if name == "triton":
            from sglang.srt.layers.attention.triton_backend import SUPPORTED_DTYPES as TRITON_DTYPES

            if not _triton_usable(device) or dtype not in TRITON_DTYPES:
                raise ValueError(f"--attention-backend triton needs triton and a CUDA device (or TRITON_INTERPRET=1 "
                                 f"to run the kernels in Triton's interpreter), in "
                                 f"{[str(d) for d in TRITON_DTYPES]}; this worker is on {device} in {dtype}")
        return name
    if device.type == "cpu" and dtype in SUPPORTED_DTYPES:
        from sglang.srt.distributed.parallel_state import sgl_kernel_builds

        if sgl_kernel_builds("sgl_kernel_paged_attention"):
            return "cpu"
        logger.warning("sgl_kernel's CPU paged attention is not installed or does not build here: using torch_native "
                       "attention")
    if device.type == "cuda":
        from sglang.srt.layers.attention.triton_backend import SUPPORTED_DTYPES as TRITON_DTYPES

        if dtype in TRITON_DTYPES and _triton_usable(device):
            return "triton"
        logger.warning("triton is not installed (or sgl_kernel is not): using torch_native attention on %s", device)
    return "torch_native"


def create_attention_backend(name: Optional[str], device, dtype: torch.dtype) -> AttentionBackend:
    resolved = resolve_attention_backend(name, device, dtype)
    if resolved == "cpu":
        from sglang.srt.layers.attention.cpu_backend import CpuPagedAttnBackend

        return CpuPagedAttnBackend()
    if resolved == "triton":
        from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

        return TritonAttnBackend()
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    return TorchNativeAttnBackend()
