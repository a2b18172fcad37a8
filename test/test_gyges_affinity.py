"""Placement by affinity (gyges.policies.affinity), pure: a request goes where its prefix's KV lives unless the
queue there costs more than recomputing that prefix elsewhere (recomputing N prompt tokens costs the prefill
of N tokens); the prefix index the controller keeps; the policies' use of it."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gyges.costmodel import StepTimeModel
from gyges.policies import ClusterState, GygesPolicy, InstanceLoad, Place, RequestInfo, StaticDPLeastLoad, least_loaded
from gyges.policies.affinity import (AffinityCandidate, PrefixIndex, choose_by_affinity, pick_by_affinity,
                                     placement_cost)

STEP = StepTimeModel(base_s=0.005, weight_s=0.01, per_token_s=2e-5, per_context_token_s=1e-8)


def _cand(base, cached=0, queued=0, running=0, waiting=0, tp=1, in_flight=0):
    return AffinityCandidate(base, tp, running, waiting, queued, in_flight, cached)


@pytest.mark.parametrize("model", [None, STEP], ids=["tokens", "step-model"])
def test_idle_home_wins_and_a_busy_home_loses(model):
    prompt = 2048
    home, other = _cand(0, cached=1536), _cand(1)
    assert choose_by_affinity(prompt, [other, home], model).base == 0
    # the home's queue costs more than the 1536 tokens it saves: go elsewhere and recompute
    busy_home = _cand(0, cached=1536, queued=4096)
    assert choose_by_affinity(prompt, [other, busy_home], model).base == 1
    # a queue shorter than the saving still loses to the cache
    assert choose_by_affinity(prompt, [other, _cand(0, cached=1536, queued=1024)], model).base == 0


@pytest.mark.parametrize("model", [None, STEP], ids=["tokens", "step-model"])
def test_recomputing_n_tokens_costs_the_prefill_of_n_tokens(model):
    # cached N tokens behind a queue of N tokens is exactly as fast as recomputing them on an idle instance
    for n in (0, 100, 512, 1500):
        a = placement_cost(2000, _cand(0, cached=n, queued=n), model, 512)
        b = placement_cost(2000, _cand(1), model, 512)
        assert a == pytest.approx(b)
    # running decodes ride along every chunk: the busier instance costs more for the same tokens
    assert placement_cost(600, _cand(0, running=8), model) > placement_cost(600, _cand(1), model)


def test_ties_go_to_the_emptier_instance_then_the_lowest_device():
    assert choose_by_affinity(10, [_cand(1), _cand(0)]).base == 0
    assert choose_by_affinity(10, [_cand(0, waiting=2), _cand(1)]).base == 1
    fuller = AffinityCandidate(0, 1, 0, 0, 0, 0, 0, kv_free_tokens=10)
    emptier = AffinityCandidate(1, 1, 0, 0, 0, 0, 0, kv_free_tokens=100)
    assert choose_by_affinity(10, [fuller, emptier]).base == 1  # new conversations spread over the memory
    with pytest.raises(ValueError):
        choose_by_affinity(10, [])


def test_prefix_index_matches_whole_leading_blocks():
    idx = PrefixIndex(block_tokens=4)
    a = list(range(10))
    idx.insert(0, a)
    assert idx.match(0, a) == 8 and idx.match(1, a) == 0
    assert idx.match(0, a[:6] + [99, 98, 97]) == 4  # diverges inside block 2
    assert idx.match(0, [99] + a[1:]) == 0  # chained: a later block never matches after a different one
    idx.insert(0, list(range(100, 116)), max_blocks=3)  # LRU cap: the oldest blocks go
    assert idx.size(0) == 3 and idx.match(0, a) == 0
    idx.insert(1, a)
    idx.regroup([0, 1], [0])  # merge
    assert idx.match(0, a) == 8 and idx.size(1) == 0
    idx.regroup([0], [0, 1])  # split: every part inherits
    assert idx.match(1, list(range(100, 116))) == 12
    idx.replace(1, idx.block_hashes(a))  # a new leader's own report after the split: exactly what it holds
    assert idx.match(1, a) == 8 and idx.match(1, list(range(100, 116))) == 0


def _load(base, tp=1, queued=0, running=0, cap=1000, in_flight=0):
    return InstanceLoad(devices=tuple(range(base, base + tp)), tp=tp, running=running, waiting=0,
                        kv_capacity_tokens=cap, kv_used_tokens=0, kv_evictable_tokens=0, tokens_in_flight=in_flight,
                        prefill_tokens_queued=queued)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 300)), min_size=1, max_size=6),
       st.integers(1, 400))
def test_without_cached_tokens_placement_is_least_loaded(loads, prompt):
    cands = [_load(i, running=r, in_flight=f) for i, (r, f) in enumerate(loads)]
    req = RequestInfo("r", prompt, 10, 0.0)
    assert pick_by_affinity(req, cands) == least_loaded(cands)


def test_policies_send_a_request_to_its_cached_prefix():
    state = ClusterState(2, 2, (_load(0, in_flight=50), _load(1)), 0.0)
    fresh = RequestInfo("a", 300, 10, 0.0)
    warm = RequestInfo("b", 300, 10, 0.0, cached_tokens=((0, 256),))
    for policy in (GygesPolicy(), StaticDPLeastLoad()):
        assert policy.on_request(fresh, state) == Place("a", 1)  # least loaded
        assert policy.on_request(warm, state) == Place("b", 0)  # where 256 of its 300 tokens are cached
