"""benchmark/study_gyges.py: the SLO ceiling (what no policy can beat) and the static-shape baselines it runs."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmark"))

import study_gyges  # noqa: E402
from gyges.sim.simulator import Simulator, build_policy  # noqa: E402
from gyges.traces import TraceRequest  # noqa: E402

PAPER_KV = {1: 3750, 2: 41250, 4: 120500}


def test_slo_ceiling_counts_the_requests_that_meet_the_slo_alone_at_their_fastest_tp():
    setup = study_gyges.Setup("H20", "Qwen2.5-32B", 8, 10.0, 0.1, PAPER_KV)
    trace = [TraceRequest(0.0, 1000, 100), TraceRequest(1.0, 50_000, 100),  # a 50K prefill: > 10 s even at TP4
             TraceRequest(2.0, 200_000, 100), TraceRequest(3.0, 30_000, 100)]  # 200K: no instance holds it
    assert study_gyges.slo_ceiling(trace, setup) == 0.5
    relaxed = study_gyges.Setup("H20", "Qwen2.5-32B", 8, 60.0, 0.1, PAPER_KV)
    assert study_gyges.slo_ceiling(trace, relaxed) == 0.75


def test_every_configuration_of_the_study_serves_a_short_trace_within_the_ceiling():
    setup = study_gyges.Setup("H20", "Qwen2.5-32B", 8, 10.0, 0.1, PAPER_KV, study_gyges.paper_tp_penalty())
    trace = [TraceRequest(0.5 * k, 2000 if k % 4 else 20_000, 50) for k in range(24)]
    ceiling = study_gyges.slo_ceiling(trace, setup)
    for label, spec in study_gyges.configurations(setup, None):
        sim = Simulator(build_policy(spec, setup.config()), trace, setup.config())
        res = sim.run()
        assert res.rejected + res.completed == len(trace), label
        assert res.slo_attainment <= ceiling + 1e-9, label
