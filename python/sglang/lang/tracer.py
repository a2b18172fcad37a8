"""Tracing a program without a server: `f.trace()` runs the function with placeholder arguments and a
backend that refuses to generate, recording what it adds until the first thing that needs a real value
(a gen, a select, reading an argument). What came before is the program's constant prefix, which run_batch
sends once so that the radix cache serves it to every program of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from sglang.lang.chat_template import get_chat_template
from sglang.lang.ir import SglExpr, SglExprList, SglFunction, _sampling_defaults


class StopTracing(Exception):
    """The traced program needs a value that only a real run has."""


class TraceArgument(SglExpr):
    """Stands for a program argument while tracing. Concatenated with text it stays an expression (so the
    text before it is still recorded); executing it, or using its value any other way, stops the trace."""

    def __init__(self, name: str):
        self.name = name

    def _stop(self, *args, **kwargs):
        raise StopTracing(f"argument {self.name!r} is used")

    __str__ = __format__ = __iter__ = __len__ = __getitem__ = __int__ = __float__ = _stop
    __bool__ = __eq__ = __lt__ = __gt__ = __contains__ = __mul__ = __mod__ = _stop
    __hash__ = object.__hash__

    def __repr__(self):
        return f"TraceArgument({self.name!r})"


class _TracingBackend:
    """Gives the real backend's chat template; every server call stops the trace."""

    def __init__(self, backend):
        self.backend = backend

    def get_chat_template(self):
        if self.backend is not None:
            return self.backend.get_chat_template()
        return get_chat_template("default")

    def _stop(self, *args, **kwargs):
        raise StopTracing("the program generates here")

    generate = generate_stream = select = commit_lazy_operations = _stop

    def end_program(self, s) -> None:
        pass


@dataclass
class TracedProgram:
    prefix: str  # the constant text before the first gen / select / argument use
    nodes: List[SglExpr] = field(default_factory=list)  # the expressions added before the trace stopped
    stopped_by: Optional[str] = None  # why it stopped (None: the program ran to the end)


def _tracing_executor_class():
    from sglang.lang.interpreter import StreamExecutor

    class TracingExecutor(StreamExecutor):
        def _execute(self, expr) -> None:
            if isinstance(expr, TraceArgument):
                expr._stop()
            super()._execute(expr)

    return TracingExecutor


def trace_program(program: SglFunction, arguments: Dict[str, Any], backend=None) -> TracedProgram:
    from sglang.lang.interpreter import ProgramState

    _TracingExecutor = _tracing_executor_class()

    backend = getattr(backend, "endpoint", backend)
    args = {name: arguments.get(name, TraceArgument(name)) for name in program.arg_names}
    args.update(program.bind_arguments)
    executor = _TracingExecutor(_TracingBackend(backend), args, _sampling_defaults(), use_thread=False)
    recorded: List[SglExpr] = []
    submit = executor.submit

    def record(expr):
        recorded.extend(expr.expr_list if isinstance(expr, SglExprList) else [expr])
        submit(expr)

    executor.submit = record
    state = ProgramState(executor)
    stopped = None
    try:
        program.func(state, **args)
    except StopTracing as e:
        stopped = str(e)
    executor._ended = True
    return TracedProgram(prefix=executor.text_, nodes=recorded, stopped_by=stopped)
