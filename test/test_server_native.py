"""SGLang's native HTTP API against a real server subprocess (one per module) on the tiny llama checkpoint.

Every test checks values, not only shapes: token counts against the tokenizer, greedy streamed text against
greedy non-streamed text, batch order against single requests, logprob bookkeeping, prefix-cache hits, and
that flushing and aborting leave no KV in use.
"""

import json
import threading
import time

import pytest
import requests
from transformers import AutoTokenizer

import sglang
from server_utils import ServerProcess, sse_events, stop_and_check

GREEDY = {"temperature": 0.0, "ignore_eos": True}
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server(test_model):
    srv = ServerProcess(test_model("llama"))
    yield srv
    stop_and_check(srv)


@pytest.fixture(scope="module")
def tok(test_model):
    return AutoTokenizer.from_pretrained(test_model("llama"))


def gen(server, prompt=PROMPT, max_new_tokens=8, **kw):
    sp = {**GREEDY, "max_new_tokens": max_new_tokens, **kw.pop("sampling_params", {})}
    return server.generate(text=prompt, sampling_params=sp, **kw)


# ---- info endpoints ----------------------------------------------------------------------------------------
def test_health_and_info(server, test_model):
    assert server.get("/health").status_code == 200
    assert server.get("/health_generate").status_code == 200
    for path in ("/get_model_info", "/model_info"):
        info = server.get(path).json()
        assert info["model_path"] == test_model("llama")
        assert info["tokenizer_path"] == test_model("llama")
        assert info["is_generation"] is True
    for path in ("/get_server_info", "/server_info"):
        info = server.get(path).json()
        assert info["version"] == sglang.__version__
        assert info["model_path"] == test_model("llama")
        assert info["port"] == server.port
        assert isinstance(info["max_total_num_tokens"], int) and info["max_total_num_tokens"] > 0
        states = info["internal_states"]
        assert isinstance(states, list) and len(states) >= 1
        assert all("kv_capacity_tokens" in s and "running" in s for s in states)


# ---- generation --------------------------------------------------------------------------------------------
def test_single_text_counts(server, tok):
    out = gen(server, max_new_tokens=7)
    meta = out["meta_info"]
    assert meta["prompt_tokens"] == len(tok.encode(PROMPT))
    assert meta["completion_tokens"] == 7 == len(out["output_ids"])
    assert meta["finish_reason"] == {"type": "length", "length": 7}
    assert out["text"] == tok.decode(out["output_ids"], skip_special_tokens=True)
    assert isinstance(meta["id"], str) and meta["e2e_latency"] > 0


def test_input_ids_equal_text(server, tok):
    by_text = gen(server, max_new_tokens=6)
    by_ids = server.generate(input_ids=tok.encode(PROMPT), sampling_params={**GREEDY, "max_new_tokens": 6})
    assert by_ids["output_ids"] == by_text["output_ids"]
    assert by_ids["text"] == by_text["text"]


def test_get_generate(server):
    r = server.get("/generate", json={"text": PROMPT, "sampling_params": {**GREEDY, "max_new_tokens": 3}})
    assert r.status_code == 200, r.text
    assert r.json()["meta_info"]["completion_tokens"] == 3


def test_max_new_tokens_zero(server, tok):
    out = gen(server, max_new_tokens=0)
    assert out["text"] == "" and out["meta_info"]["completion_tokens"] == 0
    assert out["meta_info"]["prompt_tokens"] == len(tok.encode(PROMPT))


def test_batch_in_order(server):
    prompts = ["Hello, world!", "The weather is", "Numbers: 1 2 3"]
    singles = [gen(server, p, max_new_tokens=5) for p in prompts]
    batch = server.generate(text=prompts, sampling_params={**GREEDY, "max_new_tokens": 5})
    assert isinstance(batch, list) and len(batch) == 3
    assert [b["output_ids"] for b in batch] == [s["output_ids"] for s in singles]
    assert [b["meta_info"]["prompt_tokens"] for b in batch] == [s["meta_info"]["prompt_tokens"] for s in singles]


