"""LogitsProcessor: final hidden states of the selected rows -> float32 logits over the true vocabulary.

Data flow:
    hidden [T, hidden] --rows logits_indices--> [N, hidden] --lm_head (local vocab shard)--> [N, Vp/t]
        --all-gather over TP ranks (dim -1)--> [N, Vp] --drop vocab padding--> float32 [N, vocab_size]
"""

from __future__ import annotations

import torch
from torch import nn

from sglang.srt.distributed.parallel_state import TPGroup
from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead


class LogitsProcessor(nn.Module):
    def __init__(self, vocab_size: int, tp_group: TPGroup):
        super().__init__()
        self.vocab_size = vocab_size
        self.tp_group = tp_group

    def forward(self, hidden: torch.Tensor, logits_indices: torch.Tensor, lm_head: ParallelLMHead) -> torch.Tensor:
        selected = hidden.index_select(0, logits_indices)  # [N, hidden]
        local = lm_head(selected)  # [N, Vp/t]
        full = self.tp_group.all_gather(local, dim=-1)  # [N, Vp]
        return full[:, : self.vocab_size].float()  # [N, vocab]
