"""Sampling parameters (parsing, validation, normalization) and the batched sampler."""

import math

import pytest
import torch

from sglang.srt.sampling.sampler import (
    Sampler,
    SamplingState,
    filtered_probs,
    logprobs_of,
    position_uniform,
)
from sglang.srt.sampling.sampling_params import (
    STOP_REGEX_WINDOW_TOKENS,
    SamplingParams,
    find_stop,
    matched_stop_text,
    stop_check_window,
)

VOCAB = 64
EOS = 2


def make_state(seed=0, **kw):
    p = SamplingParams(**kw)
    p.verify(VOCAB)
    p.normalize(None)
    return SamplingState.create(p, [], default_seed=seed)


def run(logits, states, outputs=None, prompts=None, **kw):
    outputs = outputs if outputs is not None else [[] for _ in states]
    return Sampler(eos_token_ids=[EOS]).sample(logits, states, outputs, prompts, **kw)


# ---------------------------------------------------------------------------------------- SamplingParams
def test_defaults_match_sglang():
    p = SamplingParams()
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (128, 1.0, 1.0, -1, 0.0)
    assert (p.frequency_penalty, p.presence_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.min_new_tokens, p.n, p.ignore_eos, p.skip_special_tokens) == (0, 1, False, True)
    assert p.spaces_between_special_tokens is True and p.no_stop_trim is False
    assert p.stop is None and p.logit_bias is None and p.sampling_seed is None


def test_from_dict_rejects_unknown_keys_and_wrong_types():
    with pytest.raises(ValueError, match="Unknown sampling parameter.*temprature.*Allowed keys:.*temperature"):
        SamplingParams.from_dict({"temprature": 0.5})
    with pytest.raises(ValueError, match="'temperature' must be a number.*str"):
        SamplingParams.from_dict({"temperature": "hot"})
    with pytest.raises(ValueError, match="'max_new_tokens' must be"):
        SamplingParams.from_dict({"max_new_tokens": "10"})
    with pytest.raises(ValueError, match="'ignore_eos' must be a boolean"):
        SamplingParams.from_dict({"ignore_eos": 1})
    with pytest.raises(ValueError, match="'stop' must be a string or a list of strings"):
        SamplingParams.from_dict({"stop": ["a", 3]})
    with pytest.raises(ValueError, match="'temperature'"):
        SamplingParams.from_dict({"temperature": True})
    with pytest.raises(ValueError, match="must be an object"):
        SamplingParams.from_dict([1, 2])


def test_from_dict_accepts_sglang_client_payloads():
    p = SamplingParams.from_dict({
        "max_new_tokens": 16, "min_new_tokens": 0, "n": 1, "stop": "x", "stop_token_ids": None,
        "stop_regex": None, "temperature": 0, "top_p": 1, "top_k": -1, "min_p": 0.0,
        "frequency_penalty": 0.0, "presence_penalty": 0.0, "ignore_eos": False, "regex": None,
        "json_schema": {"type": "object"}, "max_new_tokens": 5.0,
    })
    assert p.temperature == 0.0 and isinstance(p.temperature, float)
    assert p.max_new_tokens == 5 and isinstance(p.max_new_tokens, int)
    assert p.json_schema == '{"type": "object"}'
    assert SamplingParams.from_dict(None) == SamplingParams()


