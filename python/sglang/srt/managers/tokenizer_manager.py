"""TokenizerManager: the main process's side of every request (asyncio).

    generate_request(GenerateReqInput)
      -> validate + tokenize + SamplingParams (ValueError -> HTTP 400)
      -> one TokenizedGenerateReqInput per prompt and per parallel sample (n) --ZMQ--> Controller
      <- BatchStrOut from the Detokenizer: cumulative text, ids, finish reason, logprob deltas
      -> response dicts in SGLang's /generate format (one at the end, or a stream of them)

Background tasks (created lazily in whichever event loop serves requests): the output receiver, the
reply receiver (flush / internal state), and a watchdog that marks the server unhealthy and fails every
in-flight request as soon as a child process dies.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Dict, List, Optional

import zmq
import zmq.asyncio

from sglang.srt.managers.io_struct import (
    AbortReq,
    BatchStrOut,
    FlushCacheReq,
    FlushCacheReqOutput,
    GenerateReqInput,
    GetInternalStateReq,
    GygesTopologyReq,
    GygesTransformReq,
    ReqStrOut,
    ServingState,
    WorkerDied,
    TokenizedGenerateReqInput,
)
from sglang.srt.server_args import ServerArgs
from sglang.srt.utils import PortArgs, get_zmq_socket

logger = logging.getLogger(__name__)


class ServerUnavailableError(RuntimeError):
    """A worker process died: the server cannot serve (HTTP 503)."""


def _raise_for_rejection(resp: Dict) -> None:
    """A request that ended as an abort with an HTTP status: invalid (400) or its instance failed (503)."""
    reason = resp["meta_info"]["finish_reason"] or {}
    if reason.get("type") != "abort":
        return
    if reason.get("status_code") == 400:
        raise ValueError(reason.get("message", "invalid request"))
    if reason.get("status_code") == 503:
        raise ServerUnavailableError(reason.get("message", "the instance serving the request failed"))


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
        self.rid_to_state: Dict[str, ReqState] = {}
        self._reply_waiters: Dict[str, asyncio.Future] = {}
        self._healthy = True
        self._dead_reason = ""
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
        return self._healthy and not self._shutdown

    def shutdown(self) -> None:
        """Stop every child process (workers, controller, detokenizer)."""
        from sglang.srt.entrypoints.engine import kill_processes

        self._shutdown = True
        kill_processes(self.child_processes)

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
        obj.normalize()
        tokenized = [self._tokenize_one(obj, i, j) for i in range(obj.batch_size) for j in range(obj.parallel_sample_num)]
        rids = [t.rid for t in tokenized]
        clash = sorted({r for r in rids if r in self.rid_to_state or rids.count(r) > 1})
        if clash:
            raise ValueError(f"duplicate request id(s) {clash}: every request id must be unique among the "
                             f"requests in flight")
        states = []
        for t in tokenized:
            st = ReqState(t.rid, t.return_logprob, t.top_logprobs_num, obj.return_text_in_logprobs, time.time())
            self.rid_to_state[t.rid] = st
            states.append(st)
        for t in tokenized:
            self._send_to_controller.send_pyobj(t)
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
                    await self.abort_request(st.rid)
                self.rid_to_state.pop(st.rid, None)

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
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"input_ids holds token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
            input_text, input_ids = "", list(prompt)
        if len(input_ids) > self.max_req_input_len:
            raise ValueError(
                f"the prompt has {len(input_ids)} tokens, longer than the largest servable context: "
                f"at most {self.max_req_input_len} prompt tokens are accepted")
        params = dict(obj.sampling_params[i])
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
        return {"text": out.text, "output_ids": list(out.output_ids), "meta_info": meta}

    def _format_tokens(self, pairs, st: ReqState) -> List[List[Any]]:
        if st.return_text_in_logprobs and self.tokenizer is not None:
            return [[lp, tid, self.tokenizer.decode([tid])] for lp, tid in pairs]
        return [[lp, tid, None] for lp, tid in pairs]

    # ---- control -----------------------------------------------------------------------------------------
    async def abort_request(self, rid: str) -> None:
        self._ensure_started()
        self._send_to_controller.send_pyobj(AbortReq(rid))

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
            raise ValueError(reply.message)
        return reply.breakdown

    # ---- background loops ------------------------------------------------------------------------------
    async def _output_loop(self) -> None:
        while True:
            batch: BatchStrOut = await self._recv_outputs.recv_pyobj()
            for out in batch.outputs:
                st = self.rid_to_state.get(out.rid)
                if st is None:
                    continue
                st.pending.append(out)
                st.event.set()

    async def _reply_loop(self) -> None:
        while True:
            msg = await self._recv_replies.recv_pyobj()
            if isinstance(msg, ServingState):
                if msg.live_instances == 0:
                    self._mark_dead(f"no instance left serving (failed: {msg.failed_instances})")
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
            for p in self.child_processes:
                if p.is_alive() or p.pid in reported or self._shutdown:
                    continue
                reported.add(p.pid)
                if p.name.startswith("worker-"):
                    logger.error("process %s exited with code %s", p.name, p.exitcode)
                    self._send_to_controller.send_pyobj(WorkerDied(int(p.name.split("-")[1]), p.exitcode))
                else:
                    self._mark_dead(f"process {p.name} exited with code {p.exitcode}")

    def _mark_dead(self, reason: str) -> None:
        if not self._healthy:
            return
        self._dead_reason = reason
        logger.error("%s; failing in-flight requests", reason)
        self._healthy = False
        err = ServerUnavailableError(f"the server cannot serve: {reason}")
        for st in list(self.rid_to_state.values()):
            st.error = err
            st.event.set()
        for fut in self._reply_waiters.values():
            if not fut.done():
                fut.set_exception(err)
            if reply.status_code >= 500:
                raise ServerUnavailableError(reply.message)
