"""The server's API where SGLang's own OpenAI-server tests and frontend programs expect something else than
this server used to do (issue 11, section 4), against the same package-scoped server as the language tests:
null fields present in chat responses and stream chunks, stop_token_ids outside the vocabulary accepted,
stop_regex applied, SGLang's context-length errors, /get_load, /v1/score, /v1/responses."""

import json
import math
import re
import time

import openai
import pytest
import requests

from server_utils import sse_events

pytestmark = pytest.mark.slow
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def post(runtime, path, **body):
    return requests.post(runtime.url + path, json=body, timeout=120)


def generate(runtime, **body):
    r = post(runtime, "/generate", **body)
    assert r.status_code == 200, r.text
    return r.json()


def test_chat_responses_carry_null_fields(runtime):
    r = post(runtime, "/v1/chat/completions", model="m", messages=MESSAGES, max_tokens=4)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert "matched_stop" in choice and choice["logprobs"] is None
    assert choice["message"]["tool_calls"] is None and choice["message"]["reasoning_content"] is None
    with requests.post(runtime.url + "/v1/chat/completions", stream=True, timeout=120, json={
            "model": "m", "messages": MESSAGES, "max_tokens": 4, "stream": True}) as s:
        events = sse_events(s)
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    for c in chunks:  # every delta, the final one included, names both fields (null)
        delta = c["choices"][0]["delta"]
        assert delta["reasoning_content"] is None and delta["tool_calls"] is None


def test_stop_token_ids_outside_the_vocabulary(runtime):
    vocab = runtime.endpoint.model_info["vocab_size"]
    ref = generate(runtime, text="Hello", sampling_params={"max_new_tokens": 5, "temperature": 0})
    out = generate(runtime, text="Hello", sampling_params={"max_new_tokens": 5, "temperature": 0,
                                                           "stop_token_ids": [vocab + 7, 10**6]})
    assert out["text"] == ref["text"]  # they never match
    r = post(runtime, "/v1/completions", model="m", prompt="Hello", max_tokens=3, stop_token_ids=[vocab])
    assert r.status_code == 200, r.text


def test_stop_regex_is_applied(runtime):
    sp = {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}
    full = generate(runtime, text="Numbers: 0 1 2", sampling_params=sp)["text"]
    piece = full[8:10]
    cut = full.find(piece)
    pattern = re.escape(piece[0]) + "."
    first = re.search(pattern, full)
    out = generate(runtime, text="Numbers: 0 1 2", sampling_params={**sp, "stop_regex": pattern})
    assert out["text"] == full[:first.start()] and first.start() <= cut
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": first.group(0)}
    kept = generate(runtime, text="Numbers: 0 1 2", sampling_params={**sp, "stop_regex": [pattern],
                                                                     "no_stop_trim": True})
    assert kept["text"] == full[:first.end()]
    # a regex that only matches the empty string never stops
    none = generate(runtime, text="Numbers: 0 1 2", sampling_params={**sp, "stop_regex": "(?!)|"})
    assert none["text"] == full


def test_context_length_errors(runtime):
    ctx = runtime.endpoint.model_info["context_length"]
    r = post(runtime, "/v1/completions", model="m", prompt="Hello", max_tokens=ctx + 10)
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert msg.startswith("Requested token count exceeds the model's maximum context length") and str(ctx) in msg
    r = post(runtime, "/generate", text="Hello", sampling_params={"max_new_tokens": ctx})
    assert r.status_code == 400 and "maximum context length" in r.text
    assert post(runtime, "/generate", text="Hello", sampling_params={"max_new_tokens": 3}).status_code == 200
    limit = runtime.endpoint.get_server_info()["max_req_input_len"]
    r = post(runtime, "/generate", input_ids=[5] * (limit + 3), sampling_params={"max_new_tokens": 1})
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "is longer than the model's context length" in msg and str(limit) in msg


