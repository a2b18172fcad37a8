"""Scheduler of one instance, run by the instance's leader worker (continuous batching).

Every iteration:

    recv       TokenizedGenerateReqInput / AbortReq / FlushCacheReq / GetInternalStateReq from the controller
    schedule   running decode requests (1 token each; retract when pages run out) + prefill chunks of
               in-progress and waiting requests (token budget, chunked_prefill_size, free pages, policy order)
    forward    ForwardBatch broadcast to the other TP ranks, ModelRunner.forward on every rank
    sample     leader only: logprobs, sampling, grammar, stop checks
    send       BatchTokenIDOut to the detokenizer, InstanceReport to the controller

Followers of a TP group run `follower_loop`: receive each ForwardBatch from the leader and compute.
"""

from __future__ import annotations

import logging
import time
from typing import Dict, List, Optional, Tuple

import torch
import zmq

from sglang.srt.managers.io_struct import (
    AbortReq,
    BatchTokenIDOut,
    FlushCacheReq,
    FlushCacheReqOutput,
    GetInternalStateReq,
    GetInternalStateReqOutput,
    InstanceReport,
    ReqOutputDelta,
    TokenizedGenerateReqInput,
    TransformCmd,
)
from sglang.srt.managers.req_kv import ReqKVManager, pages_for
from sglang.srt.managers.schedule_batch import (
    InstanceState,
    Req,
    portable_req,
    finish_abort,
    finish_length,
    finish_stop_str,
    finish_stop_token,
)
from sglang.srt.managers.schedule_policy import SchedulePolicy
from sglang.srt.model_executor.forward_batch import ForwardBatch
from sglang.srt.server_args import ServerArgs
from sglang.srt.utils import PortArgs, get_zmq_socket

logger = logging.getLogger(__name__)

# Fraction of a request's remaining max_new_tokens reserved in pages when admitting new requests. It
# grows after a retraction (memory was over-committed) and decays back while decoding goes well.
INIT_NEW_TOKEN_RATIO = 0.5
MIN_NEW_TOKEN_RATIO = 0.1
NEW_TOKEN_RATIO_DECAY = 0.001


class StopChecker:
    """Finish conditions of a request after each new token: stop ids, EOS, length, stop strings, grammar."""

    def __init__(self, tokenizer, eos_token_ids, context_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids or ())
        self.context_len = context_len

    def check(self, req: Req) -> None:
        if req.finished:
            return
        sp = req.sampling_params
        last = req.output_ids[-1]
        if len(req.output_ids) >= req.max_new_tokens:
            req.finished_reason = finish_length(req.max_new_tokens)
            return
        if (sp.stop_token_ids and last in sp.stop_token_ids) or (
            not sp.ignore_eos and last in self.eos_token_ids
        ):
            req.finished_reason = finish_stop_token(last)
            return
        if req.grammar is not None and req.grammar.is_terminated():
            req.finished_reason = finish_stop_token(last)
            return
        stops = sp.stop_strs
        if stops and self.tokenizer is not None:
            tail_tokens = sp.stop_str_max_len + 1
            tail = self.tokenizer.decode(req.output_ids[-tail_tokens:], skip_special_tokens=False)
            for s in stops:
                if s in tail:
                    req.finished_reason = finish_stop_str(s)
                    if not sp.no_stop_trim:
                        req.trim_stop_str = s
                    return
        if req.seq_len >= self.context_len:
            req.finished_reason = finish_length(len(req.output_ids))


