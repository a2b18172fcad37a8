"""gyges.plans: KV and weight transformation plans, checked by simulating every device's memory.

The expected layout is computed here from CONTRACTS.md directly (rank r of TP t holds heads
[r*H/t, (r+1)*H/t); page p of a rank starts at p * (H/t) * head_block_bytes; rank r sits on device
base + bitrev(r)), not from the functions under test.
"""

import random

import pytest
from hypothesis import given, settings, strategies as st

from gyges.plans import (KVLayout, ParamSpec, execute_kv_plan, kv_merge_plan, kv_regroup_plan, kv_split_plan,
                         merge_page_id, merge_page_mapping, remap_page_table, split_page_assignment,
                         split_page_id, split_precopy_slots, weight_merge_plan, weight_prefetch_plan,
                         weight_split_plan)
from gyges.topology import Instance, Topology

H = 8
LAYOUT = KVLayout(num_kv_heads=H, num_layers=1, page_size=2, head_dim=1, dtype_bytes=1)  # 4-byte head blocks
HB = LAYOUT.head_block_bytes
PAGES_TP1 = 6
BUF = PAGES_TP1 * H * HB  # bytes per device, same at every TP


def ref_bitrev(x, bits):
    return int(format(x, f"0{bits}b")[::-1], 2) if bits else 0


def ref_location(inst, page, head):
    t = inst.tp
    hl = H // t
    rank = head // hl
    device = inst.base + ref_bitrev(rank, t.bit_length() - 1)
    return device, page * hl * HB + (head % hl) * HB


def fill(buffers, inst, pages, tag):
    for p in pages:
        for h in range(H):
            d, off = ref_location(inst, p, h)
            buffers[d][off:off + HB] = [(tag, p, h, i) for i in range(HB)]


def check_content(buffers, inst, page, expect_tag_page):
    for h in range(H):
        d, off = ref_location(inst, page, h)
        want = [expect_tag_page + (h, i) for i in range(HB)]
        assert buffers[d][off:off + HB] == want, (inst, page, h)


def ranges_disjoint(ranges):
    by_dev = {}
    for d, a, b in ranges:
        by_dev.setdefault(d, []).append((a, b))
    for rs in by_dev.values():
        rs.sort()
        for (a0, b0), (a1, b1) in zip(rs, rs[1:]):
            if a1 < b0:
                return False
    return True


def overlaps(r1, r2):
    return r1[0] == r2[0] and r1[1] < r2[2] and r2[1] < r1[2]


def check_plan_structure(plan, budget=None):
    moves = plan.moves
    assert ranges_disjoint([m.dst_range for m in moves]), "two moves write the same bytes"
    assert ranges_disjoint([m.src_range for m in moves]), "a byte is read twice"
    assert [m.round for m in moves] == sorted(m.round for m in moves)
    for i, m in enumerate(moves):
        assert 0 <= m.src_offset and m.src_offset + m.nbytes <= BUF
        assert 0 <= m.dst_offset and m.dst_offset + m.nbytes <= BUF
        assert m.src_range != m.dst_range
        for e in moves[:i]:
            if e.round < m.round:
                # never read what an earlier round overwrote
                assert not overlaps(e.dst_range, m.src_range)
    # within a round: unstaged moves first, and they overwrite nothing that anyone in the round reads
    staging = {}
    for r, rnd in enumerate(plan.rounds()):
        flags = [m.staged for m in rnd]
        assert flags == sorted(flags)
        for m in rnd:
            hazard = any(overlaps(m.dst_range, o.src_range) for o in rnd)
            assert hazard == m.staged
            if m.staged:
                staging[(r, m.dst_device)] = staging.get((r, m.dst_device), 0) + m.nbytes
    assert plan.staging_bytes == max(staging.values(), default=0)
    if budget is not None and plan.staging_bytes_per_swap <= budget:
        assert plan.staging_bytes <= budget
    assert plan.kv_bytes_moved == sum(m.nbytes for m in moves)


