"""gyges.policy: the Gyges policy's invariants on random cluster states (hypothesis), its hysteresis and
merge choice, and the static baselines.

The random states have one KV capacity per device (C tokens at any TP), so the oracles here are
independent of the policy's own helpers: an aligned group of s devices holds C*s tokens, and the largest
formable instance holds C * (largest power of two <= min(num_devices, max_tp)).
"""

from typing import Dict, List, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gyges.costmodel import TransformCostModel
from gyges.policy import (ClusterState, GygesPolicy, Hold, InstanceLoad, LoadLedger, Place, Reject, RequestInfo,
                          StaticDPLeastLoad, StaticDPRoundRobin, StaticHybrid, StaticTP, Transform,
                          make_policy, validate_transform)
from gyges.topology import Instance, Topology, is_aligned

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- state generation ----------------------------------------------------------------------------------
def largest_group(num_devices: int, max_tp: int) -> int:
    s = 1
    while s * 2 <= min(num_devices, max_tp):
        s *= 2
    return s


def size_class(need: int, per_device: int) -> int:
    s = 1
    while per_device * s < need:
        s *= 2
    return s


@st.composite
def partitions(draw, base: int, size: int, max_tp: int) -> List[Tuple[int, ...]]:
    """A random aligned partition of [base, base+size) into instances of TP <= max_tp."""
    if size == 1 or (size <= max_tp and draw(st.booleans())):
        return [tuple(range(base, base + size))]
    half = size // 2
    return draw(partitions(base, half, max_tp)) + draw(partitions(base + half, half, max_tp))


@st.composite
def instance_loads(draw, devices: Tuple[int, ...], per_device: int, transforming: bool) -> InstanceLoad:
    cap = per_device * len(devices)
    used = draw(st.integers(0, cap))
    evictable = draw(st.integers(0, used))
    in_flight = draw(st.integers(0, cap - used + evictable))
    running = draw(st.integers(0, 8)) if used - evictable + in_flight else 0
    waiting = draw(st.integers(0, 4)) if running else 0
    return InstanceLoad(devices, len(devices), running, waiting, cap, used, evictable, in_flight, transforming,
                        None if running + waiting else 0.0)


@st.composite
def requests(draw, per_device: int, num_devices: int, prefix: str = "q", n: int = 0, now: float = 100.0):
    need_hi = per_device * num_devices * 2
    prompt = draw(st.integers(1, need_hi))
    max_new = draw(st.integers(0, max(0, need_hi - prompt)))
    return RequestInfo(f"{prefix}{n}", prompt, max_new, draw(st.floats(0, now)))


