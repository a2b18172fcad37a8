"""Compile-at-first-use loader for the C++ extensions under sgl_kernel/csrc.

    load(name) -> the extension module, built by torch.utils.cpp_extension.load (ninja + g++) into torch's
    extension cache (~/.cache/torch_extensions/<python>_cpu/<name>/, or $TORCH_EXTENSIONS_DIR) and reused
    by every later process while the source is unchanged. The first build takes ~30 s; processes that
    load at the same time wait instead of building twice.

Waiting: torch's own build lock is a file (`lock` in the build directory) that a build killed midway leaves
behind, after which every later load waits for it forever (a server that never starts, silently). So loads
of one extension are serialized by an fcntl lock on `sgl_kernel.flock` next to it, which the kernel releases
when its holder dies; whoever holds it is the only one that can be building, so a torch `lock` file found
then is a leftover and is removed before torch is called.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import sys
from types import ModuleType

logger = logging.getLogger(__name__)

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


def build_directory(name: str) -> str:
    """Where torch builds `name` by default: <TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions>/py<ver>_<cpu|cuXY>/name."""
    import torch
    from torch.utils import cpp_extension

    flavour = "cpu" if torch.version.cuda is None else "cu" + torch.version.cuda.replace(".", "")
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return os.path.join(cpp_extension.get_default_build_root(), f"{python}_{flavour}", name)


@functools.lru_cache(maxsize=None)
def load(name: str) -> ModuleType:
    from torch.utils import cpp_extension

    sources = [os.path.join(CSRC, s) for s in _SOURCES[name]]
    omp = ["-fopenmp"] if name in _OPENMP else []
    build_dir = build_directory(name)
    os.makedirs(build_dir, exist_ok=True)
    with open(os.path.join(build_dir, "sgl_kernel.flock"), "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # released on close, or by the kernel when this process dies
        leftover = os.path.join(build_dir, "lock")
        if os.path.exists(leftover):
            logger.warning("removing %s, left by a build of %s that did not finish", leftover, name)
            os.remove(leftover)
        return cpp_extension.load(name=name, sources=sources, extra_cflags=_FLAGS + omp, extra_ldflags=omp,
                                  build_directory=build_dir, verbose=False)


def available(name: str) -> bool:
    """True when the extension builds (or is built) here; never raises."""
    try:
        load(name)
        return True
    except Exception:  # no compiler / ninja: callers fall back to the torch implementation
        return False


__all__ = ["EXTENSIONS", "build_directory", "load", "available"]
