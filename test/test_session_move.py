"""Moving a conversation's KV between two running instances (Engine.move_session, POST /sessions/move).

dp 2 CPU demo model: a session's first turn runs and is pinned on one instance; its KV is moved to the other
(source exports the pinned path's page bytes, the controller forwards them, the destination adopts and pins
them); the next turn runs there with the moved prefix cached and gives the same greedy tokens as the whole
conversation sent from scratch; the source's pages are all free again; bad moves are refused (ValueError, a
400 over HTTP).
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    import sglang
    from sglang.srt.demo_model import DemoModelSpec, make_demo_model

    model = str(tmp_path_factory.mktemp("session-move-model"))
    make_demo_model(model, DemoModelSpec(arch="llama", seed=11, num_key_value_heads=2))
    eng = sglang.Engine(model_path=model, device="cpu", dtype="float32", log_level="warning", dp_size=2,
                        page_size=4, max_total_tokens=512)
    yield eng
    eng.shutdown()


def _by_instance(eng) -> dict:
    return {s["instance_id"]: s for s in eng.get_internal_state()}


def test_move_session_between_instances(engine):
    sp = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
    assert engine.flush_cache()
    first_input = [(i * 29) % 450 + 3 for i in range(70)]
    second_input = [9, 8, 7, 6, 5]
    sid = engine.open_session(0)
    t1 = engine.generate(input_ids=first_input, sampling_params=sp, session_params={"id": sid})
    states = _by_instance(engine)
    src = next(i for i, s in states.items() if s["sessions_pinned"] == 1)
    dst = next(i for i in states if i != src)
    moved = engine.move_session(sid, dst)
    assert moved["instance"] == dst and moved["tokens"] >= 64 and moved["bytes"] > 0
    states = _by_instance(engine)
    assert states[src]["sessions_pinned"] == 0 and states[src]["free_pages"] == states[src]["num_pages"]
    assert states[dst]["sessions_pinned"] == 1 and states[dst]["kv_moved_bytes"] == moved["bytes"]
    t2 = engine.generate(input_ids=second_input, sampling_params=sp,
                         session_params={"id": sid, "rid": t1["meta_info"]["id"]})
    assert t2["meta_info"]["cached_tokens"] >= 64  # found on dst: the turn went where the KV is now
    engine.close_session(sid)
    assert engine.flush_cache()
    whole = engine.generate(input_ids=first_input + t1["output_ids"] + second_input, sampling_params=sp)
    assert whole["meta_info"]["cached_tokens"] == 0 and whole["output_ids"] == t2["output_ids"]
    assert engine.flush_cache()
    assert all(s["free_pages"] == s["num_pages"] for s in engine.get_internal_state())


def test_bad_moves_are_refused(engine):
    with pytest.raises(ValueError, match="no open session"):
        engine.move_session("nope", 1)
    sid = engine.open_session(0)
    with pytest.raises(ValueError, match="no KV"):
        engine.move_session(sid, 1)  # open, but no turn has run: nothing pinned anywhere
    engine.generate(input_ids=list(range(3, 40)), sampling_params={"max_new_tokens": 2},
                    session_params={"id": sid})
    home = next(s["instance_id"] for s in engine.get_internal_state() if s["sessions_pinned"] == 1)
    with pytest.raises(ValueError, match="already on instance"):
        engine.move_session(sid, home)
    with pytest.raises(ValueError, match="no instance 7"):
        engine.move_session(sid, 7)
    engine.close_session(sid)


def test_move_session_across_tp_degrees(tmp_path_factory):
    """4 CPU devices as TP2 + TP1 + TP1: a session's KV moves from where its first turn ran to an instance of the
    other TP degree and on to a third; each rank of a TP2 side sends or writes its own heads. The next turn finds
    the whole prefix there and answers as the conversation sent from scratch; every page comes back."""
    import sglang
    from sglang.srt.demo_model import DemoModelSpec, make_demo_model

    model = str(tmp_path_factory.mktemp("session-move-tp-model"))
    make_demo_model(model, DemoModelSpec(arch="llama", seed=11, num_key_value_heads=2))
    eng = sglang.Engine(model_path=model, device="cpu", dtype="float32", log_level="warning", dp_size=4,
                        enable_gyges=True, page_size=4, max_total_tokens=512)
    try:
        eng.gyges_transform([0, 1], 2)
        tp_of = {i["id"]: i["tp"] for i in eng.gyges_topology()["instances"]}
        assert sorted(tp_of.values()) == [1, 1, 2]
        sp = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
        first_input = [(i * 31) % 450 + 3 for i in range(70)]
        second_input = [9, 8, 7, 6, 5]
        sid = eng.open_session(0)
        t1 = eng.generate(input_ids=first_input, sampling_params=sp, session_params={"id": sid})
        home = next(s["instance_id"] for s in eng.get_internal_state() if s["sessions_pinned"] == 1)
        path = [home]
        for _ in range(3):  # each move to the other TP degree: TP2 both exports and adopts at least once
            other = sorted((i for i in tp_of if tp_of[i] != tp_of[path[-1]]), key=lambda i: i in path)
            moved = eng.move_session(sid, other[0])
            assert moved["instance"] == other[0] and moved["tokens"] >= 64 and moved["bytes"] > 0
            path.append(other[0])
        states = {s["instance_id"]: s for s in eng.get_internal_state()}
        assert states[path[-1]]["sessions_pinned"] == 1
        assert all(states[i]["sessions_pinned"] == 0 for i in tp_of if i != path[-1])
        t2 = eng.generate(input_ids=second_input, sampling_params=sp,
                          session_params={"id": sid, "rid": t1["meta_info"]["id"]})
        assert t2["meta_info"]["cached_tokens"] >= 64
        eng.close_session(sid)
        assert eng.flush_cache()
        whole = eng.generate(input_ids=first_input + t1["output_ids"] + second_input, sampling_params=sp)
        assert whole["meta_info"]["cached_tokens"] == 0 and whole["output_ids"] == t2["output_ids"]
        assert eng.flush_cache()
        assert all(s["free_pages"] == s["num_pages"] for s in eng.get_internal_state())
    finally:
        eng.shutdown()
