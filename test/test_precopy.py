"""Pre-copy (--gyges-precopy-chunk-bytes): a merge of TP1 instances copies the KV pages that no longer change while
both instances keep serving, then pauses only for the pages written since. Weight prefetch
(--gyges-prefetch-chunk-bytes): a split fetches the weight rows its parts lack while the merged instance serves.

Checked on the real multi-process engine (CPU workers, tiny float32 model): greedy tokens equal a run without
transformations and logprobs agree within 1e-4 across pre-copied merges and (stop-and-copy) splits, with
requests decoding and arriving during the pre-copy; an abort during the pre-copy and a worker's death leave no
page behind and nothing half-done.
"""

import threading
import time

import pytest

from test_gyges_live import (PARAMS, _assert_all_pages_free, _assert_same, _prompts, _run_with_transforms, _try,
                             two_instance_engine)

pytestmark = pytest.mark.slow


def _start_long_request(eng, prompt, rid, results):
    """A streamed 1500-token request (results["long"]: its last chunk) on a thread, once its first token came."""
    started = threading.Event()

    def stream():
        for chunk in eng.generate(input_ids=prompt, rid=rid, stream=True, sampling_params={
                "max_new_tokens": 1500, "temperature": 0, "ignore_eos": True}):
            started.set()
            results["long"] = chunk

    def run():
        results["error"] = _try(stream)
        started.set()

    t = threading.Thread(target=run)
    t.start()
    assert started.wait(60)
    return t


@pytest.fixture(scope="module")
def precopy_engine(test_model):
    # A 4 KiB chunk per iteration: a pre-copy of a few dozen pages spans many iterations of both instances; a
    # split's weight prefetch of 2 KiB per iteration spans ~100 iterations of the merged instance.
    eng = two_instance_engine(test_model, gyges_precopy_chunk_bytes=4096, gyges_prefetch_chunk_bytes=2048)
    try:
        yield eng
    finally:
        eng.shutdown()


def test_precopied_merges_and_splits_keep_tokens_with_requests_arriving(precopy_engine):
    eng = precopy_engine
    prompts = _prompts(8)
    reference = eng.generate(input_ids=prompts, sampling_params=PARAMS, return_logprob=True)
    late = _prompts(11)[8:]  # arrive while the second merge is pre-copying
    late_ref = eng.generate(input_ids=late, sampling_params=PARAMS, return_logprob=True)
    # The runs above left their prompts in both instances' radix caches: pages the pre-copy moves ahead.
    outs, bds = _run_with_transforms(eng, prompts, {10: ([0, 1], 2), 20: ([0, 1], 1)})
    _assert_same(outs, reference)
    merge, split = bds
    assert merge["kind"] == "merge" and merge["precopy_complete"], merge
    assert merge["precopy_pages_kept"] > 0 and merge["precopy_kv_bytes"] > 0 and merge["precopy_iterations"] > 1
    print({k: v for k, v in split.items() if "precopy" in k or k in ("kv_bytes", "kv_ms", "pause_ms")})
    # The split copied its cached and full pages to their parts while the merged instance served: its pause
    # moves only the pages written since.
    assert split["kind"] == "split" and split["precopy_complete"] and split["precopy_iterations"] > 1, split
    assert split["precopy_pages_kept"] > 0 and split["precopy_kv_bytes"] > 0, split
    assert 0 < split["precopy_peak_extra_bytes"] <= 4096 and merge["precopy_peak_extra_bytes"] <= 4096  # one chunk
    # ... but fetch their weights while serving: the pause copies them on the device, receives nothing
    assert split["prefetch_used"] and split["prefetch_chunks"] > 1, split
    assert split["prefetch_weight_bytes"] == split["prefetch_weight_bytes_copied"] > 0 and split["weight_bytes"] == 0
    # Second merge with requests arriving during its pre-copy.
    results = {}
    t = threading.Thread(target=lambda: results.update(bd=eng.gyges_transform([0, 1], 2)))
    t.start()
    time.sleep(0.05)
    results["late"] = eng.generate(input_ids=late, sampling_params=PARAMS, return_logprob=True)
    t.join(120)
    _assert_same(results["late"], late_ref)
    assert results["bd"]["precopy_complete"] and results["bd"]["precopy_pages_kept"] > 0, results["bd"]
    # Back to two instances; every page returns to the pools.
    assert eng.gyges_transform([0, 1], 1)["kind"] == "split"
    _assert_all_pages_free(eng)