@st.composite
def cluster_states(draw, allow_transforming: bool = True):
    num_devices = draw(st.sampled_from([1, 2, 4, 8]))
    max_tp = draw(st.sampled_from([t for t in (1, 2, 4, 8) if t <= num_devices]))
    per_device = draw(st.integers(64, 4096))
    groups = draw(partitions(0, num_devices, max_tp))
    busy = -1
    if allow_transforming and draw(st.booleans()):
        busy = draw(st.integers(0, len(groups) - 1))  # one transformation in flight (its sources)
    insts = tuple(draw(instance_loads(g, per_device, transforming=(k == busy))) for k, g in enumerate(groups))
    # Mostly short held requests with some long ones: lengths skewed to below one device.
    held = []
    for k in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            held.append(RequestInfo(f"h{k}", draw(st.integers(1, per_device // 2)), draw(st.integers(0, 32)),
                                    float(k)))
        else:
            held.append(draw(requests(per_device, num_devices, "h", k)))
    return ClusterState(num_devices, max_tp, insts, 100.0, tuple(held)), per_device


def fits(need: int, inst: InstanceLoad, extra: int = 0) -> bool:
    return need <= inst.kv_capacity_tokens - inst.kv_used_tokens + inst.kv_evictable_tokens \
        - inst.tokens_in_flight - extra


def by_base(state: ClusterState) -> Dict[int, InstanceLoad]:
    return {i.base: i for i in state.instances}


def needs_merge(req: RequestInfo, state: ClusterState) -> bool:
    return all(req.need_tokens > i.kv_capacity_tokens for i in state.instances)


# -- Gyges: on_request ---------------------------------------------------------------------------------
@SETTINGS
@given(cluster_states(), st.data())
def test_on_request_places_only_where_it_fits_and_rejects_exactly_the_unformable(sc, data):
    state, per_device = sc
    req = data.draw(requests(per_device, state.num_devices))
    d = GygesPolicy().on_request(req, state)
    limit = per_device * largest_group(state.num_devices, state.max_tp)
    assert isinstance(d, Reject) == (req.need_tokens > limit)
    if isinstance(d, Reject):
        assert str(limit) in d.message and str(req.need_tokens) in d.message
    if isinstance(d, Place):
        inst = by_base(state)[d.instance]
        assert not inst.transforming and fits(req.need_tokens, inst)


@SETTINGS
@given(cluster_states(), st.data())
def test_on_request_without_held_places_whenever_something_fits(sc, data):
    state, per_device = sc
    state = ClusterState(state.num_devices, state.max_tp, state.instances, state.now, ())
    req = data.draw(requests(per_device, state.num_devices))
    d = GygesPolicy().on_request(req, state)
    fitting = [i for i in state.instances if not i.transforming and fits(req.need_tokens, i)]
    if isinstance(d, Reject):
        return
    if any(i.tp == 1 for i in fitting):  # a TP1 instance fits: placed on one
        assert isinstance(d, Place) and by_base(state)[d.instance].tp == 1, d
    elif not fitting:
        assert isinstance(d, Hold)
    # only merged instances fit: they may refuse requests that would keep them from splitting back


# -- Gyges: on_tick ------------------------------------------------------------------------------------
def check_tick(state: ClusterState, per_device: int, decisions) -> None:
    insts = by_base(state)
    held = {h.rid: h for h in state.held}
    limit = per_device * largest_group(state.num_devices, state.max_tp)
    extra: Dict[int, int] = {}
    placed, rejected = [], set()
    for d in decisions:
        if isinstance(d, Place):
            h = held[d.rid]
            inst = insts[d.instance]
            assert not inst.transforming, "placed on a transforming instance"
            assert fits(h.need_tokens, inst, extra.get(d.instance, 0)), "placed where it does not fit"
            extra[d.instance] = extra.get(d.instance, 0) + h.need_tokens
            placed.append(d.rid)
        elif isinstance(d, Reject):
            rejected.add(d.rid)
        else:
            assert isinstance(d, Transform)
    assert len(placed) == len(set(placed)) and not set(placed) & rejected
    assert rejected == {h.rid for h in state.held if h.need_tokens > limit}

    # FIFO within a size class: the placed requests of a class are a prefix of its held requests.
    by_class: Dict[int, List[str]] = {}
    for h in state.held:
        if h.rid not in rejected:
            by_class.setdefault(size_class(h.need_tokens, per_device), []).append(h.rid)
    for rids in by_class.values():
        flags = [r in placed for r in rids]
        assert flags == sorted(flags, reverse=True), f"held requests of one class placed out of order: {rids}"

    transforms = [d for d in decisions if isinstance(d, Transform)]
    assert len(transforms) <= 1
    if any(i.transforming for i in state.instances):
        assert not transforms, "a transformation while one is in flight"
    remaining = [h for h in state.held if h.rid not in rejected and h.rid not in placed]
    for t in transforms:
        assert is_aligned(t.devices) and t.tp <= state.max_tp
        validate_transform(t, state)  # a union of instances / exactly one instance
        if t.is_merge:  # the smallest group that holds some held request
            assert any(size_class(h.need_tokens, per_device) == len(t.devices) for h in remaining)
        else:
            inst = insts[t.devices[0]]
            part = inst.kv_capacity_tokens * t.tp // inst.tp
            assert inst.held_tokens + extra.get(inst.base, 0) <= part, "split whose requests do not fit a part"
            assert not any(h.need_tokens > part for h in remaining), "split an instance a held request needs"
    # Liveness: a servable request that fits no existing instance gets its merge now.
    if not any(i.transforming for i in state.instances):
        waiting_long = [h for h in remaining if needs_merge(h, state)]
        if waiting_long:
            assert transforms and transforms[0].is_merge


@SETTINGS
@given(cluster_states())
def test_on_tick_invariants(sc):
    state, per_device = sc
    policy = GygesPolicy(split_delay=0.0)
    check_tick(state, per_device, policy.on_tick(state))


@SETTINGS
@given(cluster_states(allow_transforming=False), st.data())
def test_merge_for_a_held_long_request_within_one_tick(sc, data):
    state, per_device = sc
    limit = per_device * largest_group(state.num_devices, state.max_tp)
    biggest = max(i.kv_capacity_tokens for i in state.instances)
    if biggest >= limit:
        return  # every instance is already as large as Gyges can make one
    need = data.draw(st.integers(biggest + 1, limit))
    long_req = RequestInfo("long", need // 2, need - need // 2, 50.0)
    policy = GygesPolicy()
    first = policy.on_request(long_req, state)
    assert isinstance(first, Hold)  # for its merge, or behind an earlier held request of its class
    state = ClusterState(state.num_devices, state.max_tp, state.instances, state.now, state.held + (long_req,))
    decisions = policy.on_tick(state)
    check_tick(state, per_device, decisions)
    merges = [d for d in decisions if isinstance(d, Transform)]
    assert merges and merges[0].is_merge


# -- Gyges: scenarios ----------------------------------------------------------------------------------
def load(devices, cap_per_device=1000, used=0, in_flight=0, running=0, transforming=False, evictable=0):
    devices = tuple(devices)
    return InstanceLoad(devices, len(devices), running, 0, cap_per_device * len(devices), used, evictable,
                        in_flight, transforming, None if running else 0.0)


def test_split_waits_for_split_delay_and_resets_when_load_returns():
    policy = GygesPolicy(split_delay=5.0)
    busy = ClusterState(4, 4, (load(range(4), used=2500, in_flight=100, running=1),), now=0.0)
    assert policy.on_tick(busy) == []  # 2600 held tokens > a part (1000): no split
    quiet = lambda t: ClusterState(4, 4, (load(range(4), used=300, in_flight=100, running=2),), now=t)
    assert policy.on_tick(quiet(10.0)) == []  # condition true since 10.0
    assert policy.on_tick(quiet(14.9)) == []
    assert policy.on_tick(ClusterState(4, 4, busy.instances, now=15.0)) == []  # reset
    assert policy.on_tick(quiet(16.0)) == []
    assert policy.on_tick(quiet(20.9)) == []
    assert policy.on_tick(quiet(21.0)) == [Transform((0, 1, 2, 3), 1)]


def test_no_split_while_a_held_request_needs_the_merged_instance():
    policy = GygesPolicy(split_delay=0.0)
    big = RequestInfo("big", 1500, 100, 0.0)
    busy = (load((2,), in_flight=600, running=2), load((3,), in_flight=600, running=2))
    state = ClusterState(4, 4, (load((0, 1), used=1900, in_flight=50, running=1),) + busy, now=1.0, held=(big,))
    assert policy.on_tick(state) == []  # waits for memory on the TP2 instance: no split, and no merge of
    # (2, 3), which it would not fit right after
    idle = (load((2,)), load((3,)))
    state = ClusterState(4, 4, (load((0, 1), used=1900, in_flight=50, running=1),) + idle, now=1.0, held=(big,))
    assert policy.on_tick(state) == [Transform((2, 3), 2)]  # a second TP2 that serves it at once
    state = ClusterState(4, 4, (load((0, 1)), load((2,)), load((3,))), now=2.0, held=(big,))
    assert policy.on_tick(state) == [Place("big", 0)]


def test_split_after_placements_uses_history_of_sizes():
    """A TP4 instance holding many short requests splits when they can be dealt over the four parts,
    even though together they exceed one part; not while the long request may still be there."""
    policy = GygesPolicy(split_delay=0.0)
    long_req = RequestInfo("long", 2000, 100, 0.0)  # 2100 tokens: more than a TP2 instance holds
    state = ClusterState(4, 4, tuple(load((d,)) for d in range(4)), now=0.0)
    assert isinstance(policy.on_request(long_req, state), Hold)
    state = ClusterState(4, 4, state.instances, now=0.1, held=(long_req,))
    assert policy.on_tick(state) == [Transform((0, 1, 2, 3), 4)]
    merged = ClusterState(4, 4, (load(range(4)),), now=0.5, held=(long_req,))
    assert policy.on_tick(merged) == [Place("long", 0)]
    for k in range(9):  # shorts of 200 tokens each (no TP1 instance exists: they go to the TP4)
        short = RequestInfo(f"s{k}", 150, 50, 1.0)
        busy = load(range(4), used=0, in_flight=2100 + 200 * k, running=1 + k)
        assert policy.on_request(short, ClusterState(4, 4, (busy,), now=1.0)) == Place(f"s{k}", 0)
    # 2100 (long) + 1800 (shorts) held, or just 2100: the long request may still be there: no split.
    assert policy.on_tick(ClusterState(4, 4, (load(range(4), used=2000, in_flight=1900, running=10),), 2.0)) == []
    assert policy.on_tick(ClusterState(4, 4, (load(range(4), used=2000, in_flight=100, running=3),), 2.5)) == []
    # 1800 held: the long request is surely gone, every request left is <= 200 tokens: four parts of 1000
    # take 1800 <= 4*1000 - 3*200 although one part would not.
    assert policy.on_tick(ClusterState(4, 4, (load(range(4), used=1500, in_flight=300, running=9),), 3.0)) \
        == [Transform((0, 1, 2, 3), 1)]


def test_merged_instance_on_its_way_back_admits_only_what_keeps_it_splittable():
    policy = GygesPolicy()
    merged = lambda held, largest: InstanceLoad((0, 1, 2, 3), 4, 3, 0, 4000, held, 0, 0, False, None, largest)
    req = RequestInfo("s", 300, 100, 0.0)
    # parts of 1000; largest 400 after admission: 4*1000 - 3*400 = 2800 must hold everything
    assert policy.on_request(req, ClusterState(4, 4, (merged(2400, 300),), 0.0)) == Place("s", 0)
    assert isinstance(policy.on_request(req, ClusterState(4, 4, (merged(2401, 300),), 0.0)), Hold)
    # still serving a request that needs the merged instance: admitted while it fits
    assert policy.on_request(req, ClusterState(4, 4, (merged(3500, 1500),), 0.0)) == Place("s", 0)


def test_split_without_history_needs_everything_in_one_part():
    policy = GygesPolicy(split_delay=0.0)
    state = ClusterState(4, 4, (load(range(4), used=2500, in_flight=0, running=5),), now=0.0)
    assert policy.on_tick(state) == []
    # 1500 tokens fit one TP2 half but no TP1 quarter: a partial split
    state = ClusterState(4, 4, (load(range(4), used=1500, in_flight=0, running=5),), now=0.0)
    assert policy.on_tick(state) == [Transform((0, 1, 2, 3), 2)]
    state = ClusterState(4, 4, (load(range(4), used=900, in_flight=100, running=5),), now=0.0)
    assert policy.on_tick(state) == [Transform((0, 1, 2, 3), 1)]


def test_merge_prefers_idle_smallest_group():
    policy = GygesPolicy(cost_model=TransformCostModel())
    insts = (load((0,), used=900, running=6), load((1,), used=800, running=5), load((2,)), load((3,)),
             load((4,)), load((5,)), load((6,)), load((7,)))
    req = RequestInfo("long", 1500, 100, 0.0)
    state = ClusterState(8, 8, insts, 0.0, held=(req,))
    assert policy.on_tick(state) == [Transform((2, 3), 2)]
    assert policy.merge_group(RequestInfo("l2", 3000, 0, 0.0), 4, state, LoadLedger(state)) == ((4, 5, 6, 7), True)


def test_short_requests_keep_flowing_while_a_long_one_waits_for_its_merge():
    policy = GygesPolicy()
    long_req = RequestInfo("long", 1800, 100, 0.0)
    insts = tuple(load((d,)) for d in range(4))
    state = ClusterState(4, 2, insts, 0.0, held=(long_req,))
    short = RequestInfo("short", 100, 10, 0.1)
    d = policy.on_request(short, state)
    planned = policy.on_tick(state)[0]
    assert planned == Transform((0, 1), 2)
    assert isinstance(d, Place) and d.instance not in planned.devices  # not on the instances to be merged


def test_held_long_request_does_not_block_short_ones_and_reserves_its_instance_after_long_defer():
    policy = GygesPolicy(long_defer_s=5.0)
    long_req = RequestInfo("long", 1800, 100, 0.0)
    insts = (load((0, 1), used=500, in_flight=100, running=1), load((2,), in_flight=600, running=2),
             load((3,), in_flight=600, running=2))
    state = ClusterState(4, 4, insts, 0.0, held=(long_req,))
    # fits the TP2 now, but base work goes to the base instances first
    d = policy.on_request(RequestInfo("s", 100, 10, 0.1), state)
    assert isinstance(d, Place) and d.instance in (2, 3)
    # TP1s full: the short spills onto the TP2 the long request waits for, while it has waited < long_defer_s
    # (reserving it at once held every short request behind each long one on a 2-device host)
    full = (insts[0], load((2,), in_flight=1000, running=3), load((3,), in_flight=1000, running=3))
    d = policy.on_request(RequestInfo("s", 100, 10, 1.0), ClusterState(4, 4, full, 1.0, held=(long_req,)))
    assert isinstance(d, Place) and d.instance == 0
    # once it has waited long_defer_s, the TP2 is kept for it
    d = policy.on_request(RequestInfo("s", 100, 10, 6.0), ClusterState(4, 4, full, 6.0, held=(long_req,)))
    assert isinstance(d, Hold)


def test_reject_message_gives_the_limit():
    d = GygesPolicy().on_request(RequestInfo("x", 5000, 10, 0.0),
                                 ClusterState(4, 4, tuple(load((d,)) for d in range(4)), 0.0))
    assert isinstance(d, Reject) and "4000" in d.message and "TP 4" in d.message


def test_initial_instances():
    assert GygesPolicy().initial_instances(4, 4) == [(0,), (1,), (2,), (3,)]
    assert GygesPolicy(base_tp=2).initial_instances(8, 8) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert StaticTP().initial_instances(4, 4) == [(0, 1, 2, 3)]
    assert StaticTP().initial_instances(8, 4) == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert StaticDPLeastLoad(tp=2).initial_instances(4, 4) == [(0, 1), (2, 3)]
    assert StaticHybrid().initial_instances(4, 4) == [(0, 1), (2,), (3,)]
    assert StaticHybrid().initial_instances(8, 8) == [(0, 1, 2, 3), (4,), (5,), (6,), (7,)]
    for groups in (StaticHybrid().initial_instances(8, 8), GygesPolicy().initial_instances(8, 8)):
        Topology(8, tuple(Instance.of(g) for g in groups), 8)


def test_make_policy():
    assert isinstance(make_policy("gyges", split_delay=1.0), GygesPolicy)
    assert isinstance(make_policy("auto"), GygesPolicy)
    assert make_policy("static-dp-rr").name == "static-dp-rr"
    assert make_policy("static-hybrid", big_tp=2).name == "static-hybrid"
    with pytest.raises(ValueError, match="static-dp-ll.*static-tp"):
        make_policy("nope")


# -- baselines ------------------------------------------------------------------------------------------
@SETTINGS
@given(cluster_states(), st.data(), st.sampled_from(["static-dp-rr", "static-dp-ll", "static-tp"]))
def test_baselines_never_transform_and_reject_exactly_what_no_instance_holds(sc, data, name):
    state, per_device = sc
    policy = make_policy(name)
    req = data.draw(requests(per_device, state.num_devices))
    d = policy.on_request(req, state)
    biggest = max(i.kv_capacity_tokens for i in state.instances)
    assert isinstance(d, Reject) == (req.need_tokens > biggest)
    if isinstance(d, Place):
        inst = by_base(state)[d.instance]
        assert not inst.transforming and fits(req.need_tokens, inst)
    decisions = policy.on_tick(state)
    assert not any(isinstance(x, Transform) for x in decisions)
    extra: Dict[int, int] = {}
    held = {h.rid: h for h in state.held}
    for x in decisions:
        if isinstance(x, Place):
            inst = by_base(state)[x.instance]
            assert fits(held[x.rid].need_tokens, inst, extra.get(x.instance, 0))
            extra[x.instance] = extra.get(x.instance, 0) + held[x.rid].need_tokens
    assert {x.rid for x in decisions if isinstance(x, Reject)} == \
        {h.rid for h in state.held if h.need_tokens > biggest}


def test_round_robin_deals_in_turn_and_holds_behind_a_full_instance():
    policy = StaticDPRoundRobin()
    state = ClusterState(4, 4, tuple(load((d,)) for d in range(4)), 0.0)
    got = [policy.on_request(RequestInfo(f"r{k}", 10, 10, 0.0), state) for k in range(6)]
    assert [d.instance for d in got] == [0, 1, 2, 3, 0, 1]
    full = ClusterState(4, 4, (load((0,)), load((1,)), load((2,), in_flight=990, running=1), load((3,))), 0.0)
    held = policy.on_request(RequestInfo("x", 10, 10, 0.0), full)  # its turn: instance 2, full
    assert isinstance(held, Hold)
    with_held = ClusterState(4, 4, full.instances, 0.1, held=(RequestInfo("x", 10, 10, 0.0),))
    assert policy.on_tick(with_held) == []
    freed = ClusterState(4, 4, tuple(load((d,)) for d in range(4)), 0.2, held=with_held.held)
    assert policy.on_tick(freed) == [Place("x", 2)]


def test_least_load_picks_the_emptiest_instance():
    state = ClusterState(2, 2, (load((0,), in_flight=500, running=3), load((1,), in_flight=100, running=1)), 0.0)
    assert StaticDPLeastLoad().on_request(RequestInfo("r", 10, 10, 0.0), state) == Place("r", 1)


def test_hybrid_routes_long_requests_to_the_big_instance():
    policy = StaticHybrid(long_threshold_tokens=500)
    state = ClusterState(4, 4, (load((0, 1)), load((2,)), load((3,), in_flight=10, running=1)), 0.0)
    assert policy.on_request(RequestInfo("short", 100, 10, 0.0), state) == Place("short", 2)
    assert policy.on_request(RequestInfo("long", 900, 10, 0.0), state) == Place("long", 0)
    assert isinstance(policy.on_request(RequestInfo("huge", 2500, 10, 0.0), state), Reject)
    default = StaticHybrid()  # threshold: what a TP1 instance holds
    assert default.on_request(RequestInfo("mid", 900, 10, 0.0), state) == Place("mid", 2)
    assert default.on_request(RequestInfo("big", 1500, 10, 0.0), state) == Place("big", 0)



def test_static_shape_lays_out_aligned_groups_and_routes_each_request_to_the_smallest_size_that_holds_it():
    policy = make_policy("static-shape", sizes="1-2-1-4")
    assert policy.initial_instances(8, 4) == [(0, 1, 2, 3), (4, 5), (6,), (7,)]
    with pytest.raises(ValueError):
        policy.initial_instances(4, 4)  # sizes do not sum to the devices
    with pytest.raises(ValueError):
        make_policy("static-shape", sizes="3-1")
    tp2_full = load((4, 5), in_flight=1900, running=1)
    state = ClusterState(8, 4, (load(range(4)), tp2_full, load((6,), in_flight=10, running=1), load((7,))), 0.0)
    assert policy.on_request(RequestInfo("short", 100, 10, 0.0), state) == Place("short", 7)  # least loaded TP1
    assert policy.on_request(RequestInfo("big", 3000, 10, 0.0), state) == Place("big", 0)
    # a TP2-sized request waits for the TP2 (its own queue) rather than taking the TP4
    assert isinstance(policy.on_request(RequestInfo("mid", 1500, 10, 0.0), state), Hold)
    held = ClusterState(8, 4, state.instances, 0.1, held=(RequestInfo("mid", 1500, 10, 0.0),))
    assert policy.on_request(RequestInfo("short2", 100, 10, 0.1), held) == Place("short2", 7)
    assert isinstance(policy.on_request(RequestInfo("huge", 5000, 10, 0.0), state), Reject)

def test_split_uses_the_runtime_part_capacity_when_known():
    """A merge turns freed weight memory into KV, which a split gives back: a part holds what the runtime
    reports for TP1 (capacity_by_tp), not half of the merged capacity."""
    merged = InstanceLoad((0, 1), 2, running=1, waiting=0, kv_capacity_tokens=7200, kv_used_tokens=3000,
                          kv_evictable_tokens=0, tokens_in_flight=0, idle_since=None)
    policy = GygesPolicy(split_delay=0.0)
    naive = ClusterState(2, 2, (merged,), now=100.0)
    known = ClusterState(2, 2, (merged,), now=100.0, capacity_by_tp=((1, 2048), (2, 7200)))
    policy.on_tick(naive)
    assert policy.split_target(merged) == 1  # 3000 tokens fit one half of 7200
    policy.on_tick(known)
    assert policy.split_target(merged) is None  # but not one TP1 instance of 2048
    assert not any(isinstance(d, Transform) for d in policy.on_tick(known))


# -- Gyges: merges for speed (step-time model + TTFT target) ---------------------------------------------
def gpu_like_step_model():
    """TP divides the work and adds a small all-reduce: TP4 prefills about 3.5x faster than TP1."""
    from gyges.costmodel import StepTimeModel
    return StepTimeModel(base_s=0.002, weight_s=0.003, per_token_s=1e-4, per_context_token_s=0.0,
                         allreduce_s=0.0005, allreduce_per_token_s=1e-7)


def test_long_prompt_that_fits_tp1_merges_for_speed_and_short_ones_stay_tp1():
    policy = GygesPolicy(step_model=gpu_like_step_model(), ttft_target_s=1.0, chunk_tokens=1024)
    insts = tuple(load((d,), cap_per_device=100_000) for d in range(4))
    state = ClusterState(4, 4, insts, 0.0)
    long_req = RequestInfo("long", 20_000, 10, 0.0)  # ~2 s at TP1, ~0.55 s at TP4, 1.05 s at TP2
    assert policy.target_tp(long_req, state) == 4
    assert isinstance(policy.on_request(long_req, state), Hold)
    assert policy.on_tick(ClusterState(4, 4, insts, 0.1, held=(long_req,))) == [Transform((0, 1, 2, 3), 4)]
    short = RequestInfo("short", 500, 10, 0.0)
    assert policy.target_tp(short, state) == 1 and policy.on_request(short, state) == Place("short", 0)
    # a merged instance still prefilling the long prompt stays merged; once the prefill is done it splits
    merged = lambda left: InstanceLoad((0, 1, 2, 3), 4, 1, 0, 400_000, 15_000, 0, 5_010, False, None, 20_010, left)
    assert policy.on_tick(ClusterState(4, 4, (merged(5_000),), 1.0)) == []
    policy.on_tick(ClusterState(4, 4, (merged(0),), 1.1))
    assert policy.on_tick(ClusterState(4, 4, (merged(0),), 2.2)) == [Transform((0, 1, 2, 3), 1)]


def test_no_merge_for_speed_where_tp_is_not_faster():
    from gyges.costmodel import StepTimeModel
    cpu_like = StepTimeModel(base_s=0.002, weight_s=0.003, per_token_s=1e-4, per_context_token_s=0.0,
                             allreduce_s=0.01, allreduce_per_token_s=1.2e-4)  # TP2 costs more than it saves
    policy = GygesPolicy(step_model=cpu_like, ttft_target_s=0.5, chunk_tokens=1024)
    state = ClusterState(2, 2, tuple(load((d,), cap_per_device=100_000) for d in range(2)), 0.0)
    long_req = RequestInfo("long", 20_000, 10, 0.0)
    assert policy.target_tp(long_req, state) == 1
    assert policy.on_request(long_req, state) == Place("long", 0)


def test_partial_split_frees_devices_while_a_long_request_still_needs_a_tp2():
    """TP4 holding one request of 1500 tokens (parts of TP1: 1000, of TP2: 2000): split into two TP2s, then
    the TP2 without it splits into TP1s."""
    policy = GygesPolicy(split_delay=0.0)
    tp4 = InstanceLoad((0, 1, 2, 3), 4, 1, 0, 4000, 1400, 0, 100, False, None, 1500)
    assert policy.on_tick(ClusterState(4, 4, (tp4,), 0.0)) == [Transform((0, 1, 2, 3), 2)]
    with_long = InstanceLoad((0, 1), 2, 1, 0, 2000, 1400, 0, 100, False, None, 1500)
    empty = InstanceLoad((2, 3), 2, 0, 0, 2000, 0, 0, 0, False, 0.0, 0)
    assert policy.on_tick(ClusterState(4, 4, (with_long, empty), 1.0)) == [Transform((2, 3), 1)]


def test_naive_placement_ablations_ignore_reservations_and_merged_instances():
    """gyges-ll / gyges-rr keep the mechanism (the same merge for the held long request) but place short work
    where Gyges would not: on the TP2 instance the long request waits for."""
    long_req = RequestInfo("long", 1800, 100, 0.0)
    insts = (load((0, 1), used=100, in_flight=100, running=1), load((2,), in_flight=600, running=2),
             load((3,), in_flight=600, running=2))
    state = ClusterState(4, 4, insts, 0.0, held=(long_req,))
    short = RequestInfo("s", 100, 10, 0.1)
    assert GygesPolicy().on_request(short, state) in (Place("s", 2), Place("s", 3))
    assert make_policy("gyges-ll").on_request(short, state) == Place("s", 0)  # least loaded: the TP2
    rr = make_policy("gyges-rr")
    assert {rr.on_request(RequestInfo(f"s{k}", 100, 10, 0.1), state).instance for k in range(3)} == {0, 2, 3}


def test_speed_merges_only_on_lightly_loaded_devices():
    policy = GygesPolicy(step_model=gpu_like_step_model(), ttft_target_s=1.0, chunk_tokens=1024,
                         max_disturbed_per_device=4)
    long_req = RequestInfo("long", 20_000, 10, 0.0)
    busy = tuple(load((d,), cap_per_device=100_000, in_flight=1000, running=5) for d in range(4))
    assert policy.target_tp(long_req, ClusterState(4, 4, busy, 0.0)) == 1  # 20 decodes would share its prefill
    light = tuple(load((d,), cap_per_device=100_000, in_flight=1000, running=4) for d in range(4))
    assert policy.target_tp(long_req, ClusterState(4, 4, light, 0.0)) == 4


def test_one_speed_prefill_per_merged_instance():
    """A second long prompt does not join the TP4 instance that is prefilling the first: it gets the other
    idle group."""
    policy = GygesPolicy(step_model=gpu_like_step_model(), ttft_target_s=1.0, chunk_tokens=1024)
    prefilling = InstanceLoad((0, 1, 2, 3), 4, 1, 0, 400_000, 5_000, 0, 15_010, False, None, 20_010, 15_000)
    state = ClusterState(8, 4, (prefilling,) + tuple(load((d,), cap_per_device=100_000) for d in range(4, 8)), 0.0)
    second = RequestInfo("second", 20_000, 10, 0.0)
    assert isinstance(policy.on_request(second, state), Hold)
    held = ClusterState(8, 4, state.instances, 0.1, held=(second,))
    assert policy.on_tick(held) == [Transform((4, 5, 6, 7), 4)]
    done = InstanceLoad((0, 1, 2, 3), 4, 1, 0, 400_000, 20_000, 0, 10, False, None, 20_010, 0)
    assert policy.on_request(second, ClusterState(8, 4, (done,) + state.instances[1:], 0.0)) == Place("second", 0)


def test_capacity_merge_when_short_requests_wait_for_memory_and_the_merge_multiplies_kv():
    """Weights that fill most of a device: a TP2 pair holds 4x the KV of its two TP1 halves. Short requests
    that waited 2 s for memory get a merge of the fullest pair; it takes short work and stays merged while
    requests wait; with a gain below the threshold, or too soon, nothing merges."""
    full = lambda d: load((d,), cap_per_device=1000, used=900, in_flight=100, running=5)
    insts = (full(0), load((1,), used=800, in_flight=100, running=4), full(2), full(3))
    waiting = RequestInfo("s", 200, 50, 10.0)
    rich = ((1, 1000), (2, 8000), (4, 20000))
    policy = GygesPolicy()
    assert policy.on_tick(ClusterState(4, 4, insts, 11.0, held=(waiting,), capacity_by_tp=rich)) == []  # 1 s
    assert policy.on_tick(ClusterState(4, 4, insts, 12.5, held=(waiting,), capacity_by_tp=rich)) \
        == [Transform((2, 3), 2)]  # the fullest pair
    poor = ((1, 1000), (2, 2100), (4, 4300))
    assert GygesPolicy().on_tick(ClusterState(4, 4, insts, 12.5, held=(waiting,), capacity_by_tp=poor)) == []
    merged = InstanceLoad((2, 3), 2, 10, 0, 8000, 7000, 0, 500, False, None, 300)
    state = ClusterState(4, 4, insts[:2] + (merged,), 13.0, held=(waiting,), capacity_by_tp=rich)
    assert policy.on_tick(state) == [Place("s", 2)]  # short work on the capacity-merged instance
    light = InstanceLoad((2, 3), 2, 2, 0, 8000, 300, 0, 100, False, None, 300)
    assert policy.on_tick(ClusterState(4, 4, insts[:2] + (light,), 14.0, held=(waiting,), capacity_by_tp=rich)) \
        == [Place("s", 2)]  # requests wait: no split
    idle = ClusterState(4, 4, insts[:2] + (light,), 15.0, capacity_by_tp=rich)
    policy.on_tick(idle)
    assert policy.on_tick(ClusterState(4, 4, insts[:2] + (light,), 16.5, capacity_by_tp=rich)) \
        == [Transform((2, 3), 1)]  # nothing waits and its requests fit the parts: split after split_delay


# -- Gyges: KV-rich merges (weights fill most of a device: a merged instance holds 3x per doubling) ------
@st.composite
def kv_rich_states(draw):
    num_devices = draw(st.sampled_from([2, 4, 8]))
    max_tp = draw(st.sampled_from([t for t in (2, 4, 8) if t <= num_devices]))
    per_device = draw(st.integers(64, 2048))
    capacity = {t: per_device * t * 3 ** (t.bit_length() - 1) for t in (1, 2, 4, 8) if t <= max_tp}
    groups = draw(partitions(0, num_devices, max_tp))
    insts = []
    for g in groups:
        cap = capacity[len(g)]
        used = draw(st.integers(0, cap))
        in_flight = draw(st.integers(0, cap - used))
        running = draw(st.integers(1, 8)) if used + in_flight else 0
        insts.append(InstanceLoad(g, len(g), running, 0, cap, used, 0, in_flight, False,
                                  None if running else 0.0))
    held = tuple(RequestInfo(f"h{k}", draw(st.integers(1, per_device)), draw(st.integers(0, 32)), float(k))
                 for k in range(draw(st.integers(0, 5))))
    return ClusterState(num_devices, max_tp, tuple(insts), 100.0, held, tuple(sorted(capacity.items()))), capacity


@SETTINGS
@given(kv_rich_states())
def test_kv_rich_ticks_place_where_it_fits_merge_validly_and_never_split_while_requests_wait(sc):
    state, capacity = sc
    decisions = GygesPolicy(split_delay=0.0).on_tick(state)
    insts, held = by_base(state), {h.rid: h for h in state.held}
    extra: Dict[int, int] = {}
    for d in decisions:
        if isinstance(d, Place):
            assert fits(held[d.rid].need_tokens, insts[d.instance], extra.get(d.instance, 0))
            extra[d.instance] = extra.get(d.instance, 0) + held[d.rid].need_tokens
    placed = {d.rid for d in decisions if isinstance(d, Place)}
    remaining = [h for h in state.held if h.rid not in placed]
    transforms = [d for d in decisions if isinstance(d, Transform)]
    assert len(transforms) <= 1
    for t in transforms:
        validate_transform(t, state)
        if t.is_merge:  # the smallest size that holds some waiting request, or a pair of equal instances
            members = [i for i in state.instances if set(i.devices) <= set(t.devices)]
            size = len(t.devices)
            assert remaining
            assert (any(capacity.get(size // 2, 0) < h.need_tokens <= capacity[size] for h in remaining)
                    or (len(members) == 2 and members[0].tp == members[1].tp))
        else:
            assert not remaining, "split a KV-rich instance while requests wait for memory"
            inst = insts[t.devices[0]]
            assert inst.held_tokens + extra.get(inst.base, 0) <= capacity[t.tp]


# -- Gyges: shapes by demand (paper-like H20 limits: a TP2 holds 11x a TP1, a TP4 under 1.5x two TP2s) -----
PAPER_LIKE = ((1, 1000), (2, 11000), (4, 32000))


class PenalizedSteps:
    """A step costs (base + tokens/tp) x a TP penalty (the Gyges paper's 1.32 at TP2, 2.22 at TP4): merging
    always loses decode throughput."""

    factor = {1: 1.0, 2: 1.32, 4: 2.22, 8: 3.73}

    def step_time(self, batch_tokens, context_tokens, tp, requests=None):
        return (0.01 + 1e-4 * batch_tokens / tp + 1e-7 * context_tokens / tp) * self.factor[tp]


def paper_load(devices, held=0, largest=None, running=None):
    devices = tuple(devices)
    cap = dict(PAPER_LIKE)[len(devices)]
    n = running if running is not None else (1 if held else 0)
    return InstanceLoad(devices, len(devices), n, 0, cap, held, 0, 0, False, None if n else 0.0,
                        largest if largest is not None else held)


def test_merged_instance_larger_than_its_work_drains_to_a_partial_split_while_requests_wait():
    """A TP4 whose requests all fit a TP2 takes only what keeps it splittable into TP2s, and splits into them
    although requests wait (two TP2s hold almost as much KV: it is not KV-rich against them)."""
    tp2_full = (paper_load((4, 5), held=10_500), paper_load((6, 7), held=10_500))
    req = RequestInfo("m", 4000, 1000, 0.0)  # 5000 tokens: a TP2 request
    heavy = ClusterState(8, 4, (paper_load(range(4), held=15_000, largest=8000),) + tp2_full, 0.0,
                         capacity_by_tp=PAPER_LIKE)
    assert isinstance(GygesPolicy().on_request(req, heavy), Hold)  # 20,000 > 2 x 11,000 - 8,000
    light = ClusterState(8, 4, (paper_load(range(4), held=8000, largest=8000),) + tp2_full, 0.0,
                         capacity_by_tp=PAPER_LIKE)
    assert GygesPolicy().on_request(req, light) == Place("m", 0)  # 13,000 <= 14,000: still splittable
    waiting = RequestInfo("s", 900, 100, 0.0)
    splittable = ClusterState(8, 4, (paper_load(range(4), held=14_000, largest=8000),) + tp2_full, 1.0,
                              held=(waiting,), capacity_by_tp=PAPER_LIKE)
    assert GygesPolicy(split_delay=0.0).on_tick(splittable) == [Transform((0, 1, 2, 3), 2)]


def test_the_only_instance_of_a_size_keeps_serving_that_size():
    """No other instance holds TP2 requests: the TP4 takes them although that keeps it from splitting."""
    tp1_full = tuple(paper_load((d,), held=1000) for d in range(4, 8))
    state = ClusterState(8, 4, (paper_load(range(4), held=15_000, largest=8000),) + tp1_full, 0.0,
                         capacity_by_tp=PAPER_LIKE)
    assert GygesPolicy().on_request(RequestInfo("m", 4000, 1000, 0.0), state) == Place("m", 0)


def test_short_work_goes_to_the_smallest_kv_rich_size_before_a_larger_emptier_one():
    insts = (paper_load((0, 1), held=5000, running=5), paper_load((2,), held=1000), paper_load((3,), held=1000),
             paper_load((4, 5, 6, 7), held=1000, largest=500, running=2))
    state = ClusterState(8, 4, insts, 0.0, capacity_by_tp=PAPER_LIKE)
    assert GygesPolicy().on_request(RequestInfo("s", 400, 100, 0.0), state) == Place("s", 0)


def test_with_a_step_model_a_request_waits_for_the_instance_of_its_size_instead_of_merging_another():
    busy_tp4 = paper_load(range(4), held=25_000, largest=20_000)
    idle = tuple(paper_load((d,)) for d in range(4, 8))
    long_req = RequestInfo("long", 19_000, 1000, 0.0)  # 20,000 tokens: TP4 only
    state = ClusterState(8, 4, (busy_tp4,) + idle, 1.0, held=(long_req,), capacity_by_tp=PAPER_LIKE)
    assert GygesPolicy().on_tick(state) == [Transform((4, 5, 6, 7), 4)]  # memory alone: the second TP4
    assert GygesPolicy(step_model=PenalizedSteps()).on_tick(state) == []  # it would cost 4 devices' speed
    done = ClusterState(8, 4, (paper_load(range(4), held=5000, largest=5000),) + idle, 2.0, held=(long_req,),
                        capacity_by_tp=PAPER_LIKE)
    assert GygesPolicy(step_model=PenalizedSteps()).on_tick(done) == [Place("long", 0)]


def test_with_a_step_model_a_group_drains_before_it_merges():
    """The long request would not fit right after merging (0, 1): the pair takes no new work and merges
    once it would (its requests finish at TP1 speed instead of the merged instance's)."""
    long_req = RequestInfo("long", 9000, 1000, 0.0)  # 10,000 tokens: a TP2
    full = ClusterState(4, 4, tuple(paper_load((d,), held=900) for d in range(4)), 1.0, held=(long_req,),
                        capacity_by_tp=PAPER_LIKE)
    assert GygesPolicy().on_tick(full) == [Transform((0, 1), 2)]  # without a model: merge at once
    policy = GygesPolicy(step_model=PenalizedSteps())
    assert policy.on_tick(full) == []
    d = policy.on_request(RequestInfo("s", 50, 10, 1.0), full)
    assert isinstance(d, Place) and d.instance in (2, 3)  # not on the draining pair
    drained = ClusterState(4, 4, (paper_load((0,), held=500), paper_load((1,), held=500)) + full.instances[2:],
                           2.0, held=(long_req,), capacity_by_tp=PAPER_LIKE)
    assert policy.on_tick(drained) == [Transform((0, 1), 2)]


def test_with_a_step_model_a_costly_merge_waits_while_smaller_requests_are_held():
    long_req = RequestInfo("long", 9000, 1000, 0.0)
    short = RequestInfo("s", 900, 50, 0.5)  # 950 tokens: no TP1 instance has room now
    insts = tuple(paper_load((d,), held=100) for d in range(4))
    policy = GygesPolicy(step_model=PenalizedSteps(), long_defer_s=5.0)
    state = lambda now: ClusterState(4, 4, insts, now, held=(long_req, short), capacity_by_tp=PAPER_LIKE)
    assert policy.on_tick(state(1.0)) == []  # the short one goes first
    assert GygesPolicy(step_model=PenalizedSteps(), long_defer_s=5.0).on_tick(
        ClusterState(4, 4, insts, 1.0, held=(long_req,), capacity_by_tp=PAPER_LIKE)) == [Transform((0, 1), 2)]
    assert policy.on_tick(state(5.0)) == [Transform((0, 1), 2)]  # waited long_defer_s: merged anyway


# -- Gyges: the base reserve (short requests keep base-TP instances, sized from their demand) ------------
def test_base_demand_is_littles_law_over_the_window_plus_the_backlog():
    from gyges.policies.base_demand import BaseDemand
    # 500 of 1000 tokens for 1 s prefill + 10 steps of 0.1 s: half the KV for 2 s, plus the 1 s prefill
    assert BaseDemand.occupancy(500, 1000, 1.0, 0.1, 10) == pytest.approx(2.0)
    demand = BaseDemand(window_s=10.0, utilization=0.5)
    assert demand.instances_needed(0.0) == 0
    for t in range(10):
        demand.record(float(t), 2.0)  # one request a second, 2 instance-seconds each: 2 instances busy
    assert demand.busy_instances(10.0) == pytest.approx(2.0)
    assert demand.instances_needed(10.0) == 4  # at 50% utilization
    assert demand.instances_needed(10.0, backlog_instances=1.0) == 6
    young = BaseDemand(window_s=60.0)
    young.record(100.0, 2.0)
    young.record(101.0, 2.0)
    assert young.busy_instances(102.0) == pytest.approx(4 / 5)  # before a window has passed: over 5 s at least
    assert young.busy_instances(120.0) == pytest.approx(4 / 20)
    assert demand.busy_instances(15.5) == pytest.approx(0.8)  # arrivals before 5.5 s left the window
    assert demand.instances_needed(100.0) == 0


def short_arrivals(policy, state, n=40, every_s=0.25):
    """n base-class arrivals (900 tokens: one fills most of a paper-like TP1) every every_s seconds."""
    for k in range(n):
        policy.on_request(RequestInfo(f"s{k}", 800, 100, k * every_s),
                          ClusterState(state.num_devices, state.max_tp, state.instances, k * every_s,
                                       capacity_by_tp=state.capacity_by_tp))


def test_a_merge_never_takes_the_base_instances_the_short_requests_need():
    tp2 = paper_load((0, 1), held=10_000, largest=10_000)
    insts = (tp2, paper_load((2,), held=900), paper_load((3,), held=900))
    long_req = RequestInfo("long", 4000, 1000, 9.0)  # 5,000 tokens: a TP2
    state = ClusterState(4, 4, insts, 10.0, held=(long_req,), capacity_by_tp=PAPER_LIKE)
    # a step model where merging pays: a second TP2 is merged rather than waiting for the busy one
    unreserved = GygesPolicy(step_model=gpu_like_step_model(), base_reserve_utilization=None)
    assert unreserved.on_tick(state) == [Transform((2, 3), 2)]  # the last two TP1s merge for it
    policy = GygesPolicy(step_model=gpu_like_step_model())
    short_arrivals(policy, state)
    assert policy.base_reserve(state) == 2  # demand asks for more; two are all a TP2 leaves
    assert policy.on_tick(state) == []  # it waits for the TP2 instead
    # with no short traffic in the window the reserve is gone and the merge is made
    later = ClusterState(4, 4, insts, 200.0, held=(long_req,), capacity_by_tp=PAPER_LIKE)
    assert policy.base_reserve(later) == 0
    assert policy.on_tick(later) == [Transform((2, 3), 2)]


def test_short_requests_held_without_base_instances_drain_a_merged_one_back_to_base_tp():
    """Two TP2 instances, no TP1 left, short and TP2 requests held: the TP2 holding less takes no new TP2
    work and splits into TP1s once its TP2 work ends, although TP2 requests are still held."""
    policy = GygesPolicy(step_model=PenalizedSteps(), split_delay=0.0)
    busy = paper_load((0, 1), held=10_500, largest=10_500)
    ending = lambda held: paper_load((2, 3), held=held, largest=held)
    short_arrivals(policy, ClusterState(4, 4, (busy, ending(6000)), 0.0, capacity_by_tp=PAPER_LIKE))
    held = (RequestInfo("t2", 3000, 1000, 9.5), RequestInfo("s", 800, 100, 9.6))
    state = ClusterState(4, 4, (busy, ending(6000)), 10.0, held=held, capacity_by_tp=PAPER_LIKE)
    assert policy.on_tick(state) == []  # (2, 3) has room for t2 (4,000 of 11,000 free) but is drained
    d = policy.on_request(RequestInfo("t2b", 3000, 1000, 10.0), state)
    assert isinstance(d, Hold)
    done = ClusterState(4, 4, (busy, ending(0)), 30.0, held=held, capacity_by_tp=PAPER_LIKE)
    assert Transform((2, 3), 1) in policy.on_tick(done)
    # the same state without the reserve keeps both TP2s for the TP2 requests
    plain = GygesPolicy(step_model=PenalizedSteps(), split_delay=0.0, base_reserve_utilization=None)
    assert plain.on_tick(state) == [Place("t2", 2), Place("s", 2)]
