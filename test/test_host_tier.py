"""Host KV tier (mem_cache/host_tier.py) and next-turn hints (managers/req_kv.py, session_pins.py).

Unit: evicted radix pages go to host byte-exact and a match reloads them byte-exact; the byte budget drops
least recently used pages; reloaded / dropped pages go back to the allocator; hints order session unpinning
and bring a hinted path back before its turn; bad hints are refused. Engine (CPU, demo model): a prompt whose
prefix was evicted to host and reloaded gives the same greedy tokens as without eviction, and a hinted
session turn finds its KV prefetched before it arrives.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from sglang.srt.managers.req_kv import HintedPath, ReqKVManager
from sglang.srt.managers.session_controller import parse_next_turn_hint, parse_session_params
from sglang.srt.mem_cache.host_tier import HostKVTier, pool_page_bytes
from sglang.srt.mem_cache.kv_pool import HeadCentricKVPool
from sglang.srt.mem_cache.session_pins import HINT_LEAD_S

PS = 4


def make_pool(num_pages: int = 16) -> HeadCentricKVPool:
    pool = HeadCentricKVPool(num_pages, PS, local_kv_heads=2, num_layers=2, head_dim=4, dtype=torch.float32,
                             device="cpu")
    gen = torch.Generator().manual_seed(0)
    # Random bytes, not random floats: NaN payloads and denormals must come back bit for bit.
    pool_page_bytes(pool).copy_(torch.randint(0, 256, pool_page_bytes(pool).shape, dtype=torch.uint8, generator=gen))
    return pool


def make_kv(pool: HeadCentricKVPool, host_pages: int) -> ReqKVManager:
    tier = HostKVTier.for_pool(host_pages * pool.bytes_per_page, PS, pool)
    return ReqKVManager(pool.num_pages, PS, disable_radix_cache=False, host=tier)


def cache_path(kv: ReqKVManager, tokens):
    pages = kv.allocator.alloc(len(tokens) // PS)
    kv.tree.insert(tokens, pages)
    return pages


def test_offload_on_evict_and_reload_byte_exact():
    pool = make_pool()
    kv = make_kv(pool, host_pages=8)
    tokens = list(range(100, 100 + 3 * PS))
    pages = cache_path(kv, tokens)
    original = pool_page_bytes(pool)[pages].clone()
    assert kv.tree.evict(3) == 3 and kv.allocator.num_free == pool.num_pages
    assert kv.host.pages_held == 3 and kv.host.offloaded_bytes == 3 * pool.bytes_per_page
    pool_page_bytes(pool).zero_()  # the device pages are reused by others
    assert kv.reload(tokens + [7]) == 3 * PS
    match = kv.tree.match_prefix(tokens)
    assert match.num_tokens == 3 * PS
    assert torch.equal(pool_page_bytes(pool)[match.pages], original)
    assert kv.host.loaded_bytes == 3 * pool.bytes_per_page
    # Reloaded pages are the tree's again: evicting them copies nothing new (already on host), and frees them.
    assert kv.tree.evict(3) == 3 and kv.host.offloaded_bytes == 3 * pool.bytes_per_page
    assert kv.allocator.num_free == pool.num_pages
    kv.tree.check_invariants()


def test_reload_continues_device_match_and_partial_eviction():
    pool = make_pool()
    kv = make_kv(pool, host_pages=8)
    shared, tail = list(range(1, 1 + 2 * PS)), list(range(50, 50 + 2 * PS))
    cache_path(kv, shared + tail)
    kv.tree.match_prefix(shared)  # split: the tail is its own leaf
    before = pool_page_bytes(pool)[kv.tree.match_prefix(shared + tail).pages].clone()
    assert kv.tree.evict(1) == 2  # the tail leaf only (least recently used first)
    assert kv.tree.match_prefix(shared + tail).num_tokens == 2 * PS
    assert kv.reload(shared + tail) == 2 * PS  # only the missing tail comes from host
    match = kv.tree.match_prefix(shared + tail)
    assert match.num_tokens == 4 * PS and torch.equal(pool_page_bytes(pool)[match.pages], before)
    kv.tree.check_invariants()


def test_budget_drops_least_recently_used_and_pages_return():
    pool = make_pool()
    kv = make_kv(pool, host_pages=4)
    a, b = list(range(10, 10 + 3 * PS)), list(range(300, 300 + 3 * PS))
    cache_path(kv, a)
    kv.tree.evict(3)
    cache_path(kv, b)
    kv.tree.evict(3)  # needs 3 slots of 4: a's deepest pages go
    assert kv.host.pages_held <= 4 and kv.host.dropped_pages >= 2
    assert len(kv.host.match(b, 0, 3)) == 3
    assert len(kv.host.match(a, 0, 3)) < 3
    assert kv.reload(b) == 3 * PS
    kv.flush()  # everything back: device pages to the allocator, host slots emptied
    assert kv.allocator.num_free == pool.num_pages and kv.host.pages_held == 0


def test_reload_without_room_takes_what_fits():
    pool = make_pool(num_pages=4)
    kv = make_kv(pool, host_pages=8)
    tokens = list(range(1, 1 + 3 * PS))
    cache_path(kv, tokens)
    kv.tree.evict(3)
    held = kv.allocator.alloc(3)  # a running request holds 3 of the 4 pages
    assert kv.reload(tokens) == PS
    kv.allocator.free(held)
    kv.tree.check_invariants()


def test_hints_order_unpinning_and_prefetch_before_the_turn():
    pool = make_pool()
    kv = make_kv(pool, host_pages=16)
    near, far = list(range(1, 1 + 2 * PS)), list(range(200, 200 + 2 * PS))
    cache_path(kv, near)
    cache_path(kv, far)
    kv.sessions.pin("near", near)
    kv.sessions.pin("far", far)  # the most recently used: LRU alone would unpin "near" first
    now = time.monotonic()
    kv.hinted["near"] = HintedPath(near, now + HINT_LEAD_S + 0.5, "near")
    kv.hinted["far"] = HintedPath(far, now + 60.0, "far")
    assert kv.sessions.victim() == "far"
    assert kv.sessions.release_lru() and "far" not in kv.sessions and "near" in kv.sessions
    # Between iterations: the far path is copied to host while still on device; then evicted for free.
    assert kv.background(now)
    assert kv.host.held_pages(far, 2) == 2 and kv.hinted["far"].offloaded
    copied = kv.host.offloaded_bytes
    kv.tree.evict(kv.tree.evictable_pages())
    assert kv.tree.match_prefix(far).num_tokens == 0 and kv.host.offloaded_bytes == copied
    # HINT_LEAD_S before the turn: reloaded and pinned again, before any request asks for it.
    kv.background(now + 60.0 - HINT_LEAD_S)
    assert "far" in kv.sessions and kv.tree.match_prefix(far).num_tokens == 2 * PS
    assert kv.hint_prefetched_tokens == 2 * PS and "far" not in kv.hinted
    kv.close_session("far")
    kv.close_session("near")
    kv.flush()
    assert kv.allocator.num_free == pool.num_pages


def test_home_sessions_include_unpinned_ones_with_a_host_tier():
    pool = make_pool()
    kv = make_kv(pool, host_pages=16)
    tokens = list(range(1, 1 + 2 * PS))
    cache_path(kv, tokens)
    kv.finish_session_turn("s", tokens)
    assert kv.home_sessions() == ["s"]
    assert kv.sessions.release_lru() and "s" not in kv.sessions
    assert kv.home_sessions() == ["s"]  # its KV goes to this instance's host tier: its next turn comes here
    kv.close_session("s")
    assert kv.home_sessions() == []
    plain = ReqKVManager(pool.num_pages, PS, disable_radix_cache=False)
    cache_path(plain, tokens)
    plain.finish_session_turn("s", tokens)
    plain.sessions.release_lru()
    assert plain.home_sessions() == []  # without a host tier an unpinned session's KV may be gone


def test_a_stale_listing_does_not_take_a_session_home_back():
    """The controller's rule for session reports: an instance still listing a session it keeps on its host tier
    does not take the session back once a later turn was placed elsewhere; a newly listed session moves home."""
    from types import SimpleNamespace

    from sglang.srt.managers.controller import Controller

    ctl = SimpleNamespace(session_home={}, reported_sessions={})
    report = lambda inst, sessions: Controller._sessions_reported(ctl, inst, sessions)  # noqa: E731
    report(0, ["s"])
    assert ctl.session_home == {"s": 0}
    ctl.session_home["s"] = 1  # the next turn was routed to instance 1
    report(0, ["s"])  # instance 0 still lists it (its host tier keeps the older turn)
    assert ctl.session_home == {"s": 1}
    report(1, ["s"])  # pinned on 1 after that turn
    assert ctl.session_home == {"s": 1}
    report(1, [])  # unpinned on 1 (no host tier there): it lives nowhere ...
    assert "s" not in ctl.session_home
    report(0, ["s"])  # ... until an instance that still has it reports it again
    assert ctl.session_home == {"s": 0}


@pytest.mark.parametrize("bad", [-1, "soon", float("nan"), float("inf"), True, [1], 1e9])
def test_bad_hints_are_refused(bad):
    with pytest.raises(ValueError, match="next_turn_in_s"):
        parse_session_params({"id": "s", "next_turn_in_s": bad})
    with pytest.raises(ValueError, match="X-Next-Turn-In"):
        parse_next_turn_hint(str(bad) if not isinstance(bad, list) else bad, "X-Next-Turn-In")


def test_good_hints_parse():
    assert parse_session_params({"id": "s", "next_turn_in_s": 2}).next_turn_in_s == 2.0
    assert parse_session_params({"id": "s"}).next_turn_in_s is None
    assert parse_next_turn_hint(" 1.5 ", "X-Next-Turn-In") == 1.5


# ---------------------------------------------------------------------------------------------------------
# Engine
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    import sglang
    from sglang.srt.demo_model import DemoModelSpec, make_demo_model

    model = str(tmp_path_factory.mktemp("host-tier-model"))
    make_demo_model(model, DemoModelSpec(arch="llama", seed=3, num_key_value_heads=2))
    eng = sglang.Engine(model_path=model, device="cpu", dtype="float32", log_level="warning", page_size=PS,
                        max_total_tokens=256, enable_hierarchical_cache=True, hicache_size="4MiB")
    yield eng
    eng.shutdown()


def _state(eng) -> dict:
    return eng.get_internal_state()[0]


def _flood(eng, seed: int) -> None:
    """One-off prompts that fill the 256-token pool several times over (evicting every cached prefix)."""
    sp = {"temperature": 0, "max_new_tokens": 2, "ignore_eos": True}
    eng.generate(input_ids=[[(seed * 7 + i * 13 + j) % 400 + 5 for j in range(120)] for i in range(6)],
                 sampling_params=sp)


def test_engine_reload_gives_identical_greedy_output(engine):
    sp = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    prompt = [(i * 31) % 450 + 3 for i in range(90)]
    assert engine.flush_cache()
    first = engine.generate(input_ids=prompt, sampling_params=sp)
    warm = engine.generate(input_ids=prompt, sampling_params=sp)  # no eviction: from the device cache
    assert warm["output_ids"] == first["output_ids"] and warm["meta_info"]["cached_tokens"] >= 80
    _flood(engine, 1)
    before = _state(engine)
    again = engine.generate(input_ids=prompt, sampling_params=sp)
    after = _state(engine)
    assert after["host_reloaded_tokens"] - before["host_reloaded_tokens"] >= 80
    assert again["meta_info"]["cached_tokens"] >= 80
    assert again["output_ids"] == first["output_ids"]
    assert engine.flush_cache()
    st = _state(engine)
    assert st["free_pages"] == st["num_pages"] and st["host_pages_held"] == 0


def test_engine_hinted_turn_is_prefetched(engine):
    sp = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
    assert engine.flush_cache()
    sid = engine.open_session(0)
    prompt = [(i * 17) % 450 + 3 for i in range(80)]
    t0 = time.monotonic()
    _flood(engine, 3)
    # The hint leaves the one-off work below time to finish before the prefetch (HINT_LEAD_S before the turn):
    # what is prefetched while running requests still need the pages is theirs to evict again.
    gap = HINT_LEAD_S + 0.5 + 3 * (time.monotonic() - t0)
    t1 = engine.generate(input_ids=prompt, sampling_params=sp, session_params={"id": sid, "next_turn_in_s": gap})
    turn_end = time.monotonic()
    _flood(engine, 2)  # the session's pin is given up for the one-off work; its KV goes to host
    mid = _state(engine)
    assert mid["sessions_pinned"] == 0 and mid["hint_prefetched_tokens"] == 0
    time.sleep(max(0.0, turn_end + gap - time.monotonic()))  # brought back HINT_LEAD_S before the turn
    st = _state(engine)
    assert st["hint_prefetched_tokens"] >= 80 and st["sessions_pinned"] == 1
    t2 = engine.generate(input_ids=[5, 6, 7], sampling_params=sp,
                         session_params={"id": sid, "rid": t1["meta_info"]["id"]})
    end = _state(engine)
    assert end["host_reloaded_tokens"] == st["host_reloaded_tokens"]  # nothing reloaded on the turn's path
    assert t2["meta_info"]["cached_tokens"] >= 80
    with pytest.raises(ValueError, match="next_turn_in_s"):
        engine.generate(input_ids=[1, 2], sampling_params=sp, session_params={"id": sid, "next_turn_in_s": -3})
    engine.close_session(sid)
    assert engine.flush_cache()
    st = _state(engine)
    assert st["free_pages"] == st["num_pages"]


class _HeaderRequest:
    """What the TokenizerManager reads of a FastAPI request: its headers."""

    def __init__(self, **headers):
        self.headers = {k.replace("_", "-"): v for k, v in headers.items()}


async def _generate_with_request(tm, obj, request):
    async for out in tm.generate_request(obj, request):
        return out


def test_header_hint_without_session(engine):
    """X-Next-Turn-In (the OpenAI API's way, any endpoint): a request without a session keeps its prefix ready;
    a bad value is a ValueError (HTTP 400) and nothing is queued."""
    from sglang.srt.managers.io_struct import GenerateReqInput

    sp = {"temperature": 0, "max_new_tokens": 3, "ignore_eos": True}
    assert engine.flush_cache()
    prompt = [(i * 23) % 450 + 3 for i in range(40)]
    obj = GenerateReqInput(input_ids=prompt, sampling_params=sp)
    out = engine._run(_generate_with_request(engine.tokenizer_manager, obj, _HeaderRequest(X_Next_Turn_In="30")))
    assert out["meta_info"]["completion_tokens"] == 3
    assert _state(engine)["hinted_paths"] == 1
    for bad in ("-2", "later", "nan"):
        obj = GenerateReqInput(input_ids=prompt, sampling_params=sp)
        with pytest.raises(ValueError, match="X-Next-Turn-In"):
            engine._run(_generate_with_request(engine.tokenizer_manager, obj, _HeaderRequest(X_Next_Turn_In=bad)))
    assert engine.flush_cache()
    st = _state(engine)
    assert st["hinted_paths"] == 0 and st["free_pages"] == st["num_pages"]


def test_engine_flag_checked():
    from sglang.srt.server_args import ServerArgs

    args = ServerArgs(model_path=os.getcwd(), enable_hierarchical_cache=True, hicache_size="lots")
    with pytest.raises(ValueError, match="lots"):
        args.check()
    assert ServerArgs(model_path=".", enable_hierarchical_cache=True, hicache_size="2").hicache_bytes(0) == 2 * 2**30
    assert ServerArgs(model_path=".", enable_hierarchical_cache=True).hicache_bytes(100) == 200
    assert ServerArgs(model_path=".", hicache_size="1GiB").hicache_bytes(100) == 0


def test_tp2_reload_identical(tmp_path):
    """TP2: both ranks copy their own heads' slice to host and back (the leader's copy orders are broadcast)."""
    import sglang
    from sglang.srt.demo_model import DemoModelSpec, make_demo_model

    make_demo_model(str(tmp_path), DemoModelSpec(arch="llama", seed=5, num_key_value_heads=2))
    eng = sglang.Engine(model_path=str(tmp_path), device="cpu", dtype="float32", log_level="warning", tp_size=2,
                        page_size=PS, max_total_tokens=256, enable_hierarchical_cache=True, hicache_size="2MiB")
    try:
        sp = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}
        prompt = [(i * 37) % 450 + 3 for i in range(90)]
        first = eng.generate(input_ids=prompt, sampling_params=sp)
        _flood(eng, 4)
        again = eng.generate(input_ids=prompt, sampling_params=sp)
        st = _state(eng)
        assert st["host_reloaded_tokens"] >= 80 and again["meta_info"]["cached_tokens"] >= 80
        assert again["output_ids"] == first["output_ids"]
    finally:
        eng.shutdown()
