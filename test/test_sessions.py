"""Sessions without processes: the TokenizerManager's turn tree (session_controller.SessionStore, SGLang's
rules for session_params), radix-cache pins, the instance's session pins (budget, memory pressure, close,
export/adopt), and a split plan that keeps a session's pages together and places them before plain cache.
The live API (HTTP and Engine, merge/split) is tested in test_server_sessions.py."""

from types import SimpleNamespace

import pytest

from sglang.srt.managers.io_struct import TokenizedGenerateReqInput
from sglang.srt.managers.req_kv import ReqKVManager
from sglang.srt.managers.schedule_batch import InstanceState
from sglang.srt.managers.session_controller import SessionStore, parse_session_params
from sglang.srt.mem_cache.page_allocator import PageAllocator
from sglang.srt.mem_cache.radix_cache import RadixCache
from sglang.srt.mem_cache.session_pins import SessionPins

BOS = 1


def _turn(rid, ids, max_new=None):
    return TokenizedGenerateReqInput(rid, "", list(ids), SimpleNamespace(max_new_tokens=max_new), False, -1, 0, False)


def _prepare(store, new_rid, ids, **params):
    req = _turn(new_rid, ids)
    store.prepare(parse_session_params(params), req)
    return req


# ---- SessionStore: SGLang's session_params rules --------------------------------------------------------
def test_append_builds_the_whole_conversation():
    store = SessionStore(bos_token_id=BOS)
    sid = store.open(1000)
    r1 = _prepare(store, "a", [BOS, 5, 6, 7], id=sid)
    assert r1.input_ids == [BOS, 5, 6, 7] and r1.session_id == sid and r1.session_prefix_tokens == 0
    store.finished("a", [8, 9])
    r2 = _prepare(store, "b", [BOS, 10, 11], id=sid, rid="a")  # the new input's BOS is dropped (SGLang)
    assert r2.input_ids == [BOS, 5, 6, 7, 8, 9, 10, 11]
    assert r2.session_prefix_tokens == 5  # prompt + output minus the last output token (never fed)
    store.finished("b", [12])
    # offset (negative from the end), drop_previous_output, and a branch back from the first turn
    assert _prepare(store, "c", [20], id=sid, rid="b", offset=-1).input_ids == [BOS, 5, 6, 7, 8, 9, 10, 11, 20]
    assert _prepare(store, "d", [21], id=sid, rid="a", drop_previous_output=True).input_ids == [BOS, 5, 6, 7, 21]
    assert _prepare(store, "e", [22], id=sid, rid="a", offset=2).input_ids == [BOS, 5, 22]


def test_replace_drops_later_turns():
    store = SessionStore()
    sid = store.open(10, session_id="s1")
    assert sid == "s1"
    _prepare(store, "a", [5], id=sid)
    store.finished("a", [6])
    _prepare(store, "b", [7], id=sid, rid="a")
    store.finished("b", [8])
    _prepare(store, "c", [9], id=sid, rid="a", replace=True)  # b is replaced
    with pytest.raises(ValueError, match="not a request of session"):
        store.check(parse_session_params({"id": sid, "rid": "b"}), "z")
    _prepare(store, "d", [3], id=sid, replace=True)  # rid null + replace: the session starts over
    assert set(store.sessions[sid].turns) == {"d"}


@pytest.mark.parametrize("params, fragment", [
    ({"id": "nope"}, "not an open session"),
    ({"id": "S", "rid": "missing"}, "not a request of session"),
    ({"id": "S", "rid": "running"}, "has not finished"),
    ({"id": "S", "rid": "done", "offset": 99}, "out of range"),
    ({"id": 3}, "session_params.id"),
    ({"id": "S", "offset": "1"}, "offset"),
    ({"id": "S", "replace": 1}, "replace"),
    ({"id": "S", "bogus": 1}, "unknown fields"),
    ("S", "must be an object"),
])
def test_bad_turns_are_value_errors(params, fragment):
    store = SessionStore()
    store.open(10, session_id="S")
    _prepare(store, "running", [5], id="S")
    _prepare(store, "done", [5], id="S")
    store.finished("done", [6])
    with pytest.raises(ValueError, match=fragment):
        _prepare(store, "new", [1], **params) if isinstance(params, dict) else parse_session_params(params)
    assert "new" not in store.sessions["S"].turns


