"""End-to-end engine tests: the real multi-process pipeline (sglang.Engine) against transformers.

Each Engine is started once per configuration (module scope) because start-up costs seconds on CPU.
"""

import json
import re
import time

import psutil
import pytest
import torch

import sglang

SEQ_LEN = 40
_SEEDED_TOKENS = {}  # seeded-sampling output of the first engine configuration


def _hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _sequence(seed: int, n: int = SEQ_LEN, vocab: int = 500):
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, vocab, (n - 1,), generator=g).tolist()


def _hf_logprobs(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]


def _hf_greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0, min_new_tokens=n)
    return out[0, len(ids):].tolist()


def _children_alive():
    return [c for c in psutil.Process().children(recursive=True) if c.is_running() and c.status() != "zombie"]


@pytest.fixture(scope="module", params=[(1, 16), (1, 1), (2, 16), (2, 1)], ids=lambda p: f"tp{p[0]}-ps{p[1]}")
def engine(request, test_model):
    tp, ps = request.param
    eng = sglang.Engine(model_path=test_model("llama"), tp_size=tp, page_size=ps, device="cpu",
                        dtype="float32", log_level="warning")
    eng.tp_ps = (tp, ps)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def hf_llama(test_model):
    return _hf(test_model("llama"))


def test_teacher_forced_logprobs_match_transformers(engine, hf_llama):
    ids = _sequence(0)
    ref = _hf_logprobs(hf_llama, ids)
    out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                          logprob_start_len=0)
    meta = out["meta_info"]
    assert meta["prompt_tokens"] == SEQ_LEN and meta["completion_tokens"] == 0
    got = meta["input_token_logprobs"]
    assert len(got) == SEQ_LEN and got[0][0] is None and got[0][1] == ids[0]
    assert [t for _, t, _ in got] == ids
    diffs = [abs(a[0] - b) for a, b in zip(got[1:], ref)]
    assert max(diffs) < 2e-3, max(diffs)


def test_logprobs_over_cached_prefix(engine, hf_llama):
    tp, ps = engine.tp_ps
    ids = _sequence(1)
    engine.generate(input_ids=ids[:21], sampling_params={"max_new_tokens": 0})
    start = 21
    out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                          logprob_start_len=start)
    meta = out["meta_info"]
    assert meta["cached_tokens"] == (start - 1) // ps * ps > 0
    got = meta["input_token_logprobs"]
    assert meta["prompt_tokens"] == start + len(got)
    ref = _hf_logprobs(hf_llama, ids)[start - 1:]
    assert [t for _, t, _ in got] == ids[start:]
    assert max(abs(a[0] - b) for a, b in zip(got, ref)) < 2e-3


def test_greedy_equals_transformers(engine, hf_llama):
    ids = _sequence(2, 12)
    out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 24, "temperature": 0,
                                                          "ignore_eos": True})
    ref = _hf_greedy(hf_llama, ids, 24)
    got = out["output_ids"]
    if got != ref:  # allowed only at a near-tie of the top two logits
        k = next(i for i, (a, b) in enumerate(zip(got, ref)) if a != b)
        with torch.no_grad():
            logits = hf_llama(torch.tensor([ids + got[:k]])).logits[0, -1]
        top2 = logits.topk(2).values
        assert (top2[0] - top2[1]).item() < 1e-3, (got, ref)
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 24}


def test_seeded_sampling_reproducible_and_tp_independent(engine):
    params = {"max_new_tokens": 16, "temperature": 0.8, "top_p": 0.9, "sampling_seed": 1234, "ignore_eos": True}
    a = engine.generate(input_ids=_sequence(3, 10), sampling_params=params)["output_ids"]
    b = engine.generate(input_ids=_sequence(3, 10), sampling_params=params)["output_ids"]
    assert a == b
    other = engine.generate(input_ids=_sequence(3, 10), sampling_params={**params, "sampling_seed": 99})
    assert other["output_ids"] != a
    # The same tokens at every TP degree / page size: compare with the first configuration's tokens.
    assert a == _SEEDED_TOKENS.setdefault("first", a)


def test_page_accounting_after_flush(engine):
    engine.generate(input_ids=[_sequence(i, 30) for i in range(4)], sampling_params={"max_new_tokens": 5})
    assert engine.flush_cache()
    for state in engine.get_internal_state():
        assert state["free_pages"] == state["num_pages"]
        assert state["running"] == 0 and state["waiting"] == 0