@pytest.mark.parametrize("kw, message", [
    ({"temperature": -0.1}, r"temperature must be >= 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"top_k": 0}, r"top_k must be -1 \(disable\) or at least 1, got 0"),
    ({"top_k": -2}, r"top_k must be -1"),
    ({"min_p": -0.1}, r"min_p must be in \[0, 1\]"),
    ({"min_p": 1.1}, r"min_p must be in \[0, 1\]"),
    ({"frequency_penalty": 2.5}, r"frequency_penalty must be in \[-2, 2\]"),
    ({"presence_penalty": -3.0}, r"presence_penalty must be in \[-2, 2\]"),
    ({"repetition_penalty": 0.0}, r"repetition_penalty must be in \(0, 2\]"),
    ({"repetition_penalty": 2.5}, r"repetition_penalty must be in \(0, 2\]"),
    ({"max_new_tokens": -1}, r"max_new_tokens must be >= 0 \(0 means prefill only\)"),
    ({"min_new_tokens": -1}, r"min_new_tokens must be >= 0"),
    ({"min_new_tokens": 10, "max_new_tokens": 5}, r"min_new_tokens must be <= max_new_tokens"),
    ({"n": 0}, r"n must be >= 1"),
    ({"regex": "a+", "json_schema": "{}"}, r"Only one of regex, json_schema and ebnf.*regex, json_schema"),
    ({"regex": "a+", "ebnf": "root ::= \"a\""}, r"Only one of"),
    ({"logit_bias": {"abc": 1.0}}, r"logit_bias key 'abc' is not a token id.*\[0, 64\)"),
    ({"logit_bias": {"64": 1.0}}, r"logit_bias key 64 is out of range.*\[0, 64\)"),
    ({"logit_bias": {"-1": 1.0}}, r"out of range"),
    ({"stop_token_ids": [5, "a"]}, r"stop_token_ids must be a list of integers, got 'a'"),
    ({"json_schema": "{not json"}, r"json_schema is not valid JSON"),
])
def test_verify_rejects_bad_values(kw, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kw).verify(VOCAB)


def test_verify_accepts_edge_values():
    SamplingParams(max_new_tokens=0).verify(VOCAB)  # prefill only
    SamplingParams(temperature=0.0, top_p=1.0, top_k=1, min_p=1.0, repetition_penalty=2.0,
                   frequency_penalty=-2.0, presence_penalty=2.0, min_new_tokens=3, max_new_tokens=3,
                   logit_bias={"63": -5, 0: 1.5}, stop_token_ids=[0, 63]).verify(VOCAB)


def test_normalize_stop_and_greedy(test_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(test_model("llama"))
    p = SamplingParams(stop="The quick brown fox", temperature=0.0)
    p.normalize(tok)
    assert p.stop == ["The quick brown fox"]
    assert p.stop_str_max_len == len(tok.encode("The quick brown fox", add_special_tokens=False))
    assert p.stop_str_max_chars == len("The quick brown fox")
    assert p.is_greedy and p.top_k == 1
    q = SamplingParams(stop=["a", "bcd"], temperature=0.7).normalize(tok)
    assert q.stop == ["a", "bcd"] and q.stop_str_max_chars == 3 and not q.is_greedy
    assert SamplingParams().normalize(tok).stop == []


def test_stop_token_ids_outside_the_vocabulary_are_accepted():
    SamplingParams(stop_token_ids=[5, VOCAB, 10**9, -1]).verify(VOCAB)


def test_stop_check_window_and_matched_text():
    p = SamplingParams(stop=["END"], stop_regex=[r"\d{3}", "x*"]).normalize(None)
    assert stop_check_window(p) == STOP_REGEX_WINDOW_TOKENS
    assert stop_check_window(SamplingParams().normalize(None)) == 0
    q = SamplingParams(stop=["abc"]).normalize(None)
    assert stop_check_window(q) == q.stop_str_max_len + 1
    assert matched_stop_text("no stop here", p) is None  # "x*" matches empty strings only: no stop
    assert matched_stop_text("call 5551234 END", p) == "555"
    assert matched_stop_text("a xx b", p) == "xx"


def test_find_stop():
    p = SamplingParams(stop=["END", "stop"], stop_regex=r"\d{3}").normalize(None)
    assert find_stop("hello world", p) is None
    assert find_stop("say stop now END", p) == (4, 8)
    assert find_stop("a 1234 END", p) == (2, 5)
    assert find_stop("xxEND", p, start=3) is None


# ---------------------------------------------------------------------------------------- sampler
def test_greedy_is_argmax_of_processed_logits():
    torch.manual_seed(0)
    logits = torch.randn(5, VOCAB)
    out = run(logits, [make_state(temperature=0.0) for _ in range(5)])
    assert out.next_token_ids == logits.argmax(-1).tolist()
    # logprob reported is log_softmax of the raw logits
    expected = torch.log_softmax(logits, -1).max(-1).values
    assert torch.allclose(torch.tensor(out.next_token_logprobs), expected, atol=1e-6)


def test_top_k_1_and_tiny_top_p_are_argmax():
    torch.manual_seed(1)
    logits = torch.randn(6, VOCAB) * 3
    states = [make_state(seed=i, temperature=1.3, top_k=1) for i in range(3)]
    states += [make_state(seed=i, temperature=1.3, top_p=1e-6) for i in range(3)]
    for _ in range(3):
        out = run(logits, states, outputs=[[7] * 3 for _ in states])
        assert out.next_token_ids == logits.argmax(-1).tolist()


def test_min_p_masks_low_probability_tokens():
    logits = torch.full((1, VOCAB), -10.0)
    logits[0, 5], logits[0, 9], logits[0, 11] = 2.0, 1.9, 0.0  # p11/p5 = e^-2 ~ 0.135
    states = [make_state(seed=s, min_p=0.2) for s in range(300)]
    probs = filtered_probs(logits, [states[0].params])
    assert set(torch.nonzero(probs[0]).flatten().tolist()) == {5, 9}
    seen = set()
    for st in states:
        seen.update(run(logits, [st]).next_token_ids)
    assert seen == {5, 9}


def test_top_k_and_top_p_sets():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1] + [1e-9] * (VOCAB - 4)]))
    p_k2 = filtered_probs(logits, [SamplingParams(top_k=2)])[0]
    assert torch.allclose(p_k2[:2], torch.tensor([4 / 7, 3 / 7]), atol=1e-5) and p_k2[2:].sum() == 0
    p_p = filtered_probs(logits, [SamplingParams(top_p=0.65)])[0]  # 0.4 + 0.3 >= 0.65
    assert set(torch.nonzero(p_p).flatten().tolist()) == {0, 1}
    # top_p after top_k works on the renormalized distribution: top_k=3 -> [.444,.333,.222]
    p_kp = filtered_probs(logits, [SamplingParams(top_k=3, top_p=0.75)])[0]
    assert set(torch.nonzero(p_kp).flatten().tolist()) == {0, 1}


