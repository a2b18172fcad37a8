"""Shared-memory TP collectives (sgl_kernel csrc/shm_comm.cpp via distributed/shm_communicator.py) against gloo.

One spawned world of 4 ranks with --tp-collective shm: every aligned group ([0, 1], [2, 3], [0, 1, 2, 3]) has
its own segment; the two pairs run at the same time, then the group of 4. Each rank compares TPGroup's
all_reduce / all_gather (shm) with torch.distributed's gloo collectives on the same group, for float32,
bfloat16 and float16, from 1 element to several MB (the direct path, the reduce-scatter path, and messages
split into several chunks), over repeated calls; and object gathers and broadcasts (the leader's per-step
message, parking the followers on gloo while the leader waits for requests).
"""

import dataclasses
import os
import socket

import pytest
import torch

from sglang.srt.distributed import parallel_state as ps

# 1 element .. 1.1M elements (4.4 MB float32: two 4 MiB chunks); 70_000 float32 = 280 KB: past the direct path
SIZES = [1, 7, 65_537, 70_000, 1_100_000]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(rank: int, n: int, dtype, seed: int, integers: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    if integers:  # sums of small integers are exact in every dtype and summation order
        return torch.randint(-8, 9, (n,), generator=g).to(dtype)
    return torch.randn(n, generator=g).to(dtype)


def _check_group(group: ps.TPGroup, rank: int, failures: list) -> None:
    import torch.distributed as dist

    assert group.shm is not None, "shm segment expected for every aligned group"
    for dtype in DTYPES:
        for seed, n in enumerate(SIZES):
            for integers in (True, False):
                x = _data(rank, n, dtype, seed, integers)
                ref = x.clone()
                dist.all_reduce(ref, group=group.device_group)
                got = group.all_reduce(x.clone())
                try:
                    if integers or group.size == 2:  # a + b is the same sum in any order: gloo's bits
                        torch.testing.assert_close(got, ref, rtol=0, atol=0)
                    else:  # 4 ranks: gloo sums in its own order (and rounds each partial sum to the dtype);
                        # shm sums in float32 and rounds once: within one rounding of the exact sum
                        inputs = [torch.empty_like(x) for _ in range(group.size)]
                        dist.all_gather(inputs, x, group=group.device_group)
                        exact_sum = torch.stack(inputs).double().sum(0)
                        eps = torch.finfo(dtype).eps
                        torch.testing.assert_close(got.double(), exact_sum, rtol=eps, atol=4 * eps)
                        torch.testing.assert_close(got.double(), ref.double(), rtol=4 * eps, atol=16 * eps)
                except AssertionError as e:
                    failures.append(f"all_reduce size={group.size} {dtype} n={n} ints={integers}: {e}")
                # every rank holds the same bits
                everyone = [torch.empty_like(got) for _ in range(group.size)]
                dist.all_gather(everyone, got, group=group.device_group)
                if not all(torch.equal(e, got) for e in everyone):
                    failures.append(f"all_reduce size={group.size} {dtype} n={n}: ranks disagree")
            # all_gather: the shard-ordered concatenation equals gloo's
            x = _data(rank, n, dtype, seed, False).reshape(1, n)
            parts = [torch.empty_like(x) for _ in range(group.size)]
            dist.all_gather(parts, x, group=group.device_group)
            bits = group.size.bit_length() - 1
            ref = torch.cat([parts[ps.bitrev(s, bits)] for s in range(group.size)], dim=-1)
            if not torch.equal(group.all_gather(x, dim=-1), ref):
                failures.append(f"all_gather size={group.size} {dtype} n={n}")
    # repeated small calls (the decode step's pattern): parities alternate, results stay right
    for i in range(200):
        x = torch.full((64, 3), float(rank + i))
        group.all_reduce(x)
        expect = sum(r + i for r in group.ranks)
        if not torch.equal(x, torch.full((64, 3), float(expect))):
            failures.append(f"repeat {i} size={group.size}")
            break
    # non-contiguous input is reduced in place too
    x = torch.arange(12.0).reshape(3, 4).t() * (rank + 1)
    group.all_reduce(x)
    want = torch.arange(12.0).reshape(3, 4).t() * sum(r + 1 for r in group.ranks)
    if not torch.equal(x, want):
        failures.append("non-contiguous")
    # objects of different sizes per rank (None, a few bytes, past one 4 MiB chunk): same as gloo's
    for objs in ([None if r % 2 else {"rank": r} for r in group.ranks],
                 [list(range(r * 1000)) for r in group.ranks],
                 [b"x" * (r * (3 << 20)) for r in group.ranks]):
        ref = [None] * group.size
        dist.all_gather_object(ref, objs[group.rank], group=group.cpu_group)
        got = group.all_gather_object(objs[group.rank])
        over_gloo = dataclasses.replace(group, shm=None).all_gather_object(objs[group.rank])  # GPU groups' path
        if got != ref or got != objs or over_gloo != objs:
            failures.append(f"all_gather_object size={group.size} ({type(objs[0]).__name__})")
    _check_broadcast(group, failures)
    # other ops fall back to gloo
    t = torch.tensor([float(rank)])
    if group.all_reduce(t, op="min").item() != float(group.ranks[0]):
        failures.append("min")


def _check_broadcast(group: ps.TPGroup, failures: list) -> None:
    """broadcast_object: over shm (no gloo call) from any root and for any size; after park_followers exactly
    one message goes over gloo, and a parked follower's wait for it sleeps instead of spinning."""
    import time

    import torch.distributed as dist

    gloo_calls = []
    real = dist.broadcast_object_list

    def counting(*args, **kwargs):
        gloo_calls.append(1)
        return real(*args, **kwargs)

    dist.broadcast_object_list = counting
    try:
        for root in (0, group.size - 1):
            for obj in (None, {"step": 3, "ids": list(range(50))}, b"", b"y" * (9 << 20)):  # 9 MiB: 3 chunks
                got = group.broadcast_object(obj if group.rank == root else "not the root's", src_local=root)
                if got != obj:
                    failures.append(f"broadcast size={group.size} root={root} {type(obj).__name__}")
        if gloo_calls:
            failures.append(f"broadcast size={group.size}: {len(gloo_calls)} gloo calls while on shm")
        # park, then a second of the leader's silence: the followers wait on gloo, asleep
        for _ in range(2):
            cpu = time.process_time()
            if group.rank == 0:
                group.park_followers()
                group.park_followers()  # already parked: sends nothing
                time.sleep(1.0)
                got = group.broadcast_object("wake up")
            else:
                got = group.broadcast_object(None)
                if time.process_time() - cpu > 0.5:
                    failures.append(f"parked follower of size {group.size} spun: "
                                    f"{time.process_time() - cpu:.2f} s CPU in a 1 s wait")
            if got != "wake up" or group.shm.parked:
                failures.append(f"park size={group.size}: got {got!r}, parked={group.shm.parked}")
        if len(gloo_calls) != 2:
            failures.append(f"park size={group.size}: {len(gloo_calls)} gloo broadcasts for two wake-ups")
        # back on shm: a run of small messages, the decode step's pattern
        del gloo_calls[:]
        for i in range(100):
            if group.broadcast_object(("batch", i) if group.rank == 0 else None) != ("batch", i):
                failures.append(f"broadcast after park size={group.size} i={i}")
                break
        if gloo_calls:
            failures.append(f"broadcast after park size={group.size}: gloo used")
    finally:
        dist.broadcast_object_list = real


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    ps.init_distributed(world, rank, f"tcp://127.0.0.1:{port}", "gloo")
    ps.create_aligned_groups(world, "shm")
    failures = []
    pair = ps.get_tp_group([rank // 2 * 2, rank // 2 * 2 + 1])
    _check_group(pair, rank, failures)
    _check_group(ps.get_tp_group(list(range(world))), rank, failures)
    # back to the pair after using the group of 4 (a split after a merge): still in step
    _check_group(pair, rank, failures)
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write("\n".join(failures))
    ps.get_tp_group(list(range(world))).barrier()
    ps.destroy_distributed()


def test_shm_collectives_equal_gloo(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(4, _free_port(), str(tmp_path)), nprocs=4, join=True)
    failures = [line for r in range(4) for line in (tmp_path / f"rank{r}.txt").read_text().splitlines()]
    assert not failures, "\n".join(failures[:20])


def _dead_peer_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    ps.init_distributed(world, rank, f"tcp://127.0.0.1:{port}", "gloo")
    ps.create_aligned_groups(world, "shm")
    group = ps.get_tp_group([0, 1])
    group.all_reduce(torch.ones(4))
    if rank == 1:
        os._exit(0)  # dies without taking part in the next collective
    try:
        group.all_reduce(torch.ones(4))
        msg = "no error"
    except RuntimeError as e:
        msg = str(e)
    with open(os.path.join(out_dir, "rank0.txt"), "w") as f:
        f.write(msg)
    os._exit(0)  # gloo's peer is gone: skip destroy_process_group


def test_dead_peer_raises_instead_of_hanging(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_dead_peer_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    for p in ctx.processes:
        p.join(120)
    assert all(p.exitcode == 0 for p in ctx.processes), [p.exitcode for p in ctx.processes]
    assert "has exited" in (tmp_path / "rank0.txt").read_text()


def test_resolve_collective_without_a_world():
    assert ps.resolve_collective("gloo") == "gloo"
    assert ps.resolve_collective("auto") == "shm"  # CPU, the extension builds here
    with pytest.raises(ValueError, match="expected one of"):
        ps.resolve_collective("mpi")
