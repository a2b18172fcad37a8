"""gyges.costmodel arithmetic and JSON round trip."""

import pytest

from gyges.costmodel import StepTimeModel, TransformCost, transform_cost


def test_transform_cost():
    c = transform_cost(kv_bytes=3_000_000, weight_bytes=1_000_000, bandwidth_bytes_per_s=2e6, fixed_overhead_s=0.5)
    assert c == TransformCost(3_000_000, 1_000_000, 2.5)
    assert c.total_bytes == 4_000_000
    with pytest.raises(ValueError):
        transform_cost(1, 1, 0)
    with pytest.raises(ValueError):
        transform_cost(-1, 0, 1.0)


def test_step_time_formula():
    m = StepTimeModel(base_s=1.0, weight_s=8.0, per_token_s=0.5, per_context_token_s=0.25, allreduce_s=3.0,
                      allreduce_per_token_s=0.25)
    assert m.step_time(4, 8, 1) == 1.0 + 8.0 + 2.0 + 2.0
    assert m.step_time(4, 8, 2) == 1.0 + 4.0 + 1.0 + 1.0 + (3.0 + 1.0)
    assert m.step_time(4, 8, 4) == 1.0 + 2.0 + 0.5 + 0.5 + (3.0 + 1.0) * 1.5
    with pytest.raises(ValueError):
        m.step_time(1, 1, 0)
    with pytest.raises(ValueError):
        m.step_time(-1, 1, 1)


def test_tp1_instances_outserve_one_tp_k_instance_by_default():
    m = StepTimeModel()
    # 4 TP1 instances, each with a quarter of the batch, against one TP4 instance with all of it
    per_tp1 = m.step_time(64, 64 * 1000, 1)
    tp4 = m.step_time(256, 256 * 1000, 4)
    assert 256 / tp4 < 4 * 64 / per_tp1


def test_json_round_trip(tmp_path):
    m = StepTimeModel(base_s=0.1, weight_s=0.2, per_token_s=0.3, per_context_token_s=0.4, allreduce_s=0.5,
                      allreduce_per_token_s=0.6)
    path = tmp_path / "step.json"
    m.save(str(path))
    assert StepTimeModel.load(str(path)) == m
    path.write_text('{"base_s": 1, "bogus": 2}')
    with pytest.raises(ValueError, match="bogus"):
        StepTimeModel.load(str(path))


def test_per_request_and_attention_terms():
    m = StepTimeModel(base_s=0.0, weight_s=0.0, per_token_s=0.0, per_context_token_s=0.0, allreduce_s=0.0,
                      allreduce_per_token_s=0.0, per_request_s=2.0, per_attended_s=0.5)
    # one prefill chunk of 4 tokens over 10 context tokens: 1 request, 40 query-key pairs
    assert m.step_time(4, 10, 1, requests=1) == 2.0 + 0.5 * 40
    assert m.step_time(4, 10, 2, requests=1) == 2.0 + 0.5 * 20  # attention splits over the ranks, the rest not
    # decodes by default: 4 requests of 1 token over 10 context tokens in all -> 10 pairs
    assert m.step_time(4, 10, 1) == 4 * 2.0 + 0.5 * 10
    # batch_time sums per sequence: equal to step_time for equal sequences, exact for mixed ones
    assert m.batch_time([(2, 5), (2, 5)], 1) == m.step_time(4, 10, 1, requests=2)
    assert m.batch_time([(1, 100), (64, 64)], 1) == 2 * 2.0 + 0.5 * (100 + 64 * 64)
    assert m.batch_time([], 1) == 0.0
    with pytest.raises(ValueError):
        m.step_time(4, 10, 1, requests=0)
    with pytest.raises(ValueError):
        m.batch_time([(-1, 3)], 1)


def test_overlap_takes_the_larger_of_memory_and_compute():
    kw = dict(base_s=1.0, weight_s=8.0, per_token_s=0.5, per_context_token_s=0.25, allreduce_s=0.0,
              allreduce_per_token_s=0.0, per_request_s=0.0, per_attended_s=0.0)
    add, roof = StepTimeModel(**kw), StepTimeModel(**kw, overlap=1.0)
    # memory 8 + 0.25 * 4 = 9, compute 0.5 * 4 = 2 (one request: 4 tokens over 4 context tokens)
    assert add.step_time(4, 4, 1, requests=1) == 1.0 + 9.0 + 2.0
    assert roof.step_time(4, 4, 1, requests=1) == 1.0 + 9.0
    # compute bound: 0.5 * 64 = 32 > 8 + 0.25 * 64 = 24
    assert roof.step_time(64, 64, 1, requests=1) == 1.0 + 32.0
    assert StepTimeModel(**kw, overlap=0.5).step_time(64, 64, 1, requests=1) == 1.0 + 32.0 + 12.0


def test_padding_counts_every_sequence_as_the_longest():
    kw = dict(base_s=0.0, weight_s=0.0, per_token_s=0.0, per_context_token_s=1.0, allreduce_s=0.0,
              allreduce_per_token_s=0.0, per_request_s=0.0, per_attended_s=0.01)
    exact, padded = StepTimeModel(**kw), StepTimeModel(**kw, padding=1.0)
    mixed = [(512, 600), (1, 100), (1, 300)]  # a prefill chunk next to two decodes
    assert exact.batch_time(mixed, 1) == pytest.approx(1000 + 0.01 * (512 * 600 + 100 + 300))
    assert padded.batch_time(mixed, 1) == pytest.approx(3 * 600 + 0.01 * 3 * 512 * 600)
    uniform = [(4, 50)] * 3
    assert padded.batch_time(uniform, 2) == exact.batch_time(uniform, 2) == exact.step_time(12, 150, 2, 3)
