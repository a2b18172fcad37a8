"""The public primitives of the frontend language (what `import sglang as sgl` exposes)."""

from __future__ import annotations

from typing import Callable, List, Optional, Union

from sglang.lang.choices import ChoicesSamplingMethod, token_length_normalized
from sglang.lang.global_config import global_config
from sglang.lang.ir import (
    SglExpr,
    SglExprList,
    SglFunction,
    SglGen,
    SglRoleBegin,
    SglRoleEnd,
    SglSamplingParams,
    SglSelect,
    SglSeparateReasoning,
)


def function(func: Optional[Callable] = None, num_api_spec_tokens: Optional[int] = None):
    """Decorator: `@sgl.function` or `@sgl.function(num_api_spec_tokens=...)`."""
    if func is not None:
        return SglFunction(func, num_api_spec_tokens=num_api_spec_tokens)
    return lambda f: SglFunction(f, num_api_spec_tokens=num_api_spec_tokens)


def Runtime(*args, **kwargs):
    """This package's server in a subprocess, as a backend (see backend/runtime_endpoint.py)."""
    from sglang.lang.backend.runtime_endpoint import Runtime as _Runtime

    return _Runtime(*args, **kwargs)


def set_default_backend(backend) -> None:
    global_config.default_backend = backend


def _backend(backend):
    backend = backend or global_config.default_backend
    if backend is None:
        raise RuntimeError("no backend: pass one or call sgl.set_default_backend(...)")
    return getattr(backend, "endpoint", backend)


def flush_cache(backend=None) -> None:
    _backend(backend).flush_cache()


def get_server_info(backend=None):
    return _backend(backend).get_server_info()


def gen(name: Optional[str] = None, max_tokens: Optional[int] = None, min_tokens: Optional[int] = None,
        n: Optional[int] = None, stop: Optional[Union[str, List[str]]] = None,
        stop_token_ids: Optional[List[int]] = None, temperature: Optional[float] = None,
        top_p: Optional[float] = None, top_k: Optional[int] = None, min_p: Optional[float] = None,
        frequency_penalty: Optional[float] = None, presence_penalty: Optional[float] = None,
        ignore_eos: Optional[bool] = None, return_logprob: Optional[bool] = None,
        logprob_start_len: Optional[int] = None, top_logprobs_num: Optional[int] = None,
        return_text_in_logprobs: Optional[bool] = None, dtype: Optional[Union[type, str]] = None,
        choices: Optional[List[str]] = None, choices_method: Optional[ChoicesSamplingMethod] = None,
        regex: Optional[str] = None, json_schema: Optional[str] = None) -> SglExpr:
    """Generate into variable `name`. Unset parameters take the run()'s defaults. With `choices`, this is a
    select (scored by `choices_method`)."""
    if choices:
        return SglSelect(name, choices, 0.0 if temperature is None else temperature,
                         token_length_normalized if choices_method is None else choices_method)
    if json_schema is not None and not isinstance(json_schema, str):
        import json

        json_schema = json.dumps(json_schema)
    return SglGen(name, SglSamplingParams(
        max_new_tokens=max_tokens, min_new_tokens=min_tokens, n=n, stop=stop, stop_token_ids=stop_token_ids,
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty, ignore_eos=ignore_eos, return_logprob=return_logprob,
        logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num,
        return_text_in_logprobs=return_text_in_logprobs, dtype=dtype, regex=regex, json_schema=json_schema))


def _typed_gen(dtype: str, name, kwargs) -> SglExpr:
    if "dtype" in kwargs or "regex" in kwargs:
        raise TypeError(f"gen_{dtype} sets its own dtype; use sgl.gen for other constraints")
    return gen(name, dtype=dtype, **kwargs)


def gen_int(name: Optional[str] = None, **kwargs) -> SglExpr:
    """gen constrained to an integer (REGEX_INT), stopping at a space or newline."""
    return _typed_gen("int", name, kwargs)


def gen_string(name: Optional[str] = None, **kwargs) -> SglExpr:
    """gen constrained to a double-quoted string of word characters and spaces (REGEX_STR)."""
    return _typed_gen("str", name, kwargs)


def select(name: Optional[str] = None, choices: Optional[List[str]] = None, temperature: float = 0.0,
           choices_method: ChoicesSamplingMethod = token_length_normalized) -> SglExpr:
    """Append the choice with the best score (choices.py) and store it in variable `name`."""
    return SglSelect(name, choices, temperature, choices_method)


def image(expr) -> SglExpr:
    raise NotImplementedError("sgl.image: this runtime serves text-only models (no image input)")


def video(path: str, num_frames: int) -> SglExpr:
    raise NotImplementedError("sgl.video: this runtime serves text-only models (no video input)")


def _role(name: str, expr=None) -> SglExpr:
    if expr is None:
        return SglExprList([SglRoleBegin(name), SglRoleEnd(name)])
    return SglExprList([SglRoleBegin(name), expr if isinstance(expr, SglExpr) else SglExprList.concat("", expr),
                        SglRoleEnd(name)])


def system(expr=None) -> SglExpr:
    return _role("system", expr)


def user(expr=None) -> SglExpr:
    return _role("user", expr)


def assistant(expr=None) -> SglExpr:
    return _role("assistant", expr)


def system_begin() -> SglExpr:
    return SglRoleBegin("system")


def system_end() -> SglExpr:
    return SglRoleEnd("system")


def user_begin() -> SglExpr:
    return SglRoleBegin("user")


def user_end() -> SglExpr:
    return SglRoleEnd("user")


def assistant_begin() -> SglExpr:
    return SglRoleBegin("assistant")


def assistant_end() -> SglExpr:
    return SglRoleEnd("assistant")


def separate_reasoning(expr: Optional[SglExpr] = None, model_type: Optional[str] = None) -> SglExpr:
    """After `expr` (a gen) runs, split its variable: the answer stays in `<name>`, the reasoning goes to
    `<name>_reasoning_content` (lang/reasoning.py lists the formats)."""
    from sglang.lang.reasoning import REASONING_FORMATS

    if model_type not in REASONING_FORMATS:
        raise ValueError(f"separate_reasoning: unknown model_type {model_type!r}; known: "
                         f"{sorted(REASONING_FORMATS)}")
    return SglExprList([expr, SglSeparateReasoning(model_type, expr=expr)])
