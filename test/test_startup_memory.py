"""Start-up on the GPU path's terms, shown on CPU: the model is built on the meta device and its weights are loaded
straight into the one arena (peak bytes = budget + one checkpoint tensor's rows, never weights twice); devices with
different budgets agree on one arena and compute the same plans; every aligned group's communicators are warmed
at start-up.

    AllocatedBytes     a TorchDispatchMode counting the bytes of every CPU storage an aten op creates, minus
                       the ones freed since (a finalizer per storage): current and peak
    plan_arena         pure: budget, packed weights, buffers, page bytes -> ArenaPlan
    _world_worker      4 gloo ranks with budgets 1x, 1.5x, 2x, 3x of the smallest: warmed groups, world_min,
                       ModelRunner; arena, capacities per TP and a Gyges merge plan gathered and compared, and
                       the arenas / plans each device would have sized from its own budget
"""

import os
import socket
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.distributed.parallel_state import get_tp_group
from sglang.srt.model_executor.model_loader import checkpoint_index
from sglang.srt.model_executor.model_runner import ModelRunner, plan_arena
from sglang.srt.server_args import ServerArgs


class AllocatedBytes(TorchDispatchMode):
    """Bytes of CPU tensor storage alive, counting only what aten ops create inside the mode."""

    def __init__(self):
        super().__init__()
        self.live = {}  # storage data_ptr -> bytes
        self.current = 0
        self.peak = 0

    def _freed(self, key):
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self.live:
                    self.live[key] = nbytes
                    self.current += nbytes
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._freed, key)
        return out


def _largest_checkpoint_tensor_bytes(path: str) -> int:
    from safetensors import safe_open

    best = 0
    for name, file in checkpoint_index(path).items():
        with safe_open(file, framework="pt") as f:
            s = f.get_slice(name)
            n = 1
            for d in s.get_shape():
                n *= d
            best = max(best, n * {"F32": 4, "BF16": 2, "F16": 2}[s.get_dtype()])
    return best


def _weight_bytes(path: str) -> int:
    sa = ServerArgs(model_path=path, device_memory="64MiB")
    return ModelRunner(sa, ModelConfig.from_server_args(sa), get_tp_group([0]), "cpu",
                       show_progress=False).weight_store.weights_end


@pytest.mark.parametrize("name", ["llama", "llama_tied"])
def test_startup_peak_is_the_budget_plus_one_tensor(test_model, name):
    path = test_model(name)
    weights = _weight_bytes(path)
    # budget = 3x the weights: the old start-up (model allocated, budget measured, then an arena of the budget
    # and the weights copied in) peaked at the budget + all the weights
    sa = ServerArgs(model_path=path, device_memory=str(int(3 * weights / 0.88)))
    budget = int(sa.device_memory_bytes() * sa.mem_fraction_static)
    cfg = ModelConfig.from_server_args(sa)
    with AllocatedBytes() as counter:
        runner = ModelRunner(sa, cfg, get_tp_group([0]), "cpu", show_progress=False)
    buffers = sum(b.numel() * b.element_size() for b in runner.model.buffers())
    largest = _largest_checkpoint_tensor_bytes(path)
    margin = largest + buffers // 2 + (16 << 10)  # one tensor's rows in flight; the rotary cache's [N, D/2] freqs
    print(f'peak {counter.peak} budget {budget} margin {margin} weights {weights} buffers {buffers} largest {largest}')
    assert margin < weights  # so the bound below would catch a second copy of the weights
    assert runner.weight_store.arena_bytes + buffers <= budget
    assert counter.peak >= runner.weight_store.arena_bytes  # the counter saw the arena
    assert counter.peak <= budget + margin, (counter.peak, budget, margin)
    # the weights live in the arena: every parameter is a view of it
    arena = runner.weight_store.arena
    lo, hi = arena.data_ptr(), arena.data_ptr() + arena.numel()
    for p in runner.model.parameters():
        assert lo <= p.data_ptr() < hi and p.untyped_storage().data_ptr() == lo


