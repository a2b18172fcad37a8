"""benchmark/measure_costs.py end to end on a simulated engine: the same probe logic (merges to each TP, step
cases with cached prefixes, fills and transformations), fitting and writing, with an engine whose generate
calls advance a virtual clock by what a known StepTimeModel (plus a per-call overhead) and a known link give.
The written file must load into models that predict those times. (The real engine takes ~1 min to measure,
too long for CI; `python benchmark/measure_costs.py --model-path DIR --out F --quick` runs it.)"""

import json
import sys
from pathlib import Path

import pytest

from gyges.costmodel import StepTimeModel, TransformCostModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmark"))
import measure_costs  # noqa: E402

TRUTH = StepTimeModel(base_s=0.003, weight_s=0.0, per_token_s=8e-5, per_context_token_s=2e-6, allreduce_s=0.02,
                      allreduce_per_token_s=1e-5, per_request_s=1e-3, per_attended_s=2e-7)
CALL_S = 0.006  # a request's way through tokenizer manager, controller and detokenizer
LINK = 2e8  # bytes/s per device
FIXED = 0.03  # s per transformation


class FakeEngine:
    """Instances on `devices` devices with Engine's admin surface; a prefix cache of page-aligned prefixes."""

    def __init__(self, devices: int, page_size: int, kv_bytes_per_token: float):
        self.devices, self.page_size, self.kvt = devices, page_size, kv_bytes_per_token
        self.inst = {d: 1 for d in range(devices)}  # first device -> tp
        self.cache = set()
        self.cached_tokens = 0
        self.now = 0.0
        self.closed = False
        self.capacity = 2000  # KV tokens of a TP1 instance (twice that at TP2)

    def clock(self) -> float:
        return self.now

    def gyges_topology(self):
        return {"instances": [{"devices": list(range(b, b + t)), "tp": t, "kv_capacity_tokens": self.capacity * t}
                              for b, t in sorted(self.inst.items())]}

    def gyges_transform(self, devices, tp):
        merge = tp == len(devices)
        for d in devices:
            self.inst.pop(d, None)
        for b in range(devices[0], devices[0] + len(devices), tp):
            self.inst[b] = tp
        kv = self.cached_tokens * self.kvt / 2
        weights = 0 if merge else 1_000_000
        pause = FIXED + (kv + weights) / (LINK * len(devices))
        return {"kind": "merge" if merge else "split", "devices": list(devices), "kv_bytes": int(kv),
                "weight_bytes": weights, "pause_ms": pause * 1e3}

    def flush_cache(self):
        self.cache.clear()
        self.cached_tokens = 0
        return True

    def _cached(self, ids):
        n = 0
        for end in range(self.page_size, len(ids), self.page_size):
            if tuple(ids[:end]) in self.cache:
                n = end
        return n

    def generate(self, input_ids, sampling_params):
        steps = sampling_params["max_new_tokens"]
        bases = sorted(self.inst)
        per = {b: [] for b in bases}
        for i, ids in enumerate(input_ids):  # equal requests, least loaded first = round robin
            per[bases[i % len(bases)]].append(ids)
        worst = 0.0
        for b, prompts in per.items():
            if not prompts:
                continue
            tp = self.inst[b]
            seqs = [(len(p) - self._cached(p), len(p)) for p in prompts]
            t = TRUTH.batch_time(seqs, tp)
            for j in range(1, steps):
                t += TRUTH.batch_time([(1, len(p) + j) for p in prompts], tp)
            worst = max(worst, t)
        for ids in input_ids:
            for end in range(self.page_size, len(ids) + 1, self.page_size):
                self.cache.add(tuple(ids[:end]))
            self.cached_tokens += len(ids)
        self.now += CALL_S + worst
        return [{} for _ in input_ids]

    def shutdown(self):
        self.closed = True


