"""Request limits, unsupported fields, request ids, slow clients and the server's lifecycle under faults, each
checked as a client sees it against a real `python -m sglang.launch_server` (status code, JSON error message,
stream events, exit code, files left behind) and followed by a request that must still be served.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

from server_utils import ServerProcess, sse_events, stop_and_check
from test_server_errors import assert_error

pytestmark = pytest.mark.slow

GOOD = {"text": "Hello, world!", "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
MSG = [{"role": "user", "content": "Hi"}]
HEADER_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def server(test_model):
    srv = ServerProcess(test_model("llama"), "--timeout-request-read", str(HEADER_TIMEOUT_S))
    yield srv
    stop_and_check(srv)


def assert_still_serving(server):
    r = server.post("/generate", json=GOOD)
    assert r.status_code == 200, r.text
    assert r.json()["meta_info"]["completion_tokens"] == 2


def long_body(max_new_tokens=3000, **kw):
    return {"text": "Tell me a long story.", "sampling_params": {"max_new_tokens": max_new_tokens,
                                                                 "ignore_eos": True, "temperature": 0}, **kw}


def ipc_files_of(pid: int):
    """The ipc:// socket files the server's processes have bound."""
    files = set()
    for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            for c in p.net_connections(kind="unix"):
                if isinstance(c.laddr, str) and c.laddr.startswith("/tmp/sglang-"):
                    files.add(c.laddr)
        except psutil.Error:
            pass
    return files


def child_bound_to(pid: int, suffix: str) -> psutil.Process:
    """The child process of server `pid` bound to the ipc socket ending in `suffix` (worker-<rank>: that
    worker; detok-in: the detokenizer; ctl-in: the controller)."""
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if any(isinstance(c.laddr, str) and c.laddr.endswith(f"-{suffix}")
                   for c in p.net_connections(kind="unix")):
                return p
        except psutil.Error:
            pass
    raise AssertionError(f"no child process bound to *-{suffix}")


# ---- limits and malformed fields -------------------------------------------------------------------------
BAD_N = {"dict": {}, "list": [1], "float": 70237.0, "too_many": 65, "huge": 100000}


@pytest.mark.parametrize("name", sorted(BAD_N))
def test_bad_n_native(server, name):
    r = server.post("/generate", json={"text": "Hi", "sampling_params": {"n": BAD_N[name], "max_new_tokens": 1}})
    assert_error(r, 400, "n")
    assert_still_serving(server)


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("name", sorted(BAD_N))
def test_bad_n_openai(server, route, name):
    body = {"prompt": "Hi"} if route == "/v1/completions" else {"messages": MSG}
    r = server.post(route, json={**body, "max_tokens": 1, "n": BAD_N[name]})
    assert_error(r, 400, "n")
    assert_still_serving(server)


def test_n_at_limit_is_served(server):
    r = server.post("/generate", json={"text": "Hi", "sampling_params": {"n": 64, "max_new_tokens": 1}})
    assert r.status_code == 200, r.text
    assert len(r.json()) == 64


def _deep(depth):
    d = cur = {}
    for _ in range(depth):
        cur["a"] = {}
        cur = cur["a"]
    return d


