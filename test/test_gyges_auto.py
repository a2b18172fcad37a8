"""Gyges auto policy on the live engine: long requests that fit no TP1 instance trigger a merge, the
merged instance splits back when they are done, and every request finishes with correct output."""

import threading
import time

import torch

import sglang

SHORT = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
LONG = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}


def _prompt(seed, n):
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, 500, (n - 1,), generator=g).tolist()


def test_auto_merges_for_long_requests_and_splits_back(test_model):
    shorts = [_prompt(i, 12 + 3 * i) for i in range(8)]
    longs = [_prompt(100 + i, 150 + 10 * i) for i in range(2)]
    ref = sglang.Engine(model_path=test_model("llama_kv4"), tp_size=2, device="cpu", dtype="float32",
                        page_size=4, log_level="warning")
    try:
        expected_short = [o["output_ids"] for o in ref.generate(input_ids=shorts, sampling_params=SHORT)]
        expected_long = [o["output_ids"] for o in ref.generate(input_ids=longs, sampling_params=LONG)]
    finally:
        ref.shutdown()

    eng = sglang.Engine(model_path=test_model("llama_kv4"), dp_size=2, enable_gyges=True, gyges_policy="auto",
                        gyges_split_delay=0.3, device="cpu", dtype="float32", page_size=4,
                        max_total_tokens=96, log_level="warning")
    try:
        topo = eng.gyges_topology()
        assert [i["tp"] for i in topo["instances"]] == [1, 1]
        cap = topo["instances"][0]["kv_capacity_tokens"]
        assert all(len(p) + LONG["max_new_tokens"] > cap for p in longs)  # they fit no TP1 instance
        results = {}

        def run_shorts():
            results["short"] = eng.generate(input_ids=shorts, sampling_params=SHORT)

        t = threading.Thread(target=run_shorts)
        t.start()
        results["long"] = eng.generate(input_ids=longs, sampling_params=LONG)
        t.join()
        assert [o["output_ids"] for o in results["short"]] == expected_short
        assert [o["output_ids"] for o in results["long"]] == expected_long

        deadline = time.time() + 30
        while time.time() < deadline:
            topo = eng.gyges_topology()
            if [i["tp"] for i in topo["instances"]] == [1, 1]:
                break
            time.sleep(0.2)
        kinds = [h["kind"] for h in topo["history"]]
        assert "merge" in kinds and "split" in kinds, kinds
        assert [i["devices"] for i in topo["instances"]] == [[0], [1]]
        too_long = _prompt(7, 2000)
        try:
            eng.generate(input_ids=too_long, sampling_params=LONG)
            raise AssertionError("a request longer than any formable instance must be refused")
        except ValueError as e:
            assert "tokens" in str(e)
    finally:
        eng.shutdown()
