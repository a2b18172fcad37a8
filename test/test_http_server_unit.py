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

    def is_healthy(self):
        return self.healthy

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
    tm.release_warmup.set()
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
    tm.release_warmup.set()
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
