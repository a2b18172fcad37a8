"""Bad input and authentication against a real server started with --api-key.

Every bad request must get its 4xx with a JSON error message that says what is wrong, and the very next
valid request must still be served. /health and /metrics stay open without the key; everything else is 401.
"""

import subprocess
import sys

import pytest
import requests
from transformers import AutoTokenizer

from server_utils import ServerProcess, stop_and_check

KEY = "test-secret-key"
GOOD = {"text": "Hello, world!", "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
# A custom chat template given with --chat-template (a file), different from the tokenizer's own.
CUSTOM_TEMPLATE = ("{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}"
                   "{% if add_generation_prompt %}[ASSISTANT] {% endif %}")


@pytest.fixture(scope="module")
def server(test_model, tmp_path_factory):
    template = tmp_path_factory.mktemp("tmpl") / "template.jinja"
    template.write_text(CUSTOM_TEMPLATE)
    srv = ServerProcess(test_model("llama"), "--served-model-name", "tiny", "--chat-template", str(template),
                        api_key=KEY)
    yield srv
    stop_and_check(srv)


def test_cli_rejects_bad_flags(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--model-path", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--model-path" in r.stderr and "not a directory" in r.stderr
    r = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--model-path", str(tmp_path),
                        "--tp-size", "3"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--tp-size" in r.stderr


def test_custom_chat_template_file(server, test_model):
    tok = AutoTokenizer.from_pretrained(test_model("llama"))
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    expected = tok.encode("[USER] What is the capital of France?\n[ASSISTANT] ", add_special_tokens=False)
    r = server.post("/v1/chat/completions", json={"model": "tiny", "messages": msgs, "max_tokens": 3,
                                                  "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(expected)
    ref = server.generate(input_ids=expected, sampling_params={"max_new_tokens": 3, "temperature": 0,
                                                               "ignore_eos": True})
    assert r.json()["choices"][0]["message"]["content"] == ref["text"]


def assert_error(r: requests.Response, status: int, *fragments: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert err["code"] == status
    for frag in fragments:
        assert frag.lower() in err["message"].lower(), err["message"]
    return err


def assert_still_serving(server):
    r = server.post("/generate", json=GOOD)
    assert r.status_code == 200, r.text
    assert r.json()["meta_info"]["completion_tokens"] == 2


# ---- API key -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,path", [("post", "/generate"), ("get", "/get_server_info"), ("get", "/v1/models"),
                                         ("post", "/v1/completions"), ("get", "/get_model_info"),
                                         ("post", "/flush_cache")])
def test_api_key_required(server, method, path):
    url = server.url + path
    r = getattr(requests, method)(url, json=GOOD, timeout=30)
    assert_error(r, 401)
    r = getattr(requests, method)(url, json=GOOD, headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert_error(r, 401)


def test_api_key_accepted(server):
    assert server.get("/get_model_info").status_code == 200
    assert server.get("/v1/models").json()["data"][0]["id"] == "tiny"
    assert_still_serving(server)


def test_health_and_metrics_open(server):
    assert requests.get(server.url + "/health", timeout=30).status_code == 200
    assert requests.get(server.url + "/health_generate", timeout=60).status_code == 200
    r = requests.get(server.url + "/metrics", timeout=30)
    assert r.status_code == 200 and "sglang:num_running_reqs" in r.text


# ---- native /generate ---------------------------------------------------------------------------------------
def _long_prompt_body(server):
    limit = server.get("/get_server_info").json()["max_req_input_len"]
    return {"input_ids": [5] * (limit + 10), "sampling_params": {"max_new_tokens": 1}}, str(limit)


BAD_GENERATE = {
    "malformed_json": (b'{"text": "Hello", "sampling_params": {', ("json",)),
    "not_an_object": (b'["Hello"]', ("object",)),
    "empty_body": (b"", ("empty",)),
    "text_wrong_type": ({"text": 42}, ("text",)),
    "both_text_and_ids": ({"text": "a", "input_ids": [1, 2]}, ("exactly one",)),
    "no_prompt": ({"sampling_params": {}}, ("exactly one",)),
    "unknown_sampling_key": ({"text": "Hi", "sampling_params": {"temprature": 0.5}}, ("temprature",)),
    "negative_max_new_tokens": ({"text": "Hi", "sampling_params": {"max_new_tokens": -1}}, ("max_new_tokens",)),
    "max_new_tokens_wrong_type": ({"text": "Hi", "sampling_params": {"max_new_tokens": "ten"}},
                                  ("max_new_tokens",)),
    "negative_temperature": ({"text": "Hi", "sampling_params": {"temperature": -0.5}}, ("temperature",)),
    "top_p_zero": ({"text": "Hi", "sampling_params": {"top_p": 0.0}}, ("top_p",)),
    "top_p_above_one": ({"text": "Hi", "sampling_params": {"top_p": 1.5}}, ("top_p",)),
    "empty_text": ({"text": ""}, ("empty",)),
    "empty_input_ids": ({"input_ids": []}, ("empty",)),
    "token_out_of_vocab": ({"input_ids": [1, 10**9]}, ("vocab",)),
    "stream_wrong_type": ({"text": "Hi", "stream": "yes"}, ("stream",)),
    "bad_n": ({"text": "Hi", "sampling_params": {"n": 0}}, ("n",)),
    "bad_regex": ({"text": "Hi", "sampling_params": {"regex": "(unclosed"}}, ("regex",)),
}


@pytest.mark.parametrize("name", sorted(BAD_GENERATE))
def test_bad_generate(server, name):
    body, fragments = BAD_GENERATE[name]
    kw = {"data": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    assert_error(server.post("/generate", **kw), 400, *fragments)
    assert_still_serving(server)


def test_bad_generate_stream_fails_before_streaming(server):
    r = server.post("/generate", json={"text": "Hi", "stream": True, "sampling_params": {"temperature": -1}})
    assert_error(r, 400, "temperature")
    assert_still_serving(server)


def test_prompt_too_long_gives_limit(server):
    body, limit = _long_prompt_body(server)
    assert_error(server.post("/generate", json=body), 400, limit)
    assert_still_serving(server)


# ---- OpenAI API -----------------------------------------------------------------------------------------------
MSG = [{"role": "user", "content": "Hi"}]
BAD_OPENAI = {
    "negative_max_tokens": ("/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": -3}, 400,
                            ("max_tokens",)),
    "temperature_type": ("/v1/completions", {"model": "tiny", "prompt": "Hi", "temperature": "hot"}, 400,
                         ("temperature",)),
    "negative_temperature": ("/v1/chat/completions", {"model": "tiny", "messages": MSG, "temperature": -1}, 400,
                             ("temperature",)),
    "top_p_out_of_range": ("/v1/completions", {"model": "tiny", "prompt": "Hi", "top_p": 2}, 400, ("top_p",)),
    "n_zero": ("/v1/chat/completions", {"model": "tiny", "messages": MSG, "n": 0}, 400, ("n",)),
    "empty_prompt": ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, ("empty",)),
    "missing_prompt": ("/v1/completions", {"model": "tiny"}, 400, ("prompt",)),
    "empty_messages": ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, ("messages",)),
    "bad_role": ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400,
                 ("role",)),
    "top_logprobs_without_logprobs": ("/v1/chat/completions", {"model": "tiny", "messages": MSG, "top_logprobs": 2},
                                      400, ("logprobs",)),
    "malformed_json": ("/v1/chat/completions", b'{"model": "tiny", "messages": [', 400, ("json",)),
}


@pytest.mark.parametrize("name", sorted(BAD_OPENAI))
def test_bad_openai(server, name):
    path, body, status, fragments = BAD_OPENAI[name]
    kw = {"data": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    assert_error(server.post(path, **kw), status, *fragments)
    assert_still_serving(server)


def test_openai_prompt_too_long(server):
    body, limit = _long_prompt_body(server)
    r = server.post("/v1/completions", json={"model": "tiny", "prompt": body["input_ids"], "max_tokens": 1})
    assert_error(r, 400, limit)
    assert_still_serving(server)


# ---- other endpoints ------------------------------------------------------------------------------------------
def test_unknown_route_and_bad_abort(server):
    assert_error(server.get("/no/such/route"), 404)
    assert_error(server.post("/abort_request", json={}), 400, "rid")
    assert_still_serving(server)


def test_concurrent_good_and_bad(server):
    """A burst mixing bad and good requests: every good one is served, every bad one is rejected."""
    from concurrent.futures import ThreadPoolExecutor

    bodies = [GOOD if i % 2 == 0 else {"text": "Hi", "sampling_params": {"top_p": -1}} for i in range(10)]
    with ThreadPoolExecutor(10) as pool:
        codes = list(pool.map(lambda b: server.post("/generate", json=b).status_code, bodies))
    assert codes == [200 if i % 2 == 0 else 400 for i in range(10)]
