"""Gyges live transformations on the real multi-process engine (CPU workers, tiny float32 models).

Requests keep decoding while their instances are merged and split; their tokens must equal a run
without transformations and their logprobs must agree within 1e-4.
"""

import threading
import time

import pytest
import torch

import sglang

PARAMS = {"max_new_tokens": 40, "temperature": 0, "ignore_eos": True}


def _prompts(n):
    g = torch.Generator().manual_seed(11)
    return [[1] + torch.randint(3, 500, (4 + 9 * i,), generator=g).tolist() for i in range(n)]


def _run_with_transforms(engine, prompts, schedule):
    """Run `prompts` together; when the first (streamed) request has produced k tokens, apply schedule[k]."""
    results = {}

    def rest():
        results["rest"] = engine.generate(input_ids=prompts[1:], sampling_params=PARAMS, return_logprob=True)

    t = threading.Thread(target=rest)
    t.start()
    breakdowns = []
    last = None
    pending = dict(schedule)
    for chunk in engine.generate(input_ids=prompts[0], sampling_params=PARAMS, return_logprob=True, stream=True):
        last = chunk
        done = chunk["meta_info"]["completion_tokens"]
        for step in sorted(k for k in pending if k <= done):
            devices, tp = pending.pop(step)
            breakdowns.append(engine.gyges_transform(devices, tp))
    t.join()
    assert not pending, f"transformations not applied: {pending}"
    return [last] + results["rest"], breakdowns


def _assert_same(outs, refs):
    for o, r in zip(outs, refs):
        assert o["output_ids"] == r["output_ids"]
        a = [x[0] for x in o["meta_info"]["output_token_logprobs"]]
        b = [x[0] for x in r["meta_info"]["output_token_logprobs"]]
        assert len(a) == len(b) == PARAMS["max_new_tokens"]
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4


def _assert_all_pages_free(engine):
    assert engine.flush_cache()
    for st in engine.get_internal_state():
        assert st["free_pages"] == st["num_pages"], st


def two_instance_engine(test_model, **extra) -> sglang.Engine:
    # Small prefill chunks: long prompts are still mid-prefill when a transformation arrives; at most 3
    # running requests per instance: some of the 8 are still waiting in the queue when it arrives.
    return sglang.Engine(model_path=test_model("llama_kv4"), dp_size=2, enable_gyges=True, device="cpu",
                         dtype="float32", page_size=4, chunked_prefill_size=8, max_running_requests=3,
                         log_level="warning", **extra)


@pytest.fixture(scope="module")
def two_devices(test_model):
    eng = two_instance_engine(test_model)
    yield eng
    eng.shutdown()


def test_merge_split_merge_while_decoding(two_devices):
    eng = two_devices
    prompts = _prompts(8)
    reference = eng.generate(input_ids=prompts, sampling_params=PARAMS, return_logprob=True)
    _assert_all_pages_free(eng)
    outs, bds = _run_with_transforms(eng, prompts, {10: ([0, 1], 2), 20: ([0, 1], 1), 30: ([0, 1], 2)})
    _assert_same(outs, reference)
    assert [b["kind"] for b in bds] == ["merge", "split", "merge"]
    assert all(b["running_requests"] > 0 for b in bds), bds
    assert all(b["kv_bytes"] > 0 for b in bds)
    topo = eng.gyges_topology()
    assert [i["devices"] for i in topo["instances"]] == [[0, 1]]
    assert [h["kind"] for h in topo["history"]][-3:] == ["merge", "split", "merge"]
    eng.gyges_transform([0, 1], 1)
    assert [i["tp"] for i in eng.gyges_topology()["instances"]] == [1, 1]
    _assert_all_pages_free(eng)


