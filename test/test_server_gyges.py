"""Gyges admin API over HTTP: GET /gyges/topology and POST /gyges/transform on a real server (2 CPU devices)."""

import pytest
import requests

from server_utils import ServerProcess, stop_and_check

KEY = "gyges-secret"


@pytest.fixture(scope="module")
def server(test_model):
    srv = ServerProcess(test_model("llama_kv4"), "--dp-size", "2", "--enable-gyges", "--page-size", "4",
                        "--max-total-tokens", "64", "--dtype", "float32", api_key=KEY)
    yield srv
    stop_and_check(srv)


def test_admin_api_needs_the_key(server):
    r = requests.get(server.url + "/gyges/topology", timeout=30)
    assert r.status_code == 401
    r = requests.post(server.url + "/gyges/transform", json={"devices": [0, 1], "tp": 2}, timeout=30)
    assert r.status_code == 401


def test_topology_merge_split_over_http(server):
    topo = server.get("/gyges/topology").json()
    assert [(i["devices"], i["tp"], i["state"]) for i in topo["instances"]] == [([0], 1, "serving"), ([1], 1, "serving")]
    assert all(i["kv_capacity_tokens"] == 64 for i in topo["instances"])

    long_prompt = [1] + [7 + (i * 13) % 400 for i in range(89)]
    r = server.post("/generate", json={"input_ids": long_prompt, "sampling_params": {"max_new_tokens": 4}})
    assert r.status_code == 400 and "64 tokens" in r.json()["error"]["message"]

    r = server.post("/gyges/transform", json={"devices": [0, 1], "tp": 2})
    assert r.status_code == 200, r.text
    bd = r.json()
    for key in ("running_requests", "kv_bytes", "kv_ms", "weight_bytes", "weight_ms", "pause_ms",
                "peak_extra_bytes", "total_ms"):
        assert key in bd and bd[key] >= 0, key
    assert bd["kind"] == "merge" and bd["tp"] == 2
    topo = server.get("/gyges/topology").json()
    assert [(i["devices"], i["tp"]) for i in topo["instances"]] == [([0, 1], 2)]
    assert topo["history"][-1]["kind"] == "merge" and topo["history"][-1]["devices"] == [0, 1]

    out = server.generate(input_ids=long_prompt, sampling_params={"max_new_tokens": 4, "temperature": 0})
    assert out["meta_info"]["completion_tokens"] == 4

    r = server.post("/gyges/transform", json={"devices": [0, 1], "tp": 1})
    assert r.status_code == 200 and r.json()["kind"] == "split"
    topo = server.get("/gyges/topology").json()
    assert [(i["devices"], i["tp"]) for i in topo["instances"]] == [([0], 1), ([1], 1)]


@pytest.mark.parametrize("body, fragment", [
    ({"devices": [1, 2], "tp": 2}, ""),
    ({"devices": [0, 1], "tp": 4}, ""),
    ({"devices": "all", "tp": 2}, "devices"),
    ({"devices": [0, 1]}, "tp"),
])
def test_bad_transform_requests_get_400(server, body, fragment):
    r = server.post("/gyges/transform", json=body)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]["message"]
    assert server.generate(text="ok", sampling_params={"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2


def test_streamed_request_too_long_for_every_instance_gets_400(server):
    long_prompt = [1] + [9 + (i * 7) % 400 for i in range(99)]
    r = server.post("/generate", json={"input_ids": long_prompt, "stream": True,
                                       "sampling_params": {"max_new_tokens": 4}})
    assert r.status_code == 400 and "64 tokens" in r.json()["error"]["message"]