MALFORMED = {
    "rid_list_of_object": ({"text": "Hi", "rid": [{}]}, ("rid",)),
    "rid_empty": ({"text": "Hi", "rid": ""}, ("rid",)),
    "rid_list_empty_entry": ({"text": ["a", "b"], "rid": ["x", ""]}, ("rid",)),
    "rid_duplicates_in_batch": ({"text": ["a", "b"], "rid": ["x", "x"]}, ("unique",)),
    "rid_number": ({"text": "Hi", "rid": 5}, ("rid",)),
    "custom_params_deep": ({"text": "Hi", "sampling_params": {"custom_params": _deep(500)}}, ("custom_params",)),
    "modalities_not_list": ({"text": "Hi", "modalities": "text"}, ("modalities",)),
    "top_logprobs_num_object": ({"text": "Hi", "return_logprob": True, "top_logprobs_num": {}},
                                ("top_logprobs_num",)),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_fields(server, name):
    body, fragments = MALFORMED[name]
    assert_error(server.post("/generate", json=body), 400, *fragments)
    assert_still_serving(server)


def test_deep_json_schema_is_not_a_server_error(server):
    r = server.post("/generate", json={"text": "Hi", "sampling_params": {"json_schema": _deep(900),
                                                                         "max_new_tokens": 4}})
    # 900 levels of unknown keywords: xgrammar compiles it (any object), so the request is served.
    assert r.status_code == 200, r.text[:300]
    assert r.json()["meta_info"]["finish_reason"] == {"type": "length", "length": 4}
    assert_still_serving(server)


@pytest.mark.parametrize("top", [21, 512, 999, 100000])
def test_top_logprobs_num_bounded(server, top):
    """Beyond the limit (and the vocabulary of 512) with logprob_start_len 0: a 400, no dead worker."""
    r = server.post("/generate", json={"text": "Hi there", "return_logprob": True, "logprob_start_len": 0,
                                       "top_logprobs_num": top, "sampling_params": {"max_new_tokens": 2}})
    assert_error(r, 400, "top_logprobs_num", "at most 20")
    assert server.get("/health").status_code == 200
    assert_still_serving(server)


def test_top_logprobs_response_size_bounded(server):
    """The largest allowed answer over a ~4,000-token prompt stays a few MB (was 120 MB at 999)."""
    limit = server.get("/get_server_info").json()["max_req_input_len"]
    ids = [(7 * i) % 500 + 5 for i in range(min(4000, limit - 8))]
    r = server.post("/generate", json={"input_ids": ids, "return_logprob": True, "logprob_start_len": 0,
                                       "top_logprobs_num": 20, "sampling_params": {"max_new_tokens": 2}})
    assert r.status_code == 200, r.text[:300]
    meta = r.json()["meta_info"]
    assert len(meta["input_top_logprobs"]) == len(ids)
    assert all(x is None or len(x) == 20 for x in meta["input_top_logprobs"])
    assert len(r.content) < 8 * 2**20, len(r.content)


STOP_LIMITS = {
    "10k_stop_strings": ({"stop": ["ab"] * 10000}, ("64", "--max-stop-strings")),
    "stop_regex_counts_too": ({"stop": ["a"] * 40, "stop_regex": ["b"] * 40}, ("80",)),
    "long_stop_string": ({"stop": "x" * 513}, ("513", "--max-stop-str-len")),
    "many_stop_token_ids": ({"stop_token_ids": list(range(65))}, ("stop_token_ids",)),
}


@pytest.mark.parametrize("name", sorted(STOP_LIMITS))
def test_stop_limits(server, name):
    sp, fragments = STOP_LIMITS[name]
    t0 = time.time()
    assert_error(server.post("/generate", json={"text": "Hi", "sampling_params": sp}), 400, *fragments)
    assert time.time() - t0 < 5
    assert_still_serving(server)


def test_stop_limits_openai(server):
    r = server.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1, "stop": ["ab"] * 10000})
    assert_error(r, 400, "--max-stop-strings")


def test_batch_limits(server):
    assert_error(server.post("/generate", json={"text": ["Hi"] * 1025}), 400, "1025 prompts", "--max-batch-prompts")
    r = server.post("/generate", json={"text": ["Hi"] * 17, "sampling_params": {"n": 64}})
    assert_error(r, 400, "1088", "--max-batch-prompts")
    assert_error(server.post("/v1/completions", json={"prompt": ["Hi"] * 1025, "max_tokens": 1}), 400, "1025")
    assert_still_serving(server)