def test_logit_bias_forces_token():
    torch.manual_seed(2)
    logits = torch.randn(4, VOCAB)
    states = [make_state(seed=i, logit_bias={"17": 100.0}) for i in range(3)] + [make_state(temperature=0)]
    out = run(logits, states)
    assert out.next_token_ids[:3] == [17, 17, 17]
    assert out.next_token_ids[3] == int(logits[3].argmax())  # no bias on that row
    # reported logprob is from the raw logits, not the biased ones
    assert out.next_token_logprobs[0] == pytest.approx(float(torch.log_softmax(logits[0], -1)[17]), abs=1e-6)


def test_repetition_penalty_matches_hf():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from sglang.srt.sampling.penalties import apply_penalties

    torch.manual_seed(3)
    logits = torch.randn(3, VOCAB) * 4
    prompts = [[1, 5, 5, 9], [3, 4], [10]]
    outputs = [[9, 12], [], [10, 11, 40]]
    params = [SamplingParams(repetition_penalty=1.7), SamplingParams(repetition_penalty=0.6),
              SamplingParams(repetition_penalty=1.3)]
    ours = logits.clone()
    apply_penalties(ours, params, outputs, prompts)
    for i, p in enumerate(params):
        hf = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)
        ids = torch.tensor([prompts[i] + outputs[i]])
        expected = hf(ids, logits[i:i + 1].clone())
        assert torch.allclose(ours[i], expected[0], atol=1e-6)
    assert not torch.equal(ours, logits)
    # and the repeated token's probability goes down under a penalty > 1 (positive or negative logit)
    base = torch.softmax(logits[0], -1)
    pen = torch.softmax(ours[0], -1)
    for t in (1, 5, 9, 12):
        assert pen[t] < base[t]


