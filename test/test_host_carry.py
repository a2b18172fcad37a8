"""The host KV tier across Gyges merges and splits (mem_cache/host_carry.py, HostKVTier.export / adopt).

Unit (no processes): a tier's index survives export -> adopt; the carry plan re-lays every store's bytes so that
each page kept on host holds, head for head, the bytes it held before, at the new TP degree (merges of TP1 and
TP2 parts, splits into TP1 and TP2 parts; hypothesis over random tries), a page on host in two merged parts is
kept once, a split sends each path to the part that took its device cache, and what no part has room for is
counted dropped. Live (Engine, 2 CPU devices): a session kept on host goes through a merge and a split (the host
stores re-laid on a thread after the pause); each next turn is placed where its KV went, reloads it from host
and answers as the whole conversation from scratch; a hinted session is prefetched by the merged instance.
"""

from __future__ import annotations

import random
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gyges.plans import KVLayout, execute_kv_plan
from gyges.topology import Instance
from sglang.srt.mem_cache.host_carry import HostTierState, plan_host_carry
from sglang.srt.mem_cache.host_tier import HostKVTier, HostPageStore, pool_page_bytes
from sglang.srt.mem_cache.kv_pool import HeadCentricKVPool

PS = 4
LAYOUT = KVLayout(num_kv_heads=4, num_layers=2, page_size=PS, head_dim=2, dtype_bytes=4)


def random_tier(rng: random.Random, pages: int, capacity: int, shared_root: bool = False) -> HostTierState:
    """A trie of `pages` nodes with distinct slots < capacity (some nodes without a slot: still on device)."""
    slots = rng.sample(range(capacity), pages)
    nodes = []
    for i in range(pages):
        parent = rng.randrange(-1, i) if i else -1
        if shared_root and i == 0:
            key = (1, 2, 3, 4)
        else:
            key = tuple(rng.randrange(500) for _ in range(PS))
        nodes.append((parent, key, slots[i] if rng.random() < 0.85 else -1))
    held = [s for _, _, s in nodes if s >= 0]
    rng.shuffle(held)
    return HostTierState(nodes, held)


def stores(devices, nbytes: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return {d: torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen) for d in devices}


def page_heads(buf, inst: Instance, slot: int):
    """The bytes of every KV head of `slot` (full page, head order) wherever inst's layout keeps them."""
    out = []
    for h in range(LAYOUT.num_kv_heads):
        dev, off = LAYOUT.head_location(inst, slot, h)
        out.append(bytes(buf[dev][off:off + LAYOUT.head_block_bytes].tolist()))
    return out


def paths(tier: HostTierState):
    """path of page keys -> slot, for every node holding a page."""
    keys, out = [], {}
    for parent, key, slot in tier.nodes:
        keys.append((keys[parent] if parent >= 0 else ()) + (key,))
        if slot >= 0:
            out[keys[-1]] = slot
    return out


def check_carry(kind, src, dst, tiers, nbytes, seed, device_paths=None):
    before = {d: t.clone() for d, t in stores([d for i in src for d in i.devices], nbytes, seed).items()}
    plan = plan_host_carry(kind, src, dst, tiers, LAYOUT, nbytes, device_paths)
    bufs = {d: bytearray(t.numpy().tobytes()) for d, t in before.items()}
    execute_kv_plan(plan.make_kv_plan(), bufs)
    after = {d: torch.frombuffer(b, dtype=torch.uint8) for d, b in bufs.items()}
    old = {}  # page path -> its heads before
    for inst in src:
        if tiers.get(inst.base) is None:
            continue
        cap = LAYOUT.pages_per_device(nbytes, inst.tp)
        for path, slot in paths(tiers[inst.base]).items():
            if slot < cap:
                old.setdefault(path, page_heads(before, inst, slot))
    kept = 0
    for inst in dst:
        cap = LAYOUT.pages_per_device(nbytes, inst.tp)
        for path, slot in paths(plan.tiers[inst.base]).items():
            assert slot < cap
            assert page_heads(after, inst, slot) == old[path], (inst, path)
            kept += 1
        assert sorted(plan.tiers[inst.base].lru) == sorted(paths(plan.tiers[inst.base]).values())
    assert kept == plan.pages_kept
    held_before = sum(1 for t in tiers.values() if t is not None for _, _, s in t.nodes if s >= 0)
    assert plan.pages_kept + plan.pages_dropped == held_before
    return plan


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n0=st.integers(0, 12), n1=st.integers(0, 12))
def test_merge_keeps_every_host_page_byte_exact(seed, n0, n1):
    rng = random.Random(seed)
    nbytes = 16 * LAYOUT.page_bytes(1)
    a, b = Instance.of([0]), Instance.of([1])
    tiers = {0: random_tier(rng, n0, 16, shared_root=True) if n0 else None,
             1: random_tier(rng, n1, 16, shared_root=True) if n1 else None}
    plan = check_carry("merge", [a, b], [Instance.of([0, 1])], tiers, nbytes, seed)
    # a page on host in both parts (the shared first page) is kept once
    merged = paths(plan.tiers[0])
    assert len(merged) == len(set(merged.values()))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(0, 12))
