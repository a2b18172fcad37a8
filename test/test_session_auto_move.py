"""The controller moving sessions by itself (--session-auto-move; gyges.policies.session_moves).

Unit: the pure rule (decide_moves / SessionMover): a hinted session on a loaded home moves to a clearly less
loaded instance of the same TP with room, only when the queueing saved costs more than the copy; never with a
turn running, in its cooldown, towards another TP or an instance without room; rebalancing sheds idle sessions
until the pinned KV is even; hypothesis: a move always lowers the predicted cost of the session's next turn.
Live (Engine, dp 2, CPU demo model): a hinted session whose home gets loaded is moved before its next turn,
which is placed on the destination, finds its prefix cached there and gives the same greedy tokens as the whole
conversation without a session; every page is free after close.
"""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gyges.policies.affinity import AffinityCandidate, placement_cost
from gyges.policies.session_moves import (
    InstanceForMoves,
    MoveRuleConfig,
    SessionMover,
    SessionState,
    decide_moves,
    move_gain,
)


def inst(base, waiting=0, queued=0, running=0, room=4096, pinned=0, tp=1):
    return InstanceForMoves(AffinityCandidate(base, tp, running, waiting, queued, 0), room, pinned)


def hinted(sid="s", home=0, pinned=512, new=32, at=10.5, **kw):
    return SessionState(sid, home, pinned, new, next_turn_at=at, **kw)


def test_hinted_session_leaves_a_loaded_home():
    moves = decide_moves(10.0, [hinted()], [inst(0, waiting=3, queued=3000, running=2), inst(1)])
    assert [(m.session_id, m.src, m.dst, m.reason) for m in moves] == [("s", 0, 1, "hint")]
    assert moves[0].gain > 0


def test_no_move_when_the_queue_saved_is_less_than_the_copy():
    # 20 queued tokens at home: less than copying 512 tokens' KV (0.1 x their prefill)
    assert decide_moves(10.0, [hinted()], [inst(0, waiting=1, queued=20), inst(1)]) == []
    cheap = MoveRuleConfig(copy_ratio=0.01)
    assert [m.dst for m in decide_moves(10.0, [hinted()], [inst(0, waiting=1, queued=20), inst(1)], cheap)] == [1]


@pytest.mark.parametrize("case", ["running", "cooldown", "far", "tp", "room", "not_less_loaded", "home_gone"])
def test_sessions_that_stay(case):
    sess, insts = hinted(), [inst(0, waiting=3, queued=3000), inst(1)]
    if case == "running":
        sess = hinted(turn_running=True)
    elif case == "cooldown":
        sess = hinted(not_before=11.0)
    elif case == "far":
        sess = hinted(at=30.0)  # its turn is far off: decided when it is due
    elif case == "tp":
        insts = [inst(0, waiting=3, queued=3000), inst(1, tp=2)]
    elif case == "room":
        insts = [inst(0, waiting=3, queued=3000), inst(1, room=500)]
    elif case == "not_less_loaded":
        insts = [inst(0, waiting=3, queued=3000), inst(1, waiting=2, queued=2000)]
    elif case == "home_gone":
        sess = hinted(home=5)
    assert decide_moves(10.0, [sess], insts) == []


def test_hinted_moves_first_and_one_per_call():
    sessions = [hinted("late", at=11.4), hinted("soon", at=10.2), SessionState("idle", 0, 64, 8)]
    insts = [inst(0, waiting=4, queued=4000, pinned=4000), inst(1)]
    assert [m.session_id for m in decide_moves(10.0, sessions, insts)] == ["soon"]
    many = decide_moves(10.0, sessions, insts, MoveRuleConfig(max_moves=3))
    assert [(m.session_id, m.reason) for m in many] == [("soon", "hint"), ("late", "hint"), ("idle", "rebalance")]


def test_rebalancing_stops_when_pinned_kv_is_even():
    sessions = [SessionState(f"s{i}", 0, 256, 8) for i in range(6)]  # 1536 pinned tokens at home, none there
    insts = [inst(0, waiting=4, queued=4000, pinned=1536), inst(1)]
    moves = decide_moves(10.0, sessions, insts, MoveRuleConfig(max_moves=10))
    assert len(moves) == 3 and {m.reason for m in moves} == {"rebalance"} and {m.dst for m in moves} == {1}
    # a hint long past counts as no hint
    assert decide_moves(10.0, [hinted(at=1.0)], insts)[0].reason == "rebalance"


