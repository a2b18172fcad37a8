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


# ----------------------------------------------------------------------------------------------------------
# SGLang's session API on this server (issue 13): multi-turn sessions give the tokens of the full conversation
# sent without a session, reuse the pinned prefix (cached_tokens) where it lives, survive a merge and a split,
# release their pages on close; bad ids get a 400 and the server keeps serving. (The KV pool holds 64 tokens
# per instance, --session-kv-budget 0.5 of it: 7 pages pinned at most here.)
# ----------------------------------------------------------------------------------------------------------
SP = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}
PAGE = 4
TURNS = [[5, 17, 33, 41, 52, 60, 71, 80, 93], [110, 120, 130, 140, 150], [200, 210, 220, 230]]


def _open(server, **body) -> str:
    r = server.post("/open_session", json={"capacity_of_str_len": 1000, **body})
    assert r.status_code == 200, r.text
    return r.json()


def _turn(server, sid, rid, ids):
    return server.generate(input_ids=ids, sampling_params=SP, session_params={"id": sid, "rid": rid})


def _without_session(server, turns, outputs):
    """Each turn's output when the whole conversation so far is sent as one prompt, from an empty cache."""
    assert server.post("/flush_cache").status_code == 200
    full, outs = [], []
    for ids, prev in zip(turns, [None] + outputs[:-1]):
        full = full + (prev or []) + ids
        outs.append(server.generate(input_ids=full, sampling_params=SP)["output_ids"])
    return outs


def _session_pages(server):
    return {s["instance_id"]: (s["sessions_pinned"], s["session_pinned_pages"], s["free_pages"])
            for s in server.wait_idle()}


def test_multi_turn_session_matches_full_conversation_and_reuses_its_kv(server):
    assert server.post("/flush_cache").status_code == 200
    before = _session_pages(server)
    sid = _open(server)
    rid, outs, cached, homes = None, [], [], []
    for ids in TURNS:
        out = _turn(server, sid, rid, ids)
        rid = out["meta_info"]["id"]
        outs.append(out["output_ids"])
        cached.append(out["meta_info"]["cached_tokens"])
        homes.append({i: p[0] for i, p in _session_pages(server).items()})
    # turn k reuses everything the earlier turns computed, page-aligned: it was placed where the KV lives
    prefix = [len(TURNS[0]) + len(outs[0]) - 1, len(TURNS[0]) + len(outs[0]) + len(TURNS[1]) + len(outs[1]) - 1]
    assert cached == [0] + [p // PAGE * PAGE for p in prefix]
    assert all(sum(h.values()) == 1 for h in homes) and homes[0] == homes[1] == homes[2]
    r = server.post("/close_session", json={"session_id": sid})
    assert r.status_code == 200, r.text
    assert _session_pages(server) == before  # every page the session held is free again
    assert outs == _without_session(server, TURNS, outs)


def test_session_survives_merge_and_split(server):
    sid = _open(server, session_id="merge-split")
    assert sid == "merge-split"
    out1 = _turn(server, sid, None, TURNS[0])
    r = server.post("/gyges/transform", json={"devices": [0, 1], "tp": 2})
    assert r.status_code == 200, r.text
    out2 = _turn(server, sid, out1["meta_info"]["id"], TURNS[1])
    assert out2["meta_info"]["cached_tokens"] > 0  # the pin moved with the merge
    r = server.post("/gyges/transform", json={"devices": [0, 1], "tp": 1})
    assert r.status_code == 200, r.text
    pinned = {i: p[0] for i, p in _session_pages(server).items()}
    assert sorted(pinned.values()) == [0, 1]  # the split kept the session whole, on one part
    out3 = _turn(server, sid, out2["meta_info"]["id"], TURNS[2])
    assert out3["meta_info"]["cached_tokens"] >= out2["meta_info"]["cached_tokens"]  # placed on that part
    assert server.post("/close_session", json={"session_id": sid}).status_code == 200
    outs = [out1["output_ids"], out2["output_ids"], out3["output_ids"]]
    assert outs == _without_session(server, TURNS, outs)


def test_bad_session_requests_get_400_and_the_server_keeps_serving(server):
    sid = _open(server)
    done = _turn(server, sid, None, TURNS[0])["meta_info"]["id"]
    bad = [
        ("/open_session", {"capacity_of_str_len": 10, "session_id": sid}, "already open"),
        ("/open_session", {"session_id": "x"}, "capacity_of_str_len"),
        ("/close_session", {"session_id": "never-opened"}, "no open session"),
        ("/generate", {"input_ids": [5], "session_params": {"id": "never-opened"}}, "not an open session"),
        ("/generate", {"input_ids": [5], "session_params": {"id": sid, "rid": "nope"}}, "not a request of"),
        ("/generate", {"input_ids": [5], "session_params": {"id": sid, "rid": done, "offset": 999}}, "out of range"),
        ("/generate", {"input_ids": [5], "session_params": {"id": sid, "offset": "x"}}, "offset"),
        ("/generate", {"input_ids": [5], "session_params": [{"id": sid}, {"id": sid}]}, "one entry per prompt"),
    ]
    for path, body, fragment in bad:
        r = server.post(path, json=body)
        assert r.status_code == 400, (path, body, r.text)
        assert fragment in r.json()["error"]["message"], (fragment, r.text)
    assert server.post("/close_session", json={"session_id": sid}).status_code == 200
    r = server.post("/generate", json={"input_ids": [5], "session_params": {"id": sid, "rid": done}})
    assert r.status_code == 400 and "not an open session" in r.json()["error"]["message"]
    assert server.generate(input_ids=[5, 6, 7], sampling_params=SP)["meta_info"]["completion_tokens"] == 4