def test_cached_prefix_survives_merge_and_split(two_devices):
    eng = two_devices
    prompt = _prompts(6)[5]  # 50 tokens
    first = eng.generate(input_ids=prompt, sampling_params={"max_new_tokens": 4, "temperature": 0})
    eng.gyges_transform([0, 1], 2)
    after_merge = eng.generate(input_ids=prompt, sampling_params={"max_new_tokens": 4, "temperature": 0})
    assert after_merge["meta_info"]["cached_tokens"] >= 40
    eng.gyges_transform([0, 1], 1)
    after_split = eng.generate(input_ids=prompt, sampling_params={"max_new_tokens": 4, "temperature": 0})
    assert after_split["meta_info"]["cached_tokens"] >= 40
    assert first["output_ids"] == after_merge["output_ids"] == after_split["output_ids"]
    _assert_all_pages_free(eng)


def test_bad_transformations_are_refused(two_devices):
    eng = two_devices
    with pytest.raises(ValueError, match="align|instance|devices"):
        eng.gyges_transform([1, 2], 2)
    with pytest.raises(ValueError):
        eng.gyges_transform([0, 1], 1)  # already two TP1 instances: nothing to split
    out = eng.generate("still serving", {"max_new_tokens": 3})
    assert out["meta_info"]["completion_tokens"] == 3


def test_long_request_refused_then_served_after_merge(test_model):
    prompt = _prompts(12)[11][:90]
    params = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
    static = sglang.Engine(model_path=test_model("llama_kv4"), tp_size=2, device="cpu", dtype="float32",
                           page_size=4, max_total_tokens=128, log_level="warning")
    try:
        expected = static.generate(input_ids=prompt, sampling_params=params)["output_ids"]
    finally:
        static.shutdown()
    eng = sglang.Engine(model_path=test_model("llama_kv4"), dp_size=2, enable_gyges=True, device="cpu",
                        dtype="float32", page_size=4, max_total_tokens=64, log_level="warning",
                        gyges_prefetch_chunk_bytes=4096)  # prefetch on: a refused split leaves no page taken
    try:
        with pytest.raises(ValueError, match="KV capacity.*64 tokens.*merge"):
            eng.generate(input_ids=prompt, sampling_params=params)
        bd = eng.gyges_transform([0, 1], 2)
        # Twice the pages of one device, plus the weight memory the merge freed, now KV pages.
        capacity = eng.gyges_topology()["instances"][0]["kv_capacity_tokens"]
        assert bd["weight_bytes_freed"] > 0 and capacity == bd["kv_capacity_tokens"] > 2 * 64
        assert eng.generate(input_ids=prompt, sampling_params=params)["output_ids"] == expected
        refused = None
        long_params = {**params, "max_new_tokens": 200}  # still running for a good while after its first token
        for chunk in eng.generate(input_ids=prompt, sampling_params=long_params, stream=True):
            if refused is None:  # the long request is running: a split cannot hold it
                with pytest.raises(ValueError, match="running requests need") as refused:
                    eng.gyges_transform([0, 1], 1)
        assert refused is not None
        assert chunk["output_ids"][:8] == expected and len(chunk["output_ids"]) == 200
        _assert_all_pages_free(eng)
    finally:
        eng.shutdown()


def test_four_devices_tp4_then_two_tp2_then_four_tp1(test_model):
    eng = sglang.Engine(model_path=test_model("llama_kv4"), dp_size=4, enable_gyges=True, device="cpu",
                        dtype="float32", page_size=4, log_level="warning")
    try:
        prompts = _prompts(6)
        reference = eng.generate(input_ids=prompts, sampling_params=PARAMS, return_logprob=True)
        _assert_all_pages_free(eng)
        outs, bds = _run_with_transforms(eng, prompts, {8: ([0, 1, 2, 3], 4), 18: ([0, 1, 2, 3], 2),
                                                        28: ([0, 1], 1), 29: ([2, 3], 1)})
        _assert_same(outs, reference)
        assert [b["tp"] for b in bds] == [4, 2, 1, 1]
        assert [i["tp"] for i in eng.gyges_topology()["instances"]] == [1, 1, 1, 1]
        _assert_all_pages_free(eng)
    finally:
        eng.shutdown()


