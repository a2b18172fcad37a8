"""gyges.costmodel fitting (scipy NNLS on relative errors): step-time and transformation fits recover known
parameters from synthetic measurements with noise, parameters stay non-negative, the per-call overhead of
prefill timings is separated from the step time, and the combined JSON file round-trips through
StepTimeModel.load / TransformCostModel.load (what --gyges-cost-model and the simulator's --step-model read)."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gyges.costmodel import (StepPoint, StepTimeModel, TransformCostModel, fit_step_time, fit_transform_cost,
                             relative_nnls, save_models)

TRUTH = StepTimeModel(base_s=0.004, weight_s=0.02, per_token_s=3e-5, per_context_token_s=2e-7, allreduce_s=0.002,
                      allreduce_per_token_s=5e-6, per_request_s=1e-4, per_attended_s=2e-9)


def _grid(model, tps, rng, noise=0.0):
    """Prefill chunks (b sequences x S new tokens over a cached prefix P) and decode steps (b tokens)."""
    pts = []
    for tp in tps:
        for b in (1, 4, 16, 64):
            for prefix in (0, 512, 4096):
                for new in (1, 16, 256):
                    t = model.step_time(b * new, b * (prefix + new), tp, requests=b)
                    pts.append(StepPoint(b * new, b * (prefix + new), tp, t * (1 + rng.uniform(-noise, noise)),
                                         requests=b))
    return pts


def test_relative_nnls_exact_and_clamped():
    assert relative_nnls(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), np.array([2.0, 3.0, 5.0])) == \
        pytest.approx([2.0, 3.0])
    # the unconstrained optimum has a negative slope: clamped to 0, the intercept refitted
    x = relative_nnls(np.array([[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]]), np.array([3.0, 2.0, 1.0]))
    assert x[1] == 0.0 and 1.0 < x[0] < 3.0
    assert relative_nnls(np.array([[1.0, 0.0], [2.0, 0.0]]), np.array([1.0, 2.0])) == pytest.approx([1.0, 0.0])
    with pytest.raises(ValueError):
        relative_nnls(np.zeros((0, 2)), np.zeros(0))


def test_step_time_fit_recovers_parameters():
    rng = np.random.default_rng(0)
    for tps in ((1, 2), (1, 2, 4)):
        # weight_s pinned (base/weight/allreduce are collinear: allreduce_scale(tp) = 2 - 2/tp)
        model, report = fit_step_time(_grid(TRUTH, tps, rng), fixed={"weight_s": 0.02})
        for k, v in TRUTH.to_dict().items():
            assert getattr(model, k) == pytest.approx(v, rel=1e-6), (tps, k)
        assert report["rms_rel_error"] < 1e-9 and report["tp_degrees"] == list(tps)
        assert report["fixed"] == {"weight_s": 0.02}

    # 3% noise: every parameter that carries more than a few % of some step time comes back within 15%
    noisy, report = fit_step_time(_grid(TRUTH, (1, 2, 4), rng, noise=0.03), fixed={"weight_s": 0.02})
    assert 0.005 < report["rms_rel_error"] < 0.03
    for k in ("base_s", "per_token_s", "per_context_token_s", "allreduce_s", "per_request_s", "per_attended_s"):
        assert getattr(noisy, k) == pytest.approx(getattr(TRUTH, k), rel=0.15), k

    # nothing pinned: parameters are not unique, but the predicted step times are
    free, report = fit_step_time(_grid(TRUTH, (1, 2, 4), rng))
    assert report["rms_rel_error"] < 1e-6
    for tp in (1, 2, 4, 8):
        for b, ctx, reqs in ((32, 8192, 32), (512, 600, 1)):
            assert free.step_time(b, ctx, tp, reqs) == pytest.approx(TRUTH.step_time(b, ctx, tp, reqs), rel=1e-4)
            assert noisy.step_time(b, ctx, tp, reqs) == pytest.approx(TRUTH.step_time(b, ctx, tp, reqs), rel=0.05)
    with pytest.raises(ValueError, match="bogus"):
        fit_step_time([(1, 1, 1, 1.0)], fixed={"bogus": 1.0})
    with pytest.raises(ValueError):
        fit_step_time([])


def test_tp_cost_above_tp1_needs_weight_pinned_to_zero():
    # a TP2 step that costs more than a TP1 one at any batch (CPU: lockstep collectives on shared cores) is only
    # expressible with allreduce_s > 0; unpinned, the fit finds that pinning instead of allreduce_s = 0
    truth = StepTimeModel(base_s=0.003, weight_s=0.0, per_token_s=1e-4, per_context_token_s=1e-6,
                          allreduce_s=0.02, allreduce_per_token_s=0.0)
    model, report = fit_step_time(_grid(truth, (1, 2), np.random.default_rng(1)))
    assert report["fixed"] == {"weight_s": 0.0} and report["rms_rel_error"] < 1e-6
    assert model.allreduce_s == pytest.approx(0.02, rel=1e-4)


def test_call_overhead_is_kept_out_of_the_step_time():
    # prefill points timed around a whole request carry a constant overhead; decode points (differences) do not
    rng = np.random.default_rng(2)
    pts = []
    for p in _grid(TRUTH, (1, 2), rng):
        prefill = p.batch_tokens > p.requests
        pts.append(p._replace(seconds=p.seconds + (0.007 if prefill else 0.0), with_call_overhead=prefill))
    model, report = fit_step_time(pts, fixed={"weight_s": 0.02})
    assert report["call_overhead_s"] == pytest.approx(0.007, rel=1e-6)
    for k, v in TRUTH.to_dict().items():
        assert getattr(model, k) == pytest.approx(v, rel=1e-6), k
    assert model.step_time(256, 1024, 2, 1) == pytest.approx(TRUTH.step_time(256, 1024, 2, 1), rel=1e-6)


def test_parameters_stay_non_negative():
    # times that fall with the batch cannot be fit with non-negative slopes: the slope is clamped at 0
    model, _ = fit_step_time([(b, 0, 1, 1.0 / b) for b in (1, 2, 4, 8)])
    assert all(v >= 0 for v in model.to_dict().values())
    assert model.per_token_s == 0.0


def test_transform_fit_recovers_bandwidth_and_overhead():
    rng = np.random.default_rng(0)
    pts = []
    for nbytes in (1e6, 4e6, 3e7, 2e8, 1e9, 6e9):
        for dev in (2, 4):
            pts.append((nbytes, dev, (0.02 + nbytes / (2.5e9 * dev)) * (1 + rng.uniform(-0.01, 0.01))))
    base = TransformCostModel(kv_bytes_per_token=4096.0, weight_bytes=1e7)
    model, report = fit_transform_cost(pts, base)
    assert model.link_bandwidth_bytes_per_s == pytest.approx(2.5e9, rel=0.03)
    assert model.fixed_overhead_s == pytest.approx(0.02, rel=0.05)
    assert (model.kv_bytes_per_token, model.weight_bytes) == (4096.0, 1e7)
    assert report["points"] == len(pts) and report["rms_rel_error"] < 0.02
    with pytest.raises(ValueError, match="bandwidth"):
        fit_transform_cost([(1e6, 2, 0.5), (1e9, 2, 0.5)])


def test_combined_file_round_trip(tmp_path):
    step = StepTimeModel(base_s=0.1, weight_s=0.2, per_token_s=0.3, per_context_token_s=0.4, allreduce_s=0.5,
                         allreduce_per_token_s=0.6, per_request_s=0.7, per_attended_s=0.8)
    tr = TransformCostModel(kv_bytes_per_token=1.0, weight_bytes=2.0, link_bandwidth_bytes_per_s=3.0,
                            fixed_overhead_s=4.0)
    path = tmp_path / "cost.json"
    d = save_models(str(path), step, tr, {"sources": {"x": "y"}})
    assert json.loads(path.read_text()) == d and d["format"] == "gyges-costmodel/1"
    assert StepTimeModel.load(str(path)) == step
    assert TransformCostModel.load(str(path)) == tr
    flat = tmp_path / "flat.json"
    tr.save(str(flat))
    assert TransformCostModel.load(str(flat)) == tr
    save_models(str(path), step, None)  # no transform section: defaults
    assert TransformCostModel.load(str(path)) == TransformCostModel()
    # a file written before per_request_s / per_attended_s existed loads with them at 0
    flat.write_text(json.dumps({"step_time": {"base_s": 1.0}, "format": "gyges-costmodel/1"}))
    assert StepTimeModel.load(str(flat)).per_request_s == 0.0
    flat.write_text('{"link_bandwidth_bytes_per_s": 1, "bogus": 2}')
    with pytest.raises(ValueError, match="bogus"):
        TransformCostModel.load(str(flat))

_param = st.floats(min_value=0.0, max_value=1.0)


@settings(max_examples=40, deadline=None)
@given(st.tuples(*[_param] * 8), st.sampled_from([(1, 2), (1, 2, 4)]))
def test_fit_reproduces_any_non_negative_model(u, tps):
    # every parameter anywhere from 0 to a realistic maximum (u in [0, 1] scales it)
    scale = dict(base_s=0.01, weight_s=0.05, per_token_s=1e-4, per_context_token_s=1e-6, allreduce_s=0.02,
                 allreduce_per_token_s=1e-5, per_request_s=1e-3, per_attended_s=1e-8)
    truth = StepTimeModel(**{k: s * x + (1e-4 if k == "base_s" else 0.0) for (k, s), x in zip(scale.items(), u)})
    model, report = fit_step_time(_grid(truth, tps, np.random.default_rng(0)), fixed={"weight_s": truth.weight_s})
    assert report["rms_rel_error"] < 1e-6
    for tp in (1, 2, 4, 8):
        for b, ctx, reqs in ((1, 100, 1), (32, 32 * 2000, 32), (512, 4096, 1)):
            assert model.step_time(b, ctx, tp, reqs) == pytest.approx(truth.step_time(b, ctx, tp, reqs), rel=1e-5)