def test_frequency_and_presence_penalty_values():
    from sglang.srt.sampling.penalties import apply_penalties

    logits = torch.zeros(2, VOCAB)
    outputs = [[4, 4, 4, 7], [4]]
    params = [SamplingParams(frequency_penalty=0.5, presence_penalty=0.25),
              SamplingParams(frequency_penalty=-1.0)]
    apply_penalties(logits, params, outputs, [[4, 30], [30]])
    assert logits[0, 4] == pytest.approx(-(3 * 0.5 + 0.25))
    assert logits[0, 7] == pytest.approx(-(0.5 + 0.25))
    assert logits[0, 30] == 0.0  # prompt tokens are not counted
    assert logits[1, 4] == pytest.approx(1.0)
    assert logits[0].abs().sum() == pytest.approx(1.75 + 0.75)  # nothing else touched


def test_min_new_tokens_blocks_eos_and_stop_ids():
    logits = torch.full((2, VOCAB), -5.0)
    logits[:, EOS] = 50.0
    logits[:, 20] = 49.0
    logits[:, 21] = 0.0
    states = [make_state(temperature=0, min_new_tokens=3, stop_token_ids=[20]), make_state(temperature=0)]
    out = run(logits, states, outputs=[[8, 8], [8, 8]])
    assert out.next_token_ids == [21, EOS]
    out = run(logits, states, outputs=[[8, 8, 8], [8, 8, 8]])
    assert out.next_token_ids == [EOS, EOS]


def test_seeded_sampling_is_reproducible_across_batches():
    torch.manual_seed(4)
    target = torch.randn(VOCAB)
    others = torch.randn(8, VOCAB)

    def tokens_for(seed, position_in_batch, batch_size, steps=30):
        toks = []
        for step in range(steps):
            logits = others[:batch_size].clone()
            logits[position_in_batch] = target
            states = [make_state(seed=seed + 1000 + j) for j in range(batch_size)]
            states[position_in_batch] = make_state(sampling_seed=seed)
            outs = [[0] * step for _ in range(batch_size)]
            toks.append(run(logits, states, outputs=outs).next_token_ids[position_in_batch])
        return toks

    a = tokens_for(123, 0, 1)
    assert a == tokens_for(123, 0, 1)
    assert a == tokens_for(123, 3, 5)
    assert a == tokens_for(123, 7, 8)
    assert a != tokens_for(124, 0, 1)
    assert len(set(a)) > 3  # actually random across positions


def test_unseeded_requests_use_server_seed_and_sample_index():
    p = SamplingParams().normalize(None)
    s0 = SamplingState.create(p, [1, 2], default_seed=7)
    assert s0.seed == 7 and s0.prompt_len == 2
    s1 = SamplingState.create(p, [1, 2], default_seed=7, sample_index=1)
    assert s0.uniform(3) == position_uniform(7, 3) and s0.uniform(3) != s1.uniform(3)
    import pickle
    assert pickle.loads(pickle.dumps(s1)) == s1


def test_seeded_distribution_matches_softmax():
    torch.manual_seed(5)
    V, T, N = 12, 0.7, 6000
    logits = torch.randn(V) * 1.5
    expected = torch.softmax(logits / T, -1)
    counts = torch.zeros(V)
    batch = 200
    sampler = Sampler(eos_token_ids=[])
    for start in range(0, N, batch):
        states = [SamplingState.create(SamplingParams(temperature=T, sampling_seed=start + j).normalize(None))
                  for j in range(batch)]
        out = sampler.sample(logits.expand(batch, V).contiguous(), states, [[] for _ in range(batch)])
        counts += torch.bincount(torch.tensor(out.next_token_ids), minlength=V).float()
    exp_counts = expected * N
    chi2 = float(((counts - exp_counts) ** 2 / exp_counts).sum())
    assert chi2 < 45.0, (chi2, counts, exp_counts)  # df=11: p(chi2 > 45) ~ 5e-6


