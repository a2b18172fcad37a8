"""SGLang-compatible serving runtime with Gyges built in.

`sglang.Engine` is the in-process API (the same shape as SGLang's offline engine); the HTTP server is
`python -m sglang.launch_server`.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: importing sglang must not import torch (the client-side tools and tests stay light).
    if name == "Engine":
        from sglang.srt.entrypoints.engine import Engine

        return Engine
    raise AttributeError(f"module 'sglang' has no attribute {name!r}")
