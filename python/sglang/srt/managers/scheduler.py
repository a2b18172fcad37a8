"""Scheduler process side of one instance, run by the instance's leader worker (continuous batching).

The decisions (which requests run, how many tokens, what to retract) are made by the pure
`BatchScheduler` (batch_scheduler.py); this class carries them out. Every iteration:

    recv       TokenizedGenerateReqInput / AbortReq / FlushCacheReq / GetInternalStateReq / CloseSessionReqInput
               from the controller;
               constrained requests wait here while their grammar compiles on a side thread (time-limited)
    schedule   BatchScheduler.schedule() -> SchedulePlan (decodes + prefill chunks, retractions, failures)
    forward    ForwardBatch broadcast to the other TP ranks, ModelRunner.forward on every rank (the leader
               also takes the rows' hidden states when an embedding request's prompt ends in the batch)
    sample     leader only: logprobs, sampling, grammar, stop checks; an exception fails only the request
               that raised it (the batch's requests when it is the forward pass on a TP1 instance)
    send       BatchTokenIDOut to the detokenizer, InstanceReport to the controller: on change, at most one
               per --load-report-interval while only the load moves (decode steps change it every step),
               at once when the instance goes idle or busy or its sessions change, and at least every
               REPORT_HEARTBEAT_S (the controller's watchdog reads forward_ct from it)

Followers of a TP group run `follower_loop`: receive each ForwardBatch from the leader and compute.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from typing import Dict, List, Optional, Tuple

import torch
import zmq

from sglang.srt.managers.batch_scheduler import BatchScheduler, SchedulePlan, SchedulerConfig
from sglang.srt.managers.io_struct import (
    AbortReq,
    BatchTokenIDOut,
    CloseSessionReqInput,
    FlushCacheReq,
    FlushCacheReqOutput,
    GetInternalStateReq,
    GetInternalStateReqOutput,
    InstanceReport,
    ReqOutputDelta,
    TokenizedGenerateReqInput,
    MoveSessionReqOutput,
    SessionKVTransfer,
    SessionPagesRead,
    SessionPagesWrite,
    SplitPrecopyStart,
    SplitPrecopyStep,
    TransformCmd,
    WeightPrefetchStart,
    WeightPrefetchStep,
)
from sglang.srt.managers.req_kv import ReqKVManager
from sglang.srt.mem_cache.host_tier import (HostKVCopy, HostKVTier, rank_store, settle_carry, pool_page_bytes,
                                             read_pages_all_heads, write_pages_all_heads)
from sglang.srt.managers.schedule_batch import (
    InstanceState,
    Req,
    portable_req,
    finish_abort,
    finish_length,
    finish_stop_str,
    finish_stop_token,
)
from sglang.srt.model_executor.forward_batch import ForwardBatch
from sglang.srt.sampling.sampling_params import matched_stop_text, stop_check_window
from sglang.srt.server_args import ServerArgs
from sglang.srt.utils import PortArgs, get_zmq_socket

logger = logging.getLogger(__name__)

# Seconds between two InstanceReports when nothing changed (the controller's watchdog sees progress).
REPORT_HEARTBEAT_S = 1.0


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
        window = stop_check_window(sp)  # stop strings and stop_regex (sampling_params.py)
        if window and self.tokenizer is not None:
            tail = self.tokenizer.decode(req.output_ids[-window:], skip_special_tokens=False)
            matched = matched_stop_text(tail, sp)
            if matched is not None:
                req.finished_reason = finish_stop_str(matched)
                if not sp.no_stop_trim:
                    req.trim_stop_str = matched
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
        host_tier = None
        # The index of a host tier a transformation re-lays in the background (attached when it is done).
        self._host_pending = None
        if server_args.enable_hierarchical_cache:  # the host KV tier (mem_cache/host_tier.py), one per instance
            carried = migrated.host if migrated is not None else None
            if carried is not None and getattr(runner, "_host_carry", None) is not None:
                self._host_pending = carried
            else:
                host_tier = self._new_host_tier(carried)
        self.kv = ReqKVManager(runner.num_pages, self.page_size, server_args.disable_radix_cache, runner.reserved_pages,
                               session_budget=server_args.session_kv_budget, host=host_tier)
        self.batches = BatchScheduler(SchedulerConfig.from_server_args(server_args, self.model_config.context_len),
                                      self.kv)
        self.sampler = Sampler(self.model_config.vocab_size)
        self.tokenizer = tokenizer
        self.stop_checker = StopChecker(tokenizer, self.model_config.eos_token_ids, self.model_config.context_len)
        self._grammar_backend = grammar_backend
        self._grammar_pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        # rid -> (request, compile future, deadline): constrained requests whose grammar is compiling.
        self.grammar_pending: Dict[str, Tuple[Req, concurrent.futures.Future, float]] = {}

        self.forward_ct = 0
        self.kv_moved_bytes = 0  # KV bytes of sessions moved here from other instances
        self._last_report_key = None
        self._last_report_time = 0.0
        self._reported_sessions: Optional[List[str]] = None  # session ids of the last report that sent them
        self._reported_busy: Optional[bool] = None  # whether the last report had requests
        self._report_prefixes = migrated is not None  # the first report after a transformation lists the cache

        self.recv_from_controller = channels.recv_from_controller
        self.send_to_detokenizer = channels.send_to_detokenizer
        self.send_to_controller = channels.send_to_controller
        self.poller = channels.poller
        self._pending_transform: Optional[TransformCmd] = None
        self._precopy = None  # gyges_transform.KVPrecopy of an ordered merge, run between iterations
        self._prefetch = None  # weight_prefetch.WeightPrefetch of an ordered split, one chunk per iteration
        self._split_precopy = None  # split_precopy.SplitKVPrecopy of an ordered split, one chunk per iteration
        self._split_precopy_due: Optional[TransformCmd] = None  # the split whose KV pre-copy starts next iteration
        self._finished_since_report: List[str] = []
        self.capacity_by_tp = None
        if server_args.enable_gyges:
            top = server_args.gyges_max_tp or server_args.num_devices
            self.capacity_by_tp = runner.capacity_by_tp(top)
        if migrated is not None:
            self.adopt_state(migrated)

    @property
    def running(self) -> List[Req]:
        return self.batches.running

    @property
    def waiting(self) -> List[Req]:
        return self.batches.waiting

    # ======================================================================================================
    # main loop
    # ======================================================================================================
    def event_loop(self) -> TransformCmd:
        """Serve until the controller orders a transformation; return that order (between iterations)."""
        if not (self._report_prefixes and self.batches.has_work):
            self.report_load()  # after a transformation with requests to run: first their step, then the report
        while self._pending_transform is None:
            if self.batches.has_work:
                block_ms = 0
            else:
                block_ms = 1 if self._ahead_pending else 5 if self.grammar_pending else 200
                if block_ms >= 5:  # waiting for requests: the followers wait on gloo, not spinning on shm
                    self.tp.park_followers()
            self.process_input(block_ms=block_ms)
            if self._pending_transform is not None:
                break
            self.poll_grammars()
            self.step()
            self._attach_carried_host(wait=False)
            self.kv.background()  # hinted turns' KV: offloaded early, reloaded before the turn (req_kv.py)
            self.report_load()
            if self._ahead_pending:
                self.advance_ahead()
        cmd, self._pending_transform = self._pending_transform, None
        return cmd

    @property
    def _ahead_pending(self) -> bool:
        """A transformation's work while serving is under way (pre-copy, weight prefetch)."""
        return self._precopy is not None or self._prefetch is not None or self._split_precopy is not None \
            or self._split_precopy_due is not None

    def advance_ahead(self) -> None:
        """One step of each piece of the ordered transformation's work while serving; once every piece is done
        (or gave up), the pause is due."""
        finished = []
        if self._split_precopy_due is not None:  # a split's KV pre-copy starts one iteration after its prefetch
            cmd, self._split_precopy_due = self._split_precopy_due, None
            self._split_precopy = self.start_split_precopy(cmd)
            if self._split_precopy is not None:
                return
        if self._precopy is not None:
            finished.append(self._precopy.advance())  # a merge's pre-copy (non-blocking)
        if self._prefetch is not None:
            finished.append(self.prefetch_step())
        if self._split_precopy is not None:
            finished.append(self.split_precopy_step())
        if all(finished):
            cmd = (self._precopy or self._prefetch or self._split_precopy).cmd
            self._pending_transform = cmd
            self._precopy = self._prefetch = self._split_precopy = None

    def step(self) -> bool:
        """One scheduling iteration. Returns whether a forward pass ran."""
        plan = self.batches.schedule()
        if plan.failed:
            self.send_outputs(plan.failed)
        if not plan:
            return False
        self.run_batch(plan)
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
            self.abort(msg)
        elif isinstance(msg, FlushCacheReq):
            ok = self.flush_cache()
            self.send_to_controller.send_pyobj(FlushCacheReqOutput(msg.req_id, ok, self.instance_id))
        elif isinstance(msg, TransformCmd):
            self.begin_transform(msg)
        elif isinstance(msg, CloseSessionReqInput):
            self.kv.close_session(msg.session_id)
        elif isinstance(msg, SessionKVTransfer):
            self.transfer_session(msg)
        elif isinstance(msg, GetInternalStateReq):
            self.send_to_controller.send_pyobj(
                GetInternalStateReqOutput(msg.req_id, self.instance_id, self.internal_state()))
        else:
            logger.error("scheduler got an unknown message %r", type(msg))

    def begin_transform(self, cmd: TransformCmd) -> None:
        """Pause for `cmd` at once, or first do its work while serving and pause when that is done: a merge of TP1
        instances pre-copies its KV (gyges_transform.KVPrecopy, --gyges-precopy-chunk-bytes > 0); a split
        prefetches its weights (weight_prefetch.py, --gyges-prefetch-chunk-bytes > 0) and pre-copies its KV
        (split_precopy.py), the latter started one iteration later."""
        from sglang.srt.managers.gyges_transform import start_precopy
        from sglang.srt.managers.split_precopy import split_precopy_applies

        pages_now = InstanceState(devices=list(self.tp.ranks), running=list(self.running), waiting=[],
                                  tree_paths=self.kv.tree.export())  # read only: which pages hold what now
        self._precopy = start_precopy(cmd, self.tp.ranks[0], self.runner, self.kv, pages_now,
                                      self.args.gyges_precopy_chunk_bytes, self.args.gyges_transform_timeout)
        if self._precopy is None:
            self._prefetch = self.start_prefetch(cmd)
            if self._prefetch is None:
                self._split_precopy = self.start_split_precopy(cmd)
            elif split_precopy_applies(cmd, self.args.gyges_precopy_chunk_bytes):
                self._split_precopy_due = cmd  # started after the next step: one start per iteration's stall
        if not self._ahead_pending:
            self._pending_transform = cmd

    def start_split_precopy(self, cmd: TransformCmd):
        """A split's KV pre-copy (split_precopy.py) when it applies and free pages can take copies, below the
        weight prefetch's staging region when there is one; the followers start theirs from the broadcast."""
        from sglang.srt.managers.split_precopy import SplitKVPrecopy, split_precopy_applies
        from sglang.srt.model_executor import regroup

        chunk = self.args.gyges_precopy_chunk_bytes
        if not split_precopy_applies(cmd, chunk):
            return None
        _, hinted, prefetched_turns = self.kv.export_hints()  # groups are placed by hints as in the pause
        pages_now = InstanceState(devices=list(self.tp.ranks), running=list(self.running), waiting=[],
                                  tree_paths=self.kv.tree.export(), session_pins=self.kv.sessions.export(),
                                  hinted=hinted, prefetched_turns=prefetched_turns)
        fetch = self._prefetch
        region = fetch.staging_start if fetch is not None else regroup.kv_flat_bytes(self.runner.kv_pool).numel()
        return SplitKVPrecopy.start_on_leader(cmd, self.tp.ranks[0], self.runner, self.kv.allocator, pages_now,
                                              region, chunk, self.args.gyges_transform_timeout,
                                              self.tp.broadcast_object if self.tp.size > 1 else None,
                                              fetch.new_weights_end if fetch is not None else None)

    def split_precopy_step(self) -> bool:
        """One chunk of the split's KV pre-copy on every device; True when the pause may start."""
        pre = self._split_precopy
        if pre.done:
            return True
        self.tp.broadcast_object(SplitPrecopyStep(pre.cmd.transform_id, pre.next_chunk))
        pre.step(pre.next_chunk)
        return pre.done

    def start_prefetch(self, cmd: TransformCmd):
        """A split's weight prefetch (weight_prefetch.py) when it applies and the top of the pool is free; the
        followers start theirs from the broadcast."""
        from sglang.srt.managers.weight_prefetch import WeightPrefetch, prefetch_applies

        chunk = self.args.gyges_prefetch_chunk_bytes
        if not prefetch_applies(cmd, chunk):
            return None
        pre = WeightPrefetch.for_split(cmd, self.tp.ranks[0], self.runner, chunk)
        page_bytes = self.runner.kv_pool.bytes_per_page
        # Below the region the parts need room for the KV in use now: all of it on one part at worst, in pages
        # `stride` times larger (a merged page's heads of one part land on one device).
        stride = len(cmd.src_instances[0]) // min(len(i) for i in cmd.dst_instances)
        region = pre.staging_region(self.kv.allocator, page_bytes, self.kv.used_pages() * stride * page_bytes)
        if region is None:
            logger.info("split of devices %s: no free pages at the top of the pool for the %d weight bytes to "
                        "prefetch; the pause receives them", cmd.devices, pre.plan.max_staging_bytes)
            return None
        first, capacity = region
        self.tp.broadcast_object(WeightPrefetchStart(cmd, first * page_bytes, capacity, chunk))
        pre.start(first * page_bytes, capacity, self.kv.allocator, first)
        pre.deadline = time.monotonic() + self.args.gyges_transform_timeout
        logger.info("split of devices %s: prefetching %d of %d weight bytes per device in %d chunks while serving",
                    cmd.devices, capacity, pre.plan.max_staging_bytes, len(pre.chunks))
        return pre

    def prefetch_step(self) -> bool:
        """One chunk of the split's weight prefetch on every device; True when the pause may start (every chunk
        moved, a chunk failed, or past --gyges-transform-timeout: the pause then receives the rest)."""
        pre = self._prefetch
        if pre.complete or pre.failed or time.monotonic() > pre.deadline:
            return True
        self.tp.broadcast_object(WeightPrefetchStep(pre.cmd.transform_id, pre.next_chunk))
        pre.step(pre.next_chunk)
        return pre.complete or bool(pre.failed)

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
            return_embedding=recv.return_embedding,
            session_id=recv.session_id,
        )
        self.kv.note_request(req.rid, req.session_id, recv.next_turn_in_s)
        if req.rid in self.grammar_pending:
            self.finish_now(req, finish_abort(f"request id {req.rid!r} is already in use by a live request", 400))
            return
        error = self.batches.admission_error(req)
        if error is not None:
            self.finish_now(req, error)
            return
        try:
            req.sampling_state = SamplingState.from_params(req.sampling_params, req.origin_input_ids)
        except Exception as e:  # a bad parameter the tokenizer side did not catch fails this request only
            self.finish_now(req, finish_abort(f"invalid sampling parameters: {e}", 400))
            return
        sp = req.sampling_params
        if sp.regex is not None or sp.json_schema is not None or sp.ebnf is not None:
            try:
                backend = self.grammar_backend()
            except ValueError as e:
                self.finish_now(req, finish_abort(str(e), 400))
                return
            if self._grammar_pool is None:
                self._grammar_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="grammar")
            future = self._grammar_pool.submit(backend.new_grammar, sp)
            self.grammar_pending[req.rid] = (req, future, time.monotonic() + self.args.grammar_compile_timeout)
            return
        self.enqueue(req)

    def enqueue(self, req: Req) -> None:
        error = self.batches.add(req)
        if error is not None:
            self.finish_now(req, error)

    def poll_grammars(self, wait: bool = False) -> None:
        """Queue the constrained requests whose grammar compiled; fail those past the time limit.
        wait=True (before a transformation): wait for each up to its deadline."""
        now = time.monotonic()
        for rid, (req, future, deadline) in list(self.grammar_pending.items()):
            if wait and not future.done():
                concurrent.futures.wait([future], timeout=max(0.0, deadline - time.monotonic()))
            if future.done():
                del self.grammar_pending[rid]
                try:
                    req.grammar = future.result()
                except ValueError as e:
                    self.finish_now(req, finish_abort(f"invalid constraint: {e}", 400))
                    continue
                except Exception as e:
                    logger.exception("compiling the constraint of request %s failed", rid)
                    self.finish_now(req, finish_abort(f"compiling the constraint failed: {e}", 500))
                    continue
                self.enqueue(req)
            elif now >= deadline or wait:
                del self.grammar_pending[rid]
                future.cancel()
                self.finish_now(req, finish_abort(
                    f"compiling the constraint took longer than {self.args.grammar_compile_timeout:g} s "
                    f"(--grammar-compile-timeout); simplify the regex / JSON schema / EBNF", 400))

    def grammar_backend(self):
        if self._grammar_backend is None:
            from sglang.srt.constrained.xgrammar_backend import GrammarBackend

            if self.tokenizer is None:
                raise ValueError("constrained decoding needs a tokenizer (server started with --skip-tokenizer-init)")
            self._grammar_backend = GrammarBackend(self.tokenizer, self.model_config.vocab_size)
        return self._grammar_backend

    def abort(self, msg: AbortReq) -> None:
        if msg.abort_all:
            aborted = self.batches.abort_all()
            pending = list(self.grammar_pending)
        else:
            aborted = self.batches.abort(msg.rid, msg.issued_at)
            entry = self.grammar_pending.get(msg.rid)
            pending = [msg.rid] if entry is not None and entry[0].arrival_time <= msg.issued_at else []
        for rid in pending:
            req, future, _ = self.grammar_pending.pop(rid)
            future.cancel()
            req.finished_reason = finish_abort("aborted", 499)
            aborted.append(req)
        if aborted:
            self.send_outputs(aborted)

    def transfer_session(self, msg: SessionKVTransfer) -> None:
        """Moving a session's KV (req_kv.py export/import_session): as the source, send its pinned path's
        tokens and page bytes back to the controller (which forwards them); as the destination, adopt them and
        answer. Both sides do it between two iterations; requests keep running."""
        if msg.kv is None:
            try:
                msg.tokens, msg.kv = self.kv.export_session(msg.session_id, self.read_pages_all_heads)
            except ValueError as e:
                msg.error = str(e)
            self.send_to_controller.send_pyobj(msg)
            return
        try:
            tokens, nbytes = self.kv.import_session(msg.session_id, msg.tokens, msg.kv, self.write_pages_all_heads)
            self.kv_moved_bytes += nbytes
            reply = MoveSessionReqOutput(msg.req_id, True, "", tokens, nbytes)
        except ValueError as e:
            reply = MoveSessionReqOutput(msg.req_id, False, str(e))
        self.send_to_controller.send_pyobj(reply)

    def read_pages_all_heads(self, pages: List[int]) -> torch.Tensor:
        """The pages' KV with every head (host_tier.read_pages_all_heads); the followers send their slices."""
        if self.tp.size > 1:
            self.tp.broadcast_object(SessionPagesRead(list(pages)))
        return read_pages_all_heads(self.runner.kv_pool, list(pages), self.tp)

    def write_pages_all_heads(self, pages: List[int], kv: torch.Tensor) -> None:
        """Write KV of every head into the pages; each follower writes its heads' slice."""
        width = pool_page_bytes(self.runner.kv_pool).shape[1] * self.tp.size
        if kv.shape[1] != width:  # checked here first: the followers would fail on it out of step
            raise ValueError(f"the session's pages hold {kv.shape[1]} bytes of KV, this instance's {width} "
                             f"(a different model or page size)")
        if self.tp.size > 1:
            self.tp.broadcast_object(SessionPagesWrite(list(pages), kv))
        write_pages_all_heads(self.runner.kv_pool, list(pages), kv, self.tp)

    def finish_now(self, req: Req, reason) -> None:
        req.finished_reason = reason
        self.send_outputs([req])

    def flush_cache(self) -> bool:
        if self.batches.has_work or self.grammar_pending:
            return False
        self._attach_carried_host(wait=True)
        self.kv.flush()
        return True

    # ======================================================================================================
    # forward + sampling
    # ======================================================================================================
    def build_forward_batch(self, batch: List[Tuple[Req, int]]) -> Tuple[ForwardBatch, Dict]:
        input_ids: List[int] = []
        extend_lens, prefix_lens, tables = [], [], []
        logit_rows: List[int] = []
        row_of: Dict[Tuple[int, int], int] = {}  # (batch index, token position) -> logits row
        offset = 0
        for i, (req, n) in enumerate(batch):
            start = req.kv_len
            input_ids.extend(req.fill_slice(start, start + n))
            extend_lens.append(n)
            prefix_lens.append(start)
            tables.append(req.page_table_tensor())  # int32 [pages], appended to incrementally
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
        return ForwardBatch.assemble(input_ids, prefix_lens, extend_lens, tables, logit_rows), row_of

    def run_batch(self, plan: SchedulePlan) -> None:
        fb, row_of = self.build_forward_batch(plan.items)
        try:
            if self.tp.size > 1:
                self.tp.broadcast_object(fb)
            hidden = None  # [num_logit_rows, hidden_size] when an embedding request is in the batch
            if any(r.return_embedding for r, _ in plan.items):
                logits, hidden = self.runner.forward_with_hidden(fb)
            else:
                logits = self.runner.forward(fb)  # [num_logit_rows, vocab] float32
        except Exception as e:
            if self.tp.size > 1:
                raise  # the other ranks are out of step: the worker exits and the instance fails
            logger.exception("forward pass failed on instance %d", self.instance_id)
            reqs = [r for r, _ in plan.items]
            for req in reqs:
                req.finished_reason = self._internal_error("the forward pass failed", e)
            self.batches.finish(reqs)
            self.send_outputs(reqs)
            return
        self.forward_ct += 1
        self.process_batch_result(plan, logits, row_of, hidden)

    @staticmethod
    def _internal_error(what: str, e: BaseException) -> dict:
        return finish_abort(f"{what}: {type(e).__name__}: {e}", 500)

    def process_batch_result(self, plan: SchedulePlan, logits: torch.Tensor, row_of: Dict,
                             hidden: Optional[torch.Tensor] = None) -> None:
        index = {id(req): i for i, (req, _) in enumerate(plan.items)}
        ready = {id(r) for r in self.batches.forward_done(plan)}
        to_sample: List[Req] = []
        updated: List[Req] = []
        for i, (req, n) in enumerate(plan.items):
            try:
                if req.wants_input_logprobs:
                    self.collect_input_logprobs(req, i, req.kv_len - n, n, logits, row_of)
                    if id(req) in ready:
                        req.input_logprobs_done = True
            except Exception as e:
                logger.exception("input logprobs of request %s failed", req.rid)
                req.finished_reason = self._internal_error("computing input logprobs failed", e)
                updated.append(req)
                continue
            if id(req) not in ready:
                continue
            if req.max_new_tokens == 0:
                if req.return_embedding:  # SGLang's last-token pooling, L2-normalized
                    last = hidden[row_of[(i, req.kv_len - 1)]].float()  # [hidden_size]
                    req.embedding = torch.nn.functional.normalize(last, dim=-1).cpu().tolist()
                req.finished_reason = finish_length(0)
                req.input_logprobs_done = True
                updated.append(req)
                continue
            to_sample.append(req)
        if to_sample:
            rows = [row_of[(index[id(r)], r.kv_len - 1)] for r in to_sample]
            self.sample_and_append(to_sample, logits, rows)
            updated.extend(to_sample)
        self.batches.finish([r for r in updated if r.finished])
        self.send_outputs([r for r in updated if r.finished or r.stream])

    def sample_and_append(self, reqs: List[Req], logits: torch.Tensor, rows: List[int]) -> None:
        """Sample one token for each of `reqs` from logits[rows] and append it (grammar, logprobs, stop checks).
        A request whose sampling or token handling raises is finished with a 500; the others are unaffected."""
        try:
            groups = [(reqs, self._sample(reqs, logits, rows))]
        except Exception:
            # Find the request that fails: sample each alone (sampling changes no request state).
            groups = []
            for req, row in zip(reqs, rows):
                try:
                    groups.append(([req], self._sample([req], logits, [row])))
                except Exception as e:
                    logger.exception("sampling request %s failed", req.rid)
                    req.finished_reason = self._internal_error("sampling failed", e)
        for group, out in groups:
            for j, req in enumerate(group):
                try:
                    self._append_token(req, out, j)
                except Exception as e:
                    logger.exception("handling the token sampled for request %s failed", req.rid)
                    req.finished_reason = self._internal_error("handling the sampled token failed", e)

    def _sample(self, reqs: List[Req], logits: torch.Tensor, rows: List[int]):
        if len(rows) != logits.shape[0] or rows != list(range(len(rows))):  # a decode batch: no copy
            logits = logits[torch.tensor(rows, dtype=torch.int64)]  # [len(reqs), vocab]
        return self.sampler.sample(
            logits,
            states=[r.sampling_state for r in reqs],
            output_ids=[r.output_ids for r in reqs],
            grammars=[r.grammar for r in reqs],
            top_logprobs_nums=[r.top_logprobs_num if r.return_logprob else 0 for r in reqs],
            eos_token_ids=self.stop_checker.eos_token_ids,
            return_logprob=[r.return_logprob for r in reqs],  # no logsumexp for rows that did not ask
        )

    def _append_token(self, req: Req, out, j: int) -> None:
        tok = int(out.next_token_ids[j])
        req.output_ids.append(tok)
        if req.grammar is not None:
            req.grammar.accept_token(tok)
        if req.return_logprob:
            req.output_token_logprobs.append((float(out.next_token_logprobs[j]), tok))
            if req.top_logprobs_num:
                req.output_top_logprobs.append(out.top_logprobs[j])
        self.stop_checker.check(req)

    def collect_input_logprobs(self, req: Req, i: int, start: int, n: int, logits, row_of) -> None:
        prompt = req.origin_input_ids
        positions = [p for p in range(max(start, req.logprob_start_len - 1, 0), min(start + n, len(prompt) - 1))]
        picked, top = [], None  # computed in full before anything is recorded: a failure changes nothing
        if positions:
            rows = torch.tensor([row_of[(i, p)] for p in positions], dtype=torch.int64)
            logprobs = torch.log_softmax(logits[rows], dim=-1)  # [len(positions), vocab]
            targets = torch.tensor([prompt[p + 1] for p in positions], dtype=torch.int64)
            picked = list(zip(logprobs.gather(1, targets[:, None])[:, 0].tolist(), targets.tolist()))
            if req.top_logprobs_num:
                vals, ids = logprobs.topk(min(req.top_logprobs_num, logprobs.shape[-1]), dim=-1)
                top = [list(zip(v, t)) for v, t in zip(vals.tolist(), ids.tolist())]
        if start <= req.logprob_start_len == 0 and not req.input_token_logprobs:
            req.input_token_logprobs.append((None, prompt[0]))
            if req.top_logprobs_num:
                req.input_top_logprobs.append(None)
        req.input_token_logprobs.extend(picked)
        if top is not None:
            req.input_top_logprobs.extend(top)

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
                embedding=req.embedding,
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
            "pid": os.getpid(),  # the leader worker's process (for operators: py-spy, kill)
            "devices": list(self.tp.ranks),
            "tp_size": self.tp.size,
            "running": len(self.running),
            "waiting": self.batches.num_waiting,
            "grammar_pending": len(self.grammar_pending),
            "page_size": self.page_size,
            "num_pages": self.kv.num_pages,
            "free_pages": self.kv.allocator.num_free,
            "cached_pages": self.kv.tree.cached_pages(),
            **self.kv.sessions.stats(),
            **self.kv.host_stats(),
            "host_carry_pending": self._host_pending is not None,  # a transformation still re-lays the host tier
            # the latest re-layout on this rank (after the pause): its thread's time and the bytes it moved
            **getattr(self.runner, "host_carry_last", {"host_carry_ms": 0.0, "host_carry_bytes_moved": 0}),
            "kv_moved_bytes": self.kv_moved_bytes,
            "kv_used_tokens": self.kv.used_pages() * self.page_size,
            "kv_capacity_tokens": self.kv.num_pages * self.page_size,
            "forward_ct": self.forward_ct,
            "num_retractions": self.batches.num_retractions,
            "new_token_ratio": self.batches.new_token_ratio,
        }

    # ======================================================================================================
    # Gyges: moving this instance's state
    # ======================================================================================================
    def _new_host_tier(self, carried) -> Optional[HostKVTier]:
        return HostKVTier.for_runner(self.args.hicache_bytes(self.runner.kv_pool_bytes), self.page_size,
                                     self.runner, self.tp.broadcast_object if self.tp.size > 1 else None,
                                     carried=carried)

    def _attach_carried_host(self, wait: bool) -> None:
        """The host tier re-laid after a transformation: once this rank's re-layout is done (or at once with
        wait), the tier adopts the carried index (a fresh tier when the re-layout failed)."""
        if self._host_pending is None:
            return
        carry = getattr(self.runner, "_host_carry", None)
        if carry is not None and not wait and not carry.done.is_set():
            return
        carried, self._host_pending = self._host_pending, None
        store = settle_carry(self.runner)
        self.kv.attach_host(self._new_host_tier(carried if store is not None else None))

    def export_state(self) -> InstanceState:
        """Plain-data copy of the requests and the cache (page ids of this instance)."""
        self.poll_grammars(wait=True)  # constrained requests still compiling move as waiting requests
        self._attach_carried_host(wait=True)
        host_sessions, hinted, prefetched_turns = self.kv.export_hints()
        return InstanceState(
            devices=list(self.tp.ranks),
            running=[portable_req(r) for r in self.running],
            waiting=[portable_req(r) for r in self.waiting],
            tree_paths=self.kv.tree.export(),
            new_token_ratio=self.batches.new_token_ratio,
            session_pins=self.kv.sessions.export(),
            host=self.kv.host.export() if self.kv.host is not None else None,
            host_sessions=host_sessions,
            hinted=hinted,
            prefetched_turns=prefetched_turns,
        )

    def adopt_state(self, state: InstanceState) -> None:
        """Take over migrated requests and cache (page ids already re-based to this instance)."""
        for req in state.running + state.waiting:
            if isinstance(req.grammar, dict):
                req.grammar = self.grammar_backend().restore(req.grammar["grammar_state"])
        self.kv.adopt(state.tree_paths, state.running)
        self.kv.sessions.adopt(state.session_pins)
        self.kv.adopt_hints(state.host_sessions, state.hinted, state.prefetched_turns)
        self.batches.adopt(state.running, state.waiting, state.new_token_ratio)

    def _cached_prefix_hashes(self) -> List[int]:
        from gyges.prefix_hashes import block_hashes  # not gyges.policies: that import alone takes ~0.8 s

        hashes = {h for tokens, _ in self.kv.tree.export() for h in block_hashes(tokens, self.page_size)}
        return sorted(hashes)

    def report_load(self) -> None:
        """Send an InstanceReport when the load changed (rate-limited), a request finished, or a heartbeat is due.

        Sent at once: the first report (and the first after a transformation), the instance going idle or
        busy, a change of the sessions pinned here. Any other change waits until --load-report-interval has
        passed since the previous report (the controller adds what it routed since then); the loop calls
        this after every iteration and at least every 200 ms when idle, so a held-back change is sent soon.
        """
        now = time.monotonic()
        since = now - self._last_report_time
        waiting = self.batches.num_waiting + len(self.grammar_pending)
        busy = bool(self.running) or waiting > 0
        sessions = self.kv.home_sessions()  # pinned here (or, with a host tier, kept on host here)
        urgent = (self._last_report_key is None or self._report_prefixes or busy != self._reported_busy
                  or sessions != self._reported_sessions)
        if not urgent and since < self.args.load_report_interval:
            return  # rate limit: the O(requests) load sums below are not even computed
        reclaimable = self.kv.tree.evictable_pages() + self.kv.tree.pinned_pages()
        key = (len(self.running), waiting, self.kv.used_pages(), self.kv.num_pages,
               self.batches.tokens_in_flight(), reclaimable, self.batches.largest_prefill_left(),
               self.batches.prefill_tokens_queued(), self.kv.tree.pinned_pages())
        if (not urgent and key == self._last_report_key and not self._finished_since_report
                and since < REPORT_HEARTBEAT_S):
            return
        report = InstanceReport(
            instance_id=self.instance_id,
            running=len(self.running),
            waiting=waiting,
            kv_used_tokens=self.kv.used_pages() * self.page_size,
            kv_capacity_tokens=self.kv.num_pages * self.page_size,
            tokens_in_flight=key[4],
            kv_evictable_tokens=key[5] * self.page_size,
            capacity_by_tp=self.capacity_by_tp,
            finished_rids=self._finished_since_report,
            forward_ct=self.forward_ct,
            prefill_tokens_left=key[6],
            prefill_tokens_queued=key[7],
            kv_pinned_tokens=key[8] * self.page_size,
            sessions=sessions if sessions != self._reported_sessions else None,
            cached_prefix_hashes=self._cached_prefix_hashes() if self._report_prefixes else None,
        )
        self._report_prefixes = False
        self._reported_sessions = sessions
        self._reported_busy = busy
        self._last_report_key = key
        self._last_report_time = now
        self._finished_since_report = []
        self.send_to_controller.send_pyobj(report)


