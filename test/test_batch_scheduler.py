"""BatchScheduler (pure scheduling decisions): liveness, page accounting, aborts, admission.

The hypothesis state machine plays an engine around the scheduler: random arrivals (shared prefixes,
prompt and output lengths), aborts, and forward iterations that feed the plan and sample a token for every
request whose fill is complete. Configurations vary page size, pool size, chunk size, prefill budget,
running cap, policy and the radix cache. Invariants after every step: every page is in exactly one place
(free, the radix tree, or one running request), nothing waiting holds pages, a queued request always gets
a non-empty plan. At the end every request must finish (or get a clear error) within a bounded number of
iterations, and every page must be back.
"""

import random

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from sglang.srt.managers.batch_scheduler import BatchScheduler, SchedulerConfig
from sglang.srt.managers.req_kv import ReqKVManager
from sglang.srt.managers.schedule_batch import Req
from sglang.srt.sampling.sampling_params import SamplingParams

VOCAB = 6  # small, so outputs and prompts share prefixes in the radix tree


def make_req(rid, prompt, max_new, arrival, logprob_start_len=-1):
    return Req(rid=rid, origin_input_ids=list(prompt), sampling_params=SamplingParams(max_new_tokens=max_new),
               return_logprob=logprob_start_len >= 0, logprob_start_len=logprob_start_len, arrival_time=arrival)


