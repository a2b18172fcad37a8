"""The scheduling decisions of one instance: which requests run this iteration, and with how many tokens.

Pure logic (no torch, no sockets, no model): the instance leader's `Scheduler` (scheduler.py) owns the
process side (messages, broadcasts, forward, sampling, outputs) and calls into this class:

    add(req)                 queue a request (clips max_new_tokens; refuses one that can never fit)
    schedule() -> plan       decode tokens + prefill chunks of this iteration, and the requests retracted
                             or failed to make room; advances nothing
    forward_done(plan)       the plan's tokens are in the KV pool: advance every request's kv_len
    finish(reqs)             requests that stopped: their KV goes to the radix cache, pages to the pool
    abort(rid, issued_at) / abort_all()

Memory accounting (in pages; `ReqKVManager` holds the pool and the radix cache):

- Admission reserves what a request needs to finish its prefill: every prompt token not served from the
  cache, plus `new_token_ratio` of its remaining max_new_tokens (SGLang's PrefillAdder does the same).
  A request is admitted only if that claim fits beside the claims of the requests already running, so
  admitted prefills never starve each other.
- Decoding requests get a page for their next token first; when pages run out, requests are retracted
  (prefilling ones too) until the rest fit. A retracted request keeps its output; its computed KV goes
  into the radix cache, so re-admission usually re-uses it.

Liveness: `schedule()` returns a non-empty plan whenever there is work. If the running requests cannot
advance (no pages for any of them), it retracts until one can; a request alone on the instance always
fits (its prompt plus max_new_tokens is clipped to the capacity at `add`), and one that does not is
failed with a clear reason instead of waiting forever. `test/test_batch_scheduler.py` checks this with a
hypothesis state machine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from sglang.srt.managers.req_kv import ReqKVManager, pages_for
from sglang.srt.managers.schedule_batch import Req, finish_abort
from sglang.srt.managers.schedule_policy import SchedulePolicy

logger = logging.getLogger(__name__)

# Fraction of a request's remaining max_new_tokens reserved in pages when admitting new requests. It
# grows after a retraction (memory was over-committed) and decays back while decoding goes well.
INIT_NEW_TOKEN_RATIO = 0.5
MIN_NEW_TOKEN_RATIO = 0.1
NEW_TOKEN_RATIO_DECAY = 0.001
RETRACT_RATIO_STEP = 0.1


@dataclass
class SchedulerConfig:
    """The scheduling flags of ServerArgs that decisions depend on."""

    page_size: int = 16
    max_prefill_tokens: int = 16384  # most prompt tokens in one iteration
    chunked_prefill_size: int = 512  # longest chunk of one request per iteration; -1: no chunking
    max_running_requests: Optional[int] = None  # None: memory is the only limit
    schedule_policy: str = "fcfs"
    schedule_conservativeness: float = 1.0  # scales the decode tokens reserved at admission
    context_len: int = 1 << 30

    @classmethod
    def from_server_args(cls, args, context_len: int) -> "SchedulerConfig":
        return cls(page_size=args.page_size, max_prefill_tokens=args.max_prefill_tokens,
                   chunked_prefill_size=args.chunked_prefill_size,
                   max_running_requests=args.max_running_requests, schedule_policy=args.schedule_policy,
                   schedule_conservativeness=args.schedule_conservativeness, context_len=context_len)


@dataclass
class SchedulePlan:
    """One iteration's decisions."""

    items: List[Tuple[Req, int]] = field(default_factory=list)  # (request, new tokens to feed), batch order
    retracted: List[Req] = field(default_factory=list)  # moved back to the waiting queue to free pages
    failed: List[Req] = field(default_factory=list)  # finished with an abort reason (cannot ever fit)

    def __bool__(self) -> bool:
        return bool(self.items)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)


