"""RadixCache: page-aligned prefix matching, locking, LRU eviction, page ownership, rebase/export."""

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from sglang.srt.mem_cache.page_allocator import PageAllocator
from sglang.srt.mem_cache.radix_cache import RadixCache


def make(page_size, num_pages=64, disable=False):
    alloc = PageAllocator(num_pages)
    return alloc, RadixCache(page_size, alloc, disable=disable)


def cache_seq(alloc, tree, tokens):
    """Allocate pages for the full pages of tokens, insert them, free duplicates (caller's pages)."""
    ps = tree.page_size
    full = len(tokens) // ps * ps
    m = tree.match_prefix(tokens[:full])
    own = alloc.alloc(full // ps - len(m.pages))
    pages = m.pages + own
    n = tree.insert(tokens[:full], pages)
    alloc.free(pages[len(m.pages):n // ps])
    return pages


# ---------------------------------------------------------------------------------------------------
# examples
# ---------------------------------------------------------------------------------------------------
def test_page_size_1_match_insert_split():
    alloc, tree = make(1)
    assert tree.insert([1, 2, 3, 4], [10, 11, 12, 13]) == 0
    m = tree.match_prefix([1, 2, 3, 9, 9])
    assert (m.pages, m.num_tokens) == ([10, 11, 12], 3)
    assert m.last_node.key == (1, 2, 3)  # split at the divergence
    # inserting a branch reports the cached leading tokens; the caller frees its duplicates
    assert tree.insert([1, 2, 7], [20, 21, 22]) == 2
    assert tree.match_prefix([1, 2, 7]).pages == [10, 11, 22]
    assert tree.cached_pages() == 5
    assert sorted(tree.all_pages()) == [10, 11, 12, 13, 22]
    assert tree.match_prefix([5]).num_tokens == 0
    assert tree.match_prefix([]).pages == []
    tree.check_invariants()


def test_page_size_16_aligns_down_and_never_caches_partial_pages():
    ps = 16
    alloc, tree = make(ps)
    seq = list(range(100, 100 + 40))  # 2 full pages + 8 tokens
    pages = cache_seq(alloc, tree, seq)
    assert len(pages) == 2 and tree.cached_pages() == 2
    # partial pages are rejected by insert
    with pytest.raises(ValueError):
        tree.insert(seq, pages + [5])
    m = tree.match_prefix(seq)
    assert m.num_tokens == 32 and m.pages == pages
    # a match that diverges inside the second page is aligned down to one page
    m = tree.match_prefix(seq[:20] + [0] * 20)
    assert m.num_tokens == 16 and m.pages == pages[:1]
    # a query shorter than a page matches nothing
    assert tree.match_prefix(seq[:15]).num_tokens == 0
    # divergence inside the first page: nothing
    assert tree.match_prefix([0] + seq[1:]).num_tokens == 0


def test_split_inside_multi_page_edge_keeps_tokens_pages_consistent():
    ps = 4
    alloc, tree = make(ps)
    a = list(range(16))
    tree.insert(a, [0, 1, 2, 3])
    b = a[:8] + [99] * 8
    assert tree.insert(b, [7, 7, 8, 9][:0] + [30, 31, 32, 33]) == 8
    assert tree.match_prefix(a).pages == [0, 1, 2, 3]
    assert tree.match_prefix(b).pages == [0, 1, 32, 33]
    tree.check_invariants()


def test_lock_prevents_eviction_and_lru_order():
    alloc, tree = make(1, num_pages=16)
    old = cache_seq(alloc, tree, [1, 1, 1])
    mid = cache_seq(alloc, tree, [2, 2, 2])
    new = cache_seq(alloc, tree, [3, 3, 3])
    tree.match_prefix([1, 1, 1])  # touch: [2,2,2] is now least recently used
    m = tree.match_prefix([3, 3])
    tree.inc_lock_ref(m.last_node)
    assert tree.protected_pages() == 2 and tree.evictable_pages() == 7
    assert tree.evict(1) == 3  # whole leaf [2,2,2]
    assert all(alloc.is_free(p) for p in mid)
    assert tree.evict(100) == 4  # [1,1,1] and the unlocked tail of [3,3,3]
    assert tree.match_prefix([3, 3, 3]).pages == new[:2]
    assert all(alloc.is_free(p) for p in old) and alloc.is_free(new[2])
    with pytest.raises(RuntimeError):
        tree.reset()  # still locked
    tree.dec_lock_ref(m.last_node)
    with pytest.raises(RuntimeError):
        tree.dec_lock_ref(m.last_node)  # unbalanced
    tree.reset()
    assert alloc.num_free == 16 and tree.cached_pages() == 0


def test_evict_parents_become_leaves():
    alloc, tree = make(1, num_pages=16)
    cache_seq(alloc, tree, [1, 2, 3])
    cache_seq(alloc, tree, [1, 2, 4])
    assert tree.cached_pages() == 4
    assert tree.evict(4) == 4
    assert tree.cached_pages() == 0 and alloc.num_free == 16


def test_disabled_cache_keeps_nothing():
    alloc, tree = make(4, disable=True)
    p = alloc.alloc(2)
    assert tree.insert(list(range(8)), p) == 0  # the caller still owns (and frees) p
    m = tree.match_prefix(list(range(8)))
    assert (m.pages, m.num_tokens, m.last_node) == ([], 0, tree.root)
    tree.inc_lock_ref(m.last_node)
    tree.dec_lock_ref(m.last_node)
    assert tree.cached_pages() == 0 and tree.evict(10) == 0
    alloc.free(p)
    tree.reset()
    assert alloc.num_free == alloc.num_total


def test_rebase_and_export_import_between_instances():
    ps = 2
    alloc, tree = make(ps, num_pages=8)
    cache_seq(alloc, tree, [1, 2, 3, 4, 5, 6])
    cache_seq(alloc, tree, [1, 2, 7, 8])
    before = {tuple(t): p for t, p in tree.export()}
    assert before == {(1, 2, 3, 4, 5, 6): [0, 1, 2], (1, 2, 7, 8): [0, 3]}
    # Gyges merge of 2 instances: this one is instance s=1, page p -> p*2+1.
    big = PageAllocator(16)
    tree.rebase(lambda p: p * 2 + 1, allocator=big)
    assert tree.allocator is big
    assert tree.match_prefix([1, 2, 7, 8]).pages == [1, 7]
    with pytest.raises(ValueError):
        tree.rebase({1: 0, 3: 0, 5: 2, 7: 4})  # not injective
    assert tree.match_prefix([1, 2, 7, 8]).pages == [1, 7]  # unchanged by the failed rebase
    # combine with another instance's tree that has an overlapping prefix
    alloc2, other = make(ps, num_pages=8)
    other.insert([1, 2, 9, 9], [0, 1])
    other.rebase({0: 0, 1: 2})
    dups = tree.import_(other.export())
    assert dups == [0]  # tokens (1, 2) are already cached as page 1; page 0 stays with the caller
    assert tree.match_prefix([1, 2, 9, 9]).pages == [1, 2]
    assert tree.import_(tree.export()) == []  # re-importing itself adds nothing
    tree.check_invariants()


# ---------------------------------------------------------------------------------------------------
# stateful property test: the scheduler's use of allocator + tree
# ---------------------------------------------------------------------------------------------------
tokens_st = st.lists(st.integers(0, 2), min_size=0, max_size=14)


class SchedulerModel(RuleBasedStateMachine):
    """Requests match a prefix, lock it, allocate the rest, cache themselves (chunked) and finish.

    `content[page]` is the token prefix whose KV a page holds (KV depends on the whole prefix), so a
    match returning a page for other tokens is caught."""

    @initialize(page_size=st.sampled_from([1, 2, 4]), num_pages=st.integers(4, 24),
                disable=st.sampled_from([False, False, False, True]))
    def setup(self, page_size, num_pages, disable):
        self.ps = page_size
        self.alloc = PageAllocator(num_pages)
        self.tree = RadixCache(page_size, self.alloc, disable=disable)
        self.content = {}
        self.reqs = []  # dicts: tokens, pages (full + maybe a partial one), num_tree, node

    def _alloc(self, n):
        pages = self.alloc.alloc(n)
        if pages is None:
            self.tree.evict(n - self.alloc.num_free)
            self._forget_evicted()
            pages = self.alloc.alloc(n)
        return pages

    def _forget_evicted(self):
        for p in [p for p in self.content if self.alloc.is_free(p)]:
            del self.content[p]  # evicted pages lose their meaning

    def _check_match(self, tokens, m):
        assert m.num_tokens % self.ps == 0 and m.num_tokens == len(m.pages) * self.ps
        assert tuple(tokens[:m.num_tokens]) == tuple(tokens[:m.num_tokens])
        for i, p in enumerate(m.pages):
            assert self.content[p] == tuple(tokens[:(i + 1) * self.ps]), (p, tokens)

    def _free(self, pages):
        self.alloc.free(pages)
        for p in pages:
            del self.content[p]

    @rule(tokens=tokens_st)
    def start_request(self, tokens):
        m = self.tree.match_prefix(tokens)
        self._check_match(tokens, m)
        self.tree.inc_lock_ref(m.last_node)
        need = -(-len(tokens) // self.ps) - len(m.pages)
        own = self._alloc(need)
        if own is None:
            self.tree.dec_lock_ref(m.last_node)
            return
        pages = m.pages + own
        for i in range(len(m.pages), len(pages)):
            self.content[pages[i]] = tuple(tokens[:(i + 1) * self.ps])
        self.reqs.append(dict(tokens=list(tokens), pages=pages, num_tree=len(m.pages), node=m.last_node))

    def _cache(self, r):
        full = len(r["tokens"]) // self.ps
        n = self.tree.insert(r["tokens"][:full * self.ps], r["pages"][:full])
        assert n % self.ps == 0 and n >= r["num_tree"] * self.ps
        self._free(r["pages"][r["num_tree"]:n // self.ps])  # duplicates belong to the caller
        return full

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, 100))
    def cache_running_request(self, i):
        """Chunked-prefill style: cache the full pages, re-match, move the lock to the new node."""
        r = self.reqs[i % len(self.reqs)]
        full = self._cache(r)
        m = self.tree.match_prefix(r["tokens"])
        self._check_match(r["tokens"], m)
        if self.tree.disable:
            assert m.pages == []
            r["pages"][r["num_tree"]:0] = []
            # with the cache disabled the request keeps every page itself (its duplicates were not freed)
            return
        assert len(m.pages) == full
        assert m.pages[:r["num_tree"]] == r["pages"][:r["num_tree"]]  # locked pages survive
        r["pages"][:full] = m.pages
        r["num_tree"] = full
        self.tree.inc_lock_ref(m.last_node)
        self.tree.dec_lock_ref(r["node"])
        r["node"] = m.last_node

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, 100))
    def finish_request(self, i):
        r = self.reqs.pop(i % len(self.reqs))
        full = self._cache(r)
        if self.tree.disable:
            self._free(r["pages"])
        else:
            self._free(r["pages"][full:])  # the partial page is never cached
        self.tree.dec_lock_ref(r["node"])

    @rule(tokens=tokens_st)
    def match_only(self, tokens):
        self._check_match(tokens, self.tree.match_prefix(tokens))

    @rule(n=st.integers(0, 10))
    def evict(self, n):
        before = self.tree.evictable_pages()
        freed = self.tree.evict(n)
        assert freed <= before
        assert freed >= min(n, before)
        self._forget_evicted()

    @precondition(lambda self: not self.reqs)
    @rule()
    def reset(self):
        self.tree.reset()
        self.content.clear()
        assert self.alloc.num_free == self.alloc.num_total

    @invariant()
    def pages_accounted_exactly_once(self):
        if not hasattr(self, "tree"):
            return
        self.tree.check_invariants()
        tree_pages = self.tree.all_pages()
        private = [p for r in self.reqs for p in r["pages"][r["num_tree"]:]]
        free = self.alloc.free_pages()
        everything = tree_pages + private + free
        assert sorted(everything) == list(range(self.alloc.num_total))
        assert set(self.content) == set(tree_pages) | set(private)
        # pages that running requests read from the tree are still there (locked)
        in_tree = set(tree_pages)
        for r in self.reqs:
            assert set(r["pages"][:r["num_tree"]]) <= in_tree
        assert self.tree.protected_pages() >= len({p for r in self.reqs for p in r["pages"][:r["num_tree"]]})

    def teardown(self):
        if not hasattr(self, "tree"):
            return
        while self.reqs:
            self.finish_request(0)
        self.tree.reset()
        assert self.alloc.num_free == self.alloc.num_total
        assert self.tree.cached_pages() == 0


SchedulerModel.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_scheduler_model = SchedulerModel.TestCase