class Engine:
    """The scheduler plus a fake model: each completed fill samples a token from a seeded RNG."""

    def __init__(self, cfg: SchedulerConfig, num_pages: int, reserved: int, disable_cache: bool, seed: int = 0):
        self.kv = ReqKVManager(num_pages, cfg.page_size, disable_cache, reserved)
        self.bs = BatchScheduler(cfg, self.kv)
        self.rng = random.Random(seed)
        self.finished = {}  # rid -> finish reason
        self.clock = 0.0
        self.iterations = 0

    def add(self, rid, prompt, max_new, logprob_start_len=-1):
        self.clock += 1.0
        req = make_req(rid, prompt, max_new, self.clock, logprob_start_len)
        error = self.bs.add(req)
        if error is not None:
            self.finished[rid] = error
        return req, error

    def step(self):
        had_work = self.bs.has_work
        plan = self.bs.schedule()
        self.iterations += 1
        for req in plan.failed:
            assert req.finished_reason["type"] == "abort" and req.finished_reason["message"]
            self.finished[req.rid] = req.finished_reason
        if had_work:
            assert plan.items or plan.failed, "requests are queued but nothing was scheduled"
        seen = set()
        for req, n in plan.items:
            assert id(req) not in seen, "a request appears twice in one plan"
            seen.add(id(req))
            assert 1 <= n <= req.extend_remaining
            assert len(req.page_table) * self.kv.page_size >= req.kv_len + n, "KV pages do not cover the chunk"
            assert req in self.bs.running
        assert plan.num_tokens <= self.bs.config.max_prefill_tokens + len(plan.items)
        done = []
        for req in self.bs.forward_done(plan):
            if req.max_new_tokens == 0:
                req.finished_reason = {"type": "length", "length": 0}
            else:
                req.output_ids.append(self.rng.randrange(VOCAB))
                if len(req.output_ids) >= req.max_new_tokens or self.rng.random() < 0.05:
                    req.finished_reason = {"type": "length", "length": len(req.output_ids)}
            if req.finished:
                done.append(req)
        self.bs.finish(done)
        for req in done:
            self.finished[req.rid] = req.finished_reason
        return plan

    def drain(self, bound: int):
        for _ in range(bound):
            if not self.bs.has_work:
                return
            self.step()
        raise AssertionError(f"not drained after {bound} iterations: {len(self.bs.running)} running, "
                             f"{len(self.bs.waiting)} waiting")

    def check_pages(self):
        kv = self.kv
        tree_pages = kv.tree.all_pages()
        owned = []
        for req in self.bs.running:
            assert set(req.page_table[:req.num_tree_pages]) <= set(tree_pages)
            owned.extend(req.page_table[req.num_tree_pages:])
        for req in self.bs.waiting:
            assert not req.page_table and req.cache_node is None, "a waiting request holds pages"
        free = kv.allocator.free_pages()
        everything = free + tree_pages + owned
        assert len(everything) == len(set(everything)), "a page is in two places"
        assert len(everything) == kv.num_pages, f"pages leaked: {kv.num_pages - len(everything)}"
        kv.tree.check_invariants()


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(
        page_size=st.sampled_from([1, 2, 4, 16]),
        num_pages=st.integers(4, 48),
        reserved=st.integers(0, 2),
        chunk=st.sampled_from([-1, 1, 3, 8, 32]),
        budget=st.sampled_from([1, 5, 16, 64, 4096]),
        max_running=st.sampled_from([None, 1, 2, 5]),
        policy=st.sampled_from(["fcfs", "lpm"]),
        conservativeness=st.sampled_from([0.3, 1.0]),
        disable_cache=st.booleans(),
        prefixes=st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40), min_size=1, max_size=3),
        seed=st.integers(0, 1000),
    )
    def setup(self, page_size, num_pages, reserved, chunk, budget, max_running, policy, conservativeness,
              disable_cache, prefixes, seed):
        cfg = SchedulerConfig(page_size=page_size, max_prefill_tokens=budget, chunked_prefill_size=chunk,
                              max_running_requests=max_running, schedule_policy=policy,
                              schedule_conservativeness=conservativeness, context_len=10_000)
        self.engine = Engine(cfg, num_pages + reserved, reserved, disable_cache, seed)
        self.prefixes = prefixes
        self.capacity = num_pages * page_size
        self.submitted = {}  # rid -> prompt + max_new tokens (work it needs)
        self.next_rid = 0

    @rule(prefix=st.integers(0, 2), suffix=st.lists(st.integers(0, VOCAB - 1), max_size=40),
          max_new=st.integers(0, 60), logprob=st.sampled_from([-1, -1, -1, 0, 3]))
    def arrive(self, prefix, suffix, max_new, logprob):
        prompt = self.prefixes[prefix % len(self.prefixes)] + suffix
        rid = f"r{self.next_rid}"
        self.next_rid += 1
        req, error = self.engine.add(rid, prompt, max_new, logprob)
        if len(prompt) >= self.capacity:
            assert error is not None and error["status_code"] == 400 and str(self.capacity - 1) in error["message"]
        else:
            assert error is None
            self.submitted[rid] = len(prompt) + max_new

    @precondition(lambda self: self.engine.bs.has_work)
    @rule(data=st.data())
    def abort(self, data):
        live = [r.rid for r in self.engine.bs.running + self.engine.bs.waiting if not r.finished]
        rid = data.draw(st.sampled_from(live))
        req = self.engine.bs.get(rid)
        # An abort issued before the request arrived (a late abort of an older request with this rid) misses.
        assert self.engine.bs.abort(rid, issued_at=req.arrival_time - 0.5) == []
        assert rid in self.engine.bs
        (gone,) = self.engine.bs.abort(rid, issued_at=self.engine.clock)
        assert gone is req and req.finished_reason["status_code"] == 499
        assert rid not in self.engine.bs
        self.engine.finished[rid] = req.finished_reason

    @rule(n=st.integers(1, 8))
    def iterate(self, n):
        for _ in range(n):
            self.engine.step()

    @invariant()
    def pages_accounted(self):
        if hasattr(self, "engine"):
            self.engine.check_pages()

    def teardown(self):
        if not hasattr(self, "engine"):
            return
        e = self.engine
        work = sum(self.submitted.values())
        e.drain(bound=20 * work + 50)
        e.check_pages()
        assert set(self.submitted) <= set(e.finished), "a request never finished"
        for rid, reason in e.finished.items():
            if reason["type"] == "abort":
                assert reason["status_code"] in (400, 499, 507) and reason["message"]
        assert e.kv.tree.protected_pages() == 0
        assert e.kv.allocator.num_free + e.kv.tree.cached_pages() == e.kv.num_pages


SchedulerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                              suppress_health_check=[HealthCheck.too_slow])
test_scheduler_state_machine = SchedulerMachine.TestCase


