"""Running programs: one executor (and worker thread) per program state, as SGLang's interpreter does.

Data flow of `f.run(**args)`:

    run_program -> StreamExecutor (queue + worker thread) -> ProgramState `s` -> f(s, **args)
      s += expr            queued; the worker executes expressions in order:
                             text  -> appended to s.text()
                             gen   -> backend.generate(s, params) / generate_stream -> variable + meta info
                             select-> backend.select(s, choices, ...) -> variable + meta info
                             roles -> chat template prefix/suffix, s.messages() grows
      s["x"]               waits until the worker has set variable x (re-raises the worker's error if it
                           failed before setting it)
      s.fork(n)            sends the text so far to the server once (prefill only: the radix cache then holds
                           it for every fork), waits, and makes n executors that continue from it in parallel
      forks.join()         copies the forks' new variables back as lists
    run_program_batch -> a thread per program (ThreadPoolExecutor), optional tqdm progress bar; the program's
                         constant prefix is traced and sent once beforehand (global_config)

With stream=True the program itself runs on a thread too and `text_iter` / `text_async_iter` follow the
text (or one variable) as chunks arrive from the server.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import multiprocessing
import queue
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Dict, List, Optional

from sglang.lang.global_config import global_config
from sglang.lang.ir import (
    SAMPLING_FIELDS,
    SglCommitLazy,
    SglConcateAndAppend,
    SglConstantText,
    SglExpr,
    SglExprList,
    SglGen,
    SglRoleBegin,
    SglRoleEnd,
    SglSamplingParams,
    SglSelect,
    SglSeparateReasoning,
    SglVarScopeBegin,
    SglVarScopeEnd,
    reasoning_name,
)
from sglang.lang.reasoning import split_reasoning

logger = logging.getLogger(__name__)

_STOP = object()  # queue sentinel: the program added its last expression


class ProgramError(RuntimeError):
    """Raised when a program reads a variable that its executor could not produce (the cause is chained)."""


def run_program(program, backend, func_args, func_kwargs, default_sampling_para: SglSamplingParams,
                stream: bool, sync: bool = False, use_thread: bool = True) -> "ProgramState":
    kwargs = {**func_kwargs, **program.bind_arguments}
    executor = StreamExecutor(backend, kwargs, default_sampling_para, stream=stream, use_thread=use_thread)
    state = ProgramState(executor)
    if stream:
        def body():
            try:
                _run_body(state, program, func_args, kwargs, sync)
            except Exception as e:  # noqa: BLE001 - reported through s.error()
                executor.fail(e)

        threading.Thread(target=contextvars.copy_context().run, args=(body,), daemon=True,
                         name=f"sgl-program-{executor.sid[:8]}").start()
        return state
    _run_body(state, program, func_args, kwargs, sync)
    return state


def _run_body(state: "ProgramState", program, func_args, kwargs, sync: bool) -> None:
    try:
        state.ret_value = program.func(state, *func_args, **kwargs)
    finally:
        state.stream_executor.end()
    if sync:
        state.stream_executor.sync()
    if global_config.verbosity >= 2:
        print(state.text())


def resolve_num_threads(num_threads, batch_size: int) -> int:
    if num_threads == "auto":
        num_threads = max(96, multiprocessing.cpu_count() * 16)
    if not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be a positive int or 'auto', got {num_threads!r}")
    return max(1, min(num_threads, batch_size))


def run_program_batch(program, backend, batch_arguments: List[Dict[str, Any]],
                      default_sampling_para: SglSamplingParams, num_threads, progress_bar: bool,
                      generator_style: bool = False):
    if global_config.enable_precache_with_tracing and len(batch_arguments) > 1:
        cache_program(program, backend)
    workers = resolve_num_threads(num_threads, len(batch_arguments))

    def one(arguments):
        return run_program(program, backend, (), arguments, default_sampling_para, False, sync=True)

    if generator_style:
        return _batch_generator(one, batch_arguments, workers, progress_bar)
    bar = _progress(len(batch_arguments)) if progress_bar else None
    try:
        if workers == 1:
            states = []
            for arguments in batch_arguments:
                states.append(one(arguments))
                if bar is not None:
                    bar.update()
            return states
        with ThreadPoolExecutor(workers, thread_name_prefix="sgl-batch") as pool:
            futures = [pool.submit(one, a) for a in batch_arguments]
            if bar is not None:
                for f in futures:
                    f.add_done_callback(lambda _: bar.update())
            return [f.result() for f in futures]
    finally:
        if bar is not None:
            bar.close()


def _batch_generator(one, batch_arguments, workers: int, progress_bar: bool):
    """States in input order as they complete, submitting at most a window of programs ahead."""
    bar = _progress(len(batch_arguments)) if progress_bar else None
    window = max(workers * 2, 1)
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="sgl-batch") as pool:
            pending = []
            for arguments in batch_arguments:
                pending.append(pool.submit(one, arguments))
                if len(pending) >= window:
                    yield pending.pop(0).result()
                    if bar is not None:
                        bar.update()
            for f in pending:
                yield f.result()
                if bar is not None:
                    bar.update()
    finally:
        if bar is not None:
            bar.close()


def _progress(total: int):
    import tqdm

    return tqdm.tqdm(total=total)


def cache_program(program, backend) -> Optional[str]:
    """Send the program's constant prefix (traced) to the server once; returns it when sent."""
    from sglang.lang.tracer import trace_program

    try:
        prefix = trace_program(program, {}, backend).prefix
    except Exception:  # noqa: BLE001 - pre-caching is an optimisation; the programs still run
        logger.debug("tracing %s for its prefix failed", program.__name__, exc_info=True)
        return None
    if prefix and len(prefix) > global_config.precache_min_chars:
        backend.cache_prefix(prefix)
        return prefix
    return None


