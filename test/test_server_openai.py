"""OpenAI-compatible API against a real server subprocess, driven by the `openai` package.

Checks values: usage equals token counts from the tokenizer, completions equal /generate at temperature 0,
streamed deltas concatenate to the non-streamed text, chat prompts are the tokenizer's chat template,
logprob lists have one entry per token, constraints hold, any model name is served and echoed back (as SGLang does).
"""

import json
import re

import openai
import pytest
from transformers import AutoTokenizer

from server_utils import ServerProcess, stop_and_check

MODEL = "tiny-llama"
GREEDY_EXTRA = {"ignore_eos": True}
PROMPT = "The capital of France is"
MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(test_model):
    srv = ServerProcess(test_model("llama"), "--served-model-name", MODEL)
    yield srv
    stop_and_check(srv)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tok(test_model):
    return AutoTokenizer.from_pretrained(test_model("llama"))


def chat_ids(tok, messages):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


def native(server, **body):
    return server.generate(**body)


# ---- models ------------------------------------------------------------------------------------------------
def test_models(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert server.get("/v1/models/" + MODEL).json()["id"] == MODEL


def test_other_model_name_is_served_and_echoed(client, server):
    ref = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
    r = client.completions.create(model="gpt-nope", prompt=PROMPT, max_tokens=3, temperature=0)
    assert r.model == "gpt-nope" and r.choices[0].text == ref.choices[0].text
    c = client.chat.completions.create(model="gpt-nope", messages=MESSAGES, max_tokens=2)
    assert c.model == "gpt-nope" and c.usage.completion_tokens == 2
    chunks = list(client.chat.completions.create(model="other", messages=MESSAGES, max_tokens=2, stream=True))
    assert {ch.model for ch in chunks} == {"other"}
    assert server.get("/v1/models/gpt-nope").status_code == 404  # the model list names only the served one


# ---- completions -------------------------------------------------------------------------------------------
def test_completion_matches_native_and_usage(client, server, tok):
    c = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, extra_body=GREEDY_EXTRA)
    ref = native(server, text=PROMPT, sampling_params={"temperature": 0, "max_new_tokens": 6, "ignore_eos": True})
    assert c.object == "text_completion" and c.model == MODEL
    assert len(c.choices) == 1
    assert c.choices[0].text == ref["text"]
    assert c.choices[0].finish_reason == "length"
    assert c.usage.prompt_tokens == len(tok.encode(PROMPT))
    assert c.usage.completion_tokens == 6
    assert c.usage.total_tokens == c.usage.prompt_tokens + 6


def test_completion_prompt_list_and_token_ids(client, tok):
    prompts = ["Hello, world!", "The weather is"]
    c = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0, extra_body=GREEDY_EXTRA)
    assert [ch.index for ch in c.choices] == [0, 1]
    singles = [client.completions.create(model=MODEL, prompt=p, max_tokens=4, temperature=0,
                                         extra_body=GREEDY_EXTRA).choices[0].text for p in prompts]
    assert [ch.text for ch in c.choices] == singles
    assert c.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
    assert c.usage.completion_tokens == 8
    ids = tok.encode(prompts[0])
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0, extra_body=GREEDY_EXTRA)
    assert by_ids.choices[0].text == singles[0]
    assert by_ids.usage.prompt_tokens == len(ids)


def test_completion_n(client, tok):
    c = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, n=2, temperature=0,
                                  extra_body=GREEDY_EXTRA)
    assert [ch.index for ch in c.choices] == [0, 1]
    assert c.choices[0].text == c.choices[1].text
    assert c.usage.prompt_tokens == len(tok.encode(PROMPT))  # counted once per prompt
    assert c.usage.completion_tokens == 6


def test_completion_stop_trimmed(client):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0,
                                     extra_body=GREEDY_EXTRA).choices[0].text
    stop = full[6:9]
    c = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop],
                                  extra_body=GREEDY_EXTRA)
    assert c.choices[0].text == full[: full.find(stop)]
    assert c.choices[0].finish_reason == "stop"


def test_completion_logprobs_and_echo(client, server, tok):
    c = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2,
                                  extra_body=GREEDY_EXTRA)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    ref = native(server, text=PROMPT, sampling_params={"temperature": 0, "max_new_tokens": 5, "ignore_eos": True})
    assert lp.tokens == [tok.decode([i]) for i in ref["output_ids"]]
    assert lp.text_offset == sorted(lp.text_offset)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 2 and abs(max(top.values()) - chosen) < 1e-4  # greedy picks the top token

    e = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=1, echo=True,
                                  extra_body=GREEDY_EXTRA)
    n_prompt = len(tok.encode(PROMPT))
    assert e.choices[0].text.startswith(PROMPT)
    c3 = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, extra_body=GREEDY_EXTRA)
    assert e.choices[0].text == PROMPT + c3.choices[0].text
    assert len(e.choices[0].logprobs.token_logprobs) == n_prompt + 3
    assert e.choices[0].logprobs.token_logprobs[0] is None
    assert all(x is not None for x in e.choices[0].logprobs.token_logprobs[1:])