def test_top_logprobs_from_raw_logits():
    torch.manual_seed(6)
    logits = torch.randn(3, VOCAB)
    states = [make_state(seed=i, temperature=0.5, repetition_penalty=1.5) for i in range(3)]
    out = run(logits, states, outputs=[[1], [2], [3]], top_logprobs_nums=[0, 3, 1])
    lp = torch.log_softmax(logits, -1)
    assert out.top_logprobs[0] is None
    assert [t for _, t in out.top_logprobs[1]] == lp[1].topk(3).indices.tolist()
    assert out.top_logprobs[1][0][0] == pytest.approx(float(lp[1].max()), abs=1e-6)
    assert len(out.top_logprobs[2]) == 1
    for i, t in enumerate(out.next_token_ids):
        assert out.next_token_logprobs[i] == pytest.approx(float(lp[i, t]), abs=1e-6)
    chosen, tops = logprobs_of(logits, [0, 1, 2], top_num=2)
    assert chosen[2] == pytest.approx(float(lp[2, 2]), abs=1e-6) and len(tops[0]) == 2


def test_mixed_batch_and_no_nan():
    torch.manual_seed(7)
    logits = torch.randn(4, VOCAB)
    logits[3] = float("-inf")
    logits[3, 9] = 0.0  # single allowed token
    states = [make_state(temperature=0), make_state(seed=1, top_k=5, top_p=0.9, min_p=0.05),
              make_state(seed=2, temperature=2.0), make_state(seed=3)]
    out = run(logits, states)
    assert out.next_token_ids[0] == int(logits[0].argmax())
    assert out.next_token_ids[1] in logits[1].topk(5).indices.tolist()
    assert out.next_token_ids[3] == 9
    assert all(math.isfinite(v) for v in out.next_token_logprobs)


def test_normalize_then_verify_still_rejects_bad_values():
    p = SamplingParams.from_dict({"temperature": -1.0, "logit_bias": {"x": 1}}).normalize(None)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        p.verify(VOCAB)
    p = SamplingParams.from_dict({"logit_bias": {"x": 1}}).normalize(None)
    with pytest.raises(ValueError, match="logit_bias key 'x' is not a token id"):
        p.verify(VOCAB)
    q = SamplingParams(stop="ab", logit_bias={"3": 2}).normalize(None)
    q.verify(VOCAB)
    assert q.stop_strs == ["ab"] and q.logit_bias == {3: 2.0}


def test_repetition_penalty_uses_prompt_kept_in_state():
    logits = torch.zeros(1, VOCAB)
    logits[0, 5] = 3.0
    logits[0, 6] = 2.9
    p = SamplingParams(temperature=0, repetition_penalty=2.0).normalize(None)
    state = SamplingState.from_params(p, [5, 1])
    assert state.prompt_ids == [5, 1]
    out = Sampler(VOCAB, eos_token_ids={EOS}).sample(logits, [state], output_ids=[[]])
    assert out.next_token_ids == [6]  # 5 was in the prompt: 3.0 / 2 < 2.9
    assert SamplingState.from_params(SamplingParams(), [5, 1]).prompt_ids is None  # not kept when unused


