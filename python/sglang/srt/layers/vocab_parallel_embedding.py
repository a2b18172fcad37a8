"""Vocab-parallel embedding and LM head.

The table is [vocab_padded, hidden] with vocab_padded a multiple of 64*G (weight_layout.padded_vocab_size);
rank r of TP t holds rows [r*Vp/t, (r+1)*Vp/t).

Data flow:
    embedding: ids [T] --mask ids outside this rank's rows--> local lookup [T, hidden] --all-reduce--> [T, hidden]
    lm head:   hidden [N, hidden] --x W_local^T--> [N, Vp/t]  (gathered + trimmed by LogitsProcessor)
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from sglang.srt.distributed.parallel_state import TPGroup
from sglang.srt.layers.linear import new_param
from sglang.srt.model_executor.weight_layout import WeightTarget, padded_vocab_size, shard_copies


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp_group: TPGroup, granularity: int,
                 dtype: torch.dtype, device):
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.granularity = granularity
        self.tp_group = tp_group
        self.padded_vocab = padded_vocab_size(vocab_size, granularity)
        self.local_vocab = self.padded_vocab // tp_group.size
        self.vocab_start = tp_group.shard_rank * self.local_vocab
        self.weight = new_param((self.local_vocab, hidden_size), dtype, device)  # [Vp/t, hidden]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] -> [T, hidden]."""
        if self.tp_group.size == 1:
            return nn.functional.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        inside = (local >= 0) & (local < self.local_vocab)  # [T]
        out = nn.functional.embedding(local.clamp(0, self.local_vocab - 1), self.weight)  # [T, hidden]
        out = out * inside.unsqueeze(-1).to(out.dtype)
        return self.tp_group.all_reduce(out)

    def weight_targets(self, hf_name: str) -> Dict[str, WeightTarget]:
        copies = shard_copies([self.vocab_size], [self.padded_vocab], 0, self.granularity, self.tp_group.shard_rank,
                              self.tp_group.size)
        return {hf_name: WeightTarget(self.weight, (self.vocab_size, self.hidden_size), copies)}


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection; shares the embedding's parameter when the model ties them."""

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> this rank's logits [N, Vp/t]."""
        return nn.functional.linear(hidden, self.weight)