class BatchScheduler:
    def __init__(self, config: SchedulerConfig, kv: ReqKVManager):
        self.config = config
        self.kv = kv
        self.policy = SchedulePolicy(config.schedule_policy, kv.tree)
        self.page_size = config.page_size
        self.waiting: List[Req] = []  # not admitted (new or retracted)
        self.running: List[Req] = []  # admitted: prefilling (chunked) or decoding
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO
        self.num_retractions = 0
        self._by_rid: Dict[str, Req] = {}  # every waiting or running request
        self._waiting_dirty = False  # an abort finished a waiting request: filter it out lazily

    # ======================================================================================================
    # queue
    # ======================================================================================================
    @property
    def capacity_tokens(self) -> int:
        return self.kv.num_pages * self.page_size

    @property
    def has_work(self) -> bool:
        return bool(self._by_rid)

    @property
    def num_waiting(self) -> int:
        """Queued requests not admitted (aborted ones may still sit in `waiting` until the next schedule)."""
        return len(self._by_rid) - len(self.running)

    def __contains__(self, rid: str) -> bool:
        return rid in self._by_rid

    def get(self, rid: str) -> Optional[Req]:
        return self._by_rid.get(rid)

    def add(self, req: Req) -> Optional[dict]:
        """Queue `req`. Returns an abort reason (and queues nothing) when it can never be served here."""
        error = self.admission_error(req)
        if error is not None:
            return error
        ctx = self.config.context_len
        cap = self.capacity_tokens
        prompt_len = len(req.origin_input_ids)
        # None = up to the context / capacity limit (SGLang's meaning).
        sp = req.sampling_params
        requested = sp.max_new_tokens if sp.max_new_tokens is not None else 1 << 62
        req.max_new_tokens = min(requested, ctx - prompt_len, cap - prompt_len)
        if req.logprob_start_len >= prompt_len:
            req.logprob_start_len = prompt_len - 1 if prompt_len else -1
        self._by_rid[req.rid] = req
        self.waiting.append(req)
        return None

    def admission_error(self, req: Req) -> Optional[dict]:
        """Why `req` can never be served here (an abort reason), or None."""
        ctx = self.config.context_len
        cap = self.capacity_tokens
        prompt_len = len(req.origin_input_ids)
        if prompt_len >= min(ctx, cap):
            limit = min(ctx, cap) - 1
            return finish_abort(f"the prompt has {prompt_len} tokens; this instance serves at most {limit} "
                                f"(context length {ctx}, KV capacity {cap} tokens)", 400)
        if req.rid in self._by_rid:
            return finish_abort(f"request id {req.rid!r} is already in use by a live request", 400)
        return None

    def adopt(self, running: List[Req], waiting: List[Req], new_token_ratio: float) -> None:
        """Take over migrated requests (a Gyges transformation); their KV is already adopted by `kv`."""
        self.running = list(running)
        self.waiting = sorted(waiting, key=lambda r: r.arrival_time)
        self._by_rid = {r.rid: r for r in self.running + self.waiting}
        self.new_token_ratio = new_token_ratio

    def abort(self, rid: str, issued_at: Optional[float] = None) -> List[Req]:
        """Finish request `rid` (if it arrived at or before `issued_at`) with a 499; returns it (or nothing)."""
        req = self._by_rid.get(rid)
        if req is None or (issued_at is not None and req.arrival_time > issued_at):
            return []
        self._abort(req)
        return [req]

    def abort_all(self) -> List[Req]:
        reqs = list(self._by_rid.values())
        for req in reqs:
            self._abort(req)
        return reqs

    def _abort(self, req: Req) -> None:
        req.finished_reason = finish_abort("aborted", 499)
        del self._by_rid[req.rid]
        if req in self.running:  # running is bounded by memory; waiting can be long: filtered lazily
            self.running.remove(req)
            self.kv.release(req)
        else:
            self._waiting_dirty = True

    def finish(self, reqs: List[Req]) -> None:
        """Requests that stopped (their finished_reason is set): release their KV."""
        done = {id(r) for r in reqs}
        if not done:
            return
        self.running = [r for r in self.running if id(r) not in done]
        for req in reqs:
            self._by_rid.pop(req.rid, None)
            computed = req.fill_ids[:req.kv_len] if req.session_id else None
            self.kv.release(req)
            if computed:  # the session's next turn finds this KV here (pinned until then)
                self.kv.finish_session_turn(req.session_id, computed)

    def _clean_waiting(self) -> None:
        if self._waiting_dirty:
            self.waiting = [r for r in self.waiting if not r.finished]
            self._waiting_dirty = False

    # ======================================================================================================
    # decisions
    # ======================================================================================================
    def schedule(self) -> SchedulePlan:
        """This iteration's work. Non-empty whenever a request is queued (see the module docstring)."""
        self._clean_waiting()
        plan = SchedulePlan()
        while self.running or self.waiting:
            self._plan_iteration(plan)
            if plan.items:
                break
            if self.running:
                # Nobody can advance: free the pages of the request whose loss costs least.
                self._retract(self._pick_victim(self.running), plan)
                continue
            # Alone and its next chunk does not fit an empty instance: it can never be served here.
            req = self.policy.order(self.waiting)[0]
            self.waiting.remove(req)
            self._by_rid.pop(req.rid, None)
            req.finished_reason = finish_abort(
                f"out of KV memory: {req.seq_len} tokens do not fit this instance's capacity of "
                f"{self.capacity_tokens} tokens", 507)
            plan.failed.append(req)
        return plan

    def _plan_iteration(self, plan: SchedulePlan) -> None:
        cfg = self.config
        ps = self.page_size
        decoding = [r for r in self.running if r.is_decoding]
        # 1) one token per decoding request; retract (any running request) until their pages fit.
        while decoding:
            need = sum(1 for r in decoding if pages_for(r.kv_len + 1, ps) > len(r.page_table))
            if need <= self.kv.available_pages():
                break
            victim = self._pick_victim(self.running)
            self._retract(victim, plan)
            if victim in decoding:
                decoding.remove(victim)
        for req in decoding:
            ok = self.kv.reserve(req, req.kv_len + 1)
            assert ok, "pages were counted as available"
            plan.items.append((req, 1))
        if decoding:
            self.new_token_ratio = max(MIN_NEW_TOKEN_RATIO, self.new_token_ratio - NEW_TOKEN_RATIO_DECAY)

        budget = cfg.max_prefill_tokens
        chunk_cap = cfg.chunked_prefill_size if cfg.chunked_prefill_size > 0 else 1 << 62
        # 2) admitted requests whose prefill is not done (chunked), in admission order.
        for req in [r for r in self.running if not r.is_decoding]:
            if budget <= 0:
                break
            n = min(req.extend_remaining, chunk_cap, budget)
            if not self.kv.reserve(req, req.kv_len + n):
                break
            plan.items.append((req, n))
            budget -= n
        # 3) new admissions: each one's whole remaining prefill and its share of decode tokens must fit
        # beside what the running requests still claim.
        max_running = cfg.max_running_requests or 1 << 62
        if not self.waiting or budget <= 0 or len(self.running) >= max_running:
            return  # nothing to admit: skip ordering the queue (lpm matches every prompt to order it)
        claimed = sum(self._claim_pages(r) for r in self.running)
        admitted = []
        for req in self.policy.order(self.waiting):
            if budget <= 0 or len(self.running) >= max_running:
                break
            self.kv.admit(req)
            claim = self._claim_pages(req)
            n = min(req.extend_remaining, chunk_cap, budget)
            alone = not self.running
            if (not alone and claim > self.kv.available_pages() - claimed) or not self.kv.reserve(
                    req, req.kv_len + n):
                self.kv.release(req)
                break
            claimed += self._claim_pages(req)
            admitted.append(req)
            self.running.append(req)
            plan.items.append((req, n))
            budget -= n
        if admitted:
            gone = {id(r) for r in admitted}
            self.waiting = [r for r in self.waiting if id(r) not in gone]

    def _claim_pages(self, req: Req) -> int:
        """Pages `req` may still allocate: the rest of its prefill and a share of its remaining output."""
        ratio = min(1.0, self.new_token_ratio * self.config.schedule_conservativeness)
        tokens = req.seq_len + int(req.remaining_new_tokens * ratio)
        return max(0, pages_for(tokens, self.page_size) - len(req.page_table))

    def _pick_victim(self, candidates: List[Req]) -> Req:
        # The request with the least output (least work lost), the latest admitted on ties, so the oldest
        # request keeps running and finishes.
        order = {id(r): i for i, r in enumerate(self.running)}
        return min(candidates, key=lambda r: (len(r.output_ids), -order.get(id(r), 0)))

    def _retract(self, req: Req, plan: SchedulePlan) -> None:
        self.running.remove(req)
        self.kv.release(req)
        req.retractions += 1
        self.num_retractions += 1
        self.waiting.insert(0, req)
        self.new_token_ratio = min(1.0, self.new_token_ratio + RETRACT_RATIO_STEP)
        plan.retracted.append(req)
        logger.info("retracted request %s (%d tokens) to free KV pages", req.rid, req.seq_len)

    # ======================================================================================================
    # after the forward pass
    # ======================================================================================================
    def forward_done(self, plan: SchedulePlan) -> List[Req]:
        """The plan's tokens are in the pool. Returns the requests whose fill is complete (sample them)."""
        ready = []
        for req, n in plan.items:
            req.kv_len += n
            if req.kv_len == req.seq_len:
                ready.append(req)
        return ready

    # ======================================================================================================
    # accounting
    # ======================================================================================================
    def tokens_in_flight(self) -> int:
        return sum(r.remaining_new_tokens + r.extend_remaining for r in self.running + self.waiting)

    def prefill_tokens_queued(self) -> int:
        """Prompt tokens the admitted and waiting requests have still to prefill, in all."""
        return sum(r.extend_remaining for r in self.running + self.waiting if not r.is_decoding)

    def largest_prefill_left(self) -> int:
        """The most prompt tokens one admitted or waiting request has still to prefill."""
        return max((r.extend_remaining for r in self.running + self.waiting), default=0)