def test_split_keeps_what_fits_byte_exact(seed, n):
    rng = random.Random(seed)
    nbytes = 6 * LAYOUT.page_bytes(1)  # 12 TP2 slots, 6 per TP1 part: large tries do not fit
    tier = random_tier(rng, n, 12) if n else None
    plan = check_carry("split", [Instance.of([0, 1])], [Instance.of([0]), Instance.of([1])], {0: tier}, nbytes,
                       seed)
    assert plan.pages_kept <= 12


def test_mixed_merge_and_split_into_tp2_parts():
    rng = random.Random(3)
    nbytes = 16 * LAYOUT.page_bytes(1)
    tiers = {0: random_tier(rng, 10, 32), 2: random_tier(rng, 8, 16), 3: random_tier(rng, 5, 16)}
    merged = Instance.of([0, 1, 2, 3])
    plan = check_carry("merge", [Instance.of([0, 1]), Instance.of([2]), Instance.of([3])], [merged], tiers, nbytes, 3)
    assert plan.pages_dropped == 0
    check_carry("split", [merged], [Instance.of([0, 1]), Instance.of([2, 3])], {0: plan.tiers[0]}, nbytes, 4)


def test_split_sends_a_path_to_the_part_that_took_its_device_cache():
    a_key, b_key = (1, 1, 1, 1), (2, 2, 2, 2)
    tier = HostTierState([(-1, a_key, 0), (0, (5, 5, 5, 5), 1), (-1, b_key, 2)], [0, 1, 2])
    parts = [Instance.of([0]), Instance.of([1])]
    for a_on in (0, 1):
        device_paths = {parts[a_on].base: [list(a_key) + [9] * 8], parts[1 - a_on].base: [list(b_key)]}
        plan = check_carry("split", [Instance.of([0, 1])], parts, {0: tier}, 8 * LAYOUT.page_bytes(1), 0,
                           device_paths)
        assert {k[0] for k in paths(plan.tiers[parts[a_on].base])} == {a_key}
        assert {k[0] for k in paths(plan.tiers[parts[1 - a_on].base])} == {b_key}
    # no room: parts of 2 pages; a's path of 3 pages is dropped, b's kept
    tier = HostTierState([(-1, a_key, 0), (0, (5, 5, 5, 5), 1), (1, (6, 6, 6, 6), 3), (-1, b_key, 2)], [0, 1, 3, 2])
    plan = check_carry("split", [Instance.of([0, 1])], parts, {0: tier}, 2 * LAYOUT.page_bytes(1), 0)
    assert plan.pages_kept == 1 and plan.pages_dropped == 3


