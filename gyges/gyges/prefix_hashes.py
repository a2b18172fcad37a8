"""Chained hashes of page-aligned token blocks: the key both sides of prefix-affinity placement agree on.

    controller   gyges.policies.affinity.PrefixIndex: hashes of the prompts it routed to each instance
    scheduler    its first report after a transformation lists the hashes of every cached path
                 (InstanceReport.cached_prefix_hashes), which replace the controller's entries

A module of its own (no imports) so a worker can hash without importing gyges.policies (which loads the cost
model and scipy: ~0.8 s, once per process, that used to land on the first iteration after a transformation).
"""

from typing import List, Sequence


def block_hashes(token_ids: Sequence[int], block_tokens: int) -> List[int]:
    """Chained hash of each whole block: block i's hash depends on every token before its end."""
    out, h = [], 0
    b = block_tokens
    for i in range(len(token_ids) // b):
        h = hash((h, tuple(token_ids[i * b:(i + 1) * b])))
        out.append(h)
    return out