def test_open_close_expire():
    store = SessionStore(idle_timeout_s=5.0)
    sid = store.open(0)
    with pytest.raises(ValueError, match="already open"):
        store.open(0, session_id=sid)
    with pytest.raises(ValueError, match="capacity_of_str_len"):
        store.open(-1)
    _prepare(store, "a", [5], id=sid)
    now = store.sessions[sid].last_used
    assert store.expired(now + 10) == []  # a turn is running: not idle
    store.finished("a", [6])
    assert store.expired(store.sessions[sid].last_used + 10) == [sid]
    assert store.close(sid) == []
    with pytest.raises(ValueError, match="no open session"):
        store.close(sid)


# ---- radix pins and SessionPins -----------------------------------------------------------------------------
def _tree(pages=16, ps=2):
    alloc = PageAllocator(pages)
    return RadixCache(ps, alloc), alloc


def test_pins_survive_eviction_and_count_separately():
    tree, alloc = _tree()
    pages = alloc.alloc(3)
    tree.insert(list(range(6)), pages)
    m = tree.match_prefix(list(range(6)))
    tree.pin(m.last_node)
    assert (tree.pinned_pages(), tree.evictable_pages()) == (3, 0)
    assert tree.evict(10) == 0  # pinned: nothing to evict
    tree.inc_lock_ref(m.last_node)  # a running request as well: locked wins
    assert (tree.protected_pages(), tree.pinned_pages()) == (3, 0)
    tree.dec_lock_ref(m.last_node)
    tree.unpin(m.last_node)
    tree.check_invariants()
    assert tree.evictable_pages() == 3 and tree.evict(3) == 3
    with pytest.raises(RuntimeError):
        tree.unpin(m.last_node)


def test_session_pins_budget_memory_pressure_and_close():
    kv = ReqKVManager(num_pages=10, page_size=2, disable_radix_cache=False, session_budget=0.5)  # 5 pages
    for sid, base in (("s1", 100), ("s2", 200)):
        toks = list(range(base, base + 6))
        kv.tree.insert(toks, kv.allocator.alloc(3))
        assert kv.sessions.pin(sid, toks + [1]) == 6  # the unaligned tail is not cached
    # 6 pinned pages > budget 5: the least recently used session (s1) lost its pin
    assert kv.sessions.session_ids() == ["s2"] and kv.sessions.unpinned_for_budget == 1
    assert kv.available_pages() == 10  # free + evictable + pinned: sessions never block serving
    got = kv.alloc(10)  # running requests need everything: s2 is unpinned and evicted too
    assert got is not None and kv.sessions.session_ids() == [] and kv.sessions.unpinned_for_memory == 1
    kv.allocator.free(got)
    toks = list(range(300, 304))
    kv.tree.insert(toks, kv.allocator.alloc(2))
    kv.sessions.pin("s3", toks)
    assert kv.allocator.num_free == 8
    assert kv.sessions.close("s3") == 2 and kv.allocator.num_free == 10  # close frees the session's own pages
    kv.tree.check_invariants()


def test_pins_export_and_adopt_by_tokens():
    tree, alloc = _tree()
    pins = SessionPins(tree, budget_pages=16)
    toks = list(range(8))
    tree.insert(toks, alloc.alloc(4))
    pins.pin("s", toks)
    exported = pins.export()
    assert exported[0][:3] == ("s", toks, tree.match_prefix(toks).pages)
    tree2, alloc2 = _tree()
    tree2.insert(toks, alloc2.alloc(4))  # the destination tree holds the same tokens under its own page ids
    pins2 = SessionPins(tree2, budget_pages=16)
    pins2.adopt(exported)
    assert pins2.session_ids() == ["s"] and tree2.pinned_pages() == 4