def random_parts(rnd, group):
    """A random aligned tiling of `group` (an Instance) into at least two parts."""
    parts = [group]
    while len(parts) == 1 or rnd.random() < 0.5:
        big = [p for p in parts if p.tp > 1]
        if not big:
            break
        p = rnd.choice(big)
        parts.remove(p)
        half = p.tp // 2
        parts += [Instance.of(range(p.base, p.base + half)), Instance.of(range(p.base + half, p.base + p.tp))]
    return sorted(parts, key=lambda i: i.base)


# ---------------------------------------------------------------------------------------------------
# examples
# ---------------------------------------------------------------------------------------------------
def test_layout_arithmetic():
    lay = KVLayout(num_kv_heads=8, num_layers=32, page_size=16, head_dim=128, dtype_bytes=2)
    assert lay.head_block_bytes == 32 * 2 * 16 * 128 * 2
    assert lay.page_bytes(1) == 8 * lay.head_block_bytes and lay.page_bytes(4) == 2 * lay.head_block_bytes
    assert lay.pages_per_device(10 * lay.page_bytes(1), 4) == 40
    with pytest.raises(ValueError, match="replication"):
        KVLayout(num_kv_heads=2, num_layers=1, page_size=1, head_dim=1, dtype_bytes=1).page_bytes(4)


def test_merge_page_ids():
    m4 = Instance.of(range(4))
    parts = [Instance.of([d]) for d in range(4)]
    assert [merge_page_id(5, p, m4) for p in parts] == [20, 22, 21, 23]  # slots bitrev(s)
    two = [Instance.of([0, 1]), Instance.of([2, 3])]
    assert [merge_page_id(5, p, m4) for p in two] == [10, 11]  # p*k + s for k = 2
    mixed = [Instance.of([0, 1]), Instance.of([2]), Instance.of([3])]
    assert [merge_page_id(5, p, m4) for p in mixed] == [10, 21, 23]
    for q in range(40):
        i, p = split_page_id(q, m4, mixed)
        assert merge_page_id(p, mixed[i], m4) == q
    f = merge_page_mapping(Instance.of([1]), Instance.of([0, 1]))
    assert remap_page_table([[0, 3], [2]], f) == [[1, 7], [5]]
    assert remap_page_table([[0, 3]], {0: 9, 3: 8}) == [[9, 8]]


def test_tp1_merge_is_pairwise_swaps_and_keeps_own_heads():
    parts = [Instance.of([0]), Instance.of([1])]
    plan = kv_merge_plan(LAYOUT, BUF, parts, [[0, 2], [2]])
    # device 0 keeps heads 0..3 of its pages in place; heads 4..7 of its page 2 swap with device 1's 0..3
    half = H // 2 * HB
    assert plan.kv_bytes_in_place == 3 * half
    assert plan.kv_bytes_moved == 3 * half
    moves = {(m.src_device, m.src_offset, m.dst_device, m.dst_offset) for m in plan.moves}
    p2 = 2 * H * HB
    assert (0, p2 + half, 1, p2) in moves and (1, p2, 0, p2 + half) in moves  # the swap on page 2
    assert (0, half, 1, 0) in moves  # page 0 of device 0: device 1's half of page 0 was free
    assert plan.staging_bytes_per_swap == half
    assert plan.staging_bytes == half  # one staged block per device (the swap), the free target unstaged
    assert plan.num_rounds == 1


def test_split_rejects_pages_beyond_part_capacity_and_compacts():
    merged = Instance.of([0, 1])
    parts = [Instance.of([0]), Instance.of([1])]
    cap = LAYOUT.pages_per_device(BUF, 1)
    with pytest.raises(ValueError, match="out of range"):
        kv_split_plan(LAYOUT, BUF, merged, parts, used_pages=[2 * cap])
    # a request on pages 1 (natural: part 1) and 2 (natural: part 0) must end on one part
    a = split_page_assignment(LAYOUT, BUF, merged, parts, [(0, [2, 1]), (1, [3])])
    assert a == {2: (0, 1), 3: (1, 1), 1: (0, 0)}
    with pytest.raises(ValueError, match="no free page"):
        split_page_assignment(LAYOUT, BUF, merged, parts, [(0, list(range(cap + 1)))])
    with pytest.raises(ValueError, match="two groups"):
        split_page_assignment(LAYOUT, BUF, merged, parts, [(0, [1]), (1, [1])])


