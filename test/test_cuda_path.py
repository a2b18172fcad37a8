"""The CUDA path on a GPU (scripts/gpu_check.sh runs this file; on a machine without CUDA every test here is skipped
with that reason, and gpu_check.sh refuses to start).

    runner      ModelRunner on cuda (triton and torch_native attention) against transformers on CPU, float32:
                prefill, a chunk over a cached prefix, decode steps, a mixed batch
    start-up    one arena on the GPU: parameters and KV pages are views of it, the CUDA allocator's peak during
                start-up is the budget (free memory x mem_fraction_static) plus one checkpoint tensor's rows
    arena       WeightStore.move on the GPU (staging on the arena's device)
    engine      sglang.Engine --device cuda: greedy tokens equal transformers'; with 2 GPUs, TP2 equals TP1
"""

import pytest
import torch

from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.distributed.parallel_state import get_tp_group
from sglang.srt.model_executor.forward_batch import ForwardBatch
from sglang.srt.model_executor.model_runner import ModelRunner, local_memory_budget
from sglang.srt.model_executor.weight_store import WeightStore
from sglang.srt.server_args import ServerArgs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (scripts/gpu_check.sh runs this file on a GPU)")
GIB = 1 << 30


def _cuda_runner(path, page_size=16, **kw):
    args = dict(model_path=path, page_size=page_size, device="cuda", dtype="float32", mem_fraction_static=0.05)
    args.update(kw)
    sa = ServerArgs(**args)
    return ModelRunner(sa, ModelConfig.from_server_args(sa), get_tp_group([0]), "cuda:0", show_progress=False)


@pytest.mark.parametrize("backend", ["triton", "torch_native"])
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_cuda_runner_matches_transformers(test_model, name, backend):
    from test_model_forward import Pages, _check, _tokens, hf_logprobs

    path = test_model(name)
    runner = _cuda_runner(path, 4, attention_backend=backend)
    assert runner.kv_pool.kv_buffer.device.type == "cuda"
    ids = _tokens(runner.model_config.vocab_size, n=24, seed=2)
    ref = hf_logprobs(path, ids)
    pages = Pages(runner).take(len(ids))
    prefill = runner.forward(ForwardBatch.build([ids[:9]], [0], [pages], logits="all"))
    assert prefill.device.type == "cuda"
    _check(prefill.cpu(), ref[:9])
    _check(runner.forward(ForwardBatch.build([ids[9:20]], [9], [pages], logits="all")).cpu(), ref[9:20])
    for pos in range(20, 24):
        _check(runner.forward(ForwardBatch.build([[ids[pos]]], [pos], [pages])).cpu(), ref[pos:pos + 1])
    other = _tokens(runner.model_config.vocab_size, n=11, seed=3)
    other_pages = [p + len(pages) for p in Pages(runner).take(len(other))]
    mixed = runner.forward(ForwardBatch.build([[ids[23]], other], [23, 0], [pages, other_pages], logits="all"))
    _check(mixed[:1].cpu(), ref[23:24])
    _check(mixed[1:].cpu(), hf_logprobs(path, other))


def test_cuda_startup_is_one_arena_within_the_budget(test_model):
    from test_startup_memory import _largest_checkpoint_tensor_bytes

    path = test_model("llama")
    torch.cuda.synchronize()
    free, _ = torch.cuda.mem_get_info(0)
    fraction = 2 * GIB / free  # a 2 GiB budget, whatever the GPU's size
    sa = ServerArgs(model_path=path, device="cuda", dtype="float32", mem_fraction_static=fraction)
    assert abs(local_memory_budget(sa, torch.device("cuda", 0)) - 2 * GIB) < 64 << 20
    before = torch.cuda.memory_allocated(0)
    torch.cuda.reset_peak_memory_stats(0)
    runner = ModelRunner(sa, ModelConfig.from_server_args(sa), get_tp_group([0]), "cuda:0", show_progress=False)
    peak = torch.cuda.max_memory_allocated(0) - before
    budget = runner.arena_plan.budget_bytes
    buffers = sum(b.numel() * b.element_size() for b in runner.model.buffers())
    assert runner.weight_store.arena_bytes + buffers <= budget
    margin = _largest_checkpoint_tensor_bytes(path) + buffers + (2 << 20)  # one tensor's rows; allocator rounding
    assert peak <= budget + margin, (peak, budget, margin)
    arena = runner.weight_store.arena
    assert arena.device.type == "cuda"
    for p in runner.model.parameters():
        assert p.device == arena.device and p.untyped_storage().data_ptr() == arena.data_ptr()
    for b in runner.model.buffers():
        assert b.device == arena.device
    assert runner.kv_pool.kv_buffer.untyped_storage().data_ptr() == arena.data_ptr()


def test_weight_store_move_on_cuda():
    store = WeightStore(3 * (8 << 20) + 4096, "cuda:0")
    ref = torch.arange(store.arena_bytes, dtype=torch.int64).remainder(251).to(torch.uint8)
    store.arena.copy_(ref)
    n = 2 * (8 << 20) + 100
    store.move(4096, 0, n)  # down, overlapping, more than one staging chunk
    torch.testing.assert_close(store.arena[:n].cpu(), ref[4096:4096 + n])
    store.arena.copy_(ref)
    store.move(0, 4096, n)  # up
    torch.testing.assert_close(store.arena[4096:4096 + n].cpu(), ref[:n])


def _greedy_engine(path, ids, n, **kw):
    import sglang

    eng = sglang.Engine(model_path=path, device="cuda", dtype="float32", log_level="warning",
                        mem_fraction_static=0.2, **kw)
    try:
        return eng.generate(input_ids=ids, sampling_params={"max_new_tokens": n, "temperature": 0,
                                                            "ignore_eos": True})["output_ids"]
    finally:
        eng.shutdown()


def test_cuda_engine_greedy_equals_transformers(test_model):
    from test_engine import _hf, _hf_greedy, _sequence

    path = test_model("llama")
    ids = _sequence(2, 12)
    got = _greedy_engine(path, ids, 16)
    hf = _hf(path)
    ref = _hf_greedy(hf, ids, 16)
    if got != ref:  # allowed only at a near-tie of the top two logits (GPU vs CPU reduction order)
        k = next(i for i, (a, b) in enumerate(zip(got, ref)) if a != b)
        with torch.no_grad():
            top2 = hf(torch.tensor([ids + got[:k]])).logits[0, -1].topk(2).values
        assert (top2[0] - top2[1]).item() < 1e-3, (got, ref)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (TP2 over NCCL)")
def test_cuda_engine_tp2_equals_tp1(test_model):
    from test_engine import _sequence

    path = test_model("llama")
    ids = _sequence(3, 12)
    assert _greedy_engine(path, ids, 16, tp_size=2) == _greedy_engine(path, ids, 16)
