"""ForwardBatch: one iteration's work for the model (CONTRACTS.md "ForwardBatch").

Built by the Scheduler on the leader (CPU tensors), pickled to the other ranks of the instance, and
passed to ModelRunner.forward on every rank. `ForwardBatch.assemble` is the scheduler's per-step path: the
page table from each request's int32 page-table tensor (Req.page_table_tensor(), kept up to date
incrementally) padded in one call, positions computed with tensor ops from the per-request lengths, so a
step costs O(batch) small lists, not O(tokens + pages) python work. `ForwardBatch.build` makes one from
plain lists (tests, warm-up, benchmarks).

Requests are concatenated in order; request b contributes extend_lens[b] new tokens at absolute
positions prefix_lens[b] .. prefix_lens[b] + extend_lens[b] - 1; its K/V (prefix and new) live in pages
page_table[b, :].
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import List, Optional, Sequence

import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # int64 [num_tokens]       new tokens of all requests, concatenated
    positions: torch.Tensor  # int64 [num_tokens]       absolute position of each token in its sequence
    extend_lens: torch.Tensor  # int64 [batch]          new tokens per request (1 for a decode step)
    prefix_lens: torch.Tensor  # int64 [batch]          tokens already in the KV cache per request
    page_table: torch.Tensor  # int32 [batch, max_pages] page ids covering prefix+extend tokens (pad: 0)
    logits_indices: torch.Tensor  # int64 [num_logit_rows] rows of the num_tokens axis whose logits return

    @property
    def batch_size(self) -> int:
        return int(self.extend_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_lens(self) -> torch.Tensor:
        """int64 [batch]: prefix + new tokens per request."""
        return self.prefix_lens + self.extend_lens

    @property
    def is_decode(self) -> bool:
        return bool((self.extend_lens == 1).all())

    def to(self, device) -> "ForwardBatch":
        return ForwardBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})

    @classmethod
    def assemble(cls, input_ids: Sequence[int], prefix_lens: Sequence[int], extend_lens: Sequence[int],
                 page_tables: Sequence[torch.Tensor], logits_indices: Sequence[int]) -> "ForwardBatch":
        """From the new tokens (concatenated), per-request lengths and int32 page-table tensors."""
        extend = torch.tensor(list(extend_lens), dtype=torch.int64)  # [batch]
        prefix = torch.tensor(list(prefix_lens), dtype=torch.int64)  # [batch]
        num_tokens = len(input_ids)
        if num_tokens == extend.shape[0] and (not extend_lens or min(extend_lens) == 1):  # all 1: decode
            # (or 1-token extends): a request's position is its prefix
            positions = prefix.clone()
        else:  # token j of request b sits at prefix[b] + (j - start[b]), start = exclusive cumsum of extend
            start = torch.cumsum(extend, 0) - extend
            positions = torch.arange(num_tokens, dtype=torch.int64) + torch.repeat_interleave(prefix - start, extend)
        if page_tables:
            table = torch.nn.utils.rnn.pad_sequence(list(page_tables), batch_first=True)  # int32 [batch, max_pages]
        else:
            table = torch.zeros((0, 1), dtype=torch.int32)
        return cls(
            input_ids=torch.tensor(list(input_ids), dtype=torch.int64),  # [num_tokens]
            positions=positions,  # [num_tokens]
            extend_lens=extend,
            prefix_lens=prefix,
            page_table=table,
            logits_indices=torch.tensor(list(logits_indices), dtype=torch.int64),  # [num_logit_rows]
        )

    @classmethod
    def build(cls, new_token_ids: Sequence[Sequence[int]], prefix_lens: Sequence[int],
              page_tables: Sequence[Sequence[int]], logits: str = "last",
              logits_indices: Optional[Sequence[int]] = None) -> "ForwardBatch":
        """From per-request lists. logits: 'last' (one row per request), 'all' (every new token), or pass
        explicit logits_indices."""
        extend = [len(t) for t in new_token_ids]
        ids: List[int] = [int(x) for t in new_token_ids for x in t]
        tables = [torch.as_tensor(list(pt), dtype=torch.int32) for pt in page_tables]
        if logits_indices is None:
            if logits == "all":
                logits_indices = list(range(len(ids)))
            elif logits == "last":
                ends = torch.tensor(extend).cumsum(0) - 1
                logits_indices = [int(e) for e, n in zip(ends, extend) if n > 0]
            else:
                raise ValueError(f"logits must be 'last' or 'all', got {logits!r}")
        fb = cls.assemble(ids, prefix_lens, extend, tables, logits_indices)
        if fb.page_table.shape[1] == 0:  # at least one column, as before
            fb.page_table = torch.zeros((fb.batch_size, 1), dtype=torch.int32)
        return fb