@pytest.mark.parametrize("probe", [1024, 3])
def test_fast_truncated_path_equals_dense_reference(monkeypatch, probe):
    """sample_from_logits (topk candidates) picks exactly what the dense sort-based reference picks."""
    import sglang.srt.sampling.sampler as sampler_mod

    monkeypatch.setattr(sampler_mod, "TOP_P_PROBE", probe)
    torch.manual_seed(8)
    configs = [dict(top_k=5), dict(top_p=0.8), dict(top_p=0.95, temperature=0.6), dict(top_k=10, top_p=0.5),
               dict(top_k=7, min_p=0.1), dict(top_p=0.9, min_p=0.05, temperature=1.4), dict(min_p=0.2), dict()]
    params = [SamplingParams(**c).normalize(None) for c in configs]
    for trial in range(40):
        x = torch.randn(len(params), VOCAB) * 2.5
        u = [position_uniform(trial, j) for j in range(len(params))]
        fast = sampler_mod.sample_from_logits(x, params, u)
        dense = sampler_mod.inverse_cdf_sample(filtered_probs(x, params), u)
        assert fast == dense, (trial, fast, dense)


def test_top_k_top_p_distribution():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1] + [1e-9] * (VOCAB - 4)))
    N = 4000
    sampler = Sampler(eos_token_ids=[])
    states = [SamplingState.create(SamplingParams(top_k=3, top_p=0.75, sampling_seed=s).normalize(None))
              for s in range(N)]
    out = sampler.sample(logits.expand(N, VOCAB).contiguous(), states, [[] for _ in range(N)])
    counts = torch.bincount(torch.tensor(out.next_token_ids), minlength=VOCAB)
    assert counts[2:].sum() == 0
    assert abs(counts[0].item() / N - 4 / 7) < 0.03


# ------------------------------------------------------------------------------ fast path (no logprobs)
def _mixed_states(trial):
    configs = [dict(temperature=0.0), dict(sampling_seed=trial), dict(top_k=5, sampling_seed=trial + 1),
               dict(top_p=0.8, temperature=0.7, sampling_seed=trial + 2), dict(min_p=0.1, sampling_seed=trial + 3),
               dict(temperature=0.0, frequency_penalty=0.5, presence_penalty=0.2, repetition_penalty=1.3),
               dict(top_p=0.9, sampling_seed=trial + 4, logit_bias={"7": 2.0}, min_new_tokens=3)]
    return [make_state(**c) for c in configs]


@pytest.mark.parametrize("probe", [1024, 3])
def test_no_logprob_fast_path_gives_the_same_tokens(monkeypatch, probe):
    """return_logprob all False (no logsumexp, one host copy of the ids) samples exactly the tokens of the
    full path, greedy and seeded, in a mixed batch and in single-kind batches; rows that asked keep their
    logprobs and top logprobs, equal to the full path's."""
    import sglang.srt.sampling.sampler as sampler_mod

    monkeypatch.setattr(sampler_mod, "TOP_P_PROBE", probe)  # 3: top_p rows overflow the probe (sorted path)
    torch.manual_seed(11)
    sampler = Sampler(VOCAB, eos_token_ids=[EOS])
    for trial in range(12):
        states = _mixed_states(trial)
        for rows in (list(range(len(states))), [0, 5], [1, 2, 3, 4, 6]):  # mixed, all greedy, all seeded
            st = [states[i] for i in rows]
            x = torch.randn(len(rows), VOCAB) * 2.0
            outs = [[(trial * 7 + j) % VOCAB for j in range(trial % 5)] for _ in rows]
            full = sampler.sample(x, st, outs, top_logprobs_nums=[2] * len(rows))
            fast = sampler.sample(x, st, outs, return_logprob=[False] * len(rows))
            assert fast.next_token_ids == full.next_token_ids
            assert fast.next_token_logprobs == [None] * len(rows) and fast.top_logprobs == [None] * len(rows)
            asks = [j % 2 == 0 for j in range(len(rows))]
            some = sampler.sample(x, st, outs, top_logprobs_nums=[2 if a else 0 for a in asks], return_logprob=asks)
            assert some.next_token_ids == full.next_token_ids
            for j, a in enumerate(asks):
                if a:
                    assert some.next_token_logprobs[j] == pytest.approx(full.next_token_logprobs[j], abs=1e-6)
                    assert [t for _, t in some.top_logprobs[j]] == [t for _, t in full.top_logprobs[j]]
                else:
                    assert some.next_token_logprobs[j] is None and some.top_logprobs[j] is None