# --------------------------------------------------------------------------------------------------------
class StreamExecutor:
    """Executes one program state's expressions in order (on its own worker thread unless use_thread=False)."""

    def __init__(self, backend, arguments: Dict[str, Any], default_sampling_para: SglSamplingParams,
                 chat_template=None, stream: bool = False, use_thread: bool = True):
        self.sid = uuid.uuid4().hex
        self.backend = backend
        self.arguments = arguments
        self.default_sampling_para = default_sampling_para
        self.stream = stream
        self.chat_template = chat_template or backend.get_chat_template()

        self.text_ = ""
        self.messages_: List[dict] = []  # finished turns, OpenAI format
        self.variables: Dict[str, Any] = {}
        self.meta_info: Dict[str, Any] = {}
        self.variable_event: Dict[str, threading.Event] = {}
        self.stream_var_event: Dict[str, threading.Event] = {}
        self.stream_text_event = threading.Event() if stream else None
        self.cur_role: Optional[str] = None
        self.cur_role_begin_pos: Optional[int] = None
        self.fork_start_text_pos: Optional[int] = None
        self.error_: Optional[BaseException] = None
        self.is_finished = False
        self._ended = False

        self.use_thread = use_thread
        if use_thread:
            self.queue: "queue.Queue" = queue.Queue()
            self.worker = threading.Thread(target=contextvars.copy_context().run, args=(self._work,),
                                           daemon=True, name=f"sgl-exec-{self.sid[:8]}")
            self.worker.start()

    # ---- the program's side --------------------------------------------------------------------------
    def submit(self, expr) -> None:
        if isinstance(expr, str):
            expr = SglConstantText(expr)
        if not isinstance(expr, SglExpr):
            raise TypeError(f"cannot add {type(expr).__name__} to a program state; add text or sgl.* "
                            f"expressions")
        self._register_vars(expr)
        if self.use_thread:
            self.queue.put(expr)
        else:
            self._execute(expr)

    def sync(self) -> None:
        if self.use_thread:
            self.queue.join()

    def get_var(self, name: str):
        event = self.variable_event.get(name)
        if event is not None:
            event.wait()
        if name not in self.variables:
            if self.error_ is not None:
                raise ProgramError(f"variable {name!r} was not produced: {self.error_}") from self.error_
            raise KeyError(name)
        return self.variables[name]

    def set_var(self, name: str, value) -> None:
        self.variables[name] = value

    def get_meta_info(self, name: str, timeout: Optional[float] = None):
        event = self.variable_event.get(name)
        if event is not None and not event.wait(timeout):
            raise TimeoutError(f"timed out waiting for {name!r}")
        return self.meta_info.get(name)

    def fork(self, size: int = 1) -> List["StreamExecutor"]:
        size = int(size)
        if size > 1:
            self.submit(SglCommitLazy())  # the shared prefix is prefilled once, then served from the cache
        self.sync()
        children = []
        for _ in range(size):
            c = StreamExecutor(self.backend, self.arguments, self.default_sampling_para, self.chat_template,
                               self.stream)
            c.variables = dict(self.variables)
            c.meta_info = dict(self.meta_info)
            c.text_ = self.text_
            c.messages_ = list(self.messages_)
            c.cur_role, c.cur_role_begin_pos = self.cur_role, self.cur_role_begin_pos
            c.fork_start_text_pos = len(self.text_)
            children.append(c)
        return children

    def text(self) -> str:
        self.sync()
        return self.text_

    def messages(self) -> List[dict]:
        self.sync()
        return self.messages_

    def error(self) -> Optional[BaseException]:
        self.sync()
        return self.error_

    def end(self) -> None:
        """No more expressions will come (the worker exits once the queue is drained)."""
        if self._ended:
            return
        self._ended = True
        if self.use_thread:
            self.queue.put(_STOP)
        else:
            self._finish()
        try:
            self.backend.end_program(self)
        except Exception:  # noqa: BLE001
            logger.debug("end_program failed", exc_info=True)

    def fail(self, error: BaseException) -> None:
        """The program itself raised (stream mode): record it and wake every reader."""
        if self.error_ is None:
            self.error_ = error
        self.end()
        if not self.use_thread:
            return
        self._wake_all()

    # ---- the worker's side ---------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            expr = self.queue.get()
            if expr is _STOP:
                self.queue.task_done()
                break
            if self.error_ is None:
                try:
                    self._execute(expr)
                except Exception as e:  # noqa: BLE001 - reported through s.error() and variable reads
                    logger.warning("SGLang program %s failed: %s", self.sid[:8], e)
                    self.error_ = e
                    self._wake_all()
            self.queue.task_done()
            if self.stream_text_event is not None:
                self.stream_text_event.set()
        self._finish()

    def _finish(self) -> None:
        self.is_finished = True
        self._wake_all()

    def _wake_all(self) -> None:
        if self.error_ is not None or self.is_finished:
            for ev in list(self.variable_event.values()) + list(self.stream_var_event.values()):
                ev.set()
        if self.stream_text_event is not None:
            self.stream_text_event.set()

    def _register_vars(self, expr) -> None:
        if isinstance(expr, SglExprList):
            for e in expr.expr_list:
                self._register_vars(e)
            return
        name = getattr(expr, "name", None)
        if name is not None and isinstance(expr, (SglGen, SglSelect, SglVarScopeBegin, SglSeparateReasoning)):
            self.variable_event[name] = threading.Event()
            if self.stream:
                self.stream_var_event[name] = threading.Event()

    def _execute(self, expr) -> None:
        handler = self._HANDLERS.get(type(expr))
        if handler is None:
            raise TypeError(f"unknown expression {expr!r}")
        handler(self, expr)

    def _fill(self, expr: SglConstantText) -> None:
        self.text_ += str(expr.value)

    def _list(self, expr: SglExprList) -> None:
        for e in expr.expr_list:
            self._execute(e)

    def _set(self, name: Optional[str], value, meta) -> None:
        if name is None:
            return
        self.variables[name] = value
        self.meta_info[name] = meta
        self.variable_event.setdefault(name, threading.Event()).set()
        if name in self.stream_var_event:
            self.stream_var_event[name].set()

    def _gen(self, expr: SglGen) -> None:
        params = self.resolve_sampling_params(expr.sampling_params)
        name = expr.name
        if not self.stream:
            comp, meta = self.backend.generate(self, sampling_params=params)
            self.text_ += comp[0] if isinstance(comp, list) else comp
            self._set(name, comp, meta)
            return
        if name is not None:
            self.variables[name] = ""
            self.stream_var_event[name].set()
        for chunk, meta in self.backend.generate_stream(self, sampling_params=params):
            self.text_ += chunk
            if name is not None:
                self.variables[name] += chunk
                self.meta_info[name] = meta
                self.stream_var_event[name].set()
            self.stream_text_event.set()
        if name is not None:
            self._set(name, self.variables[name], self.meta_info.get(name))

    def _select(self, expr: SglSelect) -> None:
        decision = self.backend.select(self, expr.choices, expr.temperature, expr.choices_method)
        self._set(expr.name, decision.decision, decision.meta_info)
        self.text_ += decision.decision

    def _role_begin(self, expr: SglRoleBegin) -> None:
        if self.cur_role is not None:
            raise ValueError(f"role {expr.role!r} begins inside role {self.cur_role!r}; roles do not nest")
        tmpl = self.chat_template
        if not self.messages_ and expr.role != "system" and tmpl.default_system_prompt:
            self._role_begin(SglRoleBegin("system"))
            self.text_ += tmpl.default_system_prompt
            self._role_end(SglRoleEnd("system"))
        prefix, _ = tmpl.get_prefix_and_suffix(expr.role, self.messages_)
        self.cur_role = expr.role
        self.text_ += prefix
        self.cur_role_begin_pos = len(self.text_)

    def _role_end(self, expr: SglRoleEnd) -> None:
        if self.cur_role != expr.role:
            raise ValueError(f"role {expr.role!r} ends but {self.cur_role!r} is open")
        content = self.text_[self.cur_role_begin_pos:].lstrip()
        _, suffix = self.chat_template.get_prefix_and_suffix(expr.role, self.messages_)
        self.text_ += suffix
        self.messages_.append({"role": expr.role, "content": content})
        self.cur_role = None

    def _var_scope_begin(self, expr: SglVarScopeBegin) -> None:
        self.variables[expr.name] = len(self.text_)

    def _var_scope_end(self, expr: SglVarScopeEnd) -> None:
        start = self.variables[expr.name]
        self._set(expr.name, self.text_[start:], None)

    def _commit_lazy(self, expr: SglCommitLazy) -> None:
        if self.text_:
            self.backend.commit_lazy_operations(self)

    def _concat_append(self, expr: SglConcateAndAppend) -> None:
        for st in expr.states:
            exe = st.stream_executor
            exe.sync()
            self.text_ += exe.text_[exe.fork_start_text_pos:]

    def _separate_reasoning(self, expr: SglSeparateReasoning) -> None:
        if self.stream:
            return  # as in SGLang: streamed outputs keep their reasoning inline
        target = expr.expr
        if isinstance(target, SglExprList):
            for e in target.expr_list:
                if isinstance(e, (SglGen, SglSelect)):
                    self._separate_reasoning(SglSeparateReasoning(expr.model_type, e))
            return
        if not isinstance(target, (SglGen, SglSelect)) or target.name is None:
            return
        text = self.variables[target.name]
        reasoning, answer = split_reasoning(text, expr.model_type)
        if self.text_.endswith(text):
            self.text_ = self.text_[:len(self.text_) - len(text)] + answer
        self.variables[target.name] = answer
        self._set(reasoning_name(target.name), reasoning, None)

    _HANDLERS: Dict[type, Callable] = {
        SglConstantText: _fill, SglExprList: _list, SglGen: _gen, SglSelect: _select,
        SglRoleBegin: _role_begin, SglRoleEnd: _role_end, SglVarScopeBegin: _var_scope_begin,
        SglVarScopeEnd: _var_scope_end, SglCommitLazy: _commit_lazy, SglConcateAndAppend: _concat_append,
        SglSeparateReasoning: _separate_reasoning,
    }

    def resolve_sampling_params(self, override: SglSamplingParams) -> SglSamplingParams:
        """The run()'s defaults with the gen's own settings laid over them, plus the template's stop strings."""
        params = self.default_sampling_para.clone()
        for name in SAMPLING_FIELDS:
            value = getattr(override, name, None)
            if value is not None:
                setattr(params, name, list(value) if isinstance(value, (list, tuple)) and name != "stop"
                        else value)
        extra = tuple(getattr(self.chat_template, "stop_str", ()) or ())
        if extra:
            params.stop = params.stop_list() + [s for s in extra if s not in params.stop_list()]
        return params


