"""gyges.costmodel fitting: NNLS by hand, step-time and transformation fits recover known parameters from
synthetic measurements, the combined JSON file round-trips through StepTimeModel.load /
TransformCostModel.load (what --gyges-cost-model reads), and the `fit` command reads the benchmarks' JSON."""

import json
import random

import pytest

from gyges.costmodel import (StepTimeModel, TransformCostModel, fit_step_time, fit_transform_cost, main, nnls,
                             save_models)


def test_nnls_exact_and_clamped():
    rows = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    assert nnls(rows, [2.0, 3.0, 5.0]) == pytest.approx([2.0, 3.0])
    # the unconstrained optimum has a negative second coefficient: NNLS clamps it to 0, refits the first
    x = nnls([[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]], [3.0, 2.0, 1.0])
    assert x[1] == 0.0 and x[0] == pytest.approx(2.0)
    assert nnls([[1.0, 0.0], [2.0, 0.0]], [1.0, 2.0]) == pytest.approx([1.0, 0.0])  # an all-zero column
    with pytest.raises(ValueError):
        nnls([], [])


def _grid(model, tps, rng, noise=0.0):
    pts = []
    for tp in tps:
        for b in (1, 4, 16, 64, 256, 1024):
            for ctx in (0, 512, 4096, 65536):
                t = model.step_time(b, ctx, tp)
                pts.append((b, ctx, tp, t * (1 + rng.uniform(-noise, noise))))
    return pts


def test_step_time_fit_recovers_parameters():
    truth = StepTimeModel(base_s=0.004, weight_s=0.02, per_token_s=3e-5, per_context_token_s=2e-7,
                          allreduce_s=0.002, allreduce_per_token_s=5e-6)
    for tps in ((1, 2), (1, 2, 4)):
        # weight_s pinned (base/weight/allreduce are collinear: allreduce_scale(tp) = 2 - 2/tp)
        model, report = fit_step_time(_grid(truth, tps, random.Random(0)), fixed={"weight_s": 0.02})
        for k, v in truth.to_dict().items():
            assert getattr(model, k) == pytest.approx(v, rel=1e-4), (tps, k)
        assert report["rms_rel_error"] < 1e-6 and report["tp_degrees"] == list(tps)
        assert report["fixed"] == {"weight_s": 0.02}

    # nothing pinned: parameters are not unique, but the predicted step times are
    free, report = fit_step_time(_grid(truth, (1, 2, 4), random.Random(0)))
    assert report["rms_rel_error"] < 1e-4
    noisy, report = fit_step_time(_grid(truth, (1, 2, 4), random.Random(1), noise=0.02), fixed={"allreduce_s": 0})
    assert report["rms_rel_error"] < 0.03
    for tp in (1, 2, 4, 8):
        assert free.step_time(32, 8192, tp) == pytest.approx(truth.step_time(32, 8192, tp), rel=1e-3)
        assert noisy.step_time(32, 8192, tp) == pytest.approx(truth.step_time(32, 8192, tp), rel=0.05)
    with pytest.raises(ValueError, match="bogus"):
        fit_step_time([(1, 1, 1, 1.0)], fixed={"bogus": 1.0})


def test_parameters_stay_non_negative():
    # times that fall with the batch cannot be fit with non-negative slopes: the slope is clamped at 0
    model, _ = fit_step_time([(b, 0, 1, 1.0 / b) for b in (1, 2, 4, 8)])
    assert all(v >= 0 for v in model.to_dict().values())
    assert model.per_token_s == 0.0


def test_transform_fit_recovers_bandwidth_and_overhead():
    rng = random.Random(0)
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
                         allreduce_per_token_s=0.6)
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
    flat.write_text('{"link_bandwidth_bytes_per_s": 1, "bogus": 2}')
    with pytest.raises(ValueError, match="bogus"):
        TransformCostModel.load(str(flat))


def test_fit_command_reads_benchmark_json(tmp_path, capsys):
    truth = StepTimeModel(base_s=0.002, weight_s=0.003, per_token_s=4e-5, per_context_token_s=1e-7,
                          allreduce_s=0.005, allreduce_per_token_s=1e-5)
    L = 128
    results = []
    for tp in (1, 2):
        for B in (1, 8):
            results.append({"runtime": "sglang", "tp": tp, "batch_size": B,
                            "prefill_s": [truth.step_time(B * L, B * L, tp)],
                            "decode_step_s_runs": [[truth.step_time(B, B * (L + i), tp) for i in range(4)]]})
    results.append({"runtime": "transformers", "tp": 1, "batch_size": 1, "prefill_s": [99.0],
                    "decode_step_s_runs": [[99.0]]})
    one_batch = {"args": {"input_len": L, "dtype": "float32"}, "results": results,
                 "model": {"decode_weight_params": 750_000}, "copy_bandwidth_bytes_s": 1e9}  # weight_s 0.003
    engine = [{"kind": "merge", "devices": [0, 1], "kv_bytes": kb, "weight_bytes": 0,
               "pause_ms": (0.01 + kb / 2e9) * 1e3} for kb in (1 << 20, 1 << 24)]
    transform = {"engine": {"all_merges": engine, "all_splits": []},
                 "rows": [{"model": "m", "method": "gyges: head-centric", "bytes": 1 << 30,
                           "ms": (0.01 + (1 << 30) / 2e9) * 1e3, "note": ""},
                          {"model": "m", "method": "gyges: head-centric", "bytes": 1 << 30, "ms": 1.0,
                           "note": "WRONG WEIGHTS"},
                          {"model": "m", "method": "  KV only: gyges", "bytes": 1, "ms": 1e6, "note": ""}]}
    ob, tj, out = tmp_path / "ob.json", tmp_path / "tr.json", tmp_path / "cost.json"
    ob.write_text(json.dumps(one_batch))
    tj.write_text(json.dumps(transform))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"num_hidden_layers": 4, "num_attention_heads": 8,
                                                       "num_key_value_heads": 4, "hidden_size": 256,
                                                       "torch_dtype": "float32"}))
    (model_dir / "model.safetensors").write_bytes(b"\0" * 1000)
    assert main(["fit", "--one-batch-json", str(ob), "--transform-json", str(tj), "--model-path", str(model_dir),
                 "--out", str(out)]) == 0
    step = StepTimeModel.load(str(out))
    for k, v in truth.to_dict().items():
        assert getattr(step, k) == pytest.approx(v, rel=1e-3), k
    tr = TransformCostModel.load(str(out))
    assert tr.link_bandwidth_bytes_per_s == pytest.approx(1e9, rel=1e-3)  # 2e9 B/s in all over 2 devices' links
    assert tr.fixed_overhead_s == pytest.approx(0.01, rel=1e-3)
    assert tr.kv_bytes_per_token == 2 * 4 * 4 * 32 * 4 and tr.weight_bytes == 1000
    assert json.loads(out.read_text())["fit"]["transform"]["points"] == 3
    with pytest.raises(SystemExit):
        main(["fit", "--out", str(out)])