def test_prompt_chars_limit_before_tokenizing(server):
    """A 10 MB prompt: a 400 naming the limit in well under a second, /health answers meanwhile, and the server
    does not keep the memory."""
    main = psutil.Process(server.proc.pid)
    rss0 = main.memory_info().rss
    latencies, stop = [], threading.Event()

    def poll():
        while not stop.is_set():
            t = time.time()
            assert requests.get(server.url + "/health", timeout=10).status_code == 200
            latencies.append(time.time() - t)
            time.sleep(0.01)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        big = "lorem ipsum " * (10 * 2**20 // 12)
        for route, body in (("/generate", {"text": big}), ("/v1/completions", {"prompt": big, "max_tokens": 1}),
                            ("/v1/chat/completions", {"messages": [{"role": "user", "content": big}]})):
            t0 = time.time()
            r = server.post(route, json=body)
            elapsed = time.time() - t0
            assert r.status_code == 400, (route, r.text[:300])
            assert "characters" in r.json()["error"]["message"] or "tokens" in r.json()["error"]["message"]
            assert elapsed < 3, (route, elapsed)
    finally:
        stop.set()
        poller.join()
    assert latencies and max(latencies) < 1.0, max(latencies)
    assert main.memory_info().rss - rss0 < 300 * 2**20, (rss0, main.memory_info().rss)
    assert_still_serving(server)


def test_tokenization_in_a_thread_keeps_health_responsive(server):
    """A prompt just under the character limit is tokenized off the event loop (then rejected as too many
    tokens): /health stays fast meanwhile."""
    chars = server.get("/get_server_info").json()["max_req_input_len"] * 16 - 16
    text = "ab cd " * (chars // 6)
    latencies, stop = [], threading.Event()

    def poll():
        while not stop.is_set():
            t = time.time()
            requests.get(server.url + "/health", timeout=10)
            latencies.append(time.time() - t)
            time.sleep(0.005)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: server.post("/generate", json={"text": text}), range(4)))
    finally:
        stop.set()
        poller.join()
    for r in results:
        assert_error(r, 400, "tokens")
    assert max(latencies) < 1.0, max(latencies)


