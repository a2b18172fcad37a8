"""The simulator predicts a live run: benchmark/validate_sim.py's pipeline on a CI-sized workload.

The cost models are measured on this machine first, right before the live runs (measure_costs.py's probe
and fit through a server with the live runs' flags, validate_sim's small grid, decode steps timed from the
streams: ~40 s on a quiet machine), then a real server per policy (Gyges; static DP with least-loaded
placement) serves a few dozen short streaming requests at a sustained rate below capacity plus one request
that fits no TP1 instance (Gyges merges for it and splits back; static DP refuses it with a 400), and the
simulator replays the same requests with the measured models, the server's flags, and what probes right
before and after each replay measured: the per-request overhead and the machine's speed against the
model measurement's (the same probe requests timed then: this machine is shared, and its speed drifts 2x
within minutes). Asserted: throughput within 15%, merges and splits within one, the same requests completed,
the Gyges run really merged. The latencies (TTFT p50/p99, TPOT p50) are in the printed table and in
benchmark/validate_sim.py's 15% check, not asserted here: on a quiet machine their p50s land within 15%, but
on a shared 2-core machine other jobs move a few dozen requests' milliseconds by 25-45% between runs (seen
with either policy), which would make this test fail on the machine's load rather than on the simulator. Static TP2 is left to benchmark/validate_sim.py: its two ranks run in
lockstep on the two cores, so any other process on the machine (another test's server) stalls every step,
and its live timings swing by 10x under load where the TP1 instances' do not.
"""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmark"))

import validate_sim  # noqa: E402
from gyges.traces import TraceRequest, mix_traces, synthetic_trace  # noqa: E402

ASSERTED = ("throughput_req_s", "merges", "splits")


LONG_AT, QUIET = 4.0, (3.4, 6.5)


def workload():
    """36 short requests (~128-token prompts, ~24 new tokens) at 2.5 req/s, and at 4 s one request of
    2,600 + 16 tokens: more than a TP1 instance's 2,048 KV tokens, less than a TP2 merge's.

    No short request arrives from 0.6 s before the long one to 2.5 s after it: the shorts before it are done
    when the merge starts, and it runs alone on the merged instance (live it takes ~1 s on a quiet machine,
    ~2 s on a loaded one). Without that gap the run sits on a knife edge that no timing model can predict:
    a short request still decoding at the merge, or arriving before the long one's last decode, is batched
    with its 512-token chunks or 2,600-token context (the torch attention pads every sequence to the
    longest), so a 10% difference in the long prefill's time decides whether a dozen short requests take
    10 ms or 300 ms per token. Shorts arriving later land on the merged instance until it splits back."""
    shorts = synthetic_trace(40, 2.5, short=(128, 24), long_fraction=0.0, seed=3, jitter=0.5)
    shorts = [r for r in shorts if not QUIET[0] <= r.arrival_s < QUIET[1]]
    return mix_traces(shorts, [TraceRequest(LONG_AT, 2600, 16, None, "long")])


@pytest.fixture(scope="module")
def validation(tmp_path_factory):
    out = tmp_path_factory.mktemp("validate_sim")
    a = validate_sim.parse_args([
        "--policies", "gyges", "static-dp-ll", "--model-dir", str(out / "model"), "--result-dir", str(out),
        "--grid", "small", "--measure-once", "--tail-s", "2", "--no-plot"])
    res = validate_sim.validate(a, workload())
    validate_sim.write_outputs(res, a, "test/test_sim_validation.py")  # tables printed, JSON kept in the tmp dir
    return res


@pytest.mark.parametrize("policy", ["gyges", "static-dp-ll"])
def test_simulator_predicts_the_live_run(validation, policy):
    e = validation["entries"][policy]
    live_done = [r["ok"] for r in e["live_requests"]]
    assert live_done == [r["ok"] for r in e["sim_requests"]], "not the same requests served"
    assert sum(live_done) == len(workload()) - (policy == "static-dp-ll")  # DP refuses the long one
    rows = {r["metric"]: r for r in e["rows"]}
    off = [f"{m}: live {rows[m]['live']:.4g}, simulated {rows[m]['sim']:.4g}" for m in ASSERTED if rows[m]["flag"]]
    assert not off, f"{policy}: predictions off by more than 15% (or one transformation): {off}"


def test_gyges_merged_live_for_the_long_request(validation):
    live = validation["entries"]["gyges"]["live"]
    assert live["merges"] >= 1 and live["splits"] >= 1
