"""The scheduler's process side with a fake model (no workers, no sockets): a request whose processing
raises fails alone, grammars compile off the loop within --grammar-compile-timeout, aborts are exact.

The fake runner returns seeded random logits with the right shape; outputs the scheduler would send to the
detokenizer are captured.
"""

import threading
import time
from types import SimpleNamespace

import torch

from sglang.srt.managers.io_struct import AbortReq, TokenizedGenerateReqInput
from sglang.srt.managers.scheduler import Scheduler
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.server_args import ServerArgs

VOCAB = 64


class FakeRunner:
    def __init__(self, num_pages=64):
        self.model_config = SimpleNamespace(vocab_size=VOCAB, eos_token_ids=[0], context_len=4096)
        self.num_pages = num_pages
        self.reserved_pages = 0
        self.gen = torch.Generator().manual_seed(0)
        self.fail_next = False

    def forward(self, fb):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("device fault")
        return torch.randn(len(fb.logits_indices), VOCAB, generator=self.gen)


class Outbox:
    def __init__(self):
        self.msgs = []

    def send_pyobj(self, msg):
        self.msgs.append(msg)


def make_scheduler(grammar_backend=None, **args):
    channels = SimpleNamespace(recv_from_controller=None, send_to_detokenizer=Outbox(),
                               send_to_controller=Outbox(), poller=None)
    server_args = ServerArgs(model_path="fake", page_size=4, **args)
    tp = SimpleNamespace(size=1, ranks=[0])
    return Scheduler(server_args, channels, FakeRunner(), tp, 0, tokenizer=None, grammar_backend=grammar_backend)


def submit(sched, rid, max_new=4, arrival=None, **params):
    sp = SamplingParams(max_new_tokens=max_new, ignore_eos=True, **params)
    sched.add_request(TokenizedGenerateReqInput(rid=rid, input_text="", input_ids=[1, 2, 3, 4, 5], sampling_params=sp,
                                                return_logprob=False, logprob_start_len=-1, top_logprobs_num=0,
                                                stream=False, arrival_time=arrival or time.time()))


def finished(sched):
    out = {}
    for batch in sched.send_to_detokenizer.msgs:
        for d in batch.outputs:
            if d.finish_reason is not None:
                out[d.rid] = d.finish_reason
    return out


def run_until_idle(sched, limit=200):
    for _ in range(limit):
        sched.poll_grammars()
        if not sched.batches.has_work and not sched.grammar_pending:
            return
        sched.step()
        time.sleep(0.001)
    raise AssertionError("scheduler did not go idle")


def test_sampling_failure_fails_only_that_request():
    sched = make_scheduler()
    real_sample = sched.sampler.sample

    def sample(logits, states, **kw):
        if any(s.params.temperature == 0.5 for s in states):
            raise ValueError("bad sampling state")
        return real_sample(logits, states, **kw)

    sched.sampler.sample = sample
    submit(sched, "good", temperature=1.0)
    submit(sched, "bad", temperature=0.5)
    submit(sched, "also-good", temperature=0.0)
    run_until_idle(sched)
    done = finished(sched)
    assert done["good"] == {"type": "length", "length": 4}
    assert done["also-good"] == {"type": "length", "length": 4}
    assert done["bad"]["status_code"] == 500 and "bad sampling state" in done["bad"]["message"]
    assert sched.kv.allocator.num_free + sched.kv.tree.cached_pages() == sched.kv.num_pages


def test_token_handling_failure_fails_only_that_request():
    """The grammar rejecting the sampled token (or any fault after sampling) fails that request; the other
    requests of the batch get exactly one token per step."""
    sched = make_scheduler()

    class BrokenGrammar:
        def accept_token(self, tok):
            raise RuntimeError("matcher crashed")

        def is_terminated(self):
            return False

    submit(sched, "good")
    submit(sched, "broken")
    sched.step()  # prefill: both sample their first token
    assert [len(sched.batches.get(r).output_ids) for r in ("good", "broken")] == [1, 1]
    sched.batches.get("broken").grammar = BrokenGrammar()
    sched.sampler.sample = lambda logits, states, grammars=None, **kw: type(
        "Out", (), {"next_token_ids": [1] * len(states), "next_token_logprobs": [0.0] * len(states),
                    "top_logprobs": [None] * len(states)})()
    sched.step()
    done = finished(sched)
    assert done["broken"]["status_code"] == 500 and "matcher crashed" in done["broken"]["message"]
    assert len(sched.batches.get("good").output_ids) == 2
    run_until_idle(sched)
    assert finished(sched)["good"] == {"type": "length", "length": 4}