def test_tier_index_survives_export_and_adopt():
    pool = HeadCentricKVPool(16, PS, local_kv_heads=2, num_layers=2, head_dim=4, dtype=torch.float32, device="cpu")
    pool_page_bytes(pool).copy_(torch.randint(0, 256, pool_page_bytes(pool).shape, dtype=torch.uint8))
    tier = HostKVTier.for_pool(8 * pool.bytes_per_page, PS, pool)
    a = list(range(100, 124))
    b = a[:8] + list(range(300, 308))
    tier.offload(a, 0, [0, 1, 2, 3, 4, 5])
    tier.offload(b, 2, [6, 7])  # b's first two pages are a's (on host), its last two new
    state = tier.export()
    twin = HostKVTier(tier.budget_bytes, PS, HostPageStore(pool, tier.capacity_pages, flat=tier.store.flat))
    twin.adopt(state)
    for toks in (a, b):
        assert [n.slot for n in twin.match(toks, 0, 6)] == [n.slot for n in tier.match(toks, 0, 6)]
    assert twin.pages_held == tier.pages_held == 8
    assert list(twin._lru) == list(tier._lru)  # the same least recently used order
    # full: a new path drops the least recently used page (a's first) and what hangs below it
    twin.offload(list(range(700, 708)), 0, [8, 9])
    assert twin.pages_held == 2 and twin.dropped_pages == 8 and len(twin.match(list(range(700, 708)), 0, 2)) == 2


# ---- live ------------------------------------------------------------------------------------------------
def _states(eng) -> dict:
    return {s["instance_id"]: s for s in eng.get_internal_state()}


def _flood(eng, seed: int, n: int) -> None:
    """One-off 120-token prompts that fill the pools several times over: the session's KV goes to host."""
    eng.generate(input_ids=[[(seed * 7 + i * 13 + j) % 400 + 5 for j in range(120)] for i in range(n)],
                 sampling_params={"max_new_tokens": 2, "ignore_eos": True})


def _wait_for(cond, what: str, limit_s: float = 30.0) -> None:
    end = time.monotonic() + limit_s
    while not cond():
        assert time.monotonic() < end, f"never happened: {what}"
        time.sleep(0.02)


def _on_host_only(eng, n_flood: int, seed: int) -> int:
    """Flood until no instance pins the session (it is kept on host); returns the host pages held."""
    for k in range(4):
        _flood(eng, seed + k, n_flood)
        states = _states(eng)
        if all(s["sessions_pinned"] == 0 for s in states.values()):
            return sum(s["host_pages_held"] for s in states.values())
    raise AssertionError("the session stayed pinned on device")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    import sglang
    from sglang.srt.demo_model import DemoModelSpec, make_demo_model

    model = str(tmp_path_factory.mktemp("host-carry-model"))
    make_demo_model(model, DemoModelSpec(arch="llama", seed=3, num_key_value_heads=2))
    eng = sglang.Engine(model_path=model, device="cpu", dtype="float32", log_level="warning", dp_size=2,
                        enable_gyges=True, page_size=PS, max_total_tokens=256, enable_hierarchical_cache=True,
                        hicache_size="4MiB")
    yield eng
    eng.shutdown()


def test_session_on_host_survives_merge_and_split(engine):
    eng = engine
    sp = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
    turns = [[(i * 31) % 450 + 3 for i in range(90)], [7, 8, 9], [10, 11]]
    sid = eng.open_session(0)
    outs, rid = [], None
    for k, (new_input, kind, tp, n_flood) in enumerate(zip(turns, (None, "merge", "split"), (None, 2, 1),
                                                         (None, 12, 40))):
        if kind is not None:
            assert _on_host_only(eng, n_flood, seed=10 * k) > 0
            done = eng.gyges_transform([0, 1], tp)
            assert done["kind"] == kind and done["host_pages_kept"] > 0 and done["host_pages_dropped"] == 0
            assert done["host_kv_bytes"] > 0, done
            _wait_for(lambda: all(not s["host_carry_pending"] and s["host_pages_held"] > 0
                                  for s in _states(eng).values()), "the host tier re-laid after the pause")
            before = {i: s["host_reloaded_tokens"] for i, s in _states(eng).items()}
        params = {"id": sid} if rid is None else {"id": sid, "rid": rid}
        out = eng.generate(input_ids=new_input, sampling_params=sp, session_params=params)
        if kind is not None:
            # placed where its KV went, reloaded from host: the whole earlier conversation is cached
            assert out["meta_info"]["cached_tokens"] >= sum(map(len, turns[:k])) + 6 * k - PS
            reloaded = {i: s["host_reloaded_tokens"] - before[i] for i, s in _states(eng).items()}
            assert max(reloaded.values()) >= out["meta_info"]["cached_tokens"] - PS, reloaded
        outs.append(out["output_ids"])
        rid = out["meta_info"]["id"]
    eng.close_session(sid)
    assert eng.flush_cache()
    whole = [t for new_input, o in zip(turns, outs) for t in new_input + o][:-len(outs[-1])]
    again = eng.generate(input_ids=whole, sampling_params=sp)
    assert again["meta_info"]["cached_tokens"] == 0 and again["output_ids"] == outs[-1]
    assert eng.flush_cache()
    assert all(s["free_pages"] == s["num_pages"] and s["host_pages_held"] == 0 for s in _states(eng).values())