def test_merge_of_mixed_tp_parts_keeps_weights(test_model):
    """TP2 + TP1 + TP1 -> TP4 with the TP2 instance's cache in its lowest pages (right after its TP2 weights):
    on the TP1 devices those pages' KV lands where their TP1 weights still were, so the merge must pack the
    weights before it moves the KV. Afterwards the same prompts give the same greedy tokens as before."""
    eng = sglang.Engine(model_path=test_model("llama_kv4"), dp_size=4, enable_gyges=True, device="cpu",
                        dtype="float32", page_size=4, log_level="warning")
    try:
        prompts = _prompts(4)
        reference = eng.generate(input_ids=prompts, sampling_params=PARAMS, return_logprob=True)
        assert eng.flush_cache()
        eng.gyges_transform([0, 1], 2)
        g = torch.Generator().manual_seed(5)
        fill = [[1] + torch.randint(3, 500, (60,), generator=g).tolist() for _ in range(12)]
        eng.generate(input_ids=fill, sampling_params={"max_new_tokens": 8, "temperature": 0})
        tp2 = next(s for s in eng.get_internal_state() if s["num_pages"] > min(
            x["num_pages"] for x in eng.get_internal_state()))
        assert tp2["free_pages"] < tp2["num_pages"]  # the TP2 instance caches pages
        eng.gyges_transform([0, 1, 2, 3], 4)
        _assert_same(eng.generate(input_ids=prompts, sampling_params=PARAMS, return_logprob=True), reference)
        _assert_all_pages_free(eng)
    finally:
        eng.shutdown()


@pytest.mark.parametrize("prefetch_chunk_bytes", [0, 4096], ids=["weights-in-pause", "weights-prefetched"])
def test_every_shape_of_four_devices_with_cached_pages(test_model, prefetch_chunk_bytes):
    """A walk through the shapes of 4 devices (2+1+1, 4, 2+2, 2+1+1, 1x4, 1+1+2, 4, 1x4), each instance's cache
    filled before every transformation: the same prompts give the same greedy tokens after each one. With
    --gyges-prefetch-chunk-bytes every split (TP4 -> 2+2, TP2 -> 1+1, TP4 -> 1x4) fetches its weights while
    serving and receives none in the pause."""
    eng = sglang.Engine(model_path=test_model("llama_kv4"), dp_size=4, enable_gyges=True, device="cpu",
                        dtype="float32", page_size=4, log_level="warning",
                        gyges_prefetch_chunk_bytes=prefetch_chunk_bytes)
    g = torch.Generator().manual_seed(9)
    try:
        prompts = _prompts(4)
        reference = [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=PARAMS)]
        walk = [([0, 1], 2, [2, 1, 1]), ([0, 1, 2, 3], 4, [4]), ([0, 1, 2, 3], 2, [2, 2]), ([2, 3], 1, [2, 1, 1]),
                ([0, 1], 1, [1, 1, 1, 1]), ([2, 3], 2, [1, 1, 2]), ([0, 1, 2, 3], 4, [4]),
                ([0, 1, 2, 3], 1, [1, 1, 1, 1])]
        for devices, tp, shape in walk:
            fill = [[1] + torch.randint(3, 500, (int(torch.randint(20, 90, (1,), generator=g)),), generator=g).tolist()
                    for _ in range(10)]
            eng.generate(input_ids=fill, sampling_params={"max_new_tokens": 6, "temperature": 0})
            bd = eng.gyges_transform(devices, tp)
            assert [i["tp"] for i in eng.gyges_topology()["instances"]] == shape
            if bd["kind"] == "split":
                assert bd["prefetch_used"] == bool(prefetch_chunk_bytes), bd
                assert (bd["weight_bytes"] == 0) == bool(prefetch_chunk_bytes), bd
            outs = [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=PARAMS)]
            assert outs == reference, f"after {devices} -> TP{tp}"
        _assert_all_pages_free(eng)
    finally:
        eng.shutdown()


