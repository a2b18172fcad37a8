"""Byte-range gathers/scatters of the KV executor: the one-op block path and the general path agree."""

import torch

from sglang.srt.model_executor.regroup import gather_blocks, scatter_blocks


def _buffer(n=4096):
    return torch.arange(n, dtype=torch.int64).remainder(251).to(torch.uint8)


def test_uniform_blocks_take_and_put_the_same_bytes_as_slices():
    flat = _buffer()
    offsets, sizes = [512, 0, 3584, 1024], [512] * 4
    got = gather_blocks(flat, offsets, sizes)
    assert torch.equal(got, torch.cat([flat[o:o + n] for o, n in zip(offsets, sizes)]))
    target = torch.zeros_like(flat)
    scatter_blocks(target, [0, 2048, 1536, 512], sizes, got)
    for dst, src in zip([0, 2048, 1536, 512], offsets):
        assert torch.equal(target[dst:dst + 512], flat[src:src + 512])


def test_many_short_uniform_blocks_take_one_indexed_copy_over_words():
    """100 blocks of 24 bytes (3 int64 words): the indexed path, also with a packed buffer at an odd offset."""
    flat = _buffer(2400 * 2)
    offsets = [48 * i + 24 for i in range(100)]
    sizes = [24] * 100
    want = torch.cat([flat[o:o + 24] for o in offsets])
    assert torch.equal(gather_blocks(flat, offsets, sizes), want)
    odd = torch.zeros(2401, dtype=torch.uint8)[1:]  # storage offset 1: no wider word view
    assert torch.equal(gather_blocks(flat, offsets, sizes, out=odd), want)
    target = torch.zeros_like(flat)
    scatter_blocks(target, [48 * i for i in range(100)], sizes, want)
    for i, o in enumerate(offsets):
        assert torch.equal(target[48 * i:48 * i + 24], flat[o:o + 24])
    target2 = torch.zeros_like(flat)
    scatter_blocks(target2, [48 * i for i in range(100)], sizes, odd)
    assert torch.equal(target2, target)


def test_unaligned_or_mixed_ranges_use_the_general_path():
    flat = _buffer()
    offsets, sizes = [10, 700, 2000], [30, 64, 5]
    got = gather_blocks(flat, offsets, sizes)
    assert torch.equal(got, torch.cat([flat[o:o + n] for o, n in zip(offsets, sizes)]))
    target = torch.zeros_like(flat)
    scatter_blocks(target, [100, 3000, 5], sizes, got)
    assert torch.equal(target[100:130], flat[10:40]) and torch.equal(target[3000:3064], flat[700:764])
    assert torch.equal(target[5:10], flat[2000:2005])
    assert gather_blocks(flat, [], []).numel() == 0


# ---- the executor over real links: 2 processes, gloo -------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plans():
    """Plans over a 2-device layout with 1 KiB and 128 KiB head blocks: a merge, its natural split, and a split
    that compacts pages into other places (local and unstaged moves)."""
    from gyges.plans import KVLayout, kv_merge_plan, kv_split_plan, split_page_assignment
    from gyges.topology import Instance

    out = []
    parts, merged = [Instance.of([0]), Instance.of([1])], Instance.of([0, 1])
    for head_dim in (16, 2048):  # head block = 2 layers * 2 (K|V) * 4 slots * head_dim * 4 bytes
        layout = KVLayout(num_kv_heads=4, num_layers=2, page_size=4, head_dim=head_dim, dtype_bytes=4)
        buf = 12 * layout.page_bytes(1)
        used = [[0, 1, 2, 5, 6, 9], [1, 2, 3, 4, 10]]
        budget = 3 * layout.page_bytes(2)
        m = kv_merge_plan(layout, buf, parts, used, budget)
        merged_pages = sorted(q for q in (m.page_map[k][1] for k in m.page_map))
        natural = kv_split_plan(layout, buf, merged, parts, used_pages=merged_pages, max_staging_bytes=budget)
        groups = [(1, merged_pages[:5]), (0, merged_pages[5:])]
        assign = split_page_assignment(layout, buf, merged, parts, groups, first_page=[2, 2])
        compact = kv_split_plan(layout, buf, merged, parts, assignment=assign, max_staging_bytes=budget)
        out.append((buf, [m, natural, compact]))
    return out


def _executor_worker(rank: int, port: int, direct_min: int, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    from gyges.plans import execute_kv_plan as reference
    from sglang.srt.model_executor import regroup

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    regroup.DIRECT_MIN_BYTES = direct_min
    ok = []
    for buf_bytes, plans in _plans():
        g = torch.Generator().manual_seed(3)
        start = {d: torch.randint(0, 256, (buf_bytes,), generator=g, dtype=torch.uint8) for d in (0, 1)}
        flat = start[rank].clone()
        expect = {d: bytearray(start[d].numpy().tobytes()) for d in (0, 1)}
        for plan in plans:
            stats = regroup.RegroupStats()
            cap = max(plan.staging_bytes, 1)
            regroup.execute_kv_plan(plan, rank, flat, None, stats, max_round_bytes=cap)
            reference(plan, expect)
            ok.append(bytes(flat.numpy().tobytes()) == bytes(expect[rank]))
            # ROUNDS_IN_FLIGHT rounds, each at most cap sent + cap received (a round's staged moves: the plan's cap)
            ok.append(stats.kv_staging_peak_bytes <= 2 * regroup.ROUNDS_IN_FLIGHT * cap)
    torch.save(ok, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_executor_over_gloo_matches_the_reference_semantics(tmp_path):
    """Merge, natural split and compacting split on 2 processes: every byte ends where gyges.plans' reference
    executor puts it, with all runs direct (pool slices) and with all runs packed."""
    import torch.multiprocessing as mp

    for direct_min in (0, 1 << 40):
        mp.spawn(_executor_worker, args=(_free_port(), direct_min, str(tmp_path)), nprocs=2, join=True)
        for r in (0, 1):
            ok = torch.load(tmp_path / f"rank{r}.pt")
            assert ok and all(ok), (direct_min, r, ok)