def test_hinted_turn_is_prefetched_after_a_merge(engine):
    """A hinted session evicted to host before a merge: the merged instance brings its KV back and re-pins it
    before the turn (the hint travelled with the merge), so the turn reloads nothing on its own path."""

    eng = engine
    if len(_states(eng)) == 1:
        eng.gyges_transform([0, 1], 1)
    sp = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
    first = [(i * 17) % 450 + 3 for i in range(90)]
    sid = eng.open_session(0)
    t1 = eng.generate(input_ids=first, sampling_params=sp, session_params={"id": sid, "next_turn_in_s": 12.0})
    t_end = time.monotonic()
    assert _on_host_only(eng, 12, seed=77) > 0
    assert eng.gyges_transform([0, 1], 2)["host_pages_kept"] > 0
    _wait_for(lambda: not _states(eng)[0]["host_carry_pending"], "the host tier re-laid after the pause")
    assert time.monotonic() < t_end + 10.0, "the flood and merge took past the prefetch time; cannot check it"
    (before,) = _states(eng).values()
    assert before["sessions_pinned"] == 0 and before["hinted_paths"] == 1
    deadline = time.monotonic() + 20
    while _states(eng)[0]["sessions_pinned"] == 0:
        assert time.monotonic() < deadline, "the hinted session was never prefetched"
        time.sleep(0.05)
    ready = _states(eng)[0]
    assert ready["hint_prefetched_tokens"] - before["hint_prefetched_tokens"] >= 88
    t2 = eng.generate(input_ids=[5, 6], sampling_params=sp, session_params={"id": sid, "rid": t1["meta_info"]["id"]})
    after = _states(eng)[0]
    assert t2["meta_info"]["cached_tokens"] >= 92 and after["host_reloaded_tokens"] == ready["host_reloaded_tokens"]
    eng.close_session(sid)
    assert eng.flush_cache()
    assert eng.generate(input_ids=first + t1["output_ids"] + [5, 6], sampling_params=sp)["output_ids"] == t2["output_ids"]
    eng.gyges_transform([0, 1], 1)


def test_carry_is_bounded_to_the_most_recently_used_pages():
    rng = random.Random(5)
    tiers = {0: random_tier(rng, 12, 16), 1: random_tier(rng, 12, 16)}
    nbytes = 16 * LAYOUT.page_bytes(1)
    src, dst = [Instance.of([0]), Instance.of([1])], [Instance.of([0, 1])]
    plan = plan_host_carry("merge", src, dst, tiers, LAYOUT, nbytes, max_bytes=3 * LAYOUT.page_bytes(1))
    assert plan.pages_kept == 6  # 3 per part
    held = sum(1 for t in tiers.values() for _, _, s in t.nodes if s >= 0)
    assert plan.pages_dropped == held - 6
    moved_from = {(m.src_device, m.src_offset // LAYOUT.page_bytes(1)) for m in plan.make_kv_plan().moves}
    recent = {(b, s) for b, t in tiers.items() for s in t.lru[-3:]}
    assert moved_from <= recent  # only the 3 most recently used pages of each part leave their place
    assert plan_host_carry("merge", src, dst, tiers, LAYOUT, nbytes, max_bytes=0).pages_kept == 0