def test_parallel_sampling_n(server):
    out = server.generate(text=PROMPT, sampling_params={**GREEDY, "max_new_tokens": 4, "n": 2})
    assert isinstance(out, list) and len(out) == 2
    assert out[0]["output_ids"] == out[1]["output_ids"]  # greedy: both samples agree
    assert out[0]["meta_info"]["id"] != out[1]["meta_info"]["id"]
    # two prompts x n=2 -> four results, prompt-major
    outs = server.generate(text=[PROMPT, "Hello"], sampling_params={**GREEDY, "max_new_tokens": 3, "n": 2})
    assert len(outs) == 4
    assert outs[0]["output_ids"] == outs[1]["output_ids"] == out[0]["output_ids"][:3]
    assert outs[2]["meta_info"]["prompt_tokens"] == outs[3]["meta_info"]["prompt_tokens"]


def test_seeded_sampling_is_reproducible(server):
    sp = {"temperature": 1.0, "max_new_tokens": 8, "sampling_seed": 1234, "ignore_eos": True}
    a = server.generate(text=PROMPT, sampling_params=sp)
    b = server.generate(text=PROMPT, sampling_params=sp)
    assert a["output_ids"] == b["output_ids"]


def test_stream_equals_non_stream(server):
    # 48 tokens: the server sends what a reader has not taken yet as one event, so a stream of a few tokens can
    # arrive whole on a stalled machine; 48 decode steps make one event for all of them implausible
    ref = gen(server, max_new_tokens=48)
    r = server.post("/generate", json={"text": PROMPT, "sampling_params": {**GREEDY, "max_new_tokens": 48},
                                        "stream": True}, stream=True)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 2
    texts = [c["text"] for c in chunks]
    for prev, cur in zip(texts, texts[1:]):
        assert cur.startswith(prev)  # cumulative text
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert texts[-1] == ref["text"]
    assert chunks[-1]["output_ids"] == ref["output_ids"]


def test_stream_batch_has_index(server):
    prompts = ["Hello", "The quick brown fox"]
    ref = server.generate(text=prompts, sampling_params={**GREEDY, "max_new_tokens": 4})
    r = server.post("/generate", json={"text": prompts, "sampling_params": {**GREEDY, "max_new_tokens": 4},
                                        "stream": True}, stream=True)
    chunks = [json.loads(e) for e in sse_events(r) if e != "[DONE]"]
    last = {}
    for c in chunks:
        last[c["index"]] = c
    assert sorted(last) == [0, 1]
    for i in range(2):
        assert last[i]["text"] == ref[i]["text"]
        assert last[i]["meta_info"]["finish_reason"] is not None


# ---- logprobs ----------------------------------------------------------------------------------------------
def test_logprobs_from_start(server, tok):
    out = server.generate(text=PROMPT, sampling_params={**GREEDY, "max_new_tokens": 5}, return_logprob=True,
                          logprob_start_len=0, top_logprobs_num=3, return_text_in_logprobs=True)
    meta = out["meta_info"]
    ids = tok.encode(PROMPT)
    inp = meta["input_token_logprobs"]
    assert meta["prompt_tokens"] == 0 + len(inp) == len(ids)
    assert inp[0][0] is None  # nothing precedes the first token
    assert all(isinstance(e[0], float) and e[0] <= 0 for e in inp[1:])
    assert [e[1] for e in inp] == ids
    assert [e[2] for e in inp] == [tok.decode([i]) for i in ids]
    outp = meta["output_token_logprobs"]
    assert len(outp) == meta["completion_tokens"] == 5
    assert [e[1] for e in outp] == out["output_ids"]
    tops = meta["output_top_logprobs"]
    assert len(tops) == 5
    for chosen, top in zip(outp, tops):
        assert len(top) == 3
        assert [t[0] for t in top] == sorted((t[0] for t in top), reverse=True)
        # greedy: the chosen token is the most likely one
        assert top[0][1] == chosen[1] and abs(top[0][0] - chosen[0]) < 1e-4


def test_logprobs_start_len(server):
    out = server.generate(text=PROMPT, sampling_params={**GREEDY, "max_new_tokens": 2}, return_logprob=True,
                          logprob_start_len=3)
    meta = out["meta_info"]
    assert meta["prompt_tokens"] == 3 + len(meta["input_token_logprobs"])
    assert all(e[0] is not None for e in meta["input_token_logprobs"])
    assert len(meta["output_token_logprobs"]) == 2


# ---- stop conditions ---------------------------------------------------------------------------------------
def test_stop_string_trimmed(server):
    full = gen(server, max_new_tokens=24)["text"]
    assert len(full) > 8
    stop = full[5:8]
    cut = full.find(stop)
    out = gen(server, max_new_tokens=24, sampling_params={"stop": [stop]})
    assert out["text"] == full[:cut]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}


