"""The simulator's instance scheduler makes the live scheduler's decisions: on random arrivals, prompt and
output lengths, page sizes, chunk sizes, prefill budgets, running limits and pool sizes, every iteration of
gyges.sim's SimInstance.next_batch is the plan of sglang's BatchScheduler (same requests, same order, same
token counts), iteration after iteration until everything finished. Retraction is the one thing the
simulator does not play (the policies place a request only where all of it fits): cases where the live
scheduler retracts are discarded."""

from hypothesis import HealthCheck, assume, example, given, settings, strategies as st

from gyges.sim.simulator import SimConfig, SimInstance, SimRequest
from gyges.topology import Instance
from sglang.srt.managers.batch_scheduler import BatchScheduler, SchedulerConfig
from sglang.srt.managers.req_kv import ReqKVManager
from sglang.srt.managers.schedule_batch import Req
from sglang.srt.sampling.sampling_params import SamplingParams

requests_st = st.lists(st.tuples(st.integers(0, 6),  # arrival iteration
                                 st.integers(1, 300),  # prompt tokens
                                 st.integers(1, 40)),  # max_new_tokens
                       min_size=1, max_size=12)


# derandomize: a fixed example sequence, so CI does not draw new ones each run (8,000 random draws passed when the
# simulator learnt that a running prefill's next chunk waits when decodes took its pages, as live: the examples)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@example(reqs=[(0, 149, 12), (0, 195, 31), (0, 193, 16)], page_size=16, chunk=8, budget=32, max_running=None,
         pages_slack=0.6875)
@example(reqs=[(0, 1, 1), (0, 1, 3), (0, 122, 1)], page_size=1, chunk=64, budget=256, max_running=None,
         pages_slack=0.97)
@given(reqs=requests_st, page_size=st.sampled_from([1, 4, 16]), chunk=st.sampled_from([8, 64, 512]),
       budget=st.sampled_from([32, 256, 16384]), max_running=st.sampled_from([None, 1, 3]),
       pages_slack=st.floats(0.3, 1.5))
def test_next_batch_is_the_batch_schedulers_plan(reqs, page_size, chunk, budget, max_running, pages_slack):
    need_pages = sum(-(-(p + o) // page_size) for _, p, o in reqs)
    largest = max(-(-(p + o) // page_size) for _, p, o in reqs)
    num_pages = max(largest, int(need_pages * pages_slack))
    live_cfg = SchedulerConfig(page_size=page_size, max_prefill_tokens=budget, chunked_prefill_size=chunk,
                               max_running_requests=max_running)
    live = BatchScheduler(live_cfg, ReqKVManager(num_pages, page_size, disable_radix_cache=True))
    sim_cfg = SimConfig(chunk_tokens=1 << 40, chunked_prefill_size=chunk, max_prefill_tokens=budget,
                        max_running_requests=max_running, page_size=page_size)
    sim = SimInstance(Instance.of((0,)), num_pages * page_size, page_size=page_size)

    arrivals = sorted(enumerate(reqs), key=lambda x: (x[1][0], x[0]))
    live_reqs, sim_reqs = {}, {}
    for it in range(2000):
        for i, (at, p, o) in arrivals:
            if at == it:
                rid = f"r{i}"
                live_reqs[rid] = Req(rid=rid, origin_input_ids=[1 + (i * 7 + j) % 97 for j in range(p)],
                                     sampling_params=SamplingParams(max_new_tokens=o), arrival_time=float(i + at * 100))
                assert live.add(live_reqs[rid]) is None
                sim_reqs[rid] = SimRequest(rid, float(it), p, o, "all")
                sim.requests.append(sim_reqs[rid])
        if not live.has_work and it > max(a for a, _, _ in reqs):
            break
        plan = live.schedule()
        assume(not plan.retracted)
        assert not plan.failed
        batch = sim.next_batch(sim_cfg, float(it))
        assert [(r.rid, n) for r, n in plan.items] == [(r.rid, n) for r, n in batch], f"iteration {it}"
        done = []
        for req in live.forward_done(plan):
            req.output_ids.append(5)
            if len(req.output_ids) >= req.max_new_tokens:
                req.finished_reason = {"type": "length", "length": len(req.output_ids)}
                done.append(req)
        live.finish(done)
        sim_done = sim.advance(batch, float(it))
        assert sorted(r.rid for r in done) == sorted(r.rid for r in sim_done)
        assert sim.load().kv_used_tokens == live.kv.used_pages() * page_size
        assert sim.load().tokens_in_flight == live.tokens_in_flight()
    assert not live.has_work and not sim.requests
