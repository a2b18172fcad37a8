"""gyges.hardware: first-principles GPU models. The shapes give the published parameter counts, the roofline
step time is memory bound for small decode batches and compute bound for prefill, TP costs aggregate throughput
(4 x TP1 out-serves TP4 for short requests), KV capacity grows faster than the TP degree (weight shards shrink),
and against the Gyges paper's Qwen2.5-32B / 4 x H20 numbers the model keeps the paper's order within the stated
factors (benchmark/check_gpu_model.py prints the comparison)."""

import pytest

from gyges.costmodel import StepTimeModel, TransformCostModel
from gyges.hardware import (DEFAULT_EFFICIENCY, GPUS, H20, H200, LLAMA3_8B, LLAMA3_70B, MODELS, QWEN25_32B,
                            kv_capacity_tokens, save_gpu_models, serving_estimate, step_time_model,
                            transform_model)

# Gyges paper (v2): Qwen2.5-32B on 4 x H20, 1K-token requests: total tok/s and max context per shape
PAPER_TOK_S = {1: 1792, 2: 1340, 4: 767}
PAPER_MAX_CONTEXT = {1: 3750, 2: 41250, 4: 120500}
# how far the roofline is from the paper (README, GPU models): throughput within 7x, max context within 25x
THROUGHPUT_FACTOR, CONTEXT_FACTOR = 7.0, 25.0


def test_shapes_match_published_sizes():
    # parameter counts of the HF checkpoints (model cards: 8.03B, 32.8B, 70.6B)
    assert LLAMA3_8B.params == pytest.approx(8.03e9, rel=0.005)
    assert QWEN25_32B.params == pytest.approx(32.76e9, rel=0.005)
    assert LLAMA3_70B.params == pytest.approx(70.55e9, rel=0.005)
    assert LLAMA3_8B.kv_bytes_per_token == 32 * 8 * 128 * 2 * 2  # 128 KiB
    assert QWEN25_32B.allreduce_bytes_per_token == 2 * 64 * 5120 * 2


def test_roofline_regimes():
    step = step_time_model(H200, LLAMA3_8B)
    assert step.overlap == 1.0
    bw = H200.hbm_bytes_per_s * DEFAULT_EFFICIENCY.memory
    # one decode token: streaming the weights dominates
    t = step.step_time(1, 100, 1)
    assert t == pytest.approx(DEFAULT_EFFICIENCY.step_overhead_s + (LLAMA3_8B.weight_bytes_per_step
                                                                    + 100 * LLAMA3_8B.kv_bytes_per_token) / bw,
                              rel=0.01)
    # an 8K-token prefill chunk: compute dominates, weights are hidden under it
    flops = H200.bf16_flops * DEFAULT_EFFICIENCY.compute
    t = step.step_time(8192, 8192, 1, requests=1)
    compute = 8192 * LLAMA3_8B.matmul_flops_per_token / flops + 8192 * 8192 * LLAMA3_8B.attention_flops_per_pair / flops
    assert compute > LLAMA3_8B.weight_bytes_per_step / bw
    assert t == pytest.approx(compute, rel=0.02)
    # the linear form (overlap 0) adds memory and compute: never faster than the roofline
    additive = StepTimeModel(**dict(step.to_dict(), overlap=0.0))
    for b, c, r in ((1, 100, 1), (64, 65536, 64), (256, 256, 256), (8192, 8192, 1)):
        assert additive.step_time(b, c, 1, r) >= step.step_time(b, c, 1, r)


@pytest.mark.parametrize("gpu", list(GPUS.values()), ids=lambda g: g.name)
@pytest.mark.parametrize("model", [LLAMA3_8B, QWEN25_32B], ids=lambda m: m.name)
def test_tp1_outserves_tp4_for_short_requests(gpu, model):
    # (TP2 can beat TP1 where TP1's KV holds few requests and decode is memory bound: Qwen2.5-32B on H200)
    tp1 = serving_estimate(gpu, model, 4, 1, 1024, 256)
    tp4 = serving_estimate(gpu, model, 4, 4, 1024, 256)
    assert tp1.total_tokens_per_s > tp4.total_tokens_per_s
    assert tp1.output_tokens_per_s > tp4.output_tokens_per_s


@pytest.mark.parametrize("gpu", list(GPUS.values()), ids=lambda g: g.name)
@pytest.mark.parametrize("model", list(MODELS.values()), ids=lambda m: m.name)
def test_max_context_grows_faster_than_tp(gpu, model):
    caps = [kv_capacity_tokens(gpu, model, tp) for tp in (1, 2, 4, 8)]
    for a, b in zip(caps, caps[1:]):
        assert b > 2 * a  # twice the KV memory per token plus the freed weight memory
    fits = [tp for tp in (1, 2, 4, 8) if kv_capacity_tokens(gpu, model, tp) > 0]
    assert (model is LLAMA3_70B) == (fits[0] == 2)  # 141 GB of weights fit no single GPU
    with pytest.raises(ValueError, match="does not fit"):
        serving_estimate(H20, LLAMA3_70B, 4, 1, 1024, 1024)


def test_against_the_gyges_paper():
    est = {tp: serving_estimate(H20, QWEN25_32B, 4, tp, 1024, 1024) for tp in PAPER_TOK_S}
    # the paper's order: 4 x TP1 > 2 x TP2 > TP4 in throughput, max context the other way round
    assert est[1].total_tokens_per_s > est[2].total_tokens_per_s > est[4].total_tokens_per_s
    assert est[1].kv_capacity_tokens < est[2].kv_capacity_tokens < est[4].kv_capacity_tokens
    for tp, e in est.items():
        assert 1 / THROUGHPUT_FACTOR < e.total_tokens_per_s / PAPER_TOK_S[tp] < THROUGHPUT_FACTOR, tp
        assert 1 / CONTEXT_FACTOR < e.kv_capacity_tokens / PAPER_MAX_CONTEXT[tp] < CONTEXT_FACTOR, tp
    # max context from TP2 to TP4 grows like the paper's (x2.6 against x2.9)
    assert est[4].kv_capacity_tokens / est[2].kv_capacity_tokens == pytest.approx(
        PAPER_MAX_CONTEXT[4] / PAPER_MAX_CONTEXT[2], rel=0.15)


def test_transform_model_moves_over_nvlink():
    tr = transform_model(H20, QWEN25_32B)
    # a TP2 -> 2 x TP1 split re-gathers half of each device's weights: the whole model's shard bytes once
    c = tr.split_cost(2, 1, used_tokens=0)
    assert c.weight_bytes == int(QWEN25_32B.weight_bytes)
    link = H20.nvlink_bytes_per_s * DEFAULT_EFFICIENCY.nvlink
    assert c.est_seconds == pytest.approx(DEFAULT_EFFICIENCY.transform_overhead_s + QWEN25_32B.weight_bytes / (2 * link))
    assert tr.merge_cost([(1, 1000), (1, 1000)], 2).kv_bytes == int(1000 * QWEN25_32B.kv_bytes_per_token)


def test_gpu_model_file_round_trip(tmp_path):
    path = tmp_path / "h200-llama.json"
    d = save_gpu_models(str(path), H200, LLAMA3_8B)
    assert StepTimeModel.load(str(path)) == step_time_model(H200, LLAMA3_8B)
    assert TransformCostModel.load(str(path)) == transform_model(H200, LLAMA3_8B)
    assert d["fit"]["kv_capacity_tokens"]["4"] == kv_capacity_tokens(H200, LLAMA3_8B, 4)