def test_constrained_and_chunked_requests_survive_a_merge(two_devices):
    """A regex-constrained request keeps its grammar state across a merge and split; a long prompt in chunked
    prefill continues where it was."""
    eng = two_devices
    pattern = r"[0-9]{3}-[a-z]{3,6}-[0-9]{2}"
    params = {"regex": pattern, "max_new_tokens": 40, "temperature": 0.8, "sampling_seed": 21}
    reference = eng.generate("Code:", params)
    long_prompt = _prompts(9)[8]  # 77 tokens
    long_ref = eng.generate(input_ids=long_prompt, sampling_params=PARAMS)
    _assert_all_pages_free(eng)
    results = {}
    t = threading.Thread(target=lambda: results.update(long=eng.generate(input_ids=long_prompt, sampling_params=PARAMS)))
    t.start()
    chunks = []
    for chunk in eng.generate("Code:", params, stream=True):
        chunks.append(chunk)
        if len(chunks) == 2:
            eng.gyges_transform([0, 1], 2)
        if len(chunks) == 5:
            eng.gyges_transform([0, 1], 1)
    t.join()
    import re

    assert re.fullmatch(pattern, chunks[-1]["text"]), chunks[-1]["text"]
    assert chunks[-1]["output_ids"] == reference["output_ids"]
    assert results["long"]["output_ids"] == long_ref["output_ids"]
    _assert_all_pages_free(eng)


def test_worker_death_around_a_merge_fails_only_its_instances(test_model):
    """A peer dies while a merge of devices 0 and 1 is under way: the requests on those devices fail with a
    clear error; the instances on devices 2 and 3 keep serving."""
    from sglang.srt.managers.tokenizer_manager import ServerUnavailableError

    eng = sglang.Engine(model_path=test_model("llama_kv4"), dp_size=4, enable_gyges=True, device="cpu",
                        dtype="float32", page_size=16, chunked_prefill_size=-1, log_level="error")
    try:
        results = {}

        def run(name, ids, n):
            try:
                results[name] = eng.generate(input_ids=ids, sampling_params={"max_new_tokens": n, "ignore_eos": True})
            except Exception as e:  # noqa: BLE001 - the test inspects it
                results[name] = e

        g = torch.Generator().manual_seed(5)
        work = [("r0", [1] + torch.randint(3, 500, (20,), generator=g).tolist(), 3000),  # decoding on 0
                ("r1", [1] + torch.randint(3, 500, (300,), generator=g).tolist(), 3000),  # decoding on 1
                ("r2", [1] + torch.randint(3, 500, (20,), generator=g).tolist(), 1500),  # on 2 and 3: still
                ("r3", [1] + torch.randint(3, 500, (20,), generator=g).tolist(), 1500)]  # running at the failure
        threads = []
        for name, ids, n in work:
            threads.append(threading.Thread(target=run, args=(name, ids, n)))
            threads[-1].start()
            time.sleep(0.3)
        merge = threading.Thread(target=lambda: results.update(merge=_try(eng.gyges_transform, [0, 1], 2)))
        merge.start()
        time.sleep(0.2)
        worker1 = next(p for p in eng.tokenizer_manager.child_processes if p.name == "worker-1")
        worker1.kill()
        for t, (name, _, _) in zip(threads, work):
            t.join(120)
            assert not t.is_alive(), f"request {name} hung after its instance failed ({results})"
        merge.join(120)
        assert not merge.is_alive()
        for name in ("r0", "r1"):
            assert isinstance(results[name], ServerUnavailableError), results[name]
            assert "failed" in str(results[name]) and "exited" in str(results[name])
        for name in ("r2", "r3"):
            assert results[name]["meta_info"]["completion_tokens"] == 1500
        assert eng.tokenizer_manager.is_healthy()
        out = eng.generate("still serving", {"max_new_tokens": 3})
        assert out["meta_info"]["completion_tokens"] == 3
        states = {tuple(i["devices"]): i["state"] for i in eng.gyges_topology()["instances"]}
        assert states[(2,)] == states[(3,)] == "serving"
        assert "failed" in states.values()
    finally:
        eng.shutdown()


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        return e
