"""The HTTP layer alone, on a stub TokenizerManager (no model, no child processes): readiness gating on the
warm-up, 503 once a worker died, how TM errors map to status codes, and the metrics collector.
"""

import asyncio
import threading
import time
import types

import pytest
import requests
import uvicorn

from server_utils import free_port
from sglang.srt.entrypoints.http_server import create_app
from sglang.srt.managers.tokenizer_manager import RequestLimits
from sglang.srt.metrics import MetricsCollector
from sglang.srt.server_args import ServerArgs


class ServerUnavailableError(RuntimeError):
    """Same name as tokenizer_manager's: the HTTP layer matches it by name."""


class StubTM:
    def __init__(self, model_path):
        self.server_args = ServerArgs(model_path=model_path, skip_tokenizer_init=True)
        self.tokenizer = None
        self.model_config = types.SimpleNamespace(context_len=128, vocab_size=100, hf_config=None,
                                                  architecture="LlamaForCausalLM")
        self.max_total_num_tokens = 1000
        self.max_req_input_len = 100
        self.metrics = None
        self.release_warmup = threading.Event()
        self.healthy = True
        self.fail_with = None
        self.aborted = []
        self.limits = RequestLimits.from_server_args(self.server_args, self.max_req_input_len)
        self.failed_instances = []

    def is_healthy(self):
        return self.healthy

    def health_problems(self):
        return [] if self.healthy else ["no instance left serving (a worker died)"]

    def begin_shutdown(self, reason):
        self.healthy = False

    async def generate_request(self, obj, request=None):
        while not self.release_warmup.is_set():
            await asyncio.sleep(0.02)
        if self.fail_with is not None:
            raise self.fail_with
        obj.normalize()
        yield {"text": "ok", "output_ids": [1], "meta_info": {
            "id": obj.rid[0], "finish_reason": {"type": "length", "length": 1}, "prompt_tokens": 3,
            "completion_tokens": 1, "cached_tokens": 0, "e2e_latency": 0.01}}

    async def abort_request(self, rid):
        self.aborted.append(rid)

    async def flush_cache(self):
        return True

    async def get_internal_state(self):
        return [{"running": 2, "waiting": 1, "kv_used_tokens": 250, "kv_capacity_tokens": 1000},
                {"running": 1, "waiting": 0, "kv_used_tokens": 250, "kv_capacity_tokens": 1000}]

    def shutdown(self):
        pass


def release(tm, url):
    """Let the warm-up finish and wait for /health 200 (before a test makes the stub fail)."""
    tm.release_warmup.set()
    deadline = time.time() + 10
    while requests.get(url + "/health", timeout=5).status_code != 200:
        assert time.time() < deadline, "the stub server never became healthy"
        time.sleep(0.02)


@pytest.fixture()
def stub_server(tmp_path):
    tm = StubTM(str(tmp_path))
    metrics = MetricsCollector(model_name="stub")
    tm.metrics = metrics
    app = create_app(tm, metrics)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield tm, url
    server.should_exit = True
    thread.join(10)


def test_health_waits_for_warmup(stub_server):
    tm, url = stub_server
    for _ in range(3):
        r = requests.get(url + "/health", timeout=5)
        assert r.status_code == 503 and "warm-up" in r.json()["error"]["message"]
        time.sleep(0.05)
    tm.release_warmup.set()
    deadline = time.time() + 10
    while requests.get(url + "/health", timeout=5).status_code != 200:
        assert time.time() < deadline
        time.sleep(0.05)
    tm.healthy = False  # a worker died
    r = requests.get(url + "/health", timeout=5)
    assert r.status_code == 503 and "worker" in r.json()["error"]["message"]
    assert requests.get(url + "/health_generate", timeout=5).status_code == 503


def test_tm_errors_map_to_status(stub_server):
    tm, url = stub_server
    release(tm, url)
    body = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 1}}
    assert requests.post(url + "/generate", json=body, timeout=5).status_code == 200
    tm.fail_with = ValueError("the prompt is too long: at most 100 tokens")
    r = requests.post(url + "/generate", json=body, timeout=5)
    assert r.status_code == 400 and "at most 100" in r.json()["error"]["message"]
    r = requests.post(url + "/v1/completions", json={"prompt": [1, 2], "max_tokens": 1}, timeout=5)
    assert r.status_code == 400 and "at most 100" in r.json()["error"]["message"]
    tm.fail_with = ServerUnavailableError("the server lost a process")
    r = requests.post(url + "/generate", json={**body, "stream": True}, timeout=5)
    assert r.status_code == 503 and "lost a process" in r.json()["error"]["message"]
    tm.fail_with = None
    assert requests.post(url + "/generate", json=body, timeout=5).status_code == 200


def test_metrics_refresh_load_from_internal_state(stub_server):
    tm, url = stub_server
    release(tm, url)
    text = requests.get(url + "/metrics", timeout=5).text
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["sglang:num_running_reqs"] == 3
    assert values["sglang:num_queue_reqs"] == 1
    assert values["sglang:num_used_tokens"] == 500
    assert values["sglang:token_usage"] == pytest.approx(0.25)