def test_abort_during_precopy_leaves_every_page_free(precopy_engine):
    eng = precopy_engine
    prompts = _prompts(6)
    eng.generate(input_ids=prompts, sampling_params={"max_new_tokens": 1, "temperature": 0})  # cached pages
    results = {}
    t = _start_long_request(eng, prompts[5], "to-abort", results)
    merge = threading.Thread(target=lambda: results.update(bd=eng.gyges_transform([0, 1], 2)))
    merge.start()
    time.sleep(0.03)  # the merge's pre-copy is under way (it spans ~100 iterations here)
    eng.abort_request("to-abort")
    merge.join(120)
    t.join(120)
    assert results["bd"]["kind"] == "merge" and results["bd"]["precopy_complete"], results
    assert results["long"]["meta_info"]["finish_reason"]["type"] == "abort", results["long"]["meta_info"]
    out = eng.generate(input_ids=prompts[0], sampling_params=PARAMS, return_logprob=True)
    assert out["meta_info"]["completion_tokens"] == PARAMS["max_new_tokens"]
    assert eng.gyges_transform([0, 1], 1)["kind"] == "split"
    _assert_all_pages_free(eng)


def test_prefetched_split_keeps_tokens_with_requests_arriving_and_an_abort(precopy_engine):
    """A split prefetches its weights over ~100 iterations while the merged instance serves: requests decoding
    through it, requests arriving and an abort during the prefetch; tokens and logprobs equal a run without
    transformations, and every page (the staging region included) returns to the pools."""
    eng = precopy_engine
    prompts = _prompts(8)
    reference = eng.generate(input_ids=prompts, sampling_params=PARAMS, return_logprob=True)
    late = _prompts(11)[8:]
    late_ref = eng.generate(input_ids=late, sampling_params=PARAMS, return_logprob=True)
    assert eng.gyges_transform([0, 1], 2)["kind"] == "merge"
    results = {}
    t = _start_long_request(eng, prompts[5], "to-abort", results)
    running = threading.Thread(target=lambda: results.update(
        early=eng.generate(input_ids=prompts, sampling_params=PARAMS, return_logprob=True)))
    running.start()
    time.sleep(0.2)  # the 8 requests are decoding on the merged instance
    split = threading.Thread(target=lambda: results.update(bd=eng.gyges_transform([0, 1], 1)))
    split.start()
    time.sleep(0.03)  # the prefetch is under way
    results["late"] = eng.generate(input_ids=late, sampling_params=PARAMS, return_logprob=True)
    eng.abort_request("to-abort")
    for th in (split, running, t):
        th.join(120)
        assert not th.is_alive(), results
    bd = results["bd"]
    print({k: v for k, v in bd.items() if "precopy" in k or k in ("kv_bytes", "kv_ms", "pause_ms", "running_requests")})
    assert bd["kind"] == "split" and bd["prefetch_used"] and bd["prefetch_chunks"] > 1, bd
    # ... and copied its KV ahead below the staging region: the pause moved only what was written since
    assert bd["precopy_complete"] and bd["precopy_pages_kept"] > 0, bd
    assert bd["weight_bytes"] == 0 and bd["prefetch_weight_bytes_copied"] > 0, bd
    _assert_same(results["early"], reference)
    _assert_same(results["late"], late_ref)
    assert results["long"]["meta_info"]["finish_reason"]["type"] == "abort", results["long"]["meta_info"]
    _assert_all_pages_free(eng)


def test_partly_prefetched_split_receives_the_rest_in_the_pause(test_model):
    """Pools of 128 tokens: the parts' KV region holds only part of the rows a split fetches, so the staging
    region takes what fits and the pause receives the rest; a request decoding through the merge and split keeps
    its tokens and logprobs."""
    eng = two_instance_engine(test_model, max_total_tokens=128, gyges_prefetch_chunk_bytes=4096)
    try:
        prompts = _prompts(2)
        reference = eng.generate(input_ids=prompts, sampling_params=PARAMS, return_logprob=True)
        assert eng.flush_cache()  # the small pools hold only the two requests' KV
        outs, (merge, split) = _run_with_transforms(eng, prompts, {10: ([0, 1], 2), 25: ([0, 1], 1)})
        _assert_same(outs, reference)
        assert split["kind"] == "split" and split["prefetch_used"], {k: v for k, v in split.items() if "prefetch" in k}
        assert 0 < split["prefetch_weight_bytes"] == split["prefetch_weight_bytes_copied"], split
        assert split["weight_bytes"] > 0  # the rows the staging region had no room for
        _assert_all_pages_free(eng)
    finally:
        eng.shutdown()