# ----------------------------------------------------------------------------------------------------------
# Continuous batching, memory pressure, constraints, errors: TP1 only (the batching logic is rank-agnostic)
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine_tp1(test_model):
    eng = sglang.Engine(model_path=test_model("llama"), device="cpu", dtype="float32", log_level="warning",
                        chunked_prefill_size=32)
    yield eng
    eng.shutdown()


def _mixed_prompts(n):
    return [_sequence(100 + i, 5 + (i * 7) % 60) for i in range(n)]


def test_concurrent_requests_equal_alone(engine_tp1):
    prompts = _mixed_prompts(64)
    params = [{"max_new_tokens": 4 + (i % 5) * 3, "temperature": 0, "ignore_eos": True} for i in range(64)]
    together = engine_tp1.generate(input_ids=prompts, sampling_params=params)
    assert len(together) == 64
    for i in range(64):
        alone = engine_tp1.generate(input_ids=prompts[i], sampling_params=params[i])
        assert together[i]["output_ids"] == alone["output_ids"], i
        assert len(together[i]["output_ids"]) == params[i]["max_new_tokens"]


def test_small_budget_retracts_and_finishes_correctly(engine_tp1, test_model):
    prompts = [_sequence(200 + i, 30) for i in range(20)]
    params = {"max_new_tokens": 40, "temperature": 0, "ignore_eos": True}
    reference = [engine_tp1.generate(input_ids=p, sampling_params=params)["output_ids"] for p in prompts[:20]]
    # ~70 tokens per request, 224 tokens of KV: about 3 requests fit at once.
    small = sglang.Engine(model_path=test_model("llama"), device="cpu", dtype="float32", log_level="warning",
                          max_total_tokens=224)
    try:
        outs = small.generate(input_ids=prompts, sampling_params=params)
        assert [o["output_ids"] for o in outs] == reference
        state = small.get_internal_state()[0]
        assert state["kv_capacity_tokens"] == 224
        assert state["num_retractions"] > 0
        assert small.flush_cache()
        state = small.get_internal_state()[0]
        assert state["free_pages"] == state["num_pages"]
    finally:
        small.shutdown()


def test_regex_constraint(engine_tp1):
    pattern = r"[0-9]{3}-[a-z]{2,5}"
    out = engine_tp1.generate("Code:", {"regex": pattern, "max_new_tokens": 30, "temperature": 0.7,
                                        "sampling_seed": 3})
    assert re.fullmatch(pattern, out["text"]), out["text"]


def test_json_schema_constraint(engine_tp1):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    out = engine_tp1.generate("Person:", {"json_schema": json.dumps(schema), "max_new_tokens": 60,
                                          "temperature": 0.5, "sampling_seed": 5})
    obj = json.loads(out["text"])
    assert set(obj) == {"name", "age"} and isinstance(obj["name"], str) and isinstance(obj["age"], int)


def test_stop_string_and_n(engine_tp1):
    base = engine_tp1.generate("Hello", {"max_new_tokens": 20, "temperature": 0, "ignore_eos": True})
    text = base["text"]
    stop = text[5:8]
    assert stop
    out = engine_tp1.generate("Hello", {"max_new_tokens": 20, "temperature": 0, "ignore_eos": True, "stop": stop})
    assert out["text"] == text[: text.find(stop)]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    many = engine_tp1.generate("Hello", {"max_new_tokens": 8, "temperature": 1.0, "n": 3, "sampling_seed": 7})
    assert len(many) == 3 and len({tuple(m["output_ids"]) for m in many}) > 1


def test_streaming_matches_non_streaming(engine_tp1):
    params = {"max_new_tokens": 48, "temperature": 0, "ignore_eos": True}  # enough steps that they cannot coalesce
    full = engine_tp1.generate("The quick brown fox", params)
    chunks = list(engine_tp1.generate("The quick brown fox", params, stream=True))
    assert len(chunks) > 1
    texts = [c["text"] for c in chunks]
    assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1))
    assert texts[-1] == full["text"]
    assert chunks[-1]["meta_info"]["finish_reason"] == full["meta_info"]["finish_reason"]


