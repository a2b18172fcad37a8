"""`python -m sglang.check_env`: the versions and devices that matter when reporting a problem."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import subprocess
import sys

PACKAGES = ("sglang-gyges", "gyges", "torch", "transformers", "tokenizers", "safetensors", "xgrammar", "numpy",
            "fastapi", "uvicorn", "uvloop", "orjson", "pyzmq", "aiohttp", "requests", "openai", "psutil", "tqdm",
            "prometheus_client", "jinja2")


def version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def collect() -> dict:
    import sglang

    info = {"Python": sys.version.replace("\n", " "), "Platform": platform.platform(),
            "sglang": f"{sglang.__version__} ({os.path.dirname(sglang.__file__)})",
            "CPUs": str(os.cpu_count())}
    for dist in PACKAGES:
        info[dist] = version(dist)
    try:
        import torch

        info["CUDA available"] = str(torch.cuda.is_available())
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                info[f"GPU {i}"] = torch.cuda.get_device_name(i)
            info["CUDA (torch)"] = str(torch.version.cuda)
    except ImportError:
        info["CUDA available"] = "unknown (torch missing)"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if smi.returncode == 0 and smi.stdout.strip():
            info["nvidia-smi"] = "; ".join(smi.stdout.strip().splitlines())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def main() -> None:
    for key, value in collect().items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