def _kill_worker_during_precopy(eng, tp: int) -> None:
    """Two long requests decode; the transformation to `tp` on devices 0-1 is ordered and device 1's worker is
    killed while it pre-copies: the requests and the transformation fail with ServerUnavailableError, nothing
    waits forever."""
    from sglang.srt.managers.tokenizer_manager import ServerUnavailableError

    prompts = _prompts(8)
    eng.generate(input_ids=prompts, sampling_params={"max_new_tokens": 1, "temperature": 0})  # cached pages
    results = {}

    def run(name, ids):
        results[name] = _try(lambda: eng.generate(input_ids=ids, sampling_params={
            "max_new_tokens": 3000, "temperature": 0, "ignore_eos": True}))

    threads = [threading.Thread(target=run, args=(f"r{i}", prompts[i])) for i in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    transform = threading.Thread(target=lambda: results.update(
        transform=_try(lambda: eng.gyges_transform([0, 1], tp))))
    transform.start()
    time.sleep(0.05)
    next(p for p in eng.tokenizer_manager.child_processes if p.name == "worker-1").kill()
    for t in threads + [transform]:
        t.join(120)
        assert not t.is_alive(), results
    for name in ("r0", "r1", "transform"):
        assert isinstance(results[name], ServerUnavailableError), results[name]


def test_worker_death_during_precopy_fails_its_instances_without_hanging(test_model):
    """A peer dies while a merge is pre-copying: the survivor's chunk never lands; the transformation and the
    requests of both instances fail with a clear error instead of waiting forever."""
    eng = two_instance_engine(test_model, gyges_precopy_chunk_bytes=1024, gyges_transform_timeout=30)
    try:
        _kill_worker_during_precopy(eng, 2)
    finally:
        eng.shutdown()


def test_split_precopy_without_prefetch_keeps_tokens_of_requests_decoding_through_it(test_model):
    """KV pre-copy alone (weights received in the pause): two requests decode through a pre-copied merge and a
    pre-copied split with the tokens and logprobs of a run without transformations; the split kept pre-copied
    pages (cached prompts, the requests' full pages) and moved only the pages written since in its pause; every
    page returns to the pools."""
    eng = two_instance_engine(test_model, gyges_precopy_chunk_bytes=16384)  # 8 pages per iteration
    try:
        prompts = _prompts(6)
        eng.generate(input_ids=prompts, sampling_params={"max_new_tokens": 1, "temperature": 0})  # cached pages
        params = {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True}
        reference = eng.generate(input_ids=prompts[4:], sampling_params=params, return_logprob=True)
        assert eng.gyges_transform([0, 1], 2)["precopy_complete"]
        results = {}
        t = threading.Thread(target=lambda: results.update(outs=eng.generate(
            input_ids=prompts[4:], sampling_params=params, return_logprob=True)))
        t.start()
        time.sleep(0.3)  # both are decoding on the merged instance
        split = eng.gyges_transform([0, 1], 1)
        t.join(120)
        for o, r in zip(results["outs"], reference):
            assert o["output_ids"] == r["output_ids"]
            a = [x[0] for x in o["meta_info"]["output_token_logprobs"]]
            b = [x[0] for x in r["meta_info"]["output_token_logprobs"]]
            assert len(a) == len(b) == 400 and max(abs(x - y) for x, y in zip(a, b)) < 1e-4
        assert split["kind"] == "split" and split["precopy_complete"] and split["running_requests"] == 2, split
        assert split["precopy_pages_kept"] > 0 and split["prefetch_weight_bytes"] == 0 < split["weight_bytes"], split
        assert 0 < split["kv_bytes"] < split["precopy_kv_bytes"], split  # the pages written since, in the pause
        _assert_all_pages_free(eng)
    finally:
        eng.shutdown()


def test_split_refused_after_its_precopy_returns_every_page(test_model):
    """A request that fits a part when the split is ordered outgrows it while the split's KV is pre-copied in
    64-byte chunks (one move per iteration): the pause refuses the split, the merged instance keeps serving the
    request to the end with its tokens, and the pages the pre-copy reserved return to the pool."""
    prompt = _prompts(12)[11][:40]
    params = {"max_new_tokens": 120, "temperature": 0, "ignore_eos": True}
    eng = two_instance_engine(test_model, max_total_tokens=64, gyges_precopy_chunk_bytes=64)
    try:
        eng.generate(input_ids=_prompts(4), sampling_params={"max_new_tokens": 1, "temperature": 0})  # cached pages
        assert eng.gyges_transform([0, 1], 2)["kind"] == "merge"
        expected = eng.generate(input_ids=prompt, sampling_params=params)["output_ids"]  # 160 tokens: merged only
        assert len(expected) == params["max_new_tokens"]
        refused = None
        for chunk in eng.generate(input_ids=prompt, sampling_params=params, stream=True):
            if refused is None and len(chunk["output_ids"]) >= 4:  # 44 of a part's 64 tokens: copied, then too long
                with pytest.raises(ValueError, match="running requests need") as refused:
                    eng.gyges_transform([0, 1], 1)
        assert refused is not None
        assert chunk["output_ids"] == expected
        assert eng.gyges_transform([0, 1], 1)["kind"] == "split"
        _assert_all_pages_free(eng)
    finally:
        eng.shutdown()


def test_worker_death_during_split_precopy_fails_its_instance_without_hanging(test_model):
    """A device dies while a split is pre-copying its KV: the chunk fails on the survivor, and the split and the
    merged instance's requests fail with a clear error instead of waiting forever."""
    eng = two_instance_engine(test_model, gyges_precopy_chunk_bytes=256, gyges_transform_timeout=30)
    try:
        assert eng.gyges_transform([0, 1], 2)["kind"] == "merge"
        _kill_worker_during_precopy(eng, 1)
    finally:
        eng.shutdown()
