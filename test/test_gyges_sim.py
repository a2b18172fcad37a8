"""gyges.sim: the simulator drives the same policies as the controller. On a workload whose long
requests exceed one device, Gyges serves them by merging (then splits back) with no rejects, static DP
rejects them, and Gyges serves the short requests faster than static TP."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

from gyges.costmodel import StepTimeModel
from gyges.policy import ClusterState, Place, Policy, RequestInfo, Transform, make_policy
from gyges.sim.simulator import SimConfig, SimulationError, Simulator, compare, format_table, percentile, simulate
from gyges.traces import TraceRequest, mix_traces, synthetic_trace

REPO_ROOT = Path(__file__).resolve().parents[1]
LONG_AT = (3.0, 12.0, 21.0)


def workload():
    """20 req/s of prefill-heavy short requests (2K prompt) for 30 s, plus three 100K-token requests:
    more than one device (32K) or two (64K) hold, so only a TP4 instance serves them."""
    shorts = synthetic_trace(600, 20.0, short=(2048, 32), long_fraction=0.0, seed=0)
    longs = [TraceRequest(t, 100_000, 64, None, "long") for t in LONG_AT]
    return mix_traces(shorts, longs)


CONFIG = SimConfig(num_devices=4, max_tp=4, kv_tokens_per_device=32768, settle_s=15.0)


@pytest.fixture(scope="module")
def results():
    return {r.policy: r for r in compare(["gyges:split_delay=2", "static-dp-ll", "static-dp-rr", "static-tp"],
                                         workload(), CONFIG)}


def test_gyges_merges_for_long_requests_and_splits_back(results):
    g = results["gyges"]
    assert (g.completed, g.rejected, g.unfinished) == (603, 0, 0)
    assert g.merges >= 1 and g.splits >= 1
    assert g.timeline[0][1] == (1, 1, 1, 1) and g.timeline[-1][1] == (1, 1, 1, 1)
    assert (4,) in [shape for _, shape in g.timeline]
    first_merge = next(t for t, shape in g.timeline if shape == (4,))
    assert LONG_AT[0] < first_merge < LONG_AT[0] + 1.0  # the merge follows the first long request at once
    assert g.by_source["long"]["completed"] == 3
    assert g.transform_pause_s > 0


def test_static_dp_rejects_the_long_requests(results):
    for name in ("static-dp-ll", "static-dp-rr"):
        r = results[name]
        assert (r.completed, r.rejected, r.merges, r.splits) == (600, 3, 0, 0)
        assert r.by_source["long"]["rejected"] == 3


def test_gyges_beats_static_tp_on_short_requests(results):
    g, tp = results["gyges"].by_source["short"], results["static-tp"].by_source["short"]
    assert results["static-tp"].rejected == 0 and results["static-tp"].timeline == [(0.0, (4,))]
    assert g["throughput_tok_s"] > 1.1 * tp["throughput_tok_s"]
    assert g["ttft_p50"] < tp["ttft_p50"]


def test_without_reported_request_sizes_the_policy_still_splits_safely():
    cfg = SimConfig(num_devices=4, max_tp=4, kv_tokens_per_device=32768, settle_s=15.0,
                    report_largest_request=False)
    g = simulate(make_policy("gyges", split_delay=2.0), workload(), cfg)  # the simulator checks each split
    assert (g.rejected, g.unfinished) == (0, 0) and g.merges >= 1 and g.splits >= 1


def test_step_times_drive_latency():
    """One request alone: TTFT = one prefill iteration, TPOT = one decode iteration."""
    m = StepTimeModel()
    r = simulate(make_policy("static-dp-ll"), [TraceRequest(0.0, 1000, 11)], SimConfig(num_devices=1, max_tp=1))
    assert r.ttft_p50 == pytest.approx(m.step_time(1000, 1000, 1))
    # decode steps attend 1000..1010 context tokens: mean step time at ~1005
    assert r.tpot_p50 == pytest.approx(m.step_time(1, 1006, 1), rel=1e-3)
    assert r.completed == 1 and r.slo_attainment == 1.0


class Overcommitting(Policy):
    name = "overcommitting"

    def initial_instances(self, num_devices, max_tp):
        return [(d,) for d in range(num_devices)]

    def on_request(self, req: RequestInfo, state: ClusterState):
        return Place(req.rid, 0)

    def on_tick(self, state):
        return []


class BadMerger(Overcommitting):
    name = "bad-merger"

    def on_tick(self, state):
        return [Transform((1, 2), 2)]  # not aligned


def test_simulator_refuses_invalid_decisions():
    trace = [TraceRequest(0.0, 10000, 10), TraceRequest(0.1, 10000, 10)]
    with pytest.raises(SimulationError, match="free"):
        simulate(Overcommitting(), trace, SimConfig(num_devices=2, max_tp=2, kv_tokens_per_device=15000))
    with pytest.raises(SimulationError, match="invalid transformation"):
        simulate(BadMerger(), trace[:1], SimConfig(num_devices=4, max_tp=4))


def test_percentile():
    assert percentile([3, 1, 2, 4], 50) == 2.5
    assert percentile([5], 99) == 5
    assert math.isnan(percentile([], 50))


def test_format_table(results):
    table = format_table(list(results.values()))
    assert "gyges" in table and "static-tp" in table and "TTFT p99" in table
    assert len(table.splitlines()) == 2 + len(results)


def test_cli_help_and_run(tmp_path):
    out = subprocess.run([sys.executable, "-m", "gyges.sim.simulator", "--help"], capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=60)
    assert out.returncode == 0 and "--trace" in out.stdout and "--policies" in out.stdout
    from trace_files import find_traces_dir

    trace = find_traces_dir() / "azure2023_conv.csv"
    assert trace.is_file(), f"{trace} missing"
    out = subprocess.run([sys.executable, "-m", "gyges.sim.simulator", "--trace", f"{trace}@duration=10",
                          "--policies", "gyges:split_delay=1,static-dp-ll", "--devices", "2", "--max-tp", "2"],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [line.split("|")[1].strip() for line in out.stdout.splitlines() if line.startswith("|")]
    assert rows[1:] == ["gyges", "static-dp-ll"] or rows[2:] == ["gyges", "static-dp-ll"]
    assert "RuntimeWarning" not in out.stderr