def follower_loop(runner, tp_group) -> Optional[TransformCmd]:
    """Non-leader TP ranks: compute every batch the leader broadcasts, until it broadcasts a
    transformation order (returned) or None (shutdown)."""
    while True:
        msg = tp_group.broadcast_object(None)
        if msg is None or isinstance(msg, TransformCmd):
            return msg
        if isinstance(msg, HostKVCopy):  # the leader's host KV tier copies this rank's slice too
            rank_store(runner, msg.capacity_pages).apply(msg)
            continue
        if isinstance(msg, SessionPagesRead):  # the leader exports a session's KV: this rank's heads
            read_pages_all_heads(runner.kv_pool, msg.pages, tp_group)
            continue
        if isinstance(msg, SessionPagesWrite):  # the leader adopts a moved session: this rank's heads
            write_pages_all_heads(runner.kv_pool, msg.pages, msg.kv, tp_group)
            continue
        if isinstance(msg, (SplitPrecopyStart, SplitPrecopyStep)):  # the leader's split copies KV ahead
            from sglang.srt.managers import gyges_transform, split_precopy

            if isinstance(msg, SplitPrecopyStart):
                split_precopy.SplitKVPrecopy(msg.cmd, torch.distributed.get_rank(), runner, msg.page_map,
                                             msg.chunk_bytes)
            elif (pre := gyges_transform._PRECOPIED.get(msg.transform_id)) is not None:
                pre.step(msg.chunk)
            continue
        if isinstance(msg, (WeightPrefetchStart, WeightPrefetchStep)):  # the leader's split prefetches weights
            from sglang.srt.managers import weight_prefetch

            if isinstance(msg, WeightPrefetchStart):
                weight_prefetch.WeightPrefetch.for_split(msg.cmd, torch.distributed.get_rank(), runner,
                                                         msg.chunk_bytes).start(msg.staging_start, msg.staging_bytes)
            elif (pre := weight_prefetch._PREFETCHED.get(msg.transform_id)) is not None:
                pre.step(msg.chunk)
            continue
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