def test_measure_fit_and_write_on_a_simulated_engine(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4, "hidden_size": 256,
        "vocab_size": 512, "dtype": "float32"}))
    (model / "model.safetensors").write_bytes(b"\0" * 4000)
    kvt, wb = measure_costs.model_sizes(str(model))
    assert (kvt, wb) == (2 * 4 * 4 * 32 * 4, 4000)
    assert measure_costs.model_sizes(str(model), "bfloat16") == (kvt / 2, 2000)
    odd = tmp_path / "odd"  # 3 KV heads on an engine of max TP 2: it stores 4 (gyges.heads pads them)
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "num_attention_heads": 9,
                                                 "num_key_value_heads": 3, "hidden_size": 288, "dtype": "float32"}))
    assert measure_costs.model_sizes(str(odd), granularity=2)[0] == 2 * 2 * 4 * 32 * 4
    assert measure_costs.model_sizes(str(odd), granularity=1)[0] == 2 * 2 * 3 * 32 * 4
    engines = []

    def factory(args, devices):
        engines.append(FakeEngine(devices, args.page_size, kvt))
        return engines[-1]

    out, raw = tmp_path / "cost.json", tmp_path / "raw.json"
    clock = lambda: engines[-1].clock()  # noqa: E731
    assert measure_costs.main(["--model-path", str(model), "--out", str(out), "--tp", "1", "2", "--quick",
                               "--raw-json", str(raw)], engine_factory=factory, clock=clock) == 0
    assert engines[0].closed and engines[0].inst == {0: 1, 1: 1}  # split back at the end
    printed = capsys.readouterr().out
    assert "| decode | 2 |" in printed and "rel. error" in printed

    # the quick grid's largest cases (8 x 256 fresh tokens over a 512-token prefix) do not fit a TP1 instance
    raw_d = json.loads(raw.read_text())
    assert len(raw_d["steps"]["1"]) < len(raw_d["steps"]["2"]) == len(measure_costs.step_cases(True))
    assert all(measure_costs.kv_tokens_needed(measure_costs.StepCase(**c["case"])) <= 2000
               for c in raw_d["steps"]["1"])

    d = json.loads(out.read_text())
    assert d["format"] == "gyges-costmodel/1" and d["fit"]["tp"] == [1, 2]
    assert d["fit"]["step_time"]["call_overhead_s"] == pytest.approx(CALL_S, rel=1e-6)
    step = StepTimeModel.load(str(out))
    # The padding of the backend measured (the default on CPU: sgl_kernel's paged attention where it builds)
    assert step.padding == measure_costs.attention_padding(None, "cpu", "float32")
    for tp in (1, 2):
        for b, ctx, reqs in ((1, 300, 1), (16, 16 * 700, 16), (256, 600, 1), (2048, 4096, 8)):
            assert step.step_time(b, ctx, tp, reqs) == pytest.approx(TRUTH.step_time(b, ctx, tp, reqs), rel=1e-6)
    tr = TransformCostModel.load(str(out))
    assert tr.link_bandwidth_bytes_per_s == pytest.approx(LINK, rel=1e-6)
    assert tr.fixed_overhead_s == pytest.approx(FIXED, rel=1e-6)
    assert (tr.kv_bytes_per_token, tr.weight_bytes) == (kvt, wb)
    kinds = [b["kind"] for b in json.loads(raw.read_text())["transforms"]]
    assert kinds == ["merge", "split", "merge", "split"]  # to TP2 for its steps, back; a fill, merge, split


def test_attention_padding_follows_the_backend():
    """Only the torch-native backend pads a mixed batch to its longest sequence; sgl_kernel's CPU paged attention
    reads each request's pages as they are."""
    assert measure_costs.attention_padding("torch_native", "cpu", "float32") == 1.0
    assert measure_costs.attention_padding("cpu", "cpu", "float32") == 0.0
    assert measure_costs.attention_padding("cpu", "cpu", "bfloat16") == 0.0