def test_inverse_cdf_guard_steps_back_to_a_positive_column():
    """u * total rounding up to the total lands past the last positive column: the vectorized guard picks the
    last positive column at or before it (what the former per-row loop did), with no per-row host work."""
    import sglang.srt.sampling.sampler as sampler_mod

    w = torch.tensor([[0.0, 0.3, 0.0, 0.7, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.0, 0.0, 0.0, 0.0]])
    u = [1.0, 1.0, 0.25]  # 1.0 stands for a u whose product with the total rounded up to the total
    assert sampler_mod.inverse_cdf_sample(w, u) == [3, 5, 0]
    ids = torch.arange(6).flip(0).expand(3, 6)  # columns -> token ids
    assert sampler_mod.inverse_cdf_sample(w, u, ids) == [2, 0, 5]


# ----------------------------------------------------------------------------- incremental penalties
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as hs  # noqa: E402


@settings(max_examples=30, deadline=None)
@given(data=hs.data())
def test_incremental_penalties_equal_recomputed(data):
    """Counts folded in token by token (PenaltyCounts) penalize exactly like counts recomputed from the whole
    prompt + output lists, step after step, for any mix of rows; a list that is not the one followed
    (shorter, or another last token) rebuilds its counts."""
    import pickle

    from sglang.srt.sampling.penalties import PenaltyCounts, apply_penalties

    vocab = 16
    rows = data.draw(hs.integers(1, 4))
    params = [SamplingParams(
        repetition_penalty=data.draw(hs.sampled_from([1.0, 1.3, 0.7])),
        frequency_penalty=data.draw(hs.sampled_from([0.0, 0.5, -0.25])),
        presence_penalty=data.draw(hs.sampled_from([0.0, 0.4]))) for _ in range(rows)]
    prompts = [data.draw(hs.lists(hs.integers(0, vocab - 1), max_size=6)) for _ in range(rows)]
    outputs = [[] for _ in range(rows)]
    counts = [PenaltyCounts() for _ in range(rows)]
    torch.manual_seed(data.draw(hs.integers(0, 100)))
    for step in range(data.draw(hs.integers(1, 12))):
        logits = torch.randn(rows, vocab)
        ref, inc = logits.clone(), logits.clone()
        apply_penalties(ref, params, outputs, prompts)
        apply_penalties(inc, params, outputs, prompts, counts)
        assert torch.equal(ref, inc), step
        for i in range(rows):
            outputs[i].extend(data.draw(hs.lists(hs.integers(0, vocab - 1), min_size=0, max_size=2)))
        if data.draw(hs.booleans()):  # moves with the request (a Gyges transformation pickles it)
            counts = pickle.loads(pickle.dumps(counts))
        if data.draw(hs.integers(0, 9)) == 0:  # another list than the one followed
            outputs = [o[: len(o) // 2] + [vocab - 1] for o in outputs]


def test_sampler_keeps_penalty_counts_in_the_state():
    state = make_state(frequency_penalty=1.0, presence_penalty=0.5)
    logits = torch.zeros(1, VOCAB)
    logits[0, 9] = 1.0
    outs = [[9, 9, 4]]
    sampler = Sampler(VOCAB, eos_token_ids=[EOS])
    assert sampler.sample(logits, [state], outs).next_token_ids[0] not in (9, 4)
    c = state.penalty_counts
    assert (c.folded, c.output_counts()) == (3, {9: 2, 4: 1})
    outs[0].append(9)
    sampler.sample(logits, [state], outs)
    assert (c.folded, c.output_counts()) == (4, {9: 3, 4: 1})
