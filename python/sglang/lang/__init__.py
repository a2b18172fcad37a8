"""SGLang's frontend language, in this package: `import sglang as sgl` then `@sgl.function`, `sgl.gen`,
`sgl.select`, roles, `s.fork`, `run` / `run_batch` / streaming, on `sgl.RuntimeEndpoint(url)` (any server with
SGLang's native API), `sgl.Runtime(model_path=...)` (this package's server in a subprocess) or
`sgl.OpenAI(model, base_url=...)`.

Modules: ir (expressions, @function), api (primitives), interpreter (executors, program states), choices
(select scoring), chat_template (roles), tracer (constant prefixes), reasoning, backend/*.
Importing this package imports neither torch nor the server.
"""

from sglang.lang.api import (
    Runtime,
    assistant,
    assistant_begin,
    assistant_end,
    flush_cache,
    function,
    gen,
    gen_int,
    gen_string,
    get_server_info,
    image,
    select,
    separate_reasoning,
    set_default_backend,
    system,
    system_begin,
    system_end,
    user,
    user_begin,
    user_end,
    video,
)
from sglang.lang.backend.base_backend import BaseBackend
from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint
from sglang.lang.choices import (
    greedy_token_selection,
    token_length_normalized,
    unconditional_likelihood_normalized,
)
from sglang.lang.global_config import global_config
from sglang.lang.interpreter import ProgramError, ProgramState


def OpenAI(*args, **kwargs):
    """OpenAI-compatible backend (needs the `openai` package)."""
    from sglang.lang.backend.openai import OpenAI as _OpenAI

    return _OpenAI(*args, **kwargs)


__all__ = [
    "BaseBackend", "OpenAI", "ProgramError", "ProgramState", "Runtime", "RuntimeEndpoint", "assistant",
    "assistant_begin", "assistant_end", "flush_cache", "function", "gen", "gen_int", "gen_string",
    "get_server_info", "global_config", "greedy_token_selection", "image", "select", "separate_reasoning",
    "set_default_backend", "system", "system_begin", "system_end", "token_length_normalized",
    "unconditional_likelihood_normalized", "user", "user_begin", "user_end", "video",
]