def test_forward_failure_on_tp1_fails_the_batch_and_keeps_serving():
    sched = make_scheduler()
    submit(sched, "a")
    sched.runner.fail_next = True
    sched.step()
    assert finished(sched)["a"]["status_code"] == 500 and "device fault" in finished(sched)["a"]["message"]
    submit(sched, "b")
    run_until_idle(sched)
    assert finished(sched)["b"] == {"type": "length", "length": 4}
    assert sched.kv.allocator.num_free + sched.kv.tree.cached_pages() == sched.kv.num_pages


class SlowGrammarBackend:
    """new_grammar blocks until released (a pathological schema); 'fast' compiles at once."""

    def __init__(self):
        self.release = threading.Event()

    def new_grammar(self, sp):
        if sp.regex == "slow":
            self.release.wait(10)
        return None  # unconstrained after "compiling": the test is about scheduling, not masks

    def restore(self, state):
        return None


def test_grammar_compiles_off_the_loop_with_a_time_limit():
    backend = SlowGrammarBackend()
    sched = make_scheduler(grammar_backend=backend, grammar_compile_timeout=2.0)
    submit(sched, "slow", regex="slow")
    submit(sched, "plain")
    # The plain request is served to the end while the slow grammar is still compiling.
    for _ in range(50):
        sched.poll_grammars()
        sched.step()
        if "plain" in finished(sched):
            break
    assert finished(sched)["plain"] == {"type": "length", "length": 4}
    assert "slow" in sched.grammar_pending and "slow" not in finished(sched)
    deadline = time.time() + 10
    while "slow" not in finished(sched):
        sched.poll_grammars()
        time.sleep(0.01)
        assert time.time() < deadline, "the compile time limit never fired"
    reason = finished(sched)["slow"]
    assert reason["status_code"] == 400 and "--grammar-compile-timeout" in reason["message"]
    backend.release.set()
    submit(sched, "fast", regex="fast")
    run_until_idle(sched)
    assert finished(sched)["fast"] == {"type": "length", "length": 4}


def test_late_abort_misses_a_newer_request_with_the_same_rid():
    sched = make_scheduler()
    t = time.time()
    submit(sched, "x", max_new=50, arrival=t)
    sched.step()
    sched.handle_message(AbortReq("x", issued_at=t + 1))
    assert finished(sched)["x"]["status_code"] == 499
    submit(sched, "x", max_new=3, arrival=t + 2)  # the client reuses the rid
    sched.handle_message(AbortReq("x", issued_at=t + 1))  # a late copy of the first abort
    run_until_idle(sched)
    assert finished(sched)["x"] == {"type": "length", "length": 3}
    sched.handle_message(AbortReq("", abort_all=False))  # an empty rid aborts nothing
    submit(sched, "y", max_new=3)
    submit(sched, "z", max_new=3)
    sched.handle_message(AbortReq("", abort_all=True))
    assert finished(sched)["y"]["status_code"] == 499 and finished(sched)["z"]["status_code"] == 499
    assert not sched.batches.has_work


def _reports(sched):
    return [m for m in sched.send_to_controller.msgs if type(m).__name__ == "InstanceReport"]


def serve_reporting(sched):
    """Step until idle, reporting load after each step as the event loop does; returns the steps run."""
    steps = 0
    while sched.batches.has_work:
        sched.step()
        sched.report_load()
        steps += 1
    return steps


