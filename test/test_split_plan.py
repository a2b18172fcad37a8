"""A split's page groups (gyges_transform._page_groups): the requests and cached paths that share pages end on one
part. Checked without processes against a plain union-find over every page, on radix-shaped states (paths from
the root, requests whose cached pages are a prefix of their table) and on states that share pages elsewhere."""

import random

from hypothesis import given, settings, strategies as st

from sglang.srt.managers.gyges_transform import _page_groups
from sglang.srt.managers.schedule_batch import InstanceState, Req


def reference_groups(state):
    """Items (('req', rid) / ('path', index)) per group, and each group's pages, by union-find over every page."""
    items = [(("req", r.rid), r.page_table) for r in state.running]
    items += [(("path", i), pages) for i, (_, pages) in enumerate(state.tree_paths)]
    parent = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for _, pages in items:
        for a, b in zip(pages, pages[1:]):
            parent[find(a)] = find(b)
    out = {}
    for name, pages in items:
        key = find(pages[0]) if pages else name
        members, ps = out.setdefault(key, (set(), set()))
        members.add(name)
        ps.update(pages)
    return sorted((sorted(m), sorted(p)) for m, p in out.values())


def groups_of(state):
    index = {id(p): i for i, p in enumerate(state.tree_paths)}
    out = []
    for g in _page_groups(state):
        members = [("req", r.rid) for r in g.reqs] + [("path", index[id(p)]) for p in g.paths]
        out.append((sorted(members), g.pages))
    return sorted(out)


def radix_state(rnd: random.Random, shared_elsewhere: bool) -> InstanceState:
    """A random tree of page runs: every root-to-leaf path is a cached path; requests extend a random node's path
    with pages of their own. shared_elsewhere: one request also holds a page from the middle of another path."""
    next_page = iter(range(10_000))
    nodes = [[]]  # page lists from the root
    for _ in range(rnd.randint(0, 12)):
        parent = rnd.choice(nodes)
        nodes.append(parent + [next(next_page) for _ in range(rnd.randint(1, 3))])
    leaves = [n for n in nodes if n and not any(m != n and m[:len(n)] == n for m in nodes)]
    paths = [([0] * len(n), n) for n in leaves]
    running = []
    for i in range(rnd.randint(0, 5)):
        prefix = rnd.choice(nodes)
        table = prefix + [next(next_page) for _ in range(rnd.randint(0, 3))]
        running.append(Req(rid=f"r{i}", origin_input_ids=[1], sampling_params=None, page_table=table))
    if shared_elsewhere and running and any(len(n) > 1 for n in leaves):
        donor = rnd.choice([n for n in leaves if len(n) > 1])
        running[0].page_table = running[0].page_table + [donor[rnd.randrange(1, len(donor))]]
    return InstanceState(devices=[0, 1], running=running, waiting=[], tree_paths=paths)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 10**9), shared_elsewhere=st.booleans())
def test_page_groups_equal_a_union_find_over_every_page(seed, shared_elsewhere):
    state = radix_state(random.Random(seed), shared_elsewhere)
    assert groups_of(state) == reference_groups(state)


def test_a_page_shared_past_the_first_joins_the_groups():
    a = ([0, 0, 0], [1, 2, 3])
    b = ([0, 0], [7, 8])
    req = Req(rid="x", origin_input_ids=[1], sampling_params=None, page_table=[7, 8, 2])  # page 2: middle of a
    state = InstanceState(devices=[0, 1], running=[req], waiting=[], tree_paths=[a, b])
    (group,) = _page_groups(state)
    assert group.pages == [1, 2, 3, 7, 8] and group.reqs == [req] and len(group.paths) == 2