# ---- body size and slow clients --------------------------------------------------------------------------
def _raw(server, data: bytes, read_timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=read_timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and b'"code"' in out:
                    break
        except socket.timeout:
            pass
        return out


def test_body_too_large_rejected_before_reading(server):
    head = (f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {64 * 2**20}\r\n\r\n").encode()
    t0 = time.time()
    out = _raw(server, head)  # no body sent at all: the answer cannot wait for it
    assert out.startswith(b"HTTP/1.1 413"), out[:200]
    assert b"--max-request-body-size" in out
    assert time.time() - t0 < 3


def test_chunked_body_too_large(server):
    def chunks():
        for _ in range(40):
            yield b"x" * 2**20

    r = requests.post(server.url + "/generate", data=chunks(), headers={"Content-Type": "application/json"},
                      timeout=60)
    assert_error(r, 413, "--max-request-body-size")
    assert_still_serving(server)


def test_slow_headers_are_dropped(server):
    """Connections that never finish their headers are closed after --timeout-request-read."""
    socks = []
    for _ in range(50):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=HEADER_TIMEOUT_S + 8)
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        socks.append(s)
    assert_still_serving(server)
    t0 = time.time()
    try:
        for s in socks:
            assert s.recv(100) == b"", "the server answered a request with unfinished headers"
        assert time.time() - t0 < HEADER_TIMEOUT_S + 5
    finally:
        for s in socks:
            s.close()
    assert_still_serving(server)


def test_slow_body_gets_408(server):
    head = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    out = _raw(server, head + b'{"text": ', read_timeout=HEADER_TIMEOUT_S + 8)
    assert out.startswith(b"HTTP/1.1 408"), out[:200]
    assert b"--timeout-request-read" in out
    assert_still_serving(server)


# ---- unsupported fields -------------------------------------------------------------------------------------
UNSUPPORTED_NATIVE = {
    "lora_path": "my-lora", "image_data": "http://x/cat.png", "audio_data": "a.wav", "video_data": "v.mp4",
    "custom_logit_processor": "{}", "return_hidden_states": True, "modalities": ["image"],
    "input_embeds": [[0.1, 0.2]],
}


@pytest.mark.parametrize("field", sorted(UNSUPPORTED_NATIVE))
def test_unsupported_native_field(server, field):
    r = server.post("/generate", json={**GOOD, field: UNSUPPORTED_NATIVE[field]})
    assert_error(r, 400, field, "not supported")
    # the defaults stay accepted
    default = [] if field == "modalities" else False if field == "return_hidden_states" else None
    r = server.post("/generate", json={**GOOD, field: default})
    assert r.status_code == 200, r.text


UNSUPPORTED_OPENAI = {
    "lora_path": ("/v1/completions", {"lora_path": "my-lora"}),
    "custom_logit_processor": ("/v1/completions", {"custom_logit_processor": "{}"}),
    "return_hidden_states": ("/v1/chat/completions", {"return_hidden_states": True}),
    "custom_params": ("/v1/chat/completions", {"custom_params": {"a": 1}}),
    "modalities": ("/v1/chat/completions", {"modalities": ["text", "audio"]}),
    "audio": ("/v1/chat/completions", {"audio": {"voice": "alloy", "format": "wav"}}),
    "image_url": ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/cat.png"}}]}]}),
    "suffix": ("/v1/completions", {"suffix": "end"}),
}


@pytest.mark.parametrize("field", sorted(UNSUPPORTED_OPENAI))
def test_unsupported_openai_field(server, field):
    route, extra = UNSUPPORTED_OPENAI[field]
    body = {"prompt": "Hi"} if route == "/v1/completions" else {"messages": MSG}
    r = server.post(route, json={**body, "max_tokens": 1, **extra})
    err = assert_error(r, 400, "support")
    assert field.split("_url")[0] in err["message"] or "text content" in err["message"], err["message"]
    assert_still_serving(server)


# ---- request ids and aborts --------------------------------------------------------------------------------
def _start(server, body):
    pool = ThreadPoolExecutor(1)
    return pool, pool.submit(server.post, "/generate", json=body)


def _wait_running(server, n=1, timeout=30):
    deadline = time.time() + timeout
    while sum(s["running"] for s in server.internal_states()) < n:
        assert time.time() < deadline, "the request never started running"
        time.sleep(0.05)


def test_duplicate_rid_while_running(server):
    pool, fut = _start(server, long_body(rid="dup-rid"))
    try:
        _wait_running(server)
        assert_error(server.post("/generate", json={**GOOD, "rid": "dup-rid"}), 400, "already in use", "dup-rid")
        assert_error(server.post("/generate", json={"text": ["a", "b"], "rid": ["other", "dup-rid"]}), 400,
                     "dup-rid")
        server.post("/abort_request", json={"rid": "dup-rid"})
        r = fut.result(60)
        assert r.status_code == 200 and r.json()["meta_info"]["finish_reason"]["type"] == "abort"
    finally:
        pool.shutdown()
    # once the first one is gone the rid is free again
    deadline = time.time() + 10
    while (r := server.post("/generate", json={**GOOD, "rid": "dup-rid"})).status_code == 400:
        assert time.time() < deadline, r.text
        time.sleep(0.1)
    assert r.status_code == 200 and r.json()["meta_info"]["id"] == "dup-rid"


def test_empty_rid_is_not_abort_all(server):
    pool, fut = _start(server, long_body(max_new_tokens=300))
    try:
        _wait_running(server)
        assert_error(server.post("/abort_request", json={"rid": ""}), 400, "rid")
        assert_error(server.post("/generate", json={**GOOD, "rid": ""}), 400, "rid")
        r = fut.result(120)
        assert r.json()["meta_info"]["finish_reason"]["type"] == "length"
    finally:
        pool.shutdown()


def test_abort_all(server):
    with ThreadPoolExecutor(2) as pool:
        futs = [pool.submit(server.post, "/generate", json=long_body()) for _ in range(2)]
        _wait_running(server, 2)
        assert_error(server.post("/abort_request", json={"abort_all": "yes"}), 400, "abort_all")
        assert server.post("/abort_request", json={"abort_all": True}).status_code == 200
        for f in futs:
            r = f.result(60)
            assert r.status_code == 200
            assert r.json()["meta_info"]["finish_reason"]["type"] == "abort"
    server.wait_idle()
    assert_still_serving(server)


def test_late_abort_does_not_hit_a_reused_rid(server):
    """A stream cut by its client is aborted; a new request reusing the rid right after is not hit."""
    with requests.post(server.url + "/generate", json={**long_body(), "stream": True, "rid": "reuse"},
                       stream=True, timeout=60) as r:
        next(r.iter_lines())
    deadline = time.time() + 15
    while True:
        r = server.post("/generate", json={**GOOD, "rid": "reuse"})
        if r.status_code == 200:
            break
        assert_error(r, 400, "already in use")
        assert time.time() < deadline
        time.sleep(0.05)
    assert r.json()["meta_info"]["finish_reason"]["type"] == "length"


def test_stream_output_ids_cumulative(server):
    body = {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 12, "temperature": 0,
                                                                     "ignore_eos": True}}
    ref = server.generate(**body)
    r = server.post("/generate", json={**body, "stream": True}, stream=True)
    events = [json.loads(e) for e in sse_events(r) if e != "[DONE]"]
    ids = [e["output_ids"] for e in events]
    assert all(a == b[:len(a)] for a, b in zip(ids, ids[1:])), "output_ids must grow cumulatively"
    assert ids[-1] == ref["output_ids"] and events[-1]["text"] == ref["text"]