def test_mover_bookkeeping():
    mover = SessionMover(MoveRuleConfig(lead_s=1.0, cooldown_s=5.0))
    homes = {"s": 0}
    loaded = [inst(0, waiting=3, queued=3000), inst(1)]
    mover.turn_sent("s", "r1", 512, 40, next_turn_in_s=2.0)
    assert mover.plan(0.0, homes, loaded) == []  # its turn is running
    mover.turn_finished("r1", 100.0)  # next turn expected at 102
    assert mover.plan(100.5, homes, loaded) == []  # not yet due
    (mv,) = mover.plan(101.2, homes, loaded)
    assert (mv.src, mv.dst, mv.reason) == (0, 1, "hint")
    mover.move_done("s", False, 101.2)  # refused: retried soon
    assert mover.plan(101.3, homes, loaded) == []
    assert len(mover.plan(101.5, homes, loaded)) == 1
    mover.move_done("s", True, 101.5)
    assert mover.plan(102.0, {"s": 1}, loaded[::-1]) == []  # cooldown
    mover.closed("s")
    assert mover.plan(200.0, homes, loaded) == [] and mover.moves_done == 1 and mover.moves_refused == 1


loads = st.tuples(st.integers(0, 8), st.integers(0, 8000), st.integers(0, 16))  # waiting, queued, running


def cand(base, load, cached=0):
    waiting, queued, running = load
    return AffinityCandidate(base, 1, running, waiting, queued, 0, cached)


@settings(max_examples=150, deadline=None)
@given(home=loads, other=loads, pinned=st.integers(16, 3000), new=st.integers(1, 500),
       copy_ratio=st.floats(0.0, 1.0))
def test_a_move_lowers_the_predicted_cost_of_the_next_turn(home, other, pinned, new, copy_ratio):
    """Whenever the rule moves a session, its next turn's cost at the destination (cached) plus the copy is
    below the cheapest place without the move (home cached, or the other instance recomputing); when it does
    not, the move would not pay or the destination is not clearly less loaded."""
    cfg = MoveRuleConfig(copy_ratio=copy_ratio)
    insts = [InstanceForMoves(cand(0, home), 4096), InstanceForMoves(cand(1, other), 4096)]
    sess = hinted(pinned=pinned, new=new)
    moves = decide_moves(10.0, [sess], insts, cfg)
    prompt = pinned + new
    stay = min(placement_cost(prompt, cand(0, home, pinned)), placement_cost(prompt, cand(1, other)))
    moved = placement_cost(prompt, cand(1, other, pinned)) + copy_ratio * placement_cost(pinned, cand(1, (0, 0, 0)))
    assert move_gain(sess, cand(0, home), cand(1, other), [cand(1, other)], cfg) == pytest.approx(stay - moved)
    if moves:
        assert moves[0].dst == 1 and moved < stay
    else:
        assert moved >= stay or placement_cost(1, cand(1, other)) > 0.5 * placement_cost(1, cand(0, home))


# ---- the controller's move protocol (no processes: its sockets are lists) -------------------------------
class _Socket(list):
    def send_pyobj(self, msg):
        self.append(msg)


def _controller():
    from types import SimpleNamespace

    from sglang.srt.managers.controller import Controller

    ctl = Controller.__new__(Controller)
    ctl.moves_in_flight, ctl.session_home, ctl.active, ctl.policy = {}, {"s": 0}, None, None
    ctl.views = {0: SimpleNamespace(), 1: SimpleNamespace()}
    ctl.send_to_worker = {0: _Socket(), 1: _Socket()}
    ctl.send_to_tokenizer = _Socket()
    ctl.session_mover = SessionMover()
    ctl.routed_turns = []
    ctl.route = lambda req: ctl.routed_turns.append(req) if ctl._move_of(req.session_id) is None else None
    return ctl


def _turn(rid):
    from types import SimpleNamespace

    return SimpleNamespace(rid=rid, session_id="s")


def test_a_refused_move_gives_the_kv_back_to_the_source():
    from sglang.srt.managers.controller import Controller
    from sglang.srt.managers.io_struct import MoveSessionReq, MoveSessionReqOutput, SessionKVTransfer

    ctl = _controller()
    Controller.move_session(ctl, MoveSessionReq("m1", "s", 1))
    (ask,) = ctl.send_to_worker[0]
    assert isinstance(ask, SessionKVTransfer) and ask.kv is None and ask.dst_instance == 1
    mv = ctl.moves_in_flight["m1"]
    mv.held.append(_turn("t2"))  # a turn of the session arriving meanwhile waits for the move
    exported = SessionKVTransfer("m1", "s", 1, tokens=[1, 2, 3, 4], kv="page bytes")
    Controller._session_exported(ctl, exported)
    assert ctl.send_to_worker[1] == [exported] and ctl.session_home == {"s": 1}
    Controller._session_adopted(ctl, MoveSessionReqOutput("m1", False, "instance has no room"))
    back = ctl.send_to_worker[0][-1]  # the destination refused: the source adopts its own KV again
    assert (back.dst_instance, back.tokens, back.kv) == (0, [1, 2, 3, 4], "page bytes")
    assert ctl.session_home == {"s": 0} and ctl.routed_turns == []
    assert [(o.success, o.message) for o in ctl.send_to_tokenizer] == [(False, "instance has no room")]
    Controller._session_adopted(ctl, MoveSessionReqOutput("m1", True, "", 4, 64))
    assert ctl.moves_in_flight == {} and [t.rid for t in ctl.routed_turns] == ["t2"]
    assert len(ctl.send_to_tokenizer) == 1  # the client was answered once


