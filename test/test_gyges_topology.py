"""gyges.topology: aligned groups, instance shapes, shard order, merge/split validation."""

import pytest
from hypothesis import given, settings, strategies as st

from gyges.topology import Instance, Topology, aligned_groups, bitrev, is_aligned


def ref_bitrev(x, bits):
    return int(format(x, f"0{bits}b")[::-1], 2) if bits else 0


def test_bitrev_matches_string_reversal():
    for bits in range(4):
        for x in range(1 << bits):
            assert bitrev(x, bits) == ref_bitrev(x, bits)


def test_aligned_groups():
    assert aligned_groups(4, 2) == [(0,), (1,), (2,), (3,), (0, 1), (2, 3)]
    groups = aligned_groups(8, 8)
    assert len(groups) == 8 + 4 + 2 + 1
    assert (0, 1, 2, 3, 4, 5, 6, 7) in groups and (4, 5, 6, 7) in groups and (2, 3, 4, 5) not in groups
    assert aligned_groups(6, 4) == [(0,), (1,), (2,), (3,), (4,), (5,), (0, 1), (2, 3), (4, 5), (0, 1, 2, 3)]
    assert all(is_aligned(g) for g in groups)
    assert not is_aligned([1, 2]) and not is_aligned([0, 1, 2]) and not is_aligned([0, 2]) and not is_aligned([])


def test_instance_validation_and_shard_order():
    with pytest.raises(ValueError, match="not a multiple"):
        Instance((2, 3, 4, 5), 4)
    with pytest.raises(ValueError, match="does not match"):
        Instance((0, 1), 1)
    with pytest.raises(ValueError, match="power of two"):
        Instance.of([0, 1, 2])
    assert Instance.of([1, 0]).devices == (0, 1)
    assert Instance.of([0, 1]).shard_order == (0, 1)
    assert Instance.of(range(4, 8)).shard_order == (4, 6, 5, 7)
    i8 = Instance.of(range(8))
    assert i8.shard_order == (0, 4, 2, 6, 1, 5, 3, 7)
    for r in range(8):
        assert i8.shard_rank(i8.device_of_rank(r)) == r
    with pytest.raises(ValueError):
        i8.device_of_rank(8)
    with pytest.raises(ValueError):
        Instance.of([0, 1]).shard_rank(2)


def test_topology_validation():
    t = Topology.uniform(4, 1, max_tp=4)
    assert t.shapes() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="two instances"):
        Topology(2, (Instance.of([0, 1]), Instance.of([1])))
    with pytest.raises(ValueError, match="no instance"):
        Topology(4, (Instance.of([0, 1]),))
    with pytest.raises(ValueError, match="above max_tp"):
        Topology(4, (Instance.of(range(4)),), max_tp=2)
    with pytest.raises(ValueError):
        Topology.uniform(6, 4)
    assert Topology.uniform(8, 2).instance_of(5).devices == (4, 5)


def test_merge_and_split_errors_say_why():
    t = Topology.uniform(8, 1, max_tp=4)
    with pytest.raises(ValueError, match="not a multiple"):
        t.merge([1, 2])
    with pytest.raises(ValueError, match="power of two"):
        t.merge([0, 1, 2])
    with pytest.raises(ValueError, match="max_tp"):
        t.merge(range(8))
    with pytest.raises(ValueError, match="out of range"):
        t.merge([8, 9])
    t2 = t.merge([0, 1])
    assert [i.devices for i in t2.instances][0] == (0, 1)
    with pytest.raises(ValueError, match="already one instance"):
        t2.merge([0, 1])
    t4 = t2.merge([0, 1, 2, 3])  # mixed: TP2 + TP1 + TP1
    assert t4.instance_of(3).tp == 4
    t5 = t.merge([2, 3])
    with pytest.raises(ValueError, match="cuts instance"):
        t4.merge([0, 1])
    with pytest.raises(ValueError, match="not exactly one"):
        t5.split([2], 1)
    with pytest.raises(ValueError, match="already has"):
        t5.split([2, 3], 2)
    with pytest.raises(ValueError, match="power of two"):
        t4.split(range(4), 3)
    back = t4.split(range(4), 1)
    assert back == t


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 7), st.sampled_from([1, 2, 4, 8])), max_size=25))
def test_any_sequence_keeps_shards_nested(ops):
    """Whatever merges and splits happen, a device's new shard is inside its old one (merge) or contains
    it (split): weights and own KV heads never need to move off the device."""
    topo = Topology.uniform(8, 1, max_tp=8)
    for is_merge, dev, size in ops:
        try:
            if is_merge:
                base = dev // size * size
                new = topo.merge(range(base, base + size))
            else:
                inst = topo.instance_of(dev)
                new = topo.split(inst.devices, size)
        except ValueError:
            continue
        for d in range(8):
            old_i, new_i = topo.instance_of(d), new.instance_of(d)
            a, b = old_i.shard_rank(d), new_i.shard_rank(d)
            if new_i.tp >= old_i.tp:
                assert b // (new_i.tp // old_i.tp) == a
            else:
                assert a // (old_i.tp // new_i.tp) == b
        assert sorted(d for i in new.instances for d in i.devices) == list(range(8))
        topo = new
