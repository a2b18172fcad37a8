"""gyges.traces on the real files in shared/traces (next to the repository: ../shared/traces), which CI
has too: a missing directory is a failure, not a skip."""


import pytest

from gyges.traces import (TraceRequest, load_azure_csv, load_mooncake_jsonl, load_trace, mix_traces, rate,
                          sample, scale_trace, synthetic_trace, window)

from trace_files import find_traces_dir


@pytest.fixture(scope="module")
def traces():
    root = find_traces_dir()
    return {name: load_trace(root / name)
            for name in ("azure2023_conv.csv", "azure2023_code.csv", "mooncake_synthetic.jsonl")}


def test_real_traces_match_their_readme(traces):
    conv, code, moon = traces["azure2023_conv.csv"], traces["azure2023_code.csv"], traces["mooncake_synthetic.jsonl"]
    assert (len(conv), len(code), len(moon)) == (19366, 8819, 3993)
    assert max(r.prompt_tokens for r in conv) == 14050
    assert round(sum(r.prompt_tokens for r in conv) / len(conv)) == 1155
    assert max(r.prompt_tokens for r in code) == 7437
    assert max(r.prompt_tokens for r in moon) == 191378
    assert round(sum(r.prompt_tokens for r in moon) / len(moon)) == 15325
    assert 57 * 60 < conv[-1].arrival_s < 59 * 60  # 58 minutes
    assert moon[-1].arrival_s == pytest.approx(1022.025)  # ms -> s
    for reqs in (conv, code, moon):
        assert reqs[0].arrival_s == 0.0
        assert all(a.arrival_s <= b.arrival_s for a, b in zip(reqs, reqs[1:]))
        assert all(r.prompt_tokens > 0 and r.output_tokens >= 0 for r in reqs)


def test_first_rows_parsed_exactly(traces):
    conv = traces["azure2023_conv.csv"]
    assert conv[0] == TraceRequest(0.0, 374, 44, None, "azure2023_conv")
    # second row: 18:15:50.9951690 - 18:15:46.6805900 (seven fraction digits)
    assert conv[1].arrival_s == pytest.approx(4.314579, abs=1e-6)
    assert (conv[1].prompt_tokens, conv[1].output_tokens) == (396, 109)
    moon = traces["mooncake_synthetic.jsonl"]
    assert (moon[0].prompt_tokens, moon[0].output_tokens, moon[0].prefix_group) == (40160, 6, 0)
    groups = [r.prefix_group for r in moon]
    assert all(g is not None for g in groups) and len(set(groups)) < len(groups)  # shared prefixes exist


def test_loaders_reject_wrong_files(tmp_path):
    bad_csv = tmp_path / "x.csv"
    bad_csv.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="missing columns"):
        load_azure_csv(bad_csv)
    bad_jsonl = tmp_path / "x.jsonl"
    bad_jsonl.write_text('{"timestamp": 0, "input_length": 5, "output_length": 1}\n{"timestamp": 1}\n')
    with pytest.raises(ValueError, match=":2:"):
        load_mooncake_jsonl(bad_jsonl)
    with pytest.raises(ValueError, match="unknown trace format"):
        load_trace(tmp_path / "x.parquet")


def test_unsorted_rows_are_sorted_and_rebased(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"timestamp": 5000, "input_length": 1, "output_length": 1, "hash_ids": [7]}\n'
                 '{"timestamp": 2000, "input_length": 2, "output_length": 2, "hash_ids": []}\n')
    reqs = load_mooncake_jsonl(f)
    assert [(r.arrival_s, r.prompt_tokens, r.prefix_group) for r in reqs] == [(0.0, 2, None), (3.0, 1, 7)]


def test_window_and_sample(traces):
    moon = traces["mooncake_synthetic.jsonl"]
    w = window(moon, 100.0, 50.0)
    assert w and all(0.0 <= r.arrival_s < 50.0 for r in w)
    assert len(w) == sum(1 for r in moon if 100.0 <= r.arrival_s < 150.0)
    s = sample(moon, 200, seed=3)
    assert len(s) == 200 and s == sample(moon, 200, seed=3) and s != sample(moon, 200, seed=4)
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(s, s[1:]))
    assert sample(w, 10**6) == w


def test_scale_trace():
    reqs = [TraceRequest(0.0, 1000, 100), TraceRequest(2.0, 40000, 3, 5, "m")]
    out = scale_trace(reqs, time_scale=0.5, length_scale=0.25, max_prompt=8000, max_output=20)
    assert out == [TraceRequest(0.0, 250, 20), TraceRequest(1.0, 8000, 1, 5, "m")]
    assert scale_trace(reqs, output_scale=2.0)[0].output_tokens == 200
    with pytest.raises(ValueError):
        scale_trace(reqs, time_scale=0)


def test_mix_traces_merges_by_arrival(traces):
    conv = window(traces["azure2023_conv.csv"], 0, 60)
    moon = window(traces["mooncake_synthetic.jsonl"], 0, 60)
    mixed = mix_traces(conv, moon)
    assert len(mixed) == len(conv) + len(moon)
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(mixed, mixed[1:]))
    assert {r.source for r in mixed} == {"azure2023_conv", "mooncake_synthetic"}
    shifted = mix_traces(conv, moon, offsets_s=[0.0, 1000.0])
    assert shifted[len(conv)].arrival_s >= 1000.0 and shifted[len(conv) - 1].source == "azure2023_conv"
    assert rate(conv) == pytest.approx(len(conv) / 60, rel=0.2)


def test_synthetic_trace_is_reproducible():
    a = synthetic_trace(400, 10.0, long_fraction=0.1, seed=1)
    assert a == synthetic_trace(400, 10.0, long_fraction=0.1, seed=1)
    longs = [r for r in a if r.source == "long"]
    assert 15 < len(longs) < 70 and min(r.prompt_tokens for r in longs) > max(
        r.prompt_tokens for r in a if r.source == "short")
    assert rate(a) == pytest.approx(10.0, rel=0.25)