def test_a_session_closed_during_a_move_is_closed_where_its_kv_went():
    from sglang.srt.managers.controller import Controller
    from sglang.srt.managers.io_struct import CloseSessionReqInput, MoveSessionReqOutput, SessionKVTransfer

    ctl = _controller()
    Controller._start_move(ctl, "a1", "s", 0, 1, auto=True)
    Controller._session_exported(ctl, SessionKVTransfer("a1", "s", 1, tokens=[1, 2, 3, 4], kv="b"))
    ctl.moves_in_flight["a1"].closed = True  # /close_session came (sent to both before the adoption)
    Controller._session_adopted(ctl, MoveSessionReqOutput("a1", True, "", 4, 64))
    assert [m.session_id for m in ctl.send_to_worker[1] if isinstance(m, CloseSessionReqInput)] == ["s"]
    assert ctl.send_to_tokenizer == [] and "s" not in ctl.session_home  # automatic: no client to answer
    Controller._start_move(ctl, "a2", "s", 0, 1, auto=True)  # closed before the source answered: dropped
    ctl.moves_in_flight["a2"].closed = True
    Controller._session_exported(ctl, SessionKVTransfer("a2", "s", 1, tokens=[1], kv="b"))
    assert ctl.moves_in_flight == {} and not any(isinstance(m, SessionKVTransfer) and m.kv is not None
                                                 for m in ctl.send_to_worker[1][1:])


# ---- live ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    import sglang
    from sglang.srt.demo_model import DemoModelSpec, make_demo_model

    model = str(tmp_path_factory.mktemp("auto-move-model"))
    make_demo_model(model, DemoModelSpec(arch="llama", seed=11, num_key_value_heads=2))
    eng = sglang.Engine(model_path=model, device="cpu", dtype="float32", log_level="warning", dp_size=2,
                        page_size=4, max_total_tokens=4096, max_running_requests=1, session_auto_move=True)
    yield eng
    eng.shutdown()


def _by_instance(eng) -> dict:
    return {s["instance_id"]: s for s in eng.get_internal_state()}


def _wait_for(cond, what: str, limit_s: float = 30.0):
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def test_hinted_session_moves_off_a_loaded_instance_before_its_turn(engine):
    sp = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
    first_input = [(i * 29) % 450 + 3 for i in range(70)]
    second_input = [9, 8, 7, 6, 5]
    sid = engine.open_session(0)
    t1 = engine.generate(input_ids=first_input, sampling_params=sp,
                         session_params={"id": sid, "next_turn_in_s": 1.0})
    home = next(i for i, s in _by_instance(engine).items() if s["sessions_pinned"] == 1)
    other = next(i for i in _by_instance(engine) if i != home)
    # Load `other`: a long decode (one running request at most) and a request waiting behind it there
    # (it shares the long one's prompt prefix, so the placement puts it on the same instance). The hint (1 s)
    # makes the move due at once; the decode (3,400 tokens, the most the pool holds beside the session) must
    # outlast the move, which takes a few controller iterations.
    long_prompt = [(i * 13) % 400 + 50 for i in range(400)]
    background = []
    for k, n in enumerate((3400, 4)):
        th = threading.Thread(target=engine.generate, kwargs=dict(
            input_ids=long_prompt + [k + 3] * 4, sampling_params={"max_new_tokens": n, "ignore_eos": True}))
        th.start()
        background.append(th)
        if k == 0:
            loaded = _wait_for(lambda: next((i for i, s in _by_instance(engine).items() if s["running"]), None),
                               "the long request running")
    assert loaded == other, "the long request should go to the instance without the pinned session"
    _wait_for(lambda: _by_instance(engine)[other]["waiting"] >= 1, "a request waiting behind the long one")
    moved = engine.move_session(sid, other)  # the session is now on the loaded instance, its turn due now
    assert moved["instance"] == other
    # ... and the controller moves it back to the idle instance before the turn arrives
    _wait_for(lambda: _by_instance(engine)[home]["sessions_pinned"] == 1
              and _by_instance(engine)[other]["sessions_pinned"] == 0, "the session moved off the loaded instance")
    assert _by_instance(engine)[other]["running"] == 1  # still loaded: the move was not waiting for it to end
    t2 = engine.generate(input_ids=second_input, sampling_params=sp,
                         session_params={"id": sid, "rid": t1["meta_info"]["id"]})
    assert t2["meta_info"]["cached_tokens"] >= 68  # placed where the KV went, found cached there
    engine.close_session(sid)
    engine.abort_all()
    for th in background:
        th.join()
    assert engine.flush_cache()
    whole = engine.generate(input_ids=first_input + t1["output_ids"] + second_input, sampling_params=sp)
    assert whole["meta_info"]["cached_tokens"] == 0 and whole["output_ids"] == t2["output_ids"]
    assert engine.flush_cache()
    assert all(s["free_pages"] == s["num_pages"] and s["sessions_pinned"] == 0 for s in engine.get_internal_state())