def test_plan_arena_fits_the_budget_in_tp1_pages():
    page, tp = 4096, 4
    for budget in (10 * page * tp + 123, 37 * page * tp, 37 * page * tp + page * tp - 1):
        for weights_end in (1, 3 * page + 5, 9 * page):
            plan = plan_arena(budget, weights_end, 1000, page, tp, 16)
            assert plan.arena_bytes % (page * tp) == 0
            assert plan.arena_bytes + 1000 <= budget < plan.arena_bytes + 1000 + page * tp
            assert plan.weight_pages * page >= weights_end > (plan.weight_pages - 1) * page
            assert plan.kv_pages == plan.arena_bytes // page - plan.weight_pages >= 1
    capped = plan_arena(100 * page, 2 * page, 0, page, 1, 16, max_total_tokens=5 * 16 + 3)
    assert (capped.kv_pages, capped.arena_bytes) == (5, 7 * page)
    with pytest.raises(ValueError, match="no room for the KV cache"):
        plan_arena(3 * page, 3 * page, 0, page, 1, 16)
    with pytest.raises(ValueError, match="smaller than one page"):
        plan_arena(100 * page, page, 0, page, 1, 16, max_total_tokens=8)


# ---- four devices with different budgets ---------------------------------------------------------------

WORLD = 4


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _world_worker(rank, port, path, budgets, out_dir):
    import dataclasses

    import torch.distributed as dist

    from gyges.plans import Instance, KVLayout, kv_merge_plan
    from sglang.srt.distributed import parallel_state as ps
    from sglang.srt.model_executor.model_runner import local_memory_budget

    torch.set_num_threads(1)
    ps.init_distributed(WORLD, rank, f"tcp://127.0.0.1:{port}", "gloo")
    ps.create_aligned_groups(WORLD, "gloo")
    warmed = ps.warmed_groups()
    sa = ServerArgs(model_path=path, device_memory=str(budgets[rank]), mem_fraction_static=1.0, enable_gyges=True,
                    dp_size=WORLD)
    own = local_memory_budget(sa, torch.device("cpu"))
    agreed = ps.world_min(own)  # what the worker does
    runner = ModelRunner(sa, ModelConfig.from_server_args(sa), ps.get_tp_group([rank]), "cpu",
                         show_progress=False, memory_budget=agreed)
    p = runner.arena_plan
    buffers = sum(b.numel() * b.element_size() for b in runner.model.buffers())
    own_plan = plan_arena(own, runner.weight_store.weights_end, buffers, p.page_bytes, 1, runner.page_size)
    cfg = runner.model_config
    layout = KVLayout(cfg.heads.padded_kv_heads, cfg.num_layers, runner.page_size, cfg.head_dim,
                      torch.empty((), dtype=cfg.dtype).element_size())

    def merge_plan(arena_bytes):
        # devices 0 and 1 merge, each with the last 3 pages of its arena used, planned from this device's arena
        pages = arena_bytes // p.page_bytes
        return repr(kv_merge_plan(layout, arena_bytes, [Instance.of([0]), Instance.of([1])],
                                  [list(range(pages - 3, pages))] * 2, 1 << 20))

    mine = {"warmed": warmed, "budget": agreed, "arena": runner.weight_store.arena_bytes,
            "capacity": repr(runner.capacity_by_tp(WORLD)), "plan": merge_plan(runner.weight_store.arena_bytes),
            "own_arena": own_plan.arena_bytes, "own_plan": merge_plan(own_plan.arena_bytes),
            "arena_plan": dataclasses.asdict(p)}
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        torch.save(gathered, os.path.join(out_dir, "world.pt"))
    ps.destroy_distributed()


@pytest.mark.slow
def test_devices_with_different_budgets_agree_on_one_arena_and_plan(test_model, tmp_path):
    import torch.multiprocessing as mp

    path = test_model("llama")
    smallest = 3 * _weight_bytes(path)
    budgets = [int(smallest * f) for f in (1.5, 1.0, 3.0, 2.0)]
    mp.spawn(_world_worker, args=(_free_port(), path, budgets, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = torch.load(tmp_path / "world.pt")
    # every rank warmed exactly the aligned groups it belongs to, in creation order
    assert [r["warmed"] for r in ranks] == [[(0, 1), (0, 1, 2, 3)], [(0, 1), (0, 1, 2, 3)],
                                            [(2, 3), (0, 1, 2, 3)], [(2, 3), (0, 1, 2, 3)]]
    assert {r["budget"] for r in ranks} == {min(budgets)}
    for key in ("arena", "capacity", "plan", "arena_plan"):
        assert len({repr(r[key]) for r in ranks}) == 1, key
    # each device sizing its own arena (as before) would give four arenas and different plans
    assert len({r["own_arena"] for r in ranks}) == WORLD
    assert len({r["own_plan"] for r in ranks}) == WORLD
