"""sgl_kernel's compile-at-first-use loader: a build killed midway leaves torch's `lock` file behind, after which
torch waits for it forever; a load must then remove it and load (a server start must not hang on it)."""

import os
import subprocess
import sys

from sgl_kernel._build import build_directory

LOAD = "from sgl_kernel._build import load; load('sgl_kernel_shm_comm'); print('loaded')"


def test_a_leftover_build_lock_does_not_hang_a_load():
    subprocess.run([sys.executable, "-c", LOAD], check=True, timeout=300, cwd="/tmp")  # built (or cached)
    leftover = os.path.join(build_directory("sgl_kernel_shm_comm"), "lock")
    open(leftover, "w").close()  # what a build killed between taking torch's lock and finishing leaves
    try:
        out = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True, timeout=300, cwd="/tmp")
    finally:
        stuck = os.path.exists(leftover)
        if stuck:
            os.remove(leftover)
    assert out.returncode == 0 and "loaded" in out.stdout, out.stderr[-2000:]
    assert not stuck