# --------------------------------------------------------------------------------------------------------
class ProgramState:
    """What a program sees as `s` (and what run() returns)."""

    def __init__(self, stream_executor: StreamExecutor):
        self.stream_executor = stream_executor
        self.ret_value = None

    # roles: s.user("text") appends a whole turn; `with s.user():` opens one
    def _role(self, role: str, expr=None):
        if expr is not None:
            turn = SglExprList([SglRoleBegin(role), expr if isinstance(expr, SglExpr) else SglConstantText(expr),
                                SglRoleEnd(role)])
            self.stream_executor.submit(turn)
            return turn

        @contextmanager
        def scope():
            self.stream_executor.submit(SglRoleBegin(role))
            yield
            self.stream_executor.submit(SglRoleEnd(role))

        return scope()

    def system(self, expr=None):
        return self._role("system", expr)

    def user(self, expr=None):
        return self._role("user", expr)

    def assistant(self, expr=None):
        return self._role("assistant", expr)

    @contextmanager
    def var_scope(self, name: str):
        self.stream_executor.submit(SglVarScopeBegin(name))
        yield
        self.stream_executor.submit(SglVarScopeEnd(name))

    def fork(self, size: int = 1, position_ids_offset=None) -> "ProgramStateGroup":
        return ProgramStateGroup([ProgramState(e) for e in self.stream_executor.fork(size)], self)

    @contextmanager
    def copy(self):
        group = self.fork(1)
        try:
            yield group[0]
        finally:
            group.join()

    def text(self) -> str:
        return self.stream_executor.text()

    def messages(self) -> List[dict]:
        return self.stream_executor.messages()

    def sync(self) -> None:
        self.stream_executor.sync()

    def error(self) -> Optional[BaseException]:
        return self.stream_executor.error()

    def get_var(self, name: str):
        return self.stream_executor.get_var(name)

    def set_var(self, name: str, value) -> None:
        self.stream_executor.set_var(name, value)

    def get_meta_info(self, name: str):
        return self.stream_executor.get_meta_info(name)

    # ---- streaming -----------------------------------------------------------------------------------
    def _chunks(self, var_name: Optional[str], wait: Callable[[threading.Event], None]):
        """Generator of (piece, meta) pairs; `wait(event)` blocks until the event is set."""
        exe = self.stream_executor
        if not exe.stream:
            yield (self.text() if var_name is None else self.get_var(var_name)), None
            return
        sent = 0
        if var_name is None:
            while True:
                wait(exe.stream_text_event)
                exe.stream_text_event.clear()
                done = exe.is_finished
                piece = exe.text_[sent:]
                sent += len(piece)
                if piece:
                    yield piece, None
                if done:
                    return
        event = exe.stream_var_event.get(var_name)
        while event is None:  # the program has not added this gen yet
            if exe.is_finished:
                return
            wait(exe.stream_text_event)
            exe.stream_text_event.clear()
            event = exe.stream_var_event.get(var_name)
        while True:
            wait(event)
            event.clear()
            final = exe.variable_event[var_name].is_set()
            piece = str(exe.variables.get(var_name, ""))[sent:]
            sent += len(piece)
            if piece:
                yield piece, exe.meta_info.get(var_name)
            if final or exe.error_ is not None:
                return

    def text_iter(self, var_name: Optional[str] = None):
        for piece, _ in self._chunks(var_name, lambda ev: ev.wait()):
            yield piece

    async def text_async_iter(self, var_name: Optional[str] = None, return_meta_data: bool = False):
        loop = asyncio.get_running_loop()
        gen = self._chunks(var_name, lambda ev: ev.wait())
        while True:
            item = await loop.run_in_executor(None, next, gen, None)
            if item is None:
                return
            piece, meta = item
            yield (piece, meta) if return_meta_data else piece

    # ---- s += ..., s["x"] ----------------------------------------------------------------------------
    def __iadd__(self, other):
        if other is None:
            raise ValueError("cannot add None to a program state")
        self.stream_executor.submit(other)
        return self

    def __getitem__(self, name: str):
        return self.get_var(name)

    def __setitem__(self, name: str, value) -> None:
        self.set_var(name, value)

    def __contains__(self, name: str) -> bool:
        return name in self.stream_executor.variables

    def __repr__(self) -> str:
        return f"ProgramState({self.text()!r})"

    def __del__(self):
        # Fork states that are never joined: let their worker threads exit.
        try:
            self.stream_executor.end()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class ProgramStateGroup:
    """The states `s.fork(n)` returns: index them, add to all of them, join them back."""

    def __init__(self, states: List[ProgramState], src_state: Optional[ProgramState] = None):
        self.states = states
        self.src_state = src_state

    def join(self, mode: str = "gather_variable") -> None:
        if mode == "gather_variable":
            parent = self.src_state.stream_executor.variables
            before = set(parent)
            for st in self.states:
                st.stream_executor.sync()
                for k, v in st.stream_executor.variables.items():
                    if k in before:
                        continue
                    parent.setdefault(k, []).append(v)
        elif mode == "concate_and_append":
            self.src_state += SglConcateAndAppend(self.states)
            self.src_state.stream_executor.sync()
        else:
            raise ValueError(f"unknown join mode {mode!r}; use 'gather_variable' or 'concate_and_append'")
        for st in self.states:
            st.stream_executor.end()

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self):
        return iter(self.states)

    def __getitem__(self, i: int) -> ProgramState:
        return self.states[i]

    def __setitem__(self, i: int, value) -> None:
        if value is not self.states[i]:  # `forks[i] += x` assigns the same state back
            raise TypeError("fork states cannot be replaced")

    def __iadd__(self, other):
        if callable(other) and not isinstance(other, SglExpr):
            for i, st in enumerate(self.states):
                st += other(i)
        elif isinstance(other, (list, tuple)):
            for st, x in zip(self.states, other):
                st += x
        else:
            for st in self.states:
                st += other
        return self