# ---------------------------------------------------------------------------------------------------
# examples
# ---------------------------------------------------------------------------------------------------
def test_burst_of_long_shared_prefix_prompts_drains():
    """The burst that froze a DP server: 120 requests, prompts up to the capacity, shared prefixes, chunked
    prefill, a pool of 2,928 tokens. Every request finishes; no page leaks."""
    ps = 16
    cfg = SchedulerConfig(page_size=ps, max_prefill_tokens=16384, chunked_prefill_size=512, context_len=32768)
    e = Engine(cfg, num_pages=2928 // ps, reserved=0, disable_cache=False, seed=1)
    rng = random.Random(0)
    prefixes = [[rng.randrange(1000) for _ in range(rng.randrange(200, 1500))] for _ in range(6)]
    for i in range(120):
        prompt = prefixes[i % 6] + [rng.randrange(1000) for _ in range(rng.randrange(1, 1400))]
        prompt = prompt[:2900]
        e.add(f"b{i}", prompt, rng.randrange(16, 256))
    e.drain(bound=20000)
    assert len(e.finished) == 120
    assert all(r["type"] == "length" for r in e.finished.values())
    e.check_pages()


def test_admission_reserves_the_whole_prefill():
    """Two prompts that each fit alone but not together: the second waits instead of both starting and
    starving each other mid-prefill."""
    cfg = SchedulerConfig(page_size=4, chunked_prefill_size=8, context_len=1000)
    e = Engine(cfg, num_pages=20, reserved=0, disable_cache=True)
    a, _ = e.add("a", [1] * 50, 4)
    b, _ = e.add("b", [2] * 50, 4)
    plan = e.step()
    assert [r.rid for r, _ in plan.items] == ["a"]
    assert e.bs.waiting == [b]
    e.drain(200)
    assert set(e.finished) == {"a", "b"}


def test_stuck_prefills_are_retracted_until_one_advances():
    """Admitted prefills that cannot get pages (memory taken by decodes beyond their reservation) are
    retracted, keeping their KV in the radix cache, so the oldest advances."""
    cfg = SchedulerConfig(page_size=1, chunked_prefill_size=4, context_len=1000)
    e = Engine(cfg, num_pages=24, reserved=0, disable_cache=False)
    a, _ = e.add("a", list(range(10)), 2)
    b, _ = e.add("b", list(range(100, 110)), 2)
    e.step()  # a and b each prefill 4 tokens
    assert a.kv_len == 4 and len(a.page_table) == 4 and len(b.page_table) == 4
    # Someone else took every free page (as decodes past their reservation would).
    squatter = e.kv.allocator.alloc(e.kv.allocator.num_free)
    plan = e.step()
    assert plan.retracted == [b]
    assert [r for r, _ in plan.items] == [a]
    # b's computed KV went to the radix cache, whose pages a's next chunk then took.
    assert b in e.bs.waiting and b.retractions == 1 and a.kv_len == 8
    e.kv.allocator.free(squatter)
    e.drain(200)
    assert set(e.finished) == {"a", "b"}
    e.check_pages()


def test_request_that_cannot_fit_alone_fails_with_a_reason():
    cfg = SchedulerConfig(page_size=4, context_len=1000)
    e = Engine(cfg, num_pages=8, reserved=0, disable_cache=True)
    req, error = e.add("x", [1] * 40, 4)
    assert error["status_code"] == 400 and "at most 31" in error["message"]
    assert not e.bs.has_work
    req, error = e.add("y", [1] * 20, 100)
    assert error is None and req.max_new_tokens == 32 - 20  # clipped to the capacity


def test_abort_is_linear_and_misses_newer_requests():
    cfg = SchedulerConfig(page_size=4, context_len=1000, max_running_requests=4)
    e = Engine(cfg, num_pages=64, reserved=0, disable_cache=True)
    for i in range(20000):
        e.add(f"q{i}", [1, 2, 3], 4)
    for i in range(0, 20000, 2):
        assert len(e.bs.abort(f"q{i}", issued_at=e.clock)) == 1
    assert e.bs.abort("q1", issued_at=0.0) == []  # issued before q1 arrived
    assert len(e.bs.abort_all()) == 10000
    assert not e.bs.has_work and e.bs.schedule().items == []


@pytest.mark.parametrize("policy", ["fcfs", "lpm"])
def test_retracted_request_keeps_output_and_finishes(policy):
    cfg = SchedulerConfig(page_size=2, chunked_prefill_size=-1, context_len=1000, schedule_policy=policy)
    e = Engine(cfg, num_pages=12, reserved=0, disable_cache=False)
    e.rng.random = lambda: 1.0  # no random stops: every request runs to max_new_tokens
    for i in range(4):
        e.add(f"d{i}", [i, i + 1, i + 2], 16)
    e.drain(2000)
    assert e.bs.num_retractions > 0
    assert all(r == {"type": "length", "length": 16} for r in e.finished.values())
