"""Tensor-parallel linear layers over the padded shard-major layout (model_executor/weight_layout.py).

Data flow (one decoder layer on one rank of TP t, G fine shards, n = G/t local fine shards; H', Hkv' the
padded head counts of gyges.heads.HeadLayout, equal to H, Hkv when G divides Hkv):
    x [T, hidden] --QKVParallelLinear--> [T, n, q_f + k_f + v_f] --split--> q [T, H'/t*D], k, v [T, Hkv'/t*D]
    x [T, hidden] --MergedColumnParallelLinear--> [T, n, 2*i_f]  (gate piece | up piece per fine shard)
    x_local [T, in/t] --RowParallelLinear (weight stored [in/t, out])--> partial [T, out] --all-reduce--> out
    (o_proj: in = H'*D; the columns of padding heads are zero)

Each layer exposes `weight_targets(hf names...)` telling the loader which rows of which HF tensor land in
which rows of its local parameter.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from gyges.heads import HeadLayout
from sglang.srt.distributed.parallel_state import TPGroup
from sglang.srt.model_executor.weight_layout import (
    WeightTarget,
    head_shard_copies,
    local_rows,
    padded_size,
    replicated_target,
    shard_copies,
)


def new_param(shape, dtype: torch.dtype, device) -> nn.Parameter:
    """Zero-initialised, frozen parameter (zeros = the padding rows stay zero)."""
    return nn.Parameter(torch.zeros(shape, dtype=dtype, device=device), requires_grad=False)


class ColumnParallelLinear(nn.Module):
    """y = x W^T (+ b) with W's output rows split; fused parts are interleaved per fine shard.

    part_sizes: true output rows of each fused part (one part = plain column-parallel).
    head_sources (with head_dim): parts laid out by heads, padded head u of part j = HF head
    head_sources[j][u] or zero (gyges.heads.HeadLayout); the padded part has len(head_sources[j]) heads.
    Output: [T, G/t, sum(padded_part / G)] view; `forward_flat` gives [T, local_out].
    """

    def __init__(self, in_features: int, part_sizes: Sequence[int], tp_group: TPGroup, granularity: int,
                 bias: bool, dtype: torch.dtype, device, pad_parts: bool = False,
                 head_sources: Optional[Sequence[Sequence[int]]] = None, head_dim: int = 0):
        super().__init__()
        self.in_features = in_features
        self.part_sizes = list(part_sizes)
        self.granularity = granularity
        self.tp_group = tp_group
        self.head_sources = [tuple(s) for s in head_sources] if head_sources is not None else None
        self.head_dim = head_dim
        if not pad_parts and head_sources is None:
            for s in self.part_sizes:
                if s % granularity:
                    raise ValueError(f"output size {s} is not divisible by the weight granularity {granularity}")
        if self.head_sources is not None:
            self.padded_sizes = [len(src) * head_dim for src in self.head_sources]
        else:
            self.padded_sizes = [padded_size(s, granularity) for s in self.part_sizes]
        self.local_fine_shards = granularity // tp_group.size
        self.local_out = local_rows(self.padded_sizes, granularity, tp_group.size)
        self.weight = new_param((self.local_out, in_features), dtype, device)  # [local_out, in]
        self.bias = new_param((self.local_out,), dtype, device) if bias else None  # [local_out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight, self.bias)  # [T, local_out]
        return y.view(x.shape[0], self.local_fine_shards, -1)  # [T, G/t, fine block]

    def split_parts(self, y: torch.Tensor) -> List[torch.Tensor]:
        """[T, G/t, block] -> one [T, local rows of part] tensor per part (in head / row order)."""
        pieces = [p // self.granularity for p in self.padded_sizes]
        return [t.reshape(y.shape[0], -1) for t in torch.split(y, pieces, dim=-1)]

    def weight_targets(self, hf_names: Sequence[str], bias_names: Optional[Sequence[str]] = None
                       ) -> Dict[str, WeightTarget]:
        out: Dict[str, WeightTarget] = {}
        rank, tp = self.tp_group.shard_rank, self.tp_group.size
        for j, name in enumerate(hf_names):
            if self.head_sources is not None:
                copies = head_shard_copies(self.head_sources[j], self.head_dim, self.padded_sizes, j,
                                           self.granularity, rank, tp)
            else:
                copies = shard_copies(self.part_sizes, self.padded_sizes, j, self.granularity, rank, tp)
            out[name] = WeightTarget(self.weight, (self.part_sizes[j], self.in_features), copies)
            if self.bias is not None and bias_names is not None:
                out[bias_names[j]] = WeightTarget(self.bias, (self.part_sizes[j],), copies)
        return out


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection over the padded heads of `heads`: every fine shard holds H'/G query heads and
    Hkv'/G KV heads (padding query heads zero, replicated KV heads copies of their source)."""

    def __init__(self, hidden_size: int, head_dim: int, heads: HeadLayout, tp_group: TPGroup,
                 granularity: int, bias: bool, dtype: torch.dtype, device):
        if heads.granularity != granularity:
            raise ValueError(f"head layout for granularity {heads.granularity}, weights for {granularity}")
        super().__init__(hidden_size, [heads.num_heads * head_dim, heads.num_kv_heads * head_dim,
                                       heads.num_kv_heads * head_dim],
                         tp_group, granularity, bias, dtype, device,
                         head_sources=[heads.q_source, heads.kv_source, heads.kv_source], head_dim=head_dim)

    def forward(self, x: torch.Tensor):
        """x [T, hidden] -> q [T, H'/t*D], k [T, Hkv'/t*D], v [T, Hkv'/t*D]."""
        return self.split_parts(super().forward(x))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Fused gate/up projection; intermediate_size is zero-padded to a multiple of G."""

    def __init__(self, hidden_size: int, intermediate_size: int, tp_group: TPGroup, granularity: int,
                 bias: bool, dtype: torch.dtype, device):
        super().__init__(hidden_size, [intermediate_size, intermediate_size], tp_group, granularity, bias,
                         dtype, device, pad_parts=True)

    # forward (inherited): [T, G/t, 2 * i_f] = per fine shard [gate piece | up piece]


class RowParallelLinear(nn.Module):
    """y = x W^T (+ b) with W's input columns split; W stored transposed [in_local, out] (shard-major).

    in_features is padded to a multiple of G (zero rows: padded inputs, which are zero anyway, add nothing).
    head_sources (with head_dim): the input is laid out by heads (o_proj), padded head u = HF head
    head_sources[u] or zero rows; padded_in = len(head_sources) * head_dim.
    """

    def __init__(self, in_features: int, out_features: int, tp_group: TPGroup, granularity: int, bias: bool,
                 dtype: torch.dtype, device, reduce_results: bool = True,
                 head_sources: Optional[Sequence[int]] = None, head_dim: int = 0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.granularity = granularity
        self.tp_group = tp_group
        self.reduce_results = reduce_results
        self.head_sources = tuple(head_sources) if head_sources is not None else None
        self.head_dim = head_dim
        if self.head_sources is not None:
            self.padded_in = len(self.head_sources) * head_dim
        else:
            self.padded_in = padded_size(in_features, granularity)
        self.local_in = self.padded_in // tp_group.size
        self.weight_t = new_param((self.local_in, out_features), dtype, device)  # [local_in, out]
        self.bias = new_param((out_features,), dtype, device) if bias else None  # [out], added once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, local_in] -> [T, out] (summed over ranks)."""
        y = torch.matmul(x, self.weight_t)  # [T, out] partial sum
        if self.reduce_results:
            self.tp_group.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y

    def weight_targets(self, hf_name: str, bias_name: Optional[str] = None) -> Dict[str, WeightTarget]:
        rank, tp = self.tp_group.shard_rank, self.tp_group.size
        if self.head_sources is not None:
            copies = head_shard_copies(self.head_sources, self.head_dim, [self.padded_in], 0, self.granularity,
                                       rank, tp)
        else:
            copies = shard_copies([self.in_features], [self.padded_in], 0, self.granularity, rank, tp)
        out = {hf_name: WeightTarget(self.weight_t, (self.out_features, self.in_features), copies, transpose=True)}
        if self.bias is not None and bias_name is not None:
            out[bias_name] = replicated_target(self.bias)
        return out
