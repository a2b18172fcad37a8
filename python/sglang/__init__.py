"""SGLang-compatible serving runtime with Gyges built in.

`sglang.Engine` is the in-process API (the same shape as SGLang's offline engine); the HTTP server is
`python -m sglang.launch_server`. The frontend language (`sgl.function`, `sgl.gen`, `sgl.select`,
`sgl.RuntimeEndpoint`, ...) lives in sglang.lang and is re-exported here.

Everything is resolved lazily: importing `sglang` (or the language) imports neither torch nor the server.
"""

__version__ = "0.1.0"

# name -> module that defines it
_LANG_NAMES = (
    "BaseBackend", "OpenAI", "ProgramError", "ProgramState", "Runtime", "RuntimeEndpoint", "assistant",
    "assistant_begin", "assistant_end", "flush_cache", "function", "gen", "gen_int", "gen_string",
    "get_server_info", "global_config", "greedy_token_selection", "image", "select", "separate_reasoning",
    "set_default_backend", "system", "system_begin", "system_end", "token_length_normalized",
    "unconditional_likelihood_normalized", "user", "user_begin", "user_end", "video",
)
_LAZY = {name: "sglang.lang" for name in _LANG_NAMES}
_LAZY["Engine"] = "sglang.srt.entrypoints.engine"

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sglang' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