def test_load_reports_are_rate_limited_and_the_controller_view_converges():
    """A burst served step by step: load changes every decode step, but reports go out at most once per
    --load-report-interval, except the instance turning busy and idle, which are reported at once; the last
    report is the fresh state and every finished rid reached the controller exactly once."""
    sched = make_scheduler(load_report_interval=3600.0)  # nothing but urgent reports within the test
    sched.report_load()
    assert len(_reports(sched)) == 1 and _reports(sched)[0].running == 0  # the first report goes at once
    rids = [f"b{i}" for i in range(6)]
    for rid in rids:
        submit(sched, rid, max_new=8)
    sched.report_load()  # idle -> busy: at once
    assert _reports(sched)[-1].waiting == 6
    steps = serve_reporting(sched)
    reports = _reports(sched)
    assert steps > 5 and len(reports) == 3  # first, busy, idle: the decode steps in between held back
    last = reports[-1]
    assert (last.running, last.waiting, last.tokens_in_flight, last.prefill_tokens_left) == (0, 0, 0, 0)
    assert last.kv_used_tokens == sched.kv.used_pages() * sched.page_size
    assert last.forward_ct == sched.forward_ct == steps
    assert sorted(r for rep in reports for r in rep.finished_rids) == sorted(rids)
    sched.report_load()
    assert len(_reports(sched)) == 3  # nothing changed: nothing sent


def test_load_reports_follow_the_load_once_the_interval_passed():
    sched = make_scheduler(load_report_interval=0.0)  # 0: every change, like before rate limiting
    for rid in ("x", "y"):
        submit(sched, rid, max_new=6)
    steps = serve_reporting(sched)
    reports = _reports(sched)
    assert len(reports) == steps  # each decode step changed tokens_in_flight
    in_flight = [r.tokens_in_flight for r in reports]
    assert in_flight == sorted(in_flight, reverse=True) and in_flight[-1] == 0


def test_forward_batch_from_incremental_page_tables_equals_one_built_from_lists():
    """Every step's ForwardBatch (page tables mirrored incrementally, positions by tensor ops) equals the one
    ForwardBatch.build makes from the requests' python lists: chunked prefills, decodes, page-table growth,
    retraction and re-admission (a new list), and a list replaced under the request (re-based pages)."""
    from sglang.srt.model_executor.forward_batch import ForwardBatch

    sched = make_scheduler(chunked_prefill_size=6)
    sched.runner.num_pages = 64
    checked = []
    build = sched.build_forward_batch

    def checked_build(batch):
        fb, row_of = build(batch)
        ref = ForwardBatch.build([r.fill_slice(r.kv_len, r.kv_len + n) for r, n in batch], [r.kv_len for r, _ in batch],
                                 [list(r.page_table) for r, _ in batch], logits_indices=fb.logits_indices.tolist())
        for name in ("input_ids", "positions", "extend_lens", "prefix_lens", "page_table", "logits_indices"):
            assert torch.equal(getattr(fb, name), getattr(ref, name)), name
        checked.append(len(batch))
        return fb, row_of

    sched.build_forward_batch = checked_build
    for i in range(5):
        sp = SamplingParams(max_new_tokens=12 + i, ignore_eos=True)
        sched.add_request(TokenizedGenerateReqInput(rid=f"p{i}", input_text="", input_ids=list(range(1, 9 + 3 * i)),
                                                    sampling_params=sp, return_logprob=i == 2, logprob_start_len=1,
                                                    top_logprobs_num=0, stream=False, arrival_time=time.time()))
    for step in range(8):
        sched.step()
    from sglang.srt.managers.batch_scheduler import SchedulePlan

    sched.batches._retract(sched.running[-1], SchedulePlan())  # its KV to the cache, a new list when re-admitted
    req = sched.running[0]
    req.page_table = list(req.page_table)  # same pages, another list: mirrored afresh
    run_until_idle(sched)
    assert len(checked) > 10 and max(checked) == 5
    assert len(finished(sched)) == 5


def test_forward_batch_assemble_positions():
    """Positions by tensor ops: decode rows at their prefix, extends counted from it, empty extends skipped."""
    from sglang.srt.model_executor.forward_batch import ForwardBatch

    fb = ForwardBatch.build([[], [5, 6]], [3, 7], [[1], [2, 3]], logits_indices=[1])
    assert fb.positions.tolist() == [7, 8] and fb.page_table.tolist() == [[1, 0], [2, 3]]
    fb = ForwardBatch.build([[4], [5, 6, 8], [7]], [3, 7, 0], [[1], [2, 3], [9]])
    assert fb.positions.tolist() == [3, 7, 8, 9, 0] and fb.logits_indices.tolist() == [0, 3, 4]
    assert ForwardBatch.build([[4], [7]], [3, 5], [[1], [2]]).positions.tolist() == [3, 5]