def test_get_load_counts_running_work(runtime):
    idle = requests.get(runtime.url + "/get_load", timeout=30).json()
    assert all(i["num_running_reqs"] == 0 for i in idle["instances"])
    with requests.post(runtime.url + "/generate", stream=True, timeout=120, json={
            "text": "Once upon a time", "stream": True,
            "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}) as s:
        lines = s.iter_lines()
        next(line for line in lines if line.startswith(b"data:"))
        deadline = time.time() + 10  # instances report their queues about once a second
        while True:
            busy = requests.get(runtime.url + "/get_load", timeout=30).json()
            if sum(i["num_running_reqs"] for i in busy["instances"]) or time.time() > deadline:
                break
            time.sleep(0.2)
    assert sum(i["num_running_reqs"] for i in busy["instances"]) >= 1
    assert busy["load"] == sum(i["num_used_tokens"] for i in busy["instances"]) > 0


def test_load_report_says_the_largest_request(runtime):
    """Without Gyges the largest request now and by merging are the same: the context or the KV pool."""
    load = requests.get(runtime.url + "/get_load", timeout=30).json()
    info = requests.get(runtime.url + "/get_server_info", timeout=30).json()
    ctx = requests.get(runtime.url + "/v1/models", timeout=30).json()["data"][0]["max_model_len"]
    want = min(ctx, info["internal_states"][0]["kv_capacity_tokens"])
    assert [i["max_request_tokens"] for i in load["instances"]] == [want]
    assert load["max_request_tokens_now"] == load["max_request_tokens_merged"] == want
    assert info["max_request_tokens_now"] == info["max_request_tokens_merged"] == want
    assert info["max_req_input_len"] == want - 1


def test_score_equals_next_token_probabilities(runtime):
    query, items = "The weather is sunny, the sky is", [" blue", " very"]
    tops = []
    for item in items:
        out = generate(runtime, text=query + item, sampling_params={"max_new_tokens": 1},
                       return_logprob=True, top_logprobs_num=5)
        tops.append(out["meta_info"]["output_top_logprobs"][0])
    labels = [t[1] for t in tops[0][:3]]
    r = post(runtime, "/v1/score", query=query, items=items, label_token_ids=labels, model="m")
    assert r.status_code == 200, r.text
    scores = r.json()["scores"]
    for item_scores, top in zip(scores, tops):
        by_id = {t[1]: t[0] for t in top}
        for label, p in zip(labels, item_scores):
            if label in by_id:
                assert p == pytest.approx(math.exp(by_id[label]), abs=1e-4)
    soft = post(runtime, "/v1/score", query=query, items=items, label_token_ids=labels, apply_softmax=True).json()
    for raw, norm in zip(scores, soft["scores"]):
        assert sum(norm) == pytest.approx(1.0) and norm == pytest.approx([p / sum(raw) for p in raw], abs=1e-4)
    # token ids, item first
    ids = runtime.endpoint._generate({"text": query, "sampling_params": {"max_new_tokens": 0},
                                      "return_logprob": True, "logprob_start_len": 0})
    qids = [e[1] for e in ids["meta_info"]["input_token_logprobs"]]
    r = post(runtime, "/v1/score", query=qids[1:], items=[qids[:1]], label_token_ids=labels, item_first=True)
    assert r.status_code == 200 and len(r.json()["scores"][0]) == 3
    bad = post(runtime, "/v1/score", query=query, items=items, label_token_ids=[10**7])
    assert bad.status_code == 400 and "label_token_ids" in bad.text


def test_responses_api(runtime):
    client = openai.OpenAI(base_url=runtime.url + "/v1", api_key="none", max_retries=0)
    resp = client.responses.create(model="any", input="What is the capital of France?", instructions="Be brief.",
                                   max_output_tokens=6, temperature=0)
    chat = client.chat.completions.create(model="any", max_tokens=6, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}])
    assert resp.output_text == chat.choices[0].message.content
    assert resp.usage.output_tokens == chat.usage.completion_tokens == 6
    assert resp.usage.input_tokens == chat.usage.prompt_tokens and resp.model == "any"
    items = client.responses.create(model="any", max_output_tokens=3, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}])
    assert items.output[0].content[0].type == "output_text"
    for body, fragment in (({"input": "Hi", "stream": True}, "stream"),
                           ({"input": "Hi", "previous_response_id": "resp_1"}, "previous_response_id"),
                           ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
                            "text")):
        r = post(runtime, "/v1/responses", **body)
        assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text