def test_completion_stream(client):
    ref = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, extra_body=GREEDY_EXTRA)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body=GREEDY_EXTRA))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == ref.choices[0].text
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == ref.usage.prompt_tokens


def test_completion_seed(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7, extra_body=GREEDY_EXTRA)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


# ---- chat --------------------------------------------------------------------------------------------------
def test_chat_uses_template(client, server, tok):
    c = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                       extra_body=GREEDY_EXTRA)
    ids = chat_ids(tok, MESSAGES)
    ref = native(server, input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": 6, "ignore_eos": True})
    assert c.object == "chat.completion"
    assert c.choices[0].message.role == "assistant"
    assert c.choices[0].message.content == ref["text"]
    assert c.choices[0].finish_reason == "length"
    assert c.usage.prompt_tokens == len(ids)
    assert c.usage.completion_tokens == 6 and c.usage.total_tokens == len(ids) + 6


def test_chat_max_completion_tokens_and_n(client):
    c = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=3, n=2, temperature=0,
                                       extra_body=GREEDY_EXTRA)
    assert [ch.index for ch in c.choices] == [0, 1]
    assert c.choices[0].message.content == c.choices[1].message.content
    assert c.usage.completion_tokens == 6


def test_chat_stream(client):
    ref = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0,
                                         extra_body=GREEDY_EXTRA)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body=GREEDY_EXTRA))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert content == ref.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.prompt_tokens == ref.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == 8


def test_chat_logprobs(client):
    c = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=2, extra_body=GREEDY_EXTRA)
    content = c.choices[0].logprobs.content
    assert len(content) == 4
    assert "".join(t.token for t in content) == c.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 2
        assert t.top_logprobs[0].token == t.token and abs(t.top_logprobs[0].logprob - t.logprob) < 1e-4
        assert bytes(t.bytes).decode("utf-8", errors="replace") == t.token


def test_chat_stop(client):
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0,
                                          extra_body=GREEDY_EXTRA).choices[0].message.content
    stop = full[4:7]
    c = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0, stop=stop,
                                       extra_body=GREEDY_EXTRA)
    assert c.choices[0].message.content == full[: full.find(stop)]
    assert c.choices[0].finish_reason == "stop"


def test_chat_regex_extra_body(client):
    c = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0,
                                       extra_body={"regex": "(Paris|London|Berlin)"})
    assert c.choices[0].message.content in ("Paris", "London", "Berlin")
    assert c.choices[0].finish_reason == "stop"


def test_chat_json_schema(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
              "required": ["city"], "additionalProperties": False}
    c = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=48, temperature=0,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "answer", "schema": schema}})
    assert c.choices[0].finish_reason == "stop", c.choices[0].message.content
    data = json.loads(c.choices[0].message.content)
    assert data["city"] in ("Paris", "Rome") and set(data) == {"city"}


def test_chat_json_object(client):
    c = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=64, temperature=0,
                                       response_format={"type": "json_object"})
    if c.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(c.choices[0].message.content), dict)
    else:  # ran out of tokens: still a prefix of a JSON object
        assert re.match(r"\s*\{", c.choices[0].message.content)


def test_chat_content_parts(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                          {"type": "text", "text": "of France?"}]}]
    a = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=4, temperature=0,
                                       extra_body=GREEDY_EXTRA)
    b = client.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                                               "content": "What is the capital of France?"}],
                                       max_tokens=4, temperature=0, extra_body=GREEDY_EXTRA)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": MESSAGES}),
    ("/v1/completions", {"prompt": PROMPT, "n": 2}),
])
def test_stream_disconnect_aborts(server, path, body):
    r = server.post(path, json={"model": MODEL, "max_tokens": 3000, "stream": True, "ignore_eos": True, **body},
                    stream=True)
    assert r.status_code == 200
    seen = 0
    for line in r.iter_lines():
        if line.startswith(b"data:"):
            seen += 1
            if seen == 4:
                break
    r.close()  # the client goes away mid-stream
    states = server.wait_idle(timeout=30)
    assert sum(s["running"] for s in states) == 0
    assert server.post("/flush_cache").status_code == 200
    assert sum(s["kv_used_tokens"] for s in server.internal_states()) == 0