def test_stream_with_a_stop_string_equals_non_stream(server):
    """The stream carries text deltas end to end; the client still sees cumulative text ending exactly where
    the non-streamed answer ends, with a stop string that the stream had started to show cut away."""
    full = gen(server, max_new_tokens=24)["text"]
    stop = full[5:8]
    params = {**GREEDY, "max_new_tokens": 24, "stop": [stop]}
    ref = gen(server, sampling_params={"stop": [stop]}, max_new_tokens=24)
    r = server.post("/generate", json={"text": PROMPT, "sampling_params": params, "stream": True}, stream=True)
    chunks = [json.loads(e) for e in sse_events(r)[:-1]]
    assert chunks[-1]["text"] == ref["text"] == full[:full.find(stop)]
    assert chunks[-1]["output_ids"] == ref["output_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"] == ref["meta_info"]["finish_reason"]


def test_stop_token_id(server):
    ref = gen(server, max_new_tokens=16)
    stop_id = ref["output_ids"][4]
    first = ref["output_ids"].index(stop_id)
    out = gen(server, max_new_tokens=16, sampling_params={"stop_token_ids": [stop_id]})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
    assert out["output_ids"][: first] == ref["output_ids"][: first]
    assert out["meta_info"]["completion_tokens"] == first + 1


# ---- cache, flush, abort, metrics ----------------------------------------------------------------------------
def test_prefix_cache_hit(server):
    long_prompt = " ".join(["The scheduler batches requests continuously and reuses cached prefixes."] * 8)
    first = gen(server, long_prompt, max_new_tokens=2)
    second = gen(server, long_prompt, max_new_tokens=2)
    assert first["meta_info"]["prompt_tokens"] > 64
    assert second["meta_info"]["cached_tokens"] > 0
    assert second["meta_info"]["cached_tokens"] >= first["meta_info"]["prompt_tokens"] - 32
    assert second["output_ids"] == first["output_ids"]


def test_flush_cache_frees_kv(server):
    gen(server, "Once upon a time there was a small server " * 4, max_new_tokens=2)
    server.wait_idle()
    for method in ("post", "get"):
        r = getattr(server, method)("/flush_cache")
        assert r.status_code == 200, r.text
    states = server.internal_states()
    assert sum(s["kv_used_tokens"] for s in states) == 0


def test_abort_request_by_rid(server):
    rid = "test-abort-rid"
    result = {}

    def run():
        result["r"] = server.post("/generate", json={"text": PROMPT, "rid": rid, "sampling_params": {
            **GREEDY, "max_new_tokens": 3000}}, timeout=300)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.time() + 30
    while time.time() < deadline and sum(s["running"] for s in server.internal_states()) == 0:
        time.sleep(0.1)
    r = server.post("/abort_request", json={"rid": rid})
    assert r.status_code == 200
    t.join(60)
    assert not t.is_alive()
    meta = result["r"].json()["meta_info"]
    assert meta["finish_reason"]["type"] == "abort"
    assert meta["completion_tokens"] < 3000
    server.wait_idle()


def test_client_disconnect_mid_stream_aborts(server):
    r = server.post("/generate", json={"text": PROMPT, "stream": True, "sampling_params": {
        **GREEDY, "max_new_tokens": 3000}}, stream=True)
    seen = 0
    for line in r.iter_lines():
        if line.startswith(b"data:"):
            seen += 1
            if seen == 3:
                break
    r.close()  # the client goes away after three chunks
    states = server.wait_idle(timeout=30)
    assert sum(s["running"] for s in states) == 0
    assert server.post("/flush_cache").status_code == 200
    assert sum(s["kv_used_tokens"] for s in server.internal_states()) == 0


def test_metrics(server):
    gen(server, max_new_tokens=3)
    r = server.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    values = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name.split("{")[0]] = values.get(name.split("{")[0], 0.0) + float(value)
    for name in ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage"):
        assert name in values
    assert values["sglang:prompt_tokens_total"] > 0
    assert values["sglang:generation_tokens_total"] >= 3
    assert values["sglang:time_to_first_token_seconds_count"] > 0
    assert values["sglang:e2e_request_latency_seconds_count"] > 0
    assert values["sglang:inter_token_latency_seconds_count"] > 0
