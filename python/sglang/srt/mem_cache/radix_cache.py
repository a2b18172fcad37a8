"""Page-aligned radix cache: a prefix tree from token ids to KV page ids.

Data flow (one instance, driven by its Scheduler):

1. A new request calls `match_prefix(token_ids)`; the result's `pages` cover the first `num_tokens`
   tokens (a multiple of page_size) and go at the front of the request's page table. The scheduler pins
   them with `inc_lock_ref(result.last_node)` while the request runs.
2. Pages for the rest of the request come from the PageAllocator (after `evict(n)` when it is short).
3. When the request finishes (or a chunk of its prefill is done) the scheduler calls
   `insert(full_page_tokens, full_page_ids)` with the page-aligned part of its tokens, then
   `dec_lock_ref(old_last_node)`.

Ownership rules (who frees what):

- Pages referenced by a tree node belong to the tree. Only the tree frees them (in `evict` and `reset`).
- `insert(token_ids, pages)` returns `n`, the number of leading tokens the tree already held before the
  call. The tree adopts `pages[n // page_size:]`. For `pages[:n // page_size]` the tree keeps its own
  pages; any of those the caller allocated itself (i.e. did not get from `match_prefix`) are duplicates
  and the caller must free them; pages that came from `match_prefix` are the tree's and must not be freed.
  In the usual case: `allocator.free(pages[len(prefix_pages) : n // page_size])`.
- Partial pages (a tail shorter than page_size) are never cached: insert rejects them; the caller frees
  a partial last page itself.
- With `disable=True` the tree keeps nothing: `match_prefix` matches nothing and `insert` returns 0, so the
  caller frees all of its pages.
- `pin(node)` / `unpin(node)` hold a path for an open session (SGLang's session API) without a running
  request: a pinned node is never evicted, but unlike a lock the pin is given up on demand (the caller's
  policy, mem_cache/session_pins.py). Pages fall in three classes: locked (a running request uses them),
  pinned (only sessions hold them), evictable (nobody does).
- `on_evict(node)` (optional hook) sees every node `evict` frees, before its pages go back to the allocator:
  the host KV tier keeps their bytes (a later match reloads them, managers/req_kv.py).
- `rebase(mapping)` rewrites page ids in place (a Gyges merge/split renumbers pages); it does not touch
  any allocator: the caller sets up the allocator of the new id space (pass it as `allocator=`) so that
  `all_pages()` are marked used there.

Every edge of the tree holds a whole number of pages: `len(node.key) == len(node.pages) * page_size`.
Children are keyed by the tokens of their first page, so siblings never share a first page.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from sglang.srt.mem_cache.page_allocator import PageAllocator


class TreeNode:
    """One edge of the tree: `key` (token ids) cached in `pages` (one id per page_size tokens)."""

    __slots__ = ("key", "pages", "children", "parent", "lock_ref", "pin_ref", "last_access", "id")

    _ids = itertools.count()

    def __init__(self, key: Tuple[int, ...] = (), pages: Optional[List[int]] = None, parent=None):
        self.key: Tuple[int, ...] = key
        self.pages: List[int] = pages if pages is not None else []
        self.children: Dict[Tuple[int, ...], "TreeNode"] = {}
        self.parent: Optional["TreeNode"] = parent
        self.lock_ref: int = 0
        self.pin_ref: int = 0  # open sessions holding this node (see RadixCache.pin)
        self.last_access: int = 0
        self.id = next(TreeNode._ids)

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def __repr__(self) -> str:
        return (f"TreeNode(id={self.id}, tokens={len(self.key)}, pages={self.pages}, "
                f"lock_ref={self.lock_ref}, pin_ref={self.pin_ref}, children={len(self.children)})")


@dataclass
class MatchResult:
    pages: List[int]  # page ids covering token_ids[:num_tokens], in order
    num_tokens: int  # matched tokens, a multiple of page_size
    last_node: TreeNode  # deepest matched node (the root when nothing matched); lock/unlock this


PageMapping = Union[Mapping[int, int], Callable[[int], int]]


class RadixCache:
    def __init__(self, page_size: int, allocator: PageAllocator, disable: bool = False):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = int(page_size)
        self.allocator = allocator
        self.disable = disable
        self._clock = itertools.count(1)
        # Called with each node `evict` is about to free, while it is still in the tree (its pages' bytes are
        # intact): the host KV tier copies them out (mem_cache/host_tier.py). free_path and reset do not call it.
        self.on_evict: Optional[Callable[[TreeNode], None]] = None
        self._new_root()

    def _new_root(self) -> None:
        self.root = TreeNode()
        self.root.lock_ref = 1  # the root is never evicted
        self._evictable_pages = 0
        self._protected_pages = 0
        self._pinned_pages = 0

    # ------------------------------------------------------------------------------------------------
    # queries
    # ------------------------------------------------------------------------------------------------
    def evictable_pages(self) -> int:
        """Pages in unlocked nodes: all of them can be freed by `evict` (leaves first)."""
        return self._evictable_pages

    def protected_pages(self) -> int:
        """Pages in nodes pinned by at least one running request."""
        return self._protected_pages

    def pinned_pages(self) -> int:
        """Pages in nodes held only by session pins (no running request): reclaimable by unpinning."""
        return self._pinned_pages

    def cached_pages(self) -> int:
        """All pages owned by the tree."""
        return self._evictable_pages + self._protected_pages + self._pinned_pages

    def cached_tokens(self) -> int:
        return self.cached_pages() * self.page_size

    def all_pages(self) -> List[int]:
        out: List[int] = []
        for node in self._iter_nodes():
            out.extend(node.pages)
        return out

    def _iter_nodes(self) -> Iterable[TreeNode]:
        """Every non-root node, parents before children."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    # ------------------------------------------------------------------------------------------------
    # match / insert
    # ------------------------------------------------------------------------------------------------
    def _aligned(self, token_ids: Sequence[int]) -> Tuple[int, ...]:
        n = len(token_ids) // self.page_size * self.page_size
        return tuple(token_ids[:n])

    def _child_key(self, key: Sequence[int], start: int) -> Tuple[int, ...]:
        return tuple(key[start:start + self.page_size])

    def _matched_pages(self, node_key: Tuple[int, ...], key: Tuple[int, ...], start: int) -> int:
        """How many whole pages of node_key equal key[start:] (at least 1 when found by child key)."""
        ps = self.page_size
        n = min(len(node_key), len(key) - start) // ps
        i = 1  # the first page matched already: it is the child's dict key
        while i < n and node_key[i * ps:(i + 1) * ps] == key[start + i * ps:start + (i + 1) * ps]:
            i += 1
        return i

    def _split(self, node: TreeNode, num_pages: int) -> TreeNode:
        """Split `node` after its first num_pages pages; return the new upper node (which keeps the lock
        count and access time, so lock paths through it stay balanced)."""
        ps = self.page_size
        cut = num_pages * ps
        upper = TreeNode(node.key[:cut], node.pages[:num_pages], node.parent)
        upper.lock_ref = node.lock_ref
        upper.pin_ref = node.pin_ref
        upper.last_access = node.last_access
        node.parent.children[self._child_key(node.key, 0)] = upper
        node.key = node.key[cut:]
        node.pages = node.pages[num_pages:]
        node.parent = upper
        upper.children[self._child_key(node.key, 0)] = node
        return upper

    def match_prefix(self, token_ids: Sequence[int], touch: bool = True) -> MatchResult:
        """Longest cached page-aligned prefix of token_ids. Touches the matched path (LRU; not with
        touch=False, a look that leaves the eviction order alone) and splits the last node at a page
        boundary when the match ends inside it."""
        if self.disable:
            return MatchResult([], 0, self.root)
        key = self._aligned(token_ids)
        now = next(self._clock)
        node = self.root
        if touch:
            node.last_access = now
        pages: List[int] = []
        pos = 0
        while pos < len(key):
            child = node.children.get(self._child_key(key, pos))
            if child is None:
                break
            n = self._matched_pages(child.key, key, pos)
            if n * self.page_size < len(child.key):
                child = self._split(child, n)
            if touch:
                child.last_access = now
            pages.extend(child.pages)
            pos += len(child.key)
            node = child
        return MatchResult(pages, pos, node)

    def insert(self, token_ids: Sequence[int], pages: Sequence[int]) -> int:
        """Cache token_ids (whole pages only) in `pages`. Returns how many leading tokens were already
        cached; see the module docstring for who frees which pages."""
        return self._insert(token_ids, pages)[0]

    def _insert(self, token_ids: Sequence[int], pages: Sequence[int]) -> Tuple[int, List[int]]:
        """insert(), also returning the tree's own pages for the already-cached leading tokens."""
        ps = self.page_size
        if len(token_ids) != len(pages) * ps:
            raise ValueError(
                f"insert needs whole pages: {len(token_ids)} tokens != {len(pages)} pages * page_size {ps}")
        if self.disable:
            return 0, []
        key = tuple(token_ids)
        pages = list(pages)
        now = next(self._clock)
        node = self.root
        tree_pages: List[int] = []
        pos = 0
        while pos < len(key):
            child = node.children.get(self._child_key(key, pos))
            if child is None:
                new_pages = pages[pos // ps:]
                leaf = TreeNode(key[pos:], new_pages, node)
                leaf.last_access = now
                node.children[self._child_key(key, pos)] = leaf
                self._evictable_pages += len(new_pages)
                return pos, tree_pages
            n = self._matched_pages(child.key, key, pos)
            if n * ps < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            tree_pages.extend(child.pages)
            pos += len(child.key)
            node = child
        return pos, tree_pages

    # ------------------------------------------------------------------------------------------------
    # locks
    # ------------------------------------------------------------------------------------------------
    def inc_lock_ref(self, node: TreeNode) -> None:
        """Lock node and its ancestors (a running request uses their pages)."""
        self._add_ref(node, "lock_ref", +1)

    def dec_lock_ref(self, node: TreeNode) -> None:
        self._add_ref(node, "lock_ref", -1)

    def pin(self, node: TreeNode) -> None:
        """Keep node and its ancestors cached for a session (never evicted while pinned)."""
        self._add_ref(node, "pin_ref", +1)

    def unpin(self, node: TreeNode) -> None:
        """Undo one pin(node): the path becomes ordinary (LRU-evictable) cache again."""
        self._add_ref(node, "pin_ref", -1)

    def _add_ref(self, node: TreeNode, ref: str, delta: int) -> None:
        """Add delta to the `ref` count (lock_ref / pin_ref) of node and every ancestor, moving their pages
        between the locked / pinned / evictable counters."""
        if self.disable:
            return
        if delta < 0:  # validate the whole path first so that an unbalanced call changes nothing
            n = node
            while n is not self.root:
                if getattr(n, ref) <= 0:
                    raise RuntimeError(f"{ref} decrement on a node that holds none: {n!r}")
                if n.parent is None:
                    raise RuntimeError(f"{ref} decrement on a node that is not in this tree: {n!r}")
                n = n.parent
        while node is not self.root:
            self._count(node, -1)
            setattr(node, ref, getattr(node, ref) + delta)
            self._count(node, +1)
            node = node.parent

    def _count(self, node: TreeNode, sign: int) -> None:
        """Add (sign=+1) or remove (-1) node's pages to / from the counter of its class."""
        n = sign * len(node.pages)
        if node.lock_ref:
            self._protected_pages += n
        elif node.pin_ref:
            self._pinned_pages += n
        else:
            self._evictable_pages += n

    def free_path(self, node: TreeNode) -> int:
        """Evict node and then each ancestor that becomes an unreferenced leaf (a closed session's own
        pages; prefixes other paths share stay). Returns the pages freed."""
        freed = 0
        while (node is not self.root and node.parent is not None and node.is_leaf
               and not node.lock_ref and not node.pin_ref):
            parent = node.parent
            self.allocator.free(node.pages)
            freed += len(node.pages)
            self._evictable_pages -= len(node.pages)
            del parent.children[self._child_key(node.key, 0)]
            node.parent = None
            node = parent
        return freed

    def path_of(self, node: TreeNode) -> Tuple[List[int], List[int]]:
        """(token ids, page ids) from the root down to node."""
        keys, pages = [], []
        while node is not self.root:
            keys.append(node.key)
            pages.append(node.pages)
            node = node.parent
        return ([t for k in reversed(keys) for t in k], [p for ps in reversed(pages) for p in ps])

    # ------------------------------------------------------------------------------------------------
    # eviction / flush
    # ------------------------------------------------------------------------------------------------
    def evict(self, num_pages: int) -> int:
        """Free at least num_pages pages (fewer if not enough are evictable) by removing least recently
        used unlocked leaves; a parent whose last child goes becomes a candidate itself. Whole nodes are
        evicted, so the result may exceed num_pages. Returns the number of pages freed."""
        if self.disable or num_pages <= 0:
            return 0
        heap = [(n.last_access, n.id, n) for n in self._iter_nodes()
                if n.is_leaf and n.lock_ref == 0 and n.pin_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while freed < num_pages and heap:
            _, _, node = heapq.heappop(heap)
            if self.on_evict is not None:
                self.on_evict(node)
            self.allocator.free(node.pages)
            freed += len(node.pages)
            self._evictable_pages -= len(node.pages)
            parent = node.parent
            del parent.children[self._child_key(node.key, 0)]
            node.parent = None
            if parent is not self.root and parent.is_leaf and parent.lock_ref == 0 and parent.pin_ref == 0:
                heapq.heappush(heap, (parent.last_access, parent.id, parent))
        return freed

    def reset(self) -> None:
        """Flush the cache: every page goes back to the allocator (session pins are dropped with it).
        Raises if a running request still locks a node."""
        if self._protected_pages or any(n.lock_ref for n in self._iter_nodes()):
            raise RuntimeError(
                f"cannot reset the radix cache: {self._protected_pages} pages are locked by running requests")
        pages = self.all_pages()
        if pages:
            self.allocator.free(pages)
        for n in self._iter_nodes():
            n.parent = None
        self._new_root()

    # ------------------------------------------------------------------------------------------------
    # Gyges support: renumbering and moving trees between instances
    # ------------------------------------------------------------------------------------------------
    def rebase(self, mapping: PageMapping, allocator: Optional[PageAllocator] = None) -> None:
        """Rewrite every page id p to mapping[p] (or mapping(p)). Locks, LRU times and the shape of the
        tree are unchanged. The mapping must be injective on the tree's pages (ValueError otherwise, and
        the tree is left unchanged). If `allocator` is given it replaces the tree's allocator."""
        get = mapping.__getitem__ if isinstance(mapping, Mapping) else mapping
        nodes = list(self._iter_nodes())
        new_pages = [[int(get(p)) for p in n.pages] for n in nodes]
        flat = [p for ps in new_pages for p in ps]
        if len(set(flat)) != len(flat):
            raise ValueError("rebase mapping is not injective on the cached pages")
        for n, ps in zip(nodes, new_pages):
            n.pages = ps
        if allocator is not None:
            self.allocator = allocator

    def export(self) -> List[Tuple[List[int], List[int]]]:
        """The tree's content as root-to-leaf paths (token_ids, pages). Shared prefixes repeat in several
        paths with the same pages. Locks are not exported."""
        out: List[Tuple[List[int], List[int]]] = []

        def walk(node: TreeNode, tokens: List[int], pages: List[int]) -> None:
            if node is not self.root and node.is_leaf:
                out.append((tokens, pages))
                return
            for child in node.children.values():
                walk(child, tokens + list(child.key), pages + child.pages)

        walk(self.root, [], [])
        return out

    def import_(self, paths: Iterable[Tuple[Sequence[int], Sequence[int]]]) -> List[int]:
        """Insert exported paths. The tree adopts the pages it stores. Returns the duplicate pages it did
        not adopt (same tokens already cached under a different page id, e.g. when two instances' trees
        are combined); they belong to the caller, who frees them unless a running request still uses
        them. Pages already in the tree under the same tokens are not reported."""
        duplicates: List[int] = []
        ps = self.page_size
        for tokens, pages in paths:
            if self.disable:
                duplicates.extend(pages)
                continue
            n, tree_pages = self._insert(tokens, pages)
            # The leading n tokens were cached already; report the caller's differing page ids.
            for mine, theirs in zip(pages[:n // ps], tree_pages):
                if mine != theirs:
                    duplicates.append(mine)
        return duplicates

    # ------------------------------------------------------------------------------------------------
    # debugging
    # ------------------------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Assert the tree's structural invariants (tests and debug builds)."""
        ps = self.page_size
        evictable = protected = pinned = 0
        seen = set()
        for n in self._iter_nodes():
            assert len(n.key) > 0 and len(n.key) == len(n.pages) * ps, n
            assert n.parent.children.get(self._child_key(n.key, 0)) is n, n
            assert n.lock_ref >= 0, n
            assert n.pin_ref >= 0, n
            if n.parent is not self.root:
                assert n.parent.lock_ref >= n.lock_ref, (n.parent, n)
                assert n.parent.pin_ref >= n.pin_ref, (n.parent, n)
            for p in n.pages:
                assert p not in seen, f"page {p} owned by two nodes"
                seen.add(p)
            if n.lock_ref:
                protected += len(n.pages)
            elif n.pin_ref:
                pinned += len(n.pages)
            else:
                evictable += len(n.pages)
        assert pinned == self._pinned_pages, (pinned, self._pinned_pages)
        assert evictable == self._evictable_pages, (evictable, self._evictable_pages)
        assert protected == self._protected_pages, (protected, self._protected_pages)

    def __repr__(self) -> str:
        return (f"RadixCache(page_size={self.page_size}, cached_pages={self.cached_pages()}, "
                f"protected_pages={self.protected_pages()}, pinned_pages={self.pinned_pages()}, "
                f"disable={self.disable})")