def test_metrics_collector_observations():
    m = MetricsCollector(model_name="m")
    m.observe_ttft(0.2)
    m.observe_inter_token(0.01)
    m.observe_inter_token(0.03)
    m.observe_e2e(1.5)
    m.count_tokens(10, 4)
    m.count_tokens(0, 0)
    text = m.render().decode()
    assert 'sglang:prompt_tokens_total{model_name="m"} 10.0' in text
    assert 'sglang:generation_tokens_total{model_name="m"} 4.0' in text
    assert 'sglang:inter_token_latency_seconds_count{model_name="m"} 2.0' in text
    assert 'sglang:inter_token_latency_seconds_sum{model_name="m"} 0.04' in text
    assert 'sglang:e2e_request_latency_seconds_bucket{le="2.0",model_name="m"} 1.0' in text
    assert 'sglang:time_to_first_token_seconds_bucket{le="0.1",model_name="m"} 0.0' in text
    # two collectors do not share a registry
    assert "sglang:prompt_tokens_total" in MetricsCollector(model_name="x").render().decode()


# ---- failed instances and ServingState ----------------------------------------------------------------------
def test_health_503_names_failed_instances(stub_server):
    tm, url = stub_server
    release(tm, url)
    tm.health_problems = lambda: ["instance on devices [2, 3] failed: watchdog: no progress for 300 s"]
    tm.failed_instances = [([2, 3], "watchdog: no progress for 300 s")]
    for path in ("/health", "/health_generate"):
        r = requests.get(url + path, timeout=5)
        assert r.status_code == 503
        body = r.json()
        assert "[2, 3]" in body["error"]["message"] and "watchdog" in body["error"]["message"]
        assert body["failed_instances"] == [{"devices": [2, 3], "reason": "watchdog: no progress for 300 s"}]
    # requests still go to the live instances
    r = requests.post(url + "/generate", json={"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}},
                      timeout=5)
    assert r.status_code == 200
    tm.health_problems = lambda: []
    assert requests.get(url + "/health", timeout=5).status_code == 200


class FakeChild:
    def __init__(self, name):
        self.name, self.alive, self.pid = name, True, 1000 + len(name)

    def is_alive(self):
        return self.alive

    def kill(self):
        self.alive = False


def _bare_tm(children):
    from sglang.srt.managers.tokenizer_manager import TokenizerManager

    tm = object.__new__(TokenizerManager)
    tm.child_processes = children
    tm.failed_instances, tm.rid_to_state, tm._reply_waiters = [], {}, {}
    tm._healthy, tm._dead_reason, tm._shutdown = True, "", False
    tm.fatal = []
    tm.on_fatal = tm.fatal.append
    return tm


def test_serving_state_kills_hung_workers_and_reports_failures():
    from sglang.srt.managers.io_struct import ServingState

    children = [FakeChild("detokenizer"), FakeChild("controller"), FakeChild("worker-0"), FakeChild("worker-1"),
                FakeChild("worker-10")]
    tm = _bare_tm(children)
    tm._on_serving_state(ServingState(1, [[1]], ["watchdog: no progress"], kill_ranks=[1]))
    assert [c.alive for c in children] == [True, True, True, False, True]
    assert tm.failed_instances == [([1], "watchdog: no progress")]
    assert tm.is_healthy() and "devices [1]" in tm.health_problems()[0]
    assert tm.fatal == []
    tm._on_serving_state(ServingState(0, [[1], [0]], ["watchdog: no progress", "worker exited"]))
    assert not tm.is_healthy() and tm.fatal and "no instance left serving" in tm.fatal[0]
    assert len(tm.health_problems()) == 3


def test_request_limits_flags():
    from sglang.srt.managers.tokenizer_manager import RequestLimits

    lim = RequestLimits.from_server_args(ServerArgs(model_path="/x"), max_req_input_len=1000)
    assert lim.max_body_bytes == 32 * 2**20 and lim.max_prompt_chars == 16000
    assert (lim.max_parallel_samples, lim.max_top_logprobs_num, lim.max_batch_prompts) == (64, 20, 1024)
    for bad in ({"max_parallel_samples": 0}, {"max_request_body_size": "much"}, {"timeout_request_read": 0},
                {"limit_concurrency": 0}, {"max_stop_str_len": -1}):
        with pytest.raises(ValueError, match="--" + next(iter(bad)).replace("_", "-")):
            RequestLimits.from_server_args(ServerArgs(model_path="/x", **bad))


# ---- detokenizer ---------------------------------------------------------------------------------------------
class FlakyTokenizer:
    """Decodes ids as letters; id 13 cannot be decoded."""

    def decode(self, ids, **kw):
        if 13 in ids:
            raise OverflowError("out of range integral type conversion attempted")
        return "".join(chr(97 + i % 26) for i in ids)


def _delta(rid, ids, finish=None):
    from sglang.srt.managers.io_struct import ReqOutputDelta

    return ReqOutputDelta(rid=rid, new_output_ids=ids, finish_reason=finish, prompt_tokens=1,
                          completion_tokens=0, cached_tokens=0)


def test_detokenizer_sends_new_ids_and_new_text():
    from sglang.srt.managers.detokenizer_manager import IncrementalDetokenizer

    d = IncrementalDetokenizer(FlakyTokenizer())
    outs = [d.update_batch([_delta("a", ids)])[0] for ids in ([0, 1], [2], [3, 4])]
    assert [o.output_ids for o in outs] == [[0, 1], [2], [3, 4]]
    assert [(o.text_delta, o.text_offset) for o in outs] == [("ab", -1), ("c", -1), ("de", -1)]
    last = d.update_batch([_delta("a", [5], {"type": "length", "length": 6})])[0]
    assert last.output_ids == [5] and last.text_delta == "f" and "a" not in d.states


def test_streamed_text_deltas_reassemble_to_the_non_streamed_text():
    """Deltas (new text only) rebuild the cumulative text at every step, and the final delta's text_offset
    cuts a stop string that was already streamed, so the stream ends where the non-streamed answer does."""
    from sglang.srt.managers.detokenizer_manager import IncrementalDetokenizer
    from sglang.srt.managers.io_struct import apply_text_delta

    for trim, want in ((None, "abcdef"), ("cd", "ab"), ("f", "abcde"), ("zz", "abcdef")):
        d = IncrementalDetokenizer(FlakyTokenizer())
        text, seen = "", []
        chunks = [[0], [1, 2], [3], [4], [5]]
        for k, ids in enumerate(chunks):
            last = k == len(chunks) - 1
            delta = _delta("s", ids, {"type": "stop", "matched": trim} if last else None)
            delta.trim_stop_str = trim if last else None
            text = apply_text_delta(text, d.update_batch([delta])[0])
            seen.append(text)
        assert seen[:-1] == ["a", "abc", "abcd", "abcde"] and text == want, trim
        whole = _delta("w", [0, 1, 2, 3, 4, 5], {"type": "stop", "matched": trim})
        whole.trim_stop_str = trim
        assert apply_text_delta("", IncrementalDetokenizer(FlakyTokenizer()).update_batch([whole])[0]) == want


def test_detokenizer_survives_a_request_whose_decode_fails():
    from sglang.srt.managers.detokenizer_manager import IncrementalDetokenizer
    from sglang.srt.managers.tokenizer_manager import RequestFailedError, _raise_for_rejection

    d = IncrementalDetokenizer(FlakyTokenizer())
    outs = d.update_batch([_delta("bad", [13]), _delta("good", [0])])
    bad, good = outs
    assert good.text_delta == "a" and good.delta.finish_reason is None
    fr = bad.delta.finish_reason
    assert fr["type"] == "abort" and fr["status_code"] == 500 and "OverflowError" in fr["message"]
    assert bad.failed_in_detokenizer and not good.failed_in_detokenizer  # the TM aborts it in the scheduler
    with pytest.raises(RequestFailedError, match="decoding the output failed"):
        _raise_for_rejection({"meta_info": {"finish_reason": fr}})
    # later deltas of the failed request are dropped; its final one is forwarded once, empty
    outs = d.update_batch([_delta("bad", [1]), _delta("good", [1])])
    assert [o.rid for o in outs] == ["good"] and outs[0].text_delta == "b"
    outs = d.update_batch([_delta("bad", [2], {"type": "abort", "status_code": 499}), _delta("good", [2])])
    assert [o.rid for o in outs] == ["bad", "good"] and outs[0].output_ids == [] and "bad" not in d.failed
    assert not outs[0].failed_in_detokenizer  # the scheduler's own final word: nothing left to abort
    assert outs[1].text_delta == "c"


def test_load_report_says_the_largest_request_now_and_by_merging(stub_server):
    """/get_load and /get_server_info: per instance the largest request its KV pool holds (within the context),
    for the host the largest now and the largest it accepts by merging (the TM's prompt limit + 1 token)."""
    tm, url = stub_server
    release(tm, url)
    tm.model_config.context_len = 1000
    tm.max_req_input_len = 449  # a Gyges host: the largest instance it can form holds 450 tokens

    async def states():
        return [{"instance_id": 0, "kv_capacity_tokens": 200, "kv_used_tokens": 10},
                {"instance_id": 1, "kv_capacity_tokens": 120, "kv_used_tokens": 0}]

    tm.get_internal_state = states
    load = requests.get(url + "/get_load", timeout=5).json()
    assert [i["max_request_tokens"] for i in load["instances"]] == [200, 120]
    assert (load["max_request_tokens_now"], load["max_request_tokens_merged"], load["load"]) == (200, 450, 10)
    info = requests.get(url + "/get_server_info", timeout=5).json()
    assert (info["max_request_tokens_now"], info["max_request_tokens_merged"]) == (200, 450)
    tm.model_config.context_len = 150  # the context bounds both
    tm.max_req_input_len = 149
    load = requests.get(url + "/get_load", timeout=5).json()
    assert [i["max_request_tokens"] for i in load["instances"]] == [150, 120]
    assert (load["max_request_tokens_now"], load["max_request_tokens_merged"]) == (150, 150)