def test_bad_limit_flags_exit_2(tmp_path, test_model):
    for flag, value in (("--max-parallel-samples", "0"), ("--max-request-body-size", "lots"),
                        ("--timeout-request-read", "0")):
        r = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--model-path", test_model("llama"),
                            flag, value], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and flag in r.stderr, (flag, r.returncode, r.stderr[-500:])


# ---- lifecycle -------------------------------------------------------------------------------------------------
def test_sigterm_answers_in_flight_requests(test_model):
    srv = ServerProcess(test_model("llama"))
    files = ipc_files_of(srv.proc.pid)
    assert files, "no ipc socket files found"
    with ThreadPoolExecutor(2) as pool:
        plain = pool.submit(srv.post, "/generate", json=long_body())

        def stream():
            with requests.post(srv.url + "/generate", json={**long_body(), "stream": True}, stream=True,
                               timeout=120) as r:
                return r.status_code, sse_events(r)

        streamed = pool.submit(stream)
        _wait_running(srv, 2)
        srv.proc.send_signal(signal.SIGTERM)
        r = plain.result(60)
        assert_error(r, 503, "shutting down")
        status, events = streamed.result(60)
    assert status == 200 and events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == 503 and "shutting down" in err["message"]
    stop_and_check(srv)
    assert not [f for f in files if os.path.exists(f)], "ipc socket files left behind"


@pytest.mark.parametrize("victim", ["worker-0", "detok-in"])
def test_server_exits_nonzero_when_nothing_can_serve(test_model, victim):
    """The only worker (or the detokenizer) is killed: the in-flight request gets a 503, the server exits
    non-zero within seconds instead of answering 503 forever, and leaves no process or ipc file behind."""
    srv = ServerProcess(test_model("llama"))
    files = ipc_files_of(srv.proc.pid)
    process = child_bound_to(srv.proc.pid, victim)
    try:
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(srv.post, "/generate", json=long_body())
            _wait_running(srv)
            process.kill()
            assert_error(fut.result(60), 503)
        t0 = time.time()
        code = srv.proc.wait(timeout=30)
        assert code != 0, "the server exited 0 although it could not serve"
        assert time.time() - t0 < 20
    finally:
        orphans = srv.stop(check=False)
    assert not orphans, orphans
    assert not [f for f in files if os.path.exists(f)], "ipc socket files left behind"
    log = srv.log_tail(20000)
    assert "no instance left serving" in log if victim.startswith("worker") else "detokenizer exited" in log


def test_port_in_use_fails_at_once_before_any_process_starts(test_model):
    """The HTTP port is bound before the workers start (their gloo connections take ephemeral ports, which
    could otherwise take it during start-up): a port already in use is a clear non-zero exit within seconds,
    with no model loaded and no child process started."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--model-path", test_model("llama"),
                            "--device", "cpu", "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr, r.stderr[-2000:]
    assert "Loading safetensors" not in r.stderr, "the model was loaded before the port was checked"
    assert time.time() - t0 < 60


def test_failed_instance_makes_health_503_and_others_serve(test_model):
    srv = ServerProcess(test_model("llama"), "--dp-size", "2")
    child_bound_to(srv.proc.pid, "worker-1").kill()
    deadline = time.time() + 20
    while (r := requests.get(srv.url + "/health", timeout=10)).status_code != 503:
        assert time.time() < deadline, "/health still 200 with an instance failed"
        time.sleep(0.2)
    body = r.json()
    assert body["error"]["code"] == 503 and "[1]" in body["error"]["message"]
    assert body["failed_instances"] and body["failed_instances"][0]["devices"] == [1]
    assert body["failed_instances"][0]["reason"]
    assert requests.get(srv.url + "/health_generate", timeout=30).status_code == 503
    for _ in range(3):  # the live instance keeps serving
        assert_still_serving(srv)
    stop_and_check(srv)


def test_engine_shutdown_removes_ipc_files(test_model):
    import sglang

    engine = sglang.Engine(model_path=test_model("llama"), device="cpu", skip_warmup=True)
    assert engine.generate("Hi", {"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2
    files = engine.tokenizer_manager.port_args.ipc_files()
    assert any(os.path.exists(f) for f in files)
    engine.shutdown()
    assert not [f for f in files if os.path.exists(f)], "ipc socket files left behind"
