"""Compile-at-first-use loader for the C++ extensions under sgl_kernel/csrc.

    load(name) -> the extension module, built by torch.utils.cpp_extension.load (ninja + g++) into torch's
    extension cache (~/.cache/torch_extensions/<python>_cpu/<name>/, or $TORCH_EXTENSIONS_DIR) and reused
    by every later process while the source is unchanged. The first build takes ~30 s; processes that
    load at the same time wait on torch's build lock instead of building twice.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")

# extension name -> its C++ sources (under csrc/)
_SOURCES = {
    "sgl_kernel_shm_comm": ["shm_comm.cpp"],
    "sgl_kernel_paged_attention": ["paged_attention.cpp"],
}

EXTENSIONS = tuple(_SOURCES)

_FLAGS = ["-O3", "-march=native", "-std=c++17"]
# OpenMP (at::parallel_for over torch's intra-op threads): the soname libgomp.so.1 resolves to the runtime torch
# has already loaded, so the kernel and torch share one thread pool and torch.set_num_threads applies to both.
_OPENMP = {"sgl_kernel_paged_attention"}


@functools.lru_cache(maxsize=None)
def load(name: str) -> ModuleType:
    from torch.utils import cpp_extension

    sources = [os.path.join(CSRC, s) for s in _SOURCES[name]]
    omp = ["-fopenmp"] if name in _OPENMP else []
    return cpp_extension.load(name=name, sources=sources, extra_cflags=_FLAGS + omp, extra_ldflags=omp,
                              verbose=False)


def available(name: str) -> bool:
    """True when the extension builds (or is built) here; never raises."""
    try:
        load(name)
        return True
    except Exception:  # no compiler / ninja: callers fall back to the torch implementation
        return False


__all__ = ["EXTENSIONS", "load", "available"]