def test_split_plan_keeps_session_pages_together_before_plain_cache():
    from gyges.topology import Instance
    from sglang.srt.managers.gyges_transform import _assign_groups, _page_groups

    cached = ([0, 1, 2, 3], [0, 1])
    session = ([9, 9, 8, 8, 7, 7], [2, 3, 4])
    st = InstanceState(devices=[0, 1], running=[], waiting=[], tree_paths=[cached, session],
                       session_pins=[("s", session[0], session[1], 1)])
    groups = _page_groups(st)
    for g in groups:
        g.pinned = any(p in {2, 3, 4} for p in g.pages)
    layout = SimpleNamespace(pages_per_device=lambda buffer_bytes, tp: 3)
    targets = _assign_groups(groups, Instance.of([0, 1]), [Instance.of([0]), Instance.of([1])], layout, 0, 0)
    by_pages = {tuple(g.pages): t for g, t in zip(groups, targets)}
    assert by_pages[(2, 3, 4)] is not None  # room for one 3-page group per part: the session's comes first



def _hinted_split(sizes: dict, hints: dict, room_pages: int = 64):
    """A split plan of a TP2 instance caching pinned sessions of `sizes` pages whose hinted next turns are
    `hints` (session -> seconds); each part has room_pages pages. Returns session -> part (None: dropped)."""
    from gyges.plans import KVLayout
    from sglang.srt.managers.gyges_transform import plan_transform
    from sglang.srt.managers.io_struct import TransformCmd
    from sglang.srt.managers.req_kv import HintedPath

    layout = KVLayout(num_kv_heads=2, num_layers=1, page_size=4, head_dim=2, dtype_bytes=4)
    pins, tree, next_page = [], [], 0
    for k, (sid, n) in enumerate(sizes.items()):
        toks = [100 * (k + 1) + i for i in range(4 * n)]
        pages = list(range(next_page, next_page + n))
        next_page += n
        pins.append((sid, toks, pages, 1.0))
        tree.append((toks, pages))
    st = InstanceState(devices=[0, 1], running=[], waiting=[], tree_paths=tree, session_pins=pins,
                       hinted=[(sid, HintedPath([], 1000.0 + t, sid)) for sid, t in hints.items()])
    cmd = TransformCmd("t", "split", [[0, 1]], [[0], [1]], 0.0)
    plan = plan_transform(cmd, {0: st}, layout, room_pages * layout.page_bytes(1))
    where = {sid: None for sid in sizes}
    for base, out in plan.states.items():
        for sid, _, _, _ in out.session_pins:
            where[sid] = base
    return where


def test_split_spreads_sessions_whose_hinted_turns_come_first():
    sizes = {"big": 6, "a": 1, "b": 1, "c": 1}
    where = _hinted_split(sizes, {})  # no hints: balanced by pages, the big session alone on its part
    assert [s for s in "abc" if where[s] == where["big"]] == []
    where = _hinted_split(sizes, {"big": 1.0, "a": 2.0, "b": 3.0, "c": 4.0})  # four turns expected: two per part
    assert sorted(list(where.values()).count(p) for p in (0, 1)) == [2, 2]


def test_split_keeps_room_for_the_turns_due_first():
    # three sessions of 2 pages, parts of 3 pages: one is dropped, the one whose turn comes last
    sizes = {"x": 2, "y": 2, "z": 2}
    assert _hinted_split(sizes, {}, room_pages=3)["z"] is None  # without hints: the last in order
    where = _hinted_split(sizes, {"x": 9.0, "y": 1.0, "z": 2.0}, room_pages=3)
    assert where["x"] is None and where["y"] is not None and where["z"] is not None and where["y"] != where["z"]
    # a session with a hint goes before one without
    assert _hinted_split(sizes, {"z": 5.0}, room_pages=3)["z"] is not None