@pytest.mark.parametrize("params, fragment", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_new_tokens": -3}, "max_new_tokens"),
    ({"bogus_key": 1}, "bogus_key"),
])
def test_invalid_sampling_params_raise(engine_tp1, params, fragment):
    with pytest.raises(ValueError, match=fragment):
        engine_tp1.generate("hi", params)
    assert engine_tp1.generate("hi", {"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2


def test_prompt_longer_than_capacity_raises(engine_tp1):
    limit = engine_tp1.tokenizer_manager.max_req_input_len
    with pytest.raises(ValueError, match=str(limit)):
        engine_tp1.generate(input_ids=[5] * (limit + 1), sampling_params={"max_new_tokens": 1})


def test_bad_model_arguments(test_model, tmp_path):
    with pytest.raises(ValueError, match="tp-size must be a power of two, got 3"):
        sglang.Engine(model_path=test_model("llama"), tp_size=3, device="cpu")
    cfg = json.load(open(f"{test_model('llama')}/config.json"))
    cfg["architectures"] = ["FancyNewForCausalLM"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        sglang.Engine(model_path=str(bad), device="cpu")
    with pytest.raises(TypeError, match="allowed"):
        sglang.Engine(model_path=test_model("llama"), tp_sizee=2)


def test_shutdown_leaves_no_process(test_model):
    before = {p.pid for p in _children_alive()}
    eng = sglang.Engine(model_path=test_model("llama"), tp_size=2, device="cpu", log_level="warning")
    assert eng.generate("hi", {"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2
    eng.shutdown()
    after = {p.pid for p in _children_alive()}
    assert after <= before


def test_lpm_policy_and_running_cap_give_the_same_outputs(test_model, engine_tp1):
    """Longest-prefix-first ordering and max_running_requests change the schedule, never the tokens."""
    shared = _sequence(300, 40)
    prompts = [shared + _sequence(301 + i, 5 + i) for i in range(6)] + _mixed_prompts(4)
    params = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
    expected = [engine_tp1.generate(input_ids=p, sampling_params=params)["output_ids"] for p in prompts]
    eng = sglang.Engine(model_path=test_model("llama"), device="cpu", dtype="float32", log_level="warning",
                        schedule_policy="lpm", max_running_requests=2, chunked_prefill_size=16)
    try:
        eng.generate(input_ids=shared + [5], sampling_params={"max_new_tokens": 1})  # cache the shared prefix
        outs = eng.generate(input_ids=prompts, sampling_params=params)
        assert [o["output_ids"] for o in outs] == expected
        assert all(o["meta_info"]["cached_tokens"] >= 32 for o in outs[:6])
    finally:
        eng.shutdown()


def test_sessions_through_the_engine(engine_tp1):
    """SGLang's session API in-process: a second turn reuses the first's pinned KV and equals the full
    conversation sent without a session; close and the idle timeout release the session's pages."""
    eng, page = engine_tp1, 16
    sp = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
    turn1, turn2 = _sequence(300, 21), _sequence(400, 5)
    sid = eng.open_session(100)
    first = eng.generate(input_ids=turn1, sampling_params=sp, session_params={"id": sid})
    second = eng.generate(input_ids=turn2, sampling_params=sp, session_params={"id": sid, "rid": first["meta_info"]["id"]})
    assert second["meta_info"]["cached_tokens"] == (len(turn1) + len(first["output_ids"]) - 1) // page * page
    assert eng.get_internal_state()[0]["sessions_pinned"] == 1
    eng.close_session(sid)
    with pytest.raises(ValueError, match="no open session"):
        eng.close_session(sid)
    assert eng.flush_cache()
    full = turn1 + first["output_ids"] + turn2[1:]  # a turn's leading BOS is dropped (SGLang's rule)
    assert eng.generate(input_ids=full, sampling_params=sp)["output_ids"] == second["output_ids"]
    # an idle session is closed by the TokenizerManager's watchdog loop (--session-idle-timeout)
    sessions = eng.tokenizer_manager.sessions
    sid = eng.open_session(100)
    eng.generate(input_ids=turn1, sampling_params=sp, session_params={"id": sid})
    assert eng.get_internal_state()[0]["session_pinned_pages"] > 0
    old, sessions.idle_timeout_s = sessions.idle_timeout_s, 0.2
    try:
        deadline = time.time() + 30
        while time.time() < deadline and eng.get_internal_state()[0]["sessions_pinned"]:
            time.sleep(0.2)
    finally:
        sessions.idle_timeout_s = old
    state = eng.get_internal_state()[0]
    assert state["sessions_pinned"] == 0 and state["session_pinned_pages"] == 0
    with pytest.raises(ValueError, match="not an open session"):
        eng.generate(input_ids=turn2, sampling_params=sp, session_params={"id": sid})
