"""TokenizerManager: the main process's side of every request (asyncio).

    generate_request(GenerateReqInput)
      -> shape + type checks (normalize), then the cheap size limits (RequestLimits: batch size, n, prompt
         characters / ids, stop lists, top_logprobs_num) -- all before any tokenization (ValueError -> 400)
      -> tokenize + SamplingParams, in a thread when the prompts are large (the event loop keeps serving)
      -> one TokenizedGenerateReqInput per prompt and per parallel sample (n) --ZMQ--> Controller
      <- BatchStrOut from the Detokenizer: NEW text and output ids (reassembled here: apply_text_delta),
         finish reason, logprob deltas
      -> response dicts in SGLang's /generate format (one at the end, or a stream of them), with the
         cumulative text / output_ids / logprobs SGLang returns

Sessions (SGLang's session API, session_controller.py): open_session / close_session, and a /generate with
session_params becomes the session's next turn (the whole conversation as input_ids) right after
tokenization; idle sessions are closed by the watchdog loop after --session-idle-timeout. A next-turn hint
(session_params.next_turn_in_s, or the X-Next-Turn-In header on any endpoint, the OpenAI API included) goes
with the tokenized request to the scheduler (managers/req_kv.py keeps that turn's KV ready).

Request ids are unique among live requests: a client rid already in flight, or one whose request was
aborted and has not been confirmed finished by its scheduler yet ("draining"), is refused with a 400.

Background tasks (created lazily in whichever event loop serves requests): the output receiver, the
reply receiver (flush / internal state / ServingState), and a watchdog that reports dead workers to the
controller. ServingState from the controller: failed instances make /health 503 (requests still go to the
live ones), kill_ranks are SIGKILLed (hung workers), and no live instance left -- like a dead controller or
detokenizer -- makes the server unavailable and calls `on_fatal` (the HTTP server then exits non-zero).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import pickle
import random
import time
import uuid
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Tuple

import zmq
import zmq.asyncio

from sglang.srt.managers.io_struct import (
    AbortReq,
    BatchStrOut,
    EmbeddingReqInput,
    CloseSessionReqInput,
    OpenSessionReqInput,
    FlushCacheReq,
    FlushCacheReqOutput,
    MoveSessionReq,
    MoveSessionReqOutput,
    GenerateReqInput,
    GetInternalStateReq,
    GygesTopologyReq,
    GygesTransformReq,
    ReqStrOut,
    ServingState,
    WorkerDied,
    TokenizedGenerateReqInput,
    apply_text_delta,
)
from sglang.srt.managers.session_controller import (
    NEXT_TURN_HEADER,
    SessionStore,
    parse_next_turn_hint,
    parse_session_params,
)
from sglang.srt.server_args import ServerArgs, parse_size
from sglang.srt.utils import PortArgs, get_zmq_socket, remove_ipc_files

logger = logging.getLogger(__name__)

# Prompts with at most this many characters in all are tokenized on the event loop (faster than a thread
# hop); larger ones in the tokenizer thread pool.
INLINE_TOKENIZE_CHARS = 8192
# How long an aborted request's rid stays reserved waiting for its scheduler's final output.
DRAIN_TIMEOUT_S = 30.0


class ServerUnavailableError(RuntimeError):
    """A worker process died or the server is shutting down: it cannot serve (HTTP 503)."""


class RequestFailedError(RuntimeError):
    """The server failed this one request (its output could not be decoded): HTTP 500, others unaffected."""


@dataclass
class RequestLimits:
    """The --max-* request limits (server_args "request limits" group), resolved and checked."""

    max_body_bytes: int
    max_prompt_chars: int
    max_batch_prompts: int
    max_parallel_samples: int
    max_top_logprobs_num: int
    max_stop_strings: int
    max_stop_str_len: int

    @classmethod
    def from_server_args(cls, args: ServerArgs, max_req_input_len: Optional[int] = None) -> "RequestLimits":
        """Raises ValueError naming the bad flag."""
        try:
            body = parse_size(args.max_request_body_size)
        except ValueError as e:
            raise ValueError(f"--max-request-body-size: {e}") from None
        chars = args.max_prompt_chars
        if chars is None:
            chars = 16 * (max_req_input_len or 1 << 20)
        lim = cls(body, chars, args.max_batch_prompts, args.max_parallel_samples, args.max_top_logprobs_num,
                  args.max_stop_strings, args.max_stop_str_len)
        for name, value in dataclasses.asdict(lim).items():
            if value < 1 and name != "max_top_logprobs_num" or value < 0:
                flag = {"max_body_bytes": "max_request_body_size"}.get(name, name).replace("_", "-")
                raise ValueError(f"--{flag} must be positive, got {value}")
        for name in ("timeout_keep_alive", "timeout_request_read"):
            if not getattr(args, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0 seconds, got {getattr(args, name)}")
        if args.limit_concurrency is not None and args.limit_concurrency < 1:
            raise ValueError(f"--limit-concurrency must be >= 1, got {args.limit_concurrency}")
        return lim


def _raise_for_rejection(resp: Dict) -> None:
    """A request that ended as an abort with an HTTP status: invalid (400) or its instance failed (503)."""
    reason = resp["meta_info"]["finish_reason"] or {}
    if reason.get("type") != "abort":
        return
    if reason.get("status_code") == 400:
        raise ValueError(reason.get("message", "invalid request"))
    if reason.get("status_code") == 503:
        raise ServerUnavailableError(reason.get("message", "the instance serving the request failed"))
    if reason.get("status_code") == 500:
        raise RequestFailedError(reason.get("message", "the server failed this request"))


@dataclass
class ReqState:
    """What the TokenizerManager knows about one in-flight request."""

    rid: str
    return_logprob: bool
    top_logprobs_num: int
    return_text_in_logprobs: bool
    created_time: float
    event: asyncio.Event = field(default_factory=asyncio.Event)
    pending: List[ReqStrOut] = field(default_factory=list)  # outputs not yet consumed
    finished: bool = False
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    last_completion_tokens: int = 0
    error: Optional[BaseException] = None
    output_ids: List[int] = field(default_factory=list)  # cumulative (the detokenizer sends new ids only)
    text: str = ""  # cumulative (the detokenizer sends text deltas)
    # Cumulative logprobs (SGLang returns the whole lists in every response).
    input_token_logprobs: List[Any] = field(default_factory=list)
    input_top_logprobs: List[Any] = field(default_factory=list)
    output_token_logprobs: List[Any] = field(default_factory=list)
    output_top_logprobs: List[Any] = field(default_factory=list)


class TokenizerManager:
    def __init__(self, server_args: ServerArgs, port_args: PortArgs, model_config, max_total_num_tokens: int,
                 max_req_input_len: int, child_processes: List[Any]):
        self.server_args = server_args
        self.port_args = port_args
        self.model_config = model_config
        self.max_total_num_tokens = max_total_num_tokens
        self.max_req_input_len = max_req_input_len
        self.child_processes = child_processes
        self.metrics = None  # set by the HTTP server (MetricsCollector)
        self.tokenizer = None
        if not server_args.skip_tokenizer_init:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(server_args.tokenizer_path)
        self._seed_rng = random.Random(server_args.random_seed)
        self.sessions = SessionStore(server_args.session_idle_timeout,
                                     getattr(self.tokenizer, "bos_token_id", None))
        self.limits = RequestLimits.from_server_args(server_args, max_req_input_len)
        self.rid_to_state: Dict[str, ReqState] = {}
        # rid -> deadline: aborted requests whose scheduler has not confirmed their end yet (rid reserved).
        self._draining: Dict[str, float] = {}
        self._reply_waiters: Dict[str, asyncio.Future] = {}
        self._healthy = True
        self._dead_reason = ""
        # (devices, reason) of every failed instance (ServingState); /health is 503 while non-empty.
        self.failed_instances: List[Tuple[List[int], str]] = []
        # Called once with the reason when the server can no longer serve at all (set by the HTTP server).
        self.on_fatal: Optional[Callable[[str], None]] = None
        self._token_text: Dict[int, str] = {}
        self._executor = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)),
                                            thread_name_prefix="tokenize")
        self._loop = None
        self._zmq_ctx = zmq.asyncio.Context(2)
        self._send_to_controller = None
        self._shutdown = False

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def _ensure_started(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        self._loop = loop
        self._send_to_controller = get_zmq_socket(self._zmq_ctx, zmq.PUSH, self.port_args.controller_input, bind=False)
        self._recv_outputs = get_zmq_socket(self._zmq_ctx, zmq.PULL, self.port_args.tokenizer_input, bind=True)
        self._recv_replies = get_zmq_socket(self._zmq_ctx, zmq.PULL, self.port_args.tokenizer_replies, bind=True)
        self._tasks = [loop.create_task(self._output_loop()), loop.create_task(self._reply_loop()),
                       loop.create_task(self._watchdog_loop())]

    def is_healthy(self) -> bool:
        """True while at least one instance serves and the server is not shutting down."""
        return self._healthy and not self._shutdown

    def health_problems(self) -> List[str]:
        """Why /health must answer 503 (empty: healthy): the server is down, or instances failed."""
        if self._shutdown:
            return ["the server is shutting down"]
        problems = [] if self._healthy else [f"the server cannot serve: {self._dead_reason}"]
        problems += [f"instance on devices {devices} failed: {reason}" for devices, reason in self.failed_instances]
        return problems

    def begin_shutdown(self, reason: str = "the server is shutting down") -> None:
        """Refuse new requests and fail every in-flight one with a 503 (call from the event loop)."""
        self._fail_all(ServerUnavailableError(reason))
        self._shutdown = True

    def shutdown(self) -> None:
        """Stop every child process (workers, controller, detokenizer) and remove the ipc socket files."""
        from sglang.srt.entrypoints.engine import kill_processes

        self._shutdown = True
        try:
            kill_processes(self.child_processes)
        finally:
            remove_ipc_files(self.port_args)
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def stop_background_tasks(self) -> None:
        """Cancel the receiver / watchdog tasks (call from the loop that runs them)."""
        tasks = getattr(self, "_tasks", [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- requests ----------------------------------------------------------------------------------------
    async def generate_request(self, obj: GenerateReqInput, request=None) -> AsyncIterator[Any]:
        self._ensure_started()
        if not self.is_healthy():
            raise ServerUnavailableError(f"the server is not serving: {self._dead_reason or 'shutting down'}")
        try:
            obj.normalize()
            chars = self._check_limits(obj)
            self._check_rids(obj.rid)  # before tokenizing: cheap
            session_params = self._check_session_turns(obj)
            headers = getattr(request, "headers", None)
            header_hint = parse_next_turn_hint(headers.get(NEXT_TURN_HEADER), f"the {NEXT_TURN_HEADER} header") \
                if headers is not None else None
            tokenized = await self.offload(chars, self._tokenize_all, obj)
            if chars > INLINE_TOKENIZE_CHARS:  # it waited for a thread: the world may have changed meanwhile
                if not self.is_healthy():
                    raise ServerUnavailableError(
                        f"the server is not serving: {self._dead_reason or 'shutting down'}")
                self._check_rids(obj.rid)  # others may have taken one while this one was tokenized
            if session_params is not None:
                self._make_session_turns(obj, session_params, tokenized)
            for t in tokenized:  # the header's hint where session_params gave none
                if t.next_turn_in_s is None:
                    t.next_turn_in_s = header_hint
            messages = [pickle.dumps(t, pickle.HIGHEST_PROTOCOL) for t in tokenized]
        except RecursionError:
            raise ValueError("the request is nested too deeply (a JSON value inside it); flatten it") from None
        states = []
        for t in tokenized:
            st = ReqState(t.rid, t.return_logprob, t.top_logprobs_num, obj.return_text_in_logprobs, time.time())
            self.rid_to_state[t.rid] = st
            states.append(st)
        for m in messages:
            self._send_to_controller.send(m)  # what send_pyobj sends, pickled above where errors are a 400
        single = obj.is_single and obj.parallel_sample_num == 1
        try:
            if obj.stream:
                async for out in self._stream_outputs(states, request, single):
                    yield out
            else:
                results = await asyncio.gather(*(self._final_output(st, request) for st in states))
                yield results[0] if single else list(results)
        finally:
            for st in states:
                if not st.finished and st.rid in self.rid_to_state:
                    self._drain(st.rid)
                    await self.abort_request(st.rid)
                    self.sessions.finished(st.rid, st.output_ids)  # a session turn keeps what it produced
                self.rid_to_state.pop(st.rid, None)

    # ---- sessions ----------------------------------------------------------------------------------------
    async def open_session(self, obj: OpenSessionReqInput) -> str:
        """A new session's id (ValueError -> 400 when the id is taken or the fields are wrong)."""
        self._close_expired_sessions()
        return self.sessions.open(obj.capacity_of_str_len, obj.session_id)

    async def close_session(self, obj: CloseSessionReqInput) -> None:
        """Forget the session's turns and release its pinned KV everywhere (ValueError -> 400 if not open)."""
        self._ensure_started()
        for rid in self.sessions.close(obj.session_id):
            self._send_to_controller.send_pyobj(AbortReq(rid))
        self._send_to_controller.send_pyobj(CloseSessionReqInput(obj.session_id))

    def _close_expired_sessions(self) -> None:
        for session_id in self.sessions.expired():
            logger.info("session %s idle for more than %g s: closed (--session-idle-timeout)", session_id,
                        self.sessions.idle_timeout_s)
            self.sessions.close(session_id)
            if self._send_to_controller is not None:
                self._send_to_controller.send_pyobj(CloseSessionReqInput(session_id))

    def _check_session_turns(self, obj: GenerateReqInput):
        """The parsed session_params of each prompt (None without sessions), validated before tokenizing."""
        if obj.session_params is None:
            return None
        self._close_expired_sessions()
        value = obj.session_params
        if isinstance(value, list):
            if len(value) != obj.batch_size:
                raise ValueError("'session_params' list must have one entry per prompt")
            params = [parse_session_params(v) for v in value]
        else:
            params = [parse_session_params(value)] * obj.batch_size
        n = obj.parallel_sample_num
        for i, p in enumerate(params):
            for j in range(n):
                self.sessions.check(p, obj.rid[i * n + j])
        return params

    def _make_session_turns(self, obj: GenerateReqInput, params, tokenized: List[TokenizedGenerateReqInput]) -> None:
        """Each tokenized prompt becomes its session's next turn (whole conversation as input_ids)."""
        made, replaced = [], []
        try:
            for k, t in enumerate(tokenized):
                replaced += self.sessions.prepare(params[k // obj.parallel_sample_num], t)
                made.append(t.rid)
                if len(t.input_ids) > self.max_req_input_len:
                    raise ValueError(self._too_long_message(len(t.input_ids)))
                if t.return_logprob and t.logprob_start_len >= len(t.input_ids):
                    raise ValueError(f"logprob_start_len {t.logprob_start_len} is not inside the session turn's "
                                     f"prompt of {len(t.input_ids)} tokens")
                self._check_total_tokens(len(t.input_ids), t.sampling_params.max_new_tokens)
        except ValueError:
            for rid in made:
                self.sessions.forget_turn(rid)
            raise
        for rid in replaced:  # turns replaced while still running
            self._send_to_controller.send_pyobj(AbortReq(rid))

    # ---- validation --------------------------------------------------------------------------------------
    def _check_limits(self, obj: GenerateReqInput) -> int:
        """The size limits, on the normalized request, before any tokenization. Returns the prompt characters.
        Raises ValueError naming the limit and its flag."""
        lim = self.limits
        if obj.batch_size > lim.max_batch_prompts:
            raise ValueError(f"the request holds {obj.batch_size} prompts; at most {lim.max_batch_prompts} are "
                             f"accepted in one request (--max-batch-prompts)")
        n = obj.parallel_sample_num
        if n > lim.max_parallel_samples:
            raise ValueError(f"n = {n} parallel samples requested; at most {lim.max_parallel_samples} are "
                             f"accepted (--max-parallel-samples)")
        if obj.batch_size * n > lim.max_batch_prompts:
            raise ValueError(f"{obj.batch_size} prompts x n = {n} make {obj.batch_size * n} requests; at most "
                             f"{lim.max_batch_prompts} are accepted in one request (--max-batch-prompts)")
        chars = 0
        for i in range(obj.batch_size):
            p = obj.prompt(i)
            if isinstance(p, str):
                self.check_prompt_chars(len(p))
                chars += len(p)
            elif len(p) > self.max_req_input_len:
                raise ValueError(self._too_long_message(len(p)))
        top_max = min(lim.max_top_logprobs_num, self.model_config.vocab_size)
        for v in obj.top_logprobs_num:
            if v > top_max:
                raise ValueError(f"top_logprobs_num = {v}; at most {top_max} are accepted (--max-top-logprobs-num, "
                                 f"and never more than the vocabulary of {self.model_config.vocab_size})")
        for sp in obj.sampling_params:
            entries = 0
            for key in ("stop", "stop_regex"):
                v = sp.get(key)
                items = [v] if isinstance(v, str) else v if isinstance(v, list) else []
                entries += len(items)
                for x in items:
                    if isinstance(x, str) and len(x) > lim.max_stop_str_len:
                        raise ValueError(f"a '{key}' entry has {len(x)} characters; at most {lim.max_stop_str_len} "
                                         f"are accepted (--max-stop-str-len)")
            if entries > lim.max_stop_strings:
                raise ValueError(f"{entries} stop strings / regexes given; at most {lim.max_stop_strings} are "
                                 f"accepted (--max-stop-strings)")
            ids = sp.get("stop_token_ids")
            if isinstance(ids, list) and len(ids) > lim.max_stop_strings:
                raise ValueError(f"{len(ids)} stop_token_ids given; at most {lim.max_stop_strings} are accepted "
                                 f"(--max-stop-strings)")
        return chars

    def _check_rids(self, rids: List[str]) -> None:
        """Every rid must be free: not in flight, not draining (O(len(rids)))."""
        now = time.time()
        clash, seen = [], set()
        for r in rids:
            if r in seen:
                clash.append(r)
            seen.add(r)
            if r in self.rid_to_state:
                clash.append(r)
            elif r in self._draining:
                if self._draining[r] > now:
                    clash.append(r)
                else:
                    del self._draining[r]
        if clash:
            shown = ", ".join(sorted(clash)[:5]) + (" ..." if len(clash) > 5 else "")
            raise ValueError(f"request id(s) already in use: {shown}; a request id must be unique among the "
                             f"requests in flight (an aborted one stays in use until its scheduler has dropped it)")

    def _drain(self, rid: str) -> None:
        self._draining[rid] = time.time() + DRAIN_TIMEOUT_S
        if len(self._draining) > 4096:  # expire old ones now and then (they also expire on lookup)
            now = time.time()
            for r in [r for r, t in self._draining.items() if t <= now]:
                del self._draining[r]

    async def offload(self, chars: int, fn, *args):
        """fn(*args) for tokenizing / templating `chars` characters: inline when small, else in the
        tokenizer thread pool so the event loop keeps serving."""
        if chars <= INLINE_TOKENIZE_CHARS:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def check_prompt_chars(self, chars: int, what: str = "the prompt") -> None:
        """ValueError (400) when `chars` exceeds --max-prompt-chars."""
        if chars > self.limits.max_prompt_chars:
            raise ValueError(f"{what} has {chars} characters; at most {self.limits.max_prompt_chars} are "
                             f"accepted (--max-prompt-chars), and at most {self.max_req_input_len} prompt tokens")

    def _too_long_message(self, n: int) -> str:
        ctx = self.model_config.context_len
        return (f"The input ({n} tokens) is longer than the model's context length ({ctx} tokens): at most "
                f"{self.max_req_input_len} prompt tokens are accepted")

    def _check_total_tokens(self, prompt_tokens: int, max_new_tokens) -> None:
        """An explicit max_new_tokens must fit in the context with the prompt (SGLang's check and message)."""
        ctx = self.model_config.context_len
        if isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool) and \
                prompt_tokens + max_new_tokens > ctx:
            raise ValueError(
                f"Requested token count exceeds the model's maximum context length of {ctx} tokens. You "
                f"requested a total of {prompt_tokens + max_new_tokens} tokens: {prompt_tokens} tokens from the "
                f"input messages and {max_new_tokens} tokens for the completion. Please reduce the number of "
                f"tokens in the input messages or the completion to fit within the limit.")

    def _tokenize_all(self, obj: GenerateReqInput) -> List[TokenizedGenerateReqInput]:
        return [self._tokenize_one(obj, i, j) for i in range(obj.batch_size) for j in range(obj.parallel_sample_num)]

    def _tokenize_one(self, obj: GenerateReqInput, i: int, j: int) -> TokenizedGenerateReqInput:
        from sglang.srt.sampling.sampling_params import SamplingParams

        prompt = obj.prompt(i)
        if isinstance(prompt, str):
            if prompt == "":
                raise ValueError("the prompt is empty; send a non-empty 'text' or 'input_ids'")
            if self.tokenizer is None:
                raise ValueError("this server was started with --skip-tokenizer-init; send 'input_ids'")
            input_text, input_ids = prompt, self.tokenizer.encode(prompt)
        else:
            if not prompt:
                raise ValueError("the prompt is empty; send a non-empty 'text' or 'input_ids'")
            vocab = self.model_config.vocab_size
            if len(prompt) > self.max_req_input_len:
                raise ValueError(self._too_long_message(len(prompt)))
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"input_ids holds token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
            input_text, input_ids = "", list(prompt)
        if len(input_ids) > self.max_req_input_len:
            raise ValueError(self._too_long_message(len(input_ids)))
        params = dict(obj.sampling_params[i])
        self._check_total_tokens(len(input_ids), params.get("max_new_tokens"))
        params.pop("n", None)
        sp = SamplingParams.from_dict(params)
        sp.normalize(self.tokenizer)
        sp.verify(self.model_config.vocab_size)
        if sp.sampling_seed is None:
            sp.sampling_seed = self._seed_rng.getrandbits(63)
        elif j:
            sp = copy.copy(sp)
            sp.sampling_seed = sp.sampling_seed + j
        start = obj.logprob_start_len[i]
        return TokenizedGenerateReqInput(
            rid=obj.rid[i * obj.parallel_sample_num + j],
            input_text=input_text,
            input_ids=input_ids,
            sampling_params=sp,
            return_logprob=obj.return_logprob[i],
            logprob_start_len=start if start is not None else -1,
            top_logprobs_num=obj.top_logprobs_num[i],
            stream=obj.stream,
            arrival_time=time.time(),
            return_embedding=isinstance(obj, EmbeddingReqInput),
        )

    async def _wait(self, st: ReqState, request) -> None:
        while True:
            try:
                await asyncio.wait_for(st.event.wait(), timeout=1.0)
                st.event.clear()
                return
            except asyncio.TimeoutError:
                if st.error is not None:
                    return
                if request is not None and await request.is_disconnected():
                    await self.abort_request(st.rid)
                    raise asyncio.CancelledError("client disconnected")

    def _take(self, st: ReqState) -> Optional[Dict]:
        if st.error is not None:
            raise st.error
        if not st.pending:
            return None
        outs, st.pending = st.pending, []
        for o in outs:
            self._accumulate(st, o)
        return self._response(st, outs[-1])

    async def _final_output(self, st: ReqState, request) -> Dict:
        while True:
            await self._wait(st, request)
            resp = self._take(st)
            if resp is not None and st.finished:
                _raise_for_rejection(resp)
                return resp

    async def _stream_outputs(self, states: List[ReqState], request, single: bool) -> AsyncIterator[Dict]:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, st: ReqState):
            try:
                while not st.finished:
                    await self._wait(st, request)
                    resp = self._take(st)
                    if resp is not None:
                        if st.finished:
                            _raise_for_rejection(resp)
                        if not single:
                            resp["index"] = index
                        await queue.put(resp)
            except BaseException as e:  # forwarded to the consumer
                await queue.put(e)
            await queue.put(None)

        tasks = [asyncio.ensure_future(pump(i, st)) for i, st in enumerate(states)]
        done = 0
        try:
            while done < len(states):
                item = await queue.get()
                if item is None:
                    done += 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()

    def _accumulate(self, st: ReqState, out: ReqStrOut) -> None:
        d = out.delta
        now = time.time()
        st.output_ids.extend(out.output_ids)
        st.text = apply_text_delta(st.text, out)
        if d.completion_tokens > st.last_completion_tokens:
            m = self.metrics
            if st.first_token_time is None:
                st.first_token_time = now
                if m:
                    m.observe_ttft(now - st.created_time)
            elif m and st.last_token_time is not None:
                new = d.completion_tokens - st.last_completion_tokens
                m.observe_inter_token((now - st.last_token_time) / new)
            st.last_token_time = now
            st.last_completion_tokens = d.completion_tokens
        if d.input_token_logprobs:
            st.input_token_logprobs.extend(d.input_token_logprobs)
        if d.input_top_logprobs:
            st.input_top_logprobs.extend(d.input_top_logprobs)
        if d.output_token_logprobs:
            st.output_token_logprobs.extend(d.output_token_logprobs)
        if d.output_top_logprobs:
            st.output_top_logprobs.extend(d.output_top_logprobs)
        if d.finish_reason is not None:
            st.finished = True
            self.sessions.finished(st.rid, st.output_ids)
            if self.metrics:
                self.metrics.observe_e2e(now - st.created_time)
                self.metrics.count_tokens(d.prompt_tokens, d.completion_tokens)

    def _response(self, st: ReqState, out: ReqStrOut) -> Dict:
        d = out.delta
        reason = d.finish_reason
        meta = {
            "id": st.rid,
            "finish_reason": reason,
            "prompt_tokens": d.prompt_tokens,
            "completion_tokens": d.completion_tokens,
            "cached_tokens": d.cached_tokens,
            "e2e_latency": time.time() - st.created_time,
        }
        if st.return_logprob:
            meta["input_token_logprobs"] = self._format_tokens(st.input_token_logprobs, st)
            meta["output_token_logprobs"] = self._format_tokens(st.output_token_logprobs, st)
            if st.top_logprobs_num:
                meta["input_top_logprobs"] = [self._format_tokens(x, st) if x else None for x in st.input_top_logprobs]
                meta["output_top_logprobs"] = [self._format_tokens(x, st) if x else None for x in st.output_top_logprobs]
            else:
                meta["input_top_logprobs"] = []
                meta["output_top_logprobs"] = []
        if d.embedding is not None:  # an EmbeddingReqInput's answer, as SGLang's /encode gives it
            return {"embedding": d.embedding, "meta_info": meta}
        return {"text": st.text, "output_ids": list(st.output_ids), "meta_info": meta}

    def _format_tokens(self, pairs, st: ReqState) -> List[List[Any]]:
        if st.return_text_in_logprobs and self.tokenizer is not None:
            return [[lp, tid, self._text_of(tid)] for lp, tid in pairs]
        return [[lp, tid, None] for lp, tid in pairs]

    def _text_of(self, tid: int) -> str:
        text = self._token_text.get(tid)
        if text is None:
            text = self._token_text[tid] = self.tokenizer.decode([tid])
        return text

    # ---- control -----------------------------------------------------------------------------------------
    async def abort_request(self, rid: str) -> None:
        """Abort one request (a client's rid). Only requests that arrived before now are hit."""
        if not isinstance(rid, str) or not rid:
            raise ValueError("'rid' must be a non-empty string")
        self._ensure_started()
        self._send_to_controller.send_pyobj(AbortReq(rid))

    async def abort_all(self) -> None:
        """The operator's abort-everything (POST /abort_request {"abort_all": true})."""
        self._ensure_started()
        self._send_to_controller.send_pyobj(AbortReq(rid="", abort_all=True))

    async def _ask(self, msg, timeout: float = 30.0):
        self._ensure_started()
        if not self.is_healthy():
            raise ServerUnavailableError(f"the server is not serving: {self._dead_reason or 'shutting down'}")
        fut = self._loop.create_future()
        self._reply_waiters[msg.req_id] = fut
        self._send_to_controller.send_pyobj(msg)
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._reply_waiters.pop(msg.req_id, None)

    async def flush_cache(self) -> bool:
        reply: FlushCacheReqOutput = await self._ask(FlushCacheReq(uuid.uuid4().hex))
        return reply.success

    async def get_internal_state(self) -> List[Dict]:
        replies = await self._ask(GetInternalStateReq(uuid.uuid4().hex))
        return [r.state for r in replies]

    async def move_session(self, session_id: str, dst_instance: int) -> Dict:
        """Move a session's pinned KV to the instance led by device dst_instance. ValueError (HTTP 400) when
        refused (unknown session or instance, a transformation in progress, TP > 1, no room there)."""
        if not isinstance(session_id, str) or session_id not in self.sessions.sessions:
            raise ValueError(f"no open session {session_id!r}")
        if not isinstance(dst_instance, int) or isinstance(dst_instance, bool):
            raise ValueError("'instance' must be the integer id of an instance (its leader device)")
        reply: MoveSessionReqOutput = await self._ask(MoveSessionReq(uuid.uuid4().hex, session_id, dst_instance))
        if not reply.success:
            raise ValueError(f"cannot move session {session_id!r}: {reply.message}")
        return {"session_id": session_id, "instance": dst_instance, "tokens": reply.tokens, "bytes": reply.bytes}

    # ---- Gyges admin -------------------------------------------------------------------------------------
    async def gyges_topology(self) -> Dict:
        reply = await self._ask(GygesTopologyReq(uuid.uuid4().hex))
        return {"instances": reply.instances, "history": reply.history}

    async def gyges_transform(self, devices: List[int], tp: int, timeout: float = 600.0) -> Dict:
        """Merge or split by hand. Raises ValueError (HTTP 400) when refused, ServerUnavailableError (HTTP 503)
        when it failed on the server side (a worker died, the deadline passed), with the reason."""
        if not isinstance(devices, list) or not devices or not all(isinstance(d, int) for d in devices):
            raise ValueError("'devices' must be a non-empty list of device ids")
        if not isinstance(tp, int) or tp < 1:
            raise ValueError("'tp' must be a positive integer")
        reply = await self._ask(GygesTransformReq(uuid.uuid4().hex, devices, tp), timeout=timeout)
        if not reply.success:
            if reply.status_code >= 500:
                raise ServerUnavailableError(reply.message)
            raise ValueError(reply.message)
        return reply.breakdown

    # ---- background loops ------------------------------------------------------------------------------
    async def _output_loop(self) -> None:
        while True:
            batch: BatchStrOut = await self._recv_outputs.recv_pyobj()
            for out in batch.outputs:
                st = self.rid_to_state.get(out.rid)
                if st is None:
                    if out.delta.finish_reason is not None:
                        self._draining.pop(out.rid, None)  # its scheduler dropped it: the rid is free
                    continue
                if out.failed_in_detokenizer:  # stop the scheduler's work on it too
                    self._drain(out.rid)
                    self._send_to_controller.send_pyobj(AbortReq(out.rid))
                st.pending.append(out)
                st.event.set()

    async def _reply_loop(self) -> None:
        while True:
            msg = await self._recv_replies.recv_pyobj()
            if isinstance(msg, ServingState):
                self._on_serving_state(msg)
                continue
            req_id = msg[0].req_id if isinstance(msg, list) else msg.req_id
            fut = self._reply_waiters.get(req_id)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    async def _watchdog_loop(self) -> None:
        """A dead worker takes down its instance only (the controller fails that instance's requests and
        keeps the others serving); a dead controller or detokenizer takes down the server."""
        reported = set()
        while self._healthy and not self._shutdown:
            await asyncio.sleep(0.5)
            self._close_expired_sessions()
            for p in self.child_processes:
                if p.is_alive() or p.pid in reported or self._shutdown:
                    continue
                reported.add(p.pid)
                if p.name.startswith("worker-"):
                    logger.error("process %s exited with code %s", p.name, p.exitcode)
                    self._send_to_controller.send_pyobj(WorkerDied(int(p.name.split("-")[1]), p.exitcode))
                else:
                    self._mark_dead(f"process {p.name} exited with code {p.exitcode}")

    def _on_serving_state(self, msg: ServingState) -> None:
        reasons = list(msg.reasons) + ["failed"] * (len(msg.failed_instances) - len(msg.reasons))
        self.failed_instances = [(list(d), r) for d, r in zip(msg.failed_instances, reasons)]
        for rank in msg.kill_ranks:
            for p in self.child_processes:
                if p.name == f"worker-{rank}" and p.is_alive():
                    logger.error("killing hung worker %s (pid %s)", p.name, p.pid)
                    try:
                        p.kill()
                    except OSError:
                        pass
        if msg.live_instances == 0:
            failed = "; ".join(f"devices {d}: {r}" for d, r in self.failed_instances) or "none reported"
            self._mark_dead(f"no instance left serving (failed instances: {failed})")

    def _fail_all(self, err: BaseException) -> None:
        for st in list(self.rid_to_state.values()):
            st.error = err
            st.event.set()
        for fut in self._reply_waiters.values():
            if not fut.done():
                fut.set_exception(err)

    def _mark_dead(self, reason: str) -> None:
        if not self._healthy:
            return
        self._dead_reason = reason
        logger.error("%s; failing in-flight requests", reason)
        self._healthy = False
        self._fail_all(ServerUnavailableError(f"the server cannot serve: {reason}"))
        if self.on_fatal is not None and not self._shutdown:
            self.on_fatal(reason)

