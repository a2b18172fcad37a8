"""The frontend language's expressions and the `@function` wrapper (no I/O; nothing here talks to a server).

A program is a Python function `f(s, **args)`; `s += expr` hands an expression to the program's executor
(interpreter.py), which runs it in order on a worker thread. Expressions:

    str / SglConstantText    text appended to the prompt
    SglGen                   generate with SglSamplingParams (name: the variable that receives the output)
    SglSelect                pick one of `choices` by logprob (choices.py)
    SglRoleBegin/End         chat turn boundaries, rendered with the backend's chat template
    SglExprList              several of the above, in order (what `a + b` builds)
    SglSeparateReasoning     split a generated variable into reasoning and answer
    SglCommitLazy            send the prompt so far to the server (prefill only) so forks share its cache

`SglSamplingParams` holds a gen's parameters; `None` (or the tuple sentinel for lists) means "not set", so
that the executor can lay a gen's own settings over the defaults passed to `run()`.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Dict, List, Optional, Union

from sglang.lang.choices import ChoicesSamplingMethod

# Regexes the typed gens (dtype=int/float/str/bool, gen_int, gen_string) constrain the output with.
REGEX_INT = r"[-+]?[0-9]+[ \n]*"
REGEX_FLOAT = r"[-+]?[0-9]*\.?[0-9]+[ \n]*"
REGEX_BOOL = r"(True|False)"
REGEX_STR = r"\"[\w\d\s]*\""

# The sampling fields a gen may override, and the ones that are top-level /generate fields.
SAMPLING_FIELDS = ("max_new_tokens", "min_new_tokens", "n", "stop", "stop_token_ids", "temperature", "top_p",
                   "top_k", "min_p", "frequency_penalty", "presence_penalty", "ignore_eos", "return_logprob",
                   "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs", "dtype", "regex",
                   "json_schema")
LOGPROB_FIELDS = ("return_logprob", "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs")


@dataclasses.dataclass
class SglSamplingParams:
    """One gen's sampling parameters, with SGLang's names and defaults."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    n: int = 1
    stop: Union[str, List[str], tuple] = ()
    stop_token_ids: Union[List[int], tuple] = ()
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    ignore_eos: bool = False
    return_logprob: Optional[bool] = None
    logprob_start_len: Optional[int] = None
    top_logprobs_num: Optional[int] = None
    return_text_in_logprobs: Optional[bool] = None
    json_schema: Optional[str] = None
    dtype: Optional[Union[str, type]] = None  # int / float / str / bool: turned into a regex by the backend
    regex: Optional[str] = None

    def clone(self) -> "SglSamplingParams":
        return dataclasses.replace(self, stop=_copy_list(self.stop), stop_token_ids=_copy_list(self.stop_token_ids))

    def stop_list(self) -> List[str]:
        if not self.stop:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def to_srt_kwargs(self) -> Dict[str, Any]:
        """The `sampling_params` object of a native /generate request (unset constraints left out)."""
        out = {"max_new_tokens": self.max_new_tokens, "min_new_tokens": self.min_new_tokens, "n": self.n,
               "stop": self.stop_list(), "stop_token_ids": list(self.stop_token_ids or []),
               "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
               "frequency_penalty": self.frequency_penalty, "presence_penalty": self.presence_penalty,
               "ignore_eos": self.ignore_eos}
        if self.regex is not None:
            out["regex"] = self.regex
        if self.json_schema is not None:
            out["json_schema"] = self.json_schema
        return out

    def to_openai_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of an OpenAI completions / chat call (top_k, min_p etc. go in extra_body)."""
        out = {"max_tokens": self.max_new_tokens, "n": self.n, "stop": self.stop_list() or None,
               "temperature": self.temperature, "top_p": self.top_p,
               "frequency_penalty": self.frequency_penalty, "presence_penalty": self.presence_penalty}
        extra = {}
        if self.top_k != -1:
            extra["top_k"] = self.top_k
        if self.min_p:
            extra["min_p"] = self.min_p
        if self.min_new_tokens:
            extra["min_tokens"] = self.min_new_tokens
        if self.stop_token_ids:
            extra["stop_token_ids"] = list(self.stop_token_ids)
        if self.ignore_eos:
            extra["ignore_eos"] = True
        if self.regex is not None:
            extra["regex"] = self.regex
        if self.json_schema is not None:
            extra["json_schema"] = self.json_schema
        if extra:
            out["extra_body"] = extra
        return out


def _copy_list(v):
    return list(v) if isinstance(v, list) else v


# --------------------------------------------------------------------------------------------------------
# Expressions
# --------------------------------------------------------------------------------------------------------
class SglExpr:
    """Base of every expression; `a + b` (either side may be a str) builds an SglExprList."""

    def __add__(self, other):
        return SglExprList.concat(self, other)

    def __radd__(self, other):
        return SglExprList.concat(other, self)


class SglExprList(SglExpr):
    def __init__(self, expr_list: List[SglExpr]):
        self.expr_list = expr_list

    @staticmethod
    def concat(a, b) -> "SglExprList":
        parts = []
        for x in (a, b):
            if isinstance(x, str):
                x = SglConstantText(x)
            if not isinstance(x, SglExpr):
                raise TypeError(f"cannot add {type(x).__name__} to an SGLang expression")
            parts.extend(x.expr_list if isinstance(x, SglExprList) else [x])
        return SglExprList(parts)

    def __repr__(self):
        return f"ExprList({self.expr_list})"


class SglConstantText(SglExpr):
    def __init__(self, value: str):
        self.value = value

    def __repr__(self):
        return f"Constant({self.value!r})"


class SglGen(SglExpr):
    def __init__(self, name: Optional[str], sampling_params: SglSamplingParams):
        self.name = name
        self.sampling_params = sampling_params

    def __repr__(self):
        return f"Gen({self.name!r})"


class SglSelect(SglExpr):
    def __init__(self, name: Optional[str], choices: List[str], temperature: float,
                 choices_method: ChoicesSamplingMethod):
        if not choices or not all(isinstance(c, str) for c in choices):
            raise ValueError("select needs a non-empty list of strings as choices")
        self.name = name
        self.choices = list(choices)
        self.temperature = temperature
        self.choices_method = choices_method

    def __repr__(self):
        return f"Select({self.name!r}, choices={self.choices})"


class SglRoleBegin(SglExpr):
    def __init__(self, role: str):
        self.role = role

    def __repr__(self):
        return f"RoleBegin({self.role})"


class SglRoleEnd(SglExpr):
    def __init__(self, role: str):
        self.role = role

    def __repr__(self):
        return f"RoleEnd({self.role})"


class SglCommitLazy(SglExpr):
    def __repr__(self):
        return "CommitLazy()"


class SglVarScopeBegin(SglExpr):
    def __init__(self, name: str):
        self.name = name


class SglVarScopeEnd(SglExpr):
    def __init__(self, name: str):
        self.name = name


class SglConcateAndAppend(SglExpr):
    """Append the text each forked state added after the fork (join mode "concate_and_append")."""

    def __init__(self, states):
        self.states = states


class SglSeparateReasoning(SglExpr):
    """Split the variable of `expr` (a gen or select) into `<name>` (answer) and `<name>_reasoning_content`."""

    def __init__(self, model_type: Optional[str], expr: Optional[SglExpr] = None):
        self.model_type = model_type
        self.expr = expr
        self.name = reasoning_name(getattr(expr, "name", None)) if isinstance(expr, (SglGen, SglSelect)) else None


def reasoning_name(name: Optional[str]) -> Optional[str]:
    return None if name is None else f"{name}_reasoning_content"


# --------------------------------------------------------------------------------------------------------
# @function
# --------------------------------------------------------------------------------------------------------
def _sampling_defaults(max_new_tokens=128, n=1, stop=None, stop_token_ids=None, temperature=1.0, top_p=1.0,
                       top_k=-1, min_p=0.0, frequency_penalty=0.0, presence_penalty=0.0, ignore_eos=False,
                       return_logprob=None, logprob_start_len=None, top_logprobs_num=None,
                       return_text_in_logprobs=None) -> SglSamplingParams:
    return SglSamplingParams(
        max_new_tokens=max_new_tokens, n=n, stop=[] if stop is None else stop,
        stop_token_ids=[] if stop_token_ids is None else stop_token_ids, temperature=temperature, top_p=top_p,
        top_k=top_k, min_p=min_p, frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
        ignore_eos=ignore_eos, return_logprob=return_logprob, logprob_start_len=logprob_start_len,
        top_logprobs_num=top_logprobs_num, return_text_in_logprobs=return_text_in_logprobs)


_SAMPLING_KWARGS = set(inspect.signature(_sampling_defaults).parameters)


class SglFunction:
    """A program: `f.run(**args)` runs it once, `f.run_batch([...])` many at once, `f.trace()` records it."""

    def __init__(self, func, num_api_spec_tokens: Optional[int] = None,
                 bind_arguments: Optional[Dict[str, Any]] = None):
        params = list(inspect.signature(func).parameters.values())
        if not params or params[0].name != "s":
            raise TypeError(f"an SGLang function's first argument must be named 's' ({func.__name__})")
        self.func = func
        self.num_api_spec_tokens = num_api_spec_tokens
        self.bind_arguments = dict(bind_arguments or {})
        self.arg_names = [p.name for p in params[1:]]
        self.arg_defaults = [p.default for p in params[1:] if p.default is not inspect.Parameter.empty]
        self.__name__ = getattr(func, "__name__", "sgl_function")
        self.__doc__ = func.__doc__

    def bind(self, **kwargs) -> "SglFunction":
        unknown = sorted(set(kwargs) - set(self.arg_names))
        if unknown:
            raise TypeError(f"{self.__name__}() has no argument(s) {unknown}")
        return SglFunction(self.func, self.num_api_spec_tokens, {**self.bind_arguments, **kwargs})

    @staticmethod
    def _split_kwargs(kwargs: Dict[str, Any]):
        sampling = {k: kwargs.pop(k) for k in list(kwargs) if k in _SAMPLING_KWARGS}
        return _sampling_defaults(**sampling)

    def run(self, *args, stream: bool = False, backend=None, use_thread: bool = True, **kwargs):
        """Run once. Keyword arguments named like sampling parameters (max_new_tokens, temperature, stop, ...)
        are the defaults of every gen in the program; the others are the program's arguments."""
        from sglang.lang.interpreter import run_program

        defaults = self._split_kwargs(kwargs)
        return run_program(self, _resolve_backend(backend), args, kwargs, defaults, stream, use_thread=use_thread)

    def run_batch(self, batch_kwargs, *, backend=None, num_threads: Union[str, int] = "auto",
                  progress_bar: bool = False, generator_style: bool = False, **sampling):
        """Run once per entry of `batch_kwargs` (dicts of arguments, or tuples in argument order), each
        program on its own thread (num_threads="auto": up to max(96, 16 x CPUs)); states in input order."""
        from sglang.lang.interpreter import run_program_batch

        unknown = sorted(set(sampling) - _SAMPLING_KWARGS)
        if unknown:
            raise TypeError(f"run_batch() got unexpected keyword argument(s) {unknown}")
        if not isinstance(batch_kwargs, (list, tuple)):
            raise TypeError("run_batch() takes a list of argument dicts (or tuples)")
        batch = [self._as_kwargs(x) for x in batch_kwargs]
        if not batch:
            return []
        return run_program_batch(self, _resolve_backend(backend), batch, _sampling_defaults(**sampling),
                                 num_threads, progress_bar, generator_style=generator_style)

    def _as_kwargs(self, values) -> Dict[str, Any]:
        if isinstance(values, dict):
            return dict(values)
        if isinstance(values, (list, tuple)):
            required = len(self.arg_names) - len(self.arg_defaults)
            if not required <= len(values) <= len(self.arg_names):
                raise TypeError(f"{self.__name__}() takes {required} to {len(self.arg_names)} arguments, "
                                f"got {len(values)}: {values!r}")
            return dict(zip(self.arg_names, values))
        raise TypeError(f"run_batch() entries must be dicts or tuples, got {type(values).__name__}")

    def trace(self, *, backend=None, **kwargs):
        """Run the program without a server: constant text is recorded, gens and arguments are placeholders.
        Returns a TracedProgram (its `.prefix` is the constant text before the first placeholder)."""
        from sglang.lang.tracer import trace_program

        return trace_program(self, kwargs, backend)

    def cache(self, backend=None):
        """Send the program's constant prefix to the server once (prefill only) so that its radix cache
        holds it for later runs."""
        from sglang.lang.interpreter import cache_program

        return cache_program(self, _resolve_backend(backend))

    def __call__(self, *args, **kwargs):
        return self.run(*args, **kwargs)


def _resolve_backend(backend):
    from sglang.lang.global_config import global_config

    backend = backend or global_config.default_backend
    if backend is None:
        raise RuntimeError("no backend: pass backend=... or call sgl.set_default_backend(sgl.RuntimeEndpoint(url))")
    return getattr(backend, "endpoint", backend)  # a Runtime serves through its endpoint