def test_invalid_page_maps():
    parts = [Instance.of([0]), Instance.of([1])]
    merged = Instance.of([0, 1])
    with pytest.raises(ValueError, match="two pages"):
        kv_regroup_plan(LAYOUT, BUF, parts, [merged], {(0, 0): (0, 1), (1, 0): (0, 1)})
    with pytest.raises(ValueError, match="differ"):
        kv_regroup_plan(LAYOUT, BUF, parts, [Instance.of([0, 1, 2, 3])], {})


# ---------------------------------------------------------------------------------------------------
# properties: simulate memory
# ---------------------------------------------------------------------------------------------------
@settings(max_examples=120, deadline=None)
@given(seed=st.integers(0, 10**9), size=st.sampled_from([2, 4, 8]), budget=st.sampled_from([None, 0, 16, 64]))
def test_merge_then_split_moves_every_byte_where_the_layout_says(seed, size, budget):
    rnd = random.Random(seed)
    group = Instance.of(range(size))
    parts = random_parts(rnd, group)
    used = [sorted(rnd.sample(range(LAYOUT.pages_per_device(BUF, p.tp)),
                              rnd.randint(0, LAYOUT.pages_per_device(BUF, p.tp)))) for p in parts]
    buffers = {d: [None] * BUF for d in range(size)}
    for s, (part, pages) in enumerate(zip(parts, used)):
        fill(buffers, part, pages, s)
    total_used_bytes = sum(len(pg) * LAYOUT.page_bytes(p.tp) * p.tp for p, pg in zip(parts, used))

    plan = kv_merge_plan(LAYOUT, BUF, parts, used, max_staging_bytes=budget)
    check_plan_structure(plan, budget)
    assert plan.kv_bytes_moved + plan.kv_bytes_in_place == total_used_bytes
    execute_kv_plan(plan, buffers)
    new_ids = set()
    for s, (part, pages) in enumerate(zip(parts, used)):
        stride = size // part.tp
        slot = ref_bitrev((part.base - group.base) // part.tp, stride.bit_length() - 1)
        for p in pages:
            q = p * stride + slot
            assert plan.page_map[(s, p)] == (0, q)
            assert q < LAYOUT.pages_per_device(BUF, size)
            new_ids.add(q)
            check_content(buffers, group, q, (s, p))
    assert len(new_ids) == sum(map(len, used))
    # each device keeps in place its new rank's heads of its own part's pages (the point of the
    # renumbering): H/size heads per used page per device of the part; everything else moves
    assert plan.kv_bytes_in_place == sum(len(pg) * p.tp * (H // size) * HB for p, pg in zip(parts, used))

    # split back with the natural rule: every page returns to its (part, page) with its bytes
    back = kv_split_plan(LAYOUT, BUF, group, parts, used_pages=sorted(new_ids), max_staging_bytes=budget)
    check_plan_structure(back, budget)
    assert back.kv_bytes_moved == plan.kv_bytes_moved
    execute_kv_plan(back, buffers)
    for s, (part, pages) in enumerate(zip(parts, used)):
        for p in pages:
            check_content(buffers, part, p, (s, p))


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 10**9), size=st.sampled_from([2, 4, 8]))
def test_split_with_compaction_keeps_requests_together(seed, size):
    rnd = random.Random(seed)
    group = Instance.of(range(size))
    parts = random_parts(rnd, group)
    cap_merged = LAYOUT.pages_per_device(BUF, size)
    used = rnd.sample(range(cap_merged), rnd.randint(0, cap_merged // 2))
    groups, i = [], 0
    while i < len(used):
        n = rnd.randint(1, 4)
        groups.append((rnd.randrange(len(parts)), used[i:i + n]))
        i += n
    try:
        assignment = split_page_assignment(LAYOUT, BUF, group, parts, groups)
    except ValueError:
        return  # a part ran out of pages: refused, as documented
    for target, pages in groups:
        assert {assignment[q][0] for q in pages} == {target}
    assert len(set(assignment.values())) == len(assignment)
    buffers = {d: [None] * BUF for d in range(size)}
    fill(buffers, group, used, "m")
    plan = kv_split_plan(LAYOUT, BUF, group, parts, assignment=assignment, max_staging_bytes=32)
    check_plan_structure(plan, 32)
    execute_kv_plan(plan, buffers)
    for q, (s, p) in assignment.items():
        check_content(buffers, parts[s], p, ("m", q))


@settings(max_examples=120, deadline=None)
@given(seed=st.integers(0, 10**9), size=st.sampled_from([2, 4, 8]))
def test_split_precopy_then_pause_puts_every_page_where_the_assignment_says(seed, size):
    """A split's KV pre-copy (free aligned blocks as destinations, chosen by split_precopy_slots) followed by
    the pause's plan for what is left (pages rewritten since are not trusted): every page ends at its assigned
    destination with its latest content, and the pre-copy reads and writes nothing a used page occupies."""
    rnd = random.Random(seed)
    group = Instance.of(range(size))
    parts = random_parts(rnd, group)
    cap_merged = LAYOUT.pages_per_device(BUF, size)
    used = sorted(rnd.sample(range(cap_merged), rnd.randint(0, cap_merged // 2)))
    groups, i = [], 0
    order = used[:]
    rnd.shuffle(order)
    while i < len(order):
        n = rnd.randint(1, 4)
        groups.append((rnd.randrange(len(parts)), order[i:i + n]))
        i += n
    target = {q: t for t, pages in groups for q in pages}
    free_ids = sorted(set(range(cap_merged)) - set(used))
    free_runs = []
    for q in free_ids:
        if free_runs and free_runs[-1][1] == q:
            free_runs[-1] = (free_runs[-1][0], q + 1)
        else:
            free_runs.append((q, q + 1))
    first_page = [rnd.randint(0, 1) for _ in parts]
    capacity = [LAYOUT.pages_per_device(BUF, p.tp) for p in parts]
    candidates = [(q, target[q]) for q in order if rnd.random() < 0.8]
    max_pages = rnd.randint(0, cap_merged)
    reserved, page_map = split_precopy_slots(group, parts, free_runs, candidates, first_page, capacity, max_pages)
    assert set(reserved) <= set(free_ids) and len(reserved) == len(set(reserved)) <= max_pages
    assert set(page_map) <= {q for q, _ in candidates}
    assert all(page_map[q][0] == target[q] for q in page_map)
    assert len(set(page_map.values())) == len(page_map)
    merged_pb = LAYOUT.page_bytes(size)
    reserved_bytes = {(d, q) for d in range(size) for q in reserved}
    for q, (s, p) in page_map.items():
        assert first_page[s] <= p < capacity[s]
        pb = LAYOUT.page_bytes(parts[s].tp)
        for d in parts[s].devices:  # the destination's bytes are reserved merged pages on its devices
            for b in range(p * pb, (p + 1) * pb, merged_pb):
                assert (d, b // merged_pb) in reserved_bytes
    buffers = {d: [None] * BUF for d in range(size)}
    fill(buffers, group, used, "m")
    ahead = kv_regroup_plan(LAYOUT, BUF, (group,), parts, {(0, q): at for q, at in page_map.items()})
    check_plan_structure(ahead)
    assert not any(m.staged for m in ahead.moves)  # destinations are free: nothing to stage
    execute_kv_plan(ahead, buffers)
    # While serving after the copy, some pages were handed out again and rewritten: their copies are stale.
    dirty = {q for q in used if rnd.random() < 0.3}
    fill(buffers, group, sorted(dirty), "new")
    fixed = {q: at for q, at in page_map.items() if q not in dirty}
    try:
        assignment = split_page_assignment(LAYOUT, BUF, group, parts, groups, first_page=first_page, fixed=fixed)
    except ValueError:
        return  # a part ran out of pages: refused, as documented
    kept = {q for q, at in assignment.items() if fixed.get(q) == at}
    assert kept == set(fixed)  # every valid copy is used where its group goes
    pause = kv_split_plan(LAYOUT, BUF, group, parts, assignment={q: a for q, a in assignment.items() if q not in kept},
                          max_staging_bytes=32)
    check_plan_structure(pause, 32)
    execute_kv_plan(pause, buffers)
    for q, (s, p) in assignment.items():
        assert first_page[s] <= p
        check_content(buffers, parts[s], p, ("new" if q in dirty else "m", q))


def test_execute_on_bytearrays():
    parts = [Instance.of([0]), Instance.of([1])]
    bufs = {0: bytearray(b"a" * BUF), 1: bytearray(b"b" * BUF)}
    plan = kv_merge_plan(LAYOUT, BUF, parts, [[0], [0]])
    execute_kv_plan(plan, bufs)
    half = H // 2 * HB
    assert bufs[0][:2 * half] == b"a" * half + b"b" * half  # page 0 = dev0 heads 0-3 | page 1 = dev1's
    assert bufs[1][:2 * half] == b"a" * half + b"b" * half


# ---------------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------------
params_st = st.lists(st.tuples(st.integers(1, 4), st.integers(1, 9), st.booleans()), min_size=1, max_size=5)


def check_weight_plan(plan, params, G, old_topo_instances, new_instances):
    by_name = {p.name: p for p in params}
    new_of = {d: i for i in new_instances for d in i.devices}
    old_of = {d: i for i in old_topo_instances for d in i.devices}
    covered = {}
    for d, dp in plan.devices.items():
        oi, ni = old_of[d], new_of[d]
        for p in params:
            if not p.sharded:
                continue
            per_old, per_new = p.rows // oi.tp, p.rows // ni.tp
            o0, n0 = oi.shard_rank(d) * per_old, ni.shard_rank(d) * per_new
            new_rows = [r for k in dp.keep if k.param == p.name for r in range(k.start, k.end)]
            new_rows += [r for v in dp.recv if v.param == p.name for r in range(v.start, v.end)]
            assert sorted(new_rows) == list(range(n0, n0 + per_new))  # exactly once each
            old_rows = [r - o0 for k in dp.keep if k.param == p.name for r in range(k.start, k.end)]
            old_rows += [r for f in dp.free if f.param == p.name for r in range(f.old_local_start, f.old_local_end)]
            assert sorted(old_rows) == list(range(per_old))
            for k in dp.keep:
                if k.param == p.name:
                    assert k.old_local_start == k.start - o0 and k.new_local_start == k.start - n0
            for v in dp.recv:
                if v.param == p.name:
                    src_old = old_of[v.src_device]
                    s0 = src_old.shard_rank(v.src_device) * (p.rows // src_old.tp)
                    assert s0 <= v.start and v.end <= s0 + p.rows // src_old.tp  # the peer held them
                    assert v.src_local_start == v.start - s0 and v.dst_local_start == v.start - n0
                    assert v.nbytes == (v.end - v.start) * p.row_bytes
            for r in range(n0, n0 + per_new):
                covered.setdefault((ni, p.name, r), 0)
                covered[(ni, p.name, r)] += 1
    for ni in new_instances:
        for p in params:
            if p.sharded:
                assert all(covered[(ni, p.name, r)] == 1 for r in range(p.rows))
    assert plan.peak_extra_bytes == 0


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 10**9), size=st.sampled_from([2, 4, 8]), raw=params_st)
def test_weight_merge_and_split_cover_every_row_once(seed, size, raw):
    G = 8
    params = [ParamSpec(f"w{i}", rows=G * m, row_bytes=rb, sharded=sh) for i, (m, rb, sh) in enumerate(raw)]
    rnd = random.Random(seed)
    group = Instance.of(range(size))
    parts = random_parts(rnd, group)
    merge = weight_merge_plan(params, G, parts)
    check_weight_plan(merge, params, G, parts, [group])
    assert merge.weight_bytes_moved == 0  # merge keeps a slice in place, receives nothing
    sharded_bytes = sum(p.rows * p.row_bytes for p in params if p.sharded)
    freed = sum(sharded_bytes // pt.tp * pt.tp - sharded_bytes // size * pt.tp for pt in parts)
    assert merge.weight_bytes_freed == freed
    split = weight_split_plan(params, G, group, parts)
    check_weight_plan(split, params, G, [group], parts)
    assert split.weight_bytes_freed == 0 and split.weight_bytes_moved == freed


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 10**9), size=st.sampled_from([2, 4, 8]), raw=params_st,
       chunk=st.integers(1, 200), align=st.sampled_from([1, 8, 64]))
def test_weight_prefetch_plan_stages_every_received_row_once(seed, size, raw, chunk, align):
    """Pieces of a split's received rows: each received row exactly once, from the device the split plan reads
    it from; staging pieces disjoint, aligned and inside their receiver's region; a chunk receives at most
    `chunk` bytes per device unless one row alone is larger."""
    G = 8
    params = [ParamSpec(f"w{i}", rows=G * m, row_bytes=rb, sharded=sh) for i, (m, rb, sh) in enumerate(raw)]
    row_bytes = {p.name: p.row_bytes for p in params}
    parts = random_parts(random.Random(seed), Instance.of(range(size)))
    split = weight_split_plan(params, G, Instance.of(range(size)), parts)
    pre = weight_prefetch_plan(split, chunk, align)
    want = {(d, rv.param, rv.dst_local_start + i): (rv.src_device, rv.src_local_start + i)
            for d, dp in split.devices.items() for rv in dp.recv for i in range(rv.end - rv.start)}
    got, spans = {}, {}
    for c in pre.chunks:
        assert c, "no empty chunk"
        load = {}
        for piece in c:
            assert piece.nbytes == piece.rows * row_bytes[piece.param] and piece.rows > 0
            assert piece.staging_offset % align == 0
            assert piece.staging_offset + piece.nbytes <= pre.staging_bytes[piece.dst_device]
            spans.setdefault(piece.dst_device, []).append((piece.staging_offset, piece.staging_offset + piece.nbytes))
            load.setdefault(piece.dst_device, []).append(piece.nbytes)
            for i in range(piece.rows):
                key = (piece.dst_device, piece.param, piece.dst_local_start + i)
                assert key not in got
                got[key] = (piece.src_device, piece.src_local_start + i)
        for sizes in load.values():
            assert sum(sizes) <= chunk or len(sizes) == 1
    assert got == want
    for ranges in spans.values():
        ranges.sort()
        assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))
    assert pre.bytes_fetched == split.weight_bytes_moved
    # each region ends where its last piece ends (no slack beyond alignment gaps)
    assert pre.staging_bytes == {d: max((b for _, b in spans.get(d, [])), default=0) for d in split.devices}


def test_weight_plan_errors():
    with pytest.raises(ValueError, match="multiple of G"):
        weight_merge_plan([ParamSpec("w", 10, 4)], 4, [Instance.of([0]), Instance.of([1])])
    with pytest.raises(ValueError, match="granularity"):
        weight_merge_plan([ParamSpec("w", 16, 4)], 2, [Instance.of([0, 1]), Instance.of([2, 3])])


def test_topology_and_plans_agree():
    topo = Topology.uniform(4, 1)
    new = topo.merge(range(4))
    merged = new.instance_of(0)
    parts = topo.merge_sources(range(4))
    plan = kv_merge_plan(LAYOUT, BUF, parts, [[0]] * 4)
    assert {q for (_, q) in plan.page_map.values()} == {0, 1, 2, 3}
    assert merged.shard_order == (0, 2, 1, 3)