class Scheduler:
    def __init__(self, server_args: ServerArgs, channels: "WorkerChannels", runner, tp_group, instance_id: int,
                 tokenizer, grammar_backend=None, migrated: Optional[InstanceState] = None):
        from sglang.srt.sampling.sampler import Sampler

        self.args = server_args
        self.runner = runner
        self.tp = tp_group
        self.instance_id = instance_id
        self.model_config = runner.model_config
        self.page_size = server_args.page_size
        self.kv = ReqKVManager(runner.num_pages, self.page_size, server_args.disable_radix_cache, runner.reserved_pages)
        self.policy = SchedulePolicy(server_args.schedule_policy, self.kv.tree)
        self.sampler = Sampler(self.model_config.vocab_size)
        self.tokenizer = tokenizer
        self.stop_checker = StopChecker(tokenizer, self.model_config.eos_token_ids, self.model_config.context_len)
        self._grammar_backend = grammar_backend

        self.waiting: List[Req] = []
        self.running: List[Req] = []  # admitted: prefilling (chunked) or decoding
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO
        self.forward_ct = 0
        self.num_retractions = 0  # total retractions since start (reported in internal_state)
        self._last_report: Optional[InstanceReport] = None

        self.recv_from_controller = channels.recv_from_controller
        self.send_to_detokenizer = channels.send_to_detokenizer
        self.send_to_controller = channels.send_to_controller
        self.poller = channels.poller
        self._pending_transform: Optional[TransformCmd] = None
        self._finished_since_report: List[str] = []
        self.capacity_by_tp = None
        if server_args.enable_gyges:
            top = server_args.gyges_max_tp or server_args.num_devices
            self.capacity_by_tp = runner.capacity_by_tp(top)
        if migrated is not None:
            self.adopt_state(migrated)

    # ======================================================================================================
    # main loop
    # ======================================================================================================
    def event_loop(self) -> TransformCmd:
        """Serve until the controller orders a transformation; return that order (between iterations)."""
        self.report_load()
        while self._pending_transform is None:
            busy = bool(self.running or self.waiting)
            self.process_input(block_ms=0 if busy else 200)
            if self._pending_transform is not None:
                break
            self.step()
            self.report_load()
        cmd, self._pending_transform = self._pending_transform, None
        return cmd

    def step(self) -> bool:
        """One scheduling iteration. Returns whether a forward pass ran."""
        batch = self.schedule()
        if not batch:
            return False
        self.run_batch(batch)
        return True

    # ======================================================================================================
    # inputs
    # ======================================================================================================
    def process_input(self, block_ms: int) -> None:
        if block_ms and not self.poller.poll(block_ms):
            return
        while self._pending_transform is None:
            try:
                msg = self.recv_from_controller.recv_pyobj(zmq.NOBLOCK)
            except zmq.ZMQError:
                return
            self.handle_message(msg)

    def handle_message(self, msg) -> None:
        if isinstance(msg, TokenizedGenerateReqInput):
            self.add_request(msg)
        elif isinstance(msg, AbortReq):
            self.abort(msg.rid)
        elif isinstance(msg, FlushCacheReq):
            ok = self.flush_cache()
            self.send_to_controller.send_pyobj(FlushCacheReqOutput(msg.req_id, ok, self.instance_id))
        elif isinstance(msg, TransformCmd):
            self._pending_transform = msg
        elif isinstance(msg, GetInternalStateReq):
            self.send_to_controller.send_pyobj(
                GetInternalStateReqOutput(msg.req_id, self.instance_id, self.internal_state()))
        else:
            logger.error("scheduler got an unknown message %r", type(msg))

    def add_request(self, recv: TokenizedGenerateReqInput) -> None:
        from sglang.srt.sampling.sampler import SamplingState

        req = Req(
            rid=recv.rid,
            origin_input_ids=list(recv.input_ids),
            sampling_params=recv.sampling_params,
            return_logprob=recv.return_logprob,
            logprob_start_len=recv.logprob_start_len if recv.return_logprob else -1,
            top_logprobs_num=recv.top_logprobs_num,
            stream=recv.stream,
            arrival_time=recv.arrival_time or time.time(),
        )
        sp = req.sampling_params
        ctx = self.model_config.context_len
        cap = self.kv.num_pages * self.page_size
        prompt_len = len(req.origin_input_ids)
        if prompt_len >= min(ctx, cap):
            limit = min(ctx, cap) - 1
            self.finish_now(req, finish_abort(
                f"the prompt has {prompt_len} tokens; this instance serves at most {limit} "
                f"(context length {ctx}, KV capacity {cap} tokens)", 400))
            return
        # None = up to the context / capacity limit (SGLang's meaning).
        requested = sp.max_new_tokens if sp.max_new_tokens is not None else 1 << 62
        req.max_new_tokens = min(requested, ctx - prompt_len, cap - prompt_len)
        if req.logprob_start_len >= prompt_len:
            req.logprob_start_len = prompt_len - 1 if prompt_len else -1
        req.sampling_state = SamplingState.from_params(sp, req.origin_input_ids)
        if sp.regex is not None or sp.json_schema is not None or sp.ebnf is not None:
            try:
                req.grammar = self.grammar_backend().new_grammar(sp)
            except ValueError as e:
                self.finish_now(req, finish_abort(f"invalid constraint: {e}", 400))
                return
        self.waiting.append(req)

    def grammar_backend(self):
        if self._grammar_backend is None:
            from sglang.srt.constrained.xgrammar_backend import GrammarBackend

            if self.tokenizer is None:
                raise ValueError("constrained decoding needs a tokenizer (server started with --skip-tokenizer-init)")
            self._grammar_backend = GrammarBackend(self.tokenizer, self.model_config.vocab_size)
        return self._grammar_backend

    def abort(self, rid: str) -> None:
        for req in list(self.waiting):
            if rid == "" or req.rid == rid:
                self.waiting.remove(req)
                self.finish_now(req, finish_abort("aborted", 499))
        for req in list(self.running):
            if rid == "" or req.rid == rid:
                req.finished_reason = finish_abort("aborted", 499)
                self.running.remove(req)
                self.kv.release(req)
                self.send_outputs([req])

    def finish_now(self, req: Req, reason) -> None:
        req.finished_reason = reason
        self.send_outputs([req])

    def flush_cache(self) -> bool:
        if self.running or self.waiting:
            return False
        self.kv.flush()
        return True

    # ======================================================================================================
    # scheduling
    # ======================================================================================================
    def schedule(self) -> List[Tuple[Req, int]]:
        """Choose this iteration's work: (request, number of new tokens to feed) pairs."""
        batch: List[Tuple[Req, int]] = []
        decoding = [r for r in self.running if r.is_decoding]
        decoding = self.reserve_decode_pages(decoding)
        batch.extend((r, 1) for r in decoding)

        budget = self.args.max_prefill_tokens
        chunk_cap = self.args.chunked_prefill_size if self.args.chunked_prefill_size > 0 else 1 << 62
        # 1) requests already admitted whose prefill is not done (chunked)
        for req in [r for r in self.running if not r.is_decoding]:
            if budget <= 0:
                break
            n = min(req.extend_remaining, chunk_cap, budget)
            if not self.kv.reserve(req, req.kv_len + n):
                break
            batch.append((req, n))
            budget -= n
        # 2) new admissions
        max_running = self.args.max_running_requests or 1 << 62
        reserved = self.decode_reservation_pages()
        for req in self.policy.order(self.waiting):
            if budget <= 0 or len(self.running) >= max_running:
                break
            self.kv.admit(req)
            n = min(req.extend_remaining, chunk_cap, budget)
            future = pages_for(int(req.remaining_new_tokens * self.new_token_ratio), self.page_size)
            need = pages_for(req.kv_len + n, self.page_size) - len(req.page_table)
            # A request alone on the instance is always admitted if its prompt chunk fits.
            if (self.running and need + future > self.kv.available_pages() - reserved) or not self.kv.reserve(
                req, req.kv_len + n
            ):
                self.kv.release(req)
                break
            reserved += future
            self.waiting.remove(req)
            self.running.append(req)
            batch.append((req, n))
            budget -= n
        return batch

    def decode_reservation_pages(self) -> int:
        return sum(pages_for(int(r.remaining_new_tokens * self.new_token_ratio), self.page_size) for r in self.running)

    def reserve_decode_pages(self, decoding: List[Req]) -> List[Req]:
        """Give every decoding request a page for its next token; retract requests until that fits."""
        ps = self.page_size
        while True:
            need = sum(1 for r in decoding if r.kv_len % ps == 0 and pages_for(r.kv_len + 1, ps) > len(r.page_table))
            if need <= self.kv.available_pages() or not decoding:
                break
            victim = self.pick_retract_victim(decoding)
            decoding.remove(victim)
            self.retract(victim)
        for r in decoding:
            ok = self.kv.reserve(r, r.kv_len + 1)
            assert ok, "pages were counted as available"
        if decoding:
            self.new_token_ratio = max(MIN_NEW_TOKEN_RATIO, self.new_token_ratio - NEW_TOKEN_RATIO_DECAY)
        return decoding

    def pick_retract_victim(self, decoding: List[Req]) -> Req:
        # The request with the least output (least work lost), longest prompt on ties.
        return min(decoding, key=lambda r: (len(r.output_ids), -len(r.origin_input_ids)))

    def retract(self, req: Req) -> None:
        self.running.remove(req)
        if not self.running and not self.waiting:
            # Alone and still out of memory: it can never finish here.
            req.finished_reason = finish_abort(
                f"out of KV memory: {req.seq_len} tokens exceed this instance's capacity", 507)
            self.kv.release(req)
            self.send_outputs([req])
            return
        self.kv.release(req)
        req.retractions += 1
        self.num_retractions += 1
        self.waiting.insert(0, req)
        self.new_token_ratio = min(1.0, self.new_token_ratio + 0.1)
        logger.info("retracted request %s (%d tokens) to free KV pages", req.rid, req.seq_len)

    # ======================================================================================================
    # forward + sampling
    # ======================================================================================================
    def build_forward_batch(self, batch: List[Tuple[Req, int]]) -> Tuple[ForwardBatch, Dict]:
        input_ids: List[int] = []
        positions: List[int] = []
        extend_lens, prefix_lens, tables = [], [], []
        logit_rows: List[int] = []
        row_of: Dict[Tuple[int, int], int] = {}  # (batch index, token position) -> logits row
        offset = 0
        for i, (req, n) in enumerate(batch):
            start = req.kv_len
            input_ids.extend(req.fill_slice(start, start + n))
            positions.extend(range(start, start + n))
            extend_lens.append(n)
            prefix_lens.append(start)
            tables.append(req.page_table)
            wanted = []
            if req.wants_input_logprobs:
                lo = max(start, req.logprob_start_len - 1, 0)
                hi = min(start + n, len(req.origin_input_ids) - 1)
                wanted.extend(range(lo, hi))
            if start + n == req.seq_len:
                wanted.append(start + n - 1)
            for pos in wanted:
                if (i, pos) not in row_of:
                    row_of[(i, pos)] = len(logit_rows)
                    logit_rows.append(offset + pos - start)
            offset += n
        max_pages = max(len(t) for t in tables)
        page_table = torch.zeros((len(batch), max_pages), dtype=torch.int32)  # [batch, max_pages]
        for i, t in enumerate(tables):
            page_table[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        fb = ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.int64),  # [num_tokens]
            positions=torch.tensor(positions, dtype=torch.int64),  # [num_tokens]
            extend_lens=torch.tensor(extend_lens, dtype=torch.int64),  # [batch]
            prefix_lens=torch.tensor(prefix_lens, dtype=torch.int64),  # [batch]
            page_table=page_table,
            logits_indices=torch.tensor(logit_rows, dtype=torch.int64),  # [num_logit_rows]
        )
        return fb, row_of

    def run_batch(self, batch: List[Tuple[Req, int]]) -> None:
        fb, row_of = self.build_forward_batch(batch)
        if self.tp.size > 1:
            self.tp.broadcast_object(fb)
        logits = self.runner.forward(fb)  # [num_logit_rows, vocab] float32
        self.forward_ct += 1
        self.process_batch_result(batch, logits, row_of)

    def process_batch_result(self, batch, logits: torch.Tensor, row_of: Dict) -> None:
        to_sample: List[Req] = []
        sample_rows: List[int] = []
        updated: List[Req] = []
        for i, (req, n) in enumerate(batch):
            start = req.kv_len
            req.kv_len += n
            if req.wants_input_logprobs:
                self.collect_input_logprobs(req, i, start, n, logits, row_of)
            if req.kv_len == req.seq_len:  # this request's fill is complete: sample its next token
                if req.wants_input_logprobs:
                    req.input_logprobs_done = True
                if req.max_new_tokens == 0:
                    req.finished_reason = finish_length(0)
                    req.input_logprobs_done = True
                    updated.append(req)
                    continue
                to_sample.append(req)
                sample_rows.append(row_of[(i, req.kv_len - 1)])
        if to_sample:
            rows = logits[torch.tensor(sample_rows, dtype=torch.int64)]  # [num_sampled, vocab]
            out = self.sampler.sample(
                rows,
                states=[r.sampling_state for r in to_sample],
                output_ids=[r.output_ids for r in to_sample],
                grammars=[r.grammar for r in to_sample],
                top_logprobs_nums=[r.top_logprobs_num if r.return_logprob else 0 for r in to_sample],
                eos_token_ids=self.stop_checker.eos_token_ids,
            )
            for j, req in enumerate(to_sample):
                tok = int(out.next_token_ids[j])
                req.output_ids.append(tok)
                if req.grammar is not None:
                    req.grammar.accept_token(tok)
                if req.return_logprob:
                    req.output_token_logprobs.append((float(out.next_token_logprobs[j]), tok))
                    if req.top_logprobs_num:
                        req.output_top_logprobs.append(out.top_logprobs[j])
                self.stop_checker.check(req)
                updated.append(req)
        finished = [r for r in updated if r.finished]
        for req in finished:
            self.running.remove(req)
            self.kv.release(req)
        self.send_outputs([r for r in updated if r.finished or r.stream])

    def collect_input_logprobs(self, req: Req, i: int, start: int, n: int, logits, row_of) -> None:
        prompt = req.origin_input_ids
        if start <= req.logprob_start_len == 0 and not req.input_token_logprobs:
            req.input_token_logprobs.append((None, prompt[0]))
            if req.top_logprobs_num:
                req.input_top_logprobs.append(None)
        positions = [p for p in range(max(start, req.logprob_start_len - 1, 0), min(start + n, len(prompt) - 1))]
        if not positions:
            return
        rows = torch.tensor([row_of[(i, p)] for p in positions], dtype=torch.int64)
        logprobs = torch.log_softmax(logits[rows], dim=-1)  # [len(positions), vocab]
        targets = torch.tensor([prompt[p + 1] for p in positions], dtype=torch.int64)
        picked = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        req.input_token_logprobs.extend(zip(picked, targets.tolist()))
        if req.top_logprobs_num:
            vals, ids = logprobs.topk(req.top_logprobs_num, dim=-1)
            for v, t in zip(vals.tolist(), ids.tolist()):
                req.input_top_logprobs.append(list(zip(v, t)))

    # ======================================================================================================
    # outputs
    # ======================================================================================================
    def send_outputs(self, reqs: List[Req]) -> None:
        deltas = []
        for req in reqs:
            if req.finished:
                self._finished_since_report.append(req.rid)
            if not req.finished and len(req.output_ids) - req.sent_output_len < self.args.stream_interval:
                continue
            delta = ReqOutputDelta(
                rid=req.rid,
                new_output_ids=req.output_ids[req.sent_output_len:],
                finish_reason=req.finished_reason,
                prompt_tokens=len(req.origin_input_ids),
                completion_tokens=len(req.output_ids),
                cached_tokens=req.cached_tokens,
                trim_stop_str=req.trim_stop_str,
                skip_special_tokens=req.sampling_params.skip_special_tokens,
                spaces_between_special_tokens=req.sampling_params.spaces_between_special_tokens,
            )
            if req.return_logprob:
                if req.input_token_logprobs or req.input_top_logprobs:
                    delta.input_token_logprobs = req.input_token_logprobs
                    delta.input_top_logprobs = req.input_top_logprobs if req.top_logprobs_num else None
                    req.input_token_logprobs, req.input_top_logprobs = [], []
                delta.output_token_logprobs = req.output_token_logprobs
                delta.output_top_logprobs = req.output_top_logprobs if req.top_logprobs_num else None
                req.output_token_logprobs, req.output_top_logprobs = [], []
            req.sent_output_len = len(req.output_ids)
            deltas.append(delta)
        if deltas:
            self.send_to_detokenizer.send_pyobj(BatchTokenIDOut(deltas))

    def internal_state(self) -> Dict:
        return {
            "instance_id": self.instance_id,
            "devices": list(self.tp.ranks),
            "tp_size": self.tp.size,
            "running": len(self.running),
            "waiting": len(self.waiting),
            "page_size": self.page_size,
            "num_pages": self.kv.num_pages,
            "free_pages": self.kv.allocator.num_free,
            "cached_pages": self.kv.tree.cached_pages(),
            "kv_used_tokens": self.kv.used_pages() * self.page_size,
            "kv_capacity_tokens": self.kv.num_pages * self.page_size,
            "forward_ct": self.forward_ct,
            "num_retractions": self.num_retractions,
            "new_token_ratio": self.new_token_ratio,
        }

    # ======================================================================================================
    # Gyges: moving this instance's state
    # ======================================================================================================
    def export_state(self) -> InstanceState:
        """Plain-data copy of the requests and the cache (page ids of this instance)."""
        return InstanceState(
            devices=list(self.tp.ranks),
            running=[portable_req(r) for r in self.running],
            waiting=[portable_req(r) for r in self.waiting],
            tree_paths=self.kv.tree.export(),
            new_token_ratio=self.new_token_ratio,
        )

    def adopt_state(self, state: InstanceState) -> None:
        """Take over migrated requests and cache (page ids already re-based to this instance)."""
        for req in state.running + state.waiting:
            if isinstance(req.grammar, dict):
                req.grammar = self.grammar_backend().restore(req.grammar["grammar_state"])
        self.kv.adopt(state.tree_paths, state.running)
        self.running = list(state.running)
        self.waiting = sorted(state.waiting, key=lambda r: r.arrival_time)
        self.new_token_ratio = state.new_token_ratio

    def report_load(self) -> None:
        report = InstanceReport(
            instance_id=self.instance_id,
            running=len(self.running),
            waiting=len(self.waiting),
            kv_used_tokens=self.kv.used_pages() * self.page_size,
            kv_capacity_tokens=self.kv.num_pages * self.page_size,
            tokens_in_flight=sum(r.remaining_new_tokens + r.extend_remaining for r in self.running + self.waiting),
            kv_evictable_tokens=self.kv.tree.evictable_pages() * self.page_size,
            capacity_by_tp=self.capacity_by_tp,
            finished_rids=self._finished_since_report,
        )
        if report != self._last_report:
            self._last_report = report
            self._finished_since_report = []
            self.send_to_controller.send_pyobj(report)


def follower_loop(runner, tp_group) -> Optional[TransformCmd]:
    """Non-leader TP ranks: compute every batch the leader broadcasts, until it broadcasts a
    transformation order (returned) or None (shutdown)."""
    while True:
        msg = tp_group.broadcast_object(None)
        if msg is None or isinstance(msg, TransformCmd):
            return msg
        runner.forward(msg)


class WorkerChannels:
    """ZMQ sockets of one worker, created once: a worker may lead an instance, follow, and lead again."""

    def __init__(self, port_args: PortArgs, rank: int):
        ctx = zmq.Context(2)
        self.recv_from_controller = get_zmq_socket(ctx, zmq.PULL, port_args.worker_inputs[rank], bind=True)
        self.send_to_detokenizer = get_zmq_socket(ctx, zmq.PUSH, port_args.detokenizer_input, bind=False)
        self.send_to_controller = get_zmq_socket(ctx, zmq.PUSH, port_args.controller_from_workers, bind=False)
        self.poller = zmq.Poller()
        self.poller.register(self.recv_from_controller, zmq.POLLIN)
