"""Batched next-token sampler of an instance leader.

Data flow for one scheduler step (logits come from ModelRunner.forward, one row per request):

    raw logits [B, V] float32
      -> logprobs = log_softmax(raw)                        reported logprobs / top logprobs (SGLang: raw)
      -> + logit_bias                                       per request dict token -> bias
      -> grammar masks                                      xgrammar bitmask, -inf on forbidden tokens
      -> penalties                                          repetition (prompt+output), frequency/presence
      -> min_new_tokens                                     -inf on EOS + stop_token_ids while too short
      -> greedy rows: argmax
         other rows: softmax(x / T) -> top_k -> top_p -> min_p (each renormalized) -> inverse-CDF draw
      -> SampleOutput(next_token_ids, next_token_logprobs, top_logprobs)

Reproducibility: the only randomness is one uniform number u per (request, output position), computed
from (seed, sample_index, position) by a fixed integer hash (`position_uniform`). The token is the first
vocab id whose cumulative processed probability (in vocab-id order, float64) exceeds u. Nothing depends
on the batch composition, on the row of the request, or on the TP degree (logits are identical on every
TP degree up to reduction order), so a seeded request gives the same tokens in any batch and after a
Gyges transformation. SamplingState is plain python data (picklable) and moves with the request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from sglang.srt.sampling.penalties import apply_penalties
from sglang.srt.sampling.sampling_params import GREEDY_EPS, SamplingParams

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def position_uniform(seed: int, position: int, sample_index: int = 0) -> float:
    """Deterministic u in [0, 1) for output `position` of a request with `seed` (53 random bits)."""
    h = _splitmix64(int(seed) & _MASK64)
    h = _splitmix64(h ^ (int(sample_index) & _MASK64))
    h = _splitmix64(h ^ (int(position) & _MASK64))
    return (h >> 11) * (1.0 / (1 << 53))


@dataclass
class SamplingState:
    """Per-request sampling state: python data only, so it pickles and moves between instances.

    The output position (the index of the token being sampled) is len(output_ids) at sampling time, so
    the state needs no counter of its own.
    """

    params: SamplingParams
    seed: int  # params.sampling_seed, or the server's --random-seed when unset
    sample_index: int = 0  # index among the n parallel samples of one prompt (0 for n == 1)
    prompt_len: int = 0

    @classmethod
    def create(cls, params: SamplingParams, prompt_ids: Optional[Sequence[int]] = None,
               default_seed: int = 0, sample_index: int = 0) -> "SamplingState":
        seed = params.sampling_seed if params.sampling_seed is not None else default_seed
        return cls(params=params, seed=int(seed), sample_index=int(sample_index),
                   prompt_len=len(prompt_ids) if prompt_ids is not None else 0)

    def uniform(self, position: int) -> float:
        return position_uniform(self.seed, position, self.sample_index)


@dataclass
class SampleOutput:
    next_token_ids: List[int]
    # log_softmax(raw logits)[next token], one per request
    next_token_logprobs: List[float]
    # per request: None (not asked) or [(logprob, token_id), ...] best first, from raw logits
    top_logprobs: List[Optional[List[Tuple[float, int]]]] = field(default_factory=list)


def logprobs_of(logits: torch.Tensor, token_ids: Sequence[int], top_num: int = 0
                ) -> Tuple[List[float], Optional[List[List[Tuple[float, int]]]]]:
    """log_softmax(logits)[row, token_ids[row]] and, if top_num > 0, each row's top_num alternatives.

    Also for prompt logprobs: pass the logits of the prompt positions and the next prompt tokens.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=logits.device)
    chosen = logprobs.gather(1, ids.unsqueeze(1)).squeeze(1).tolist()
    if top_num <= 0:
        return chosen, None
    vals, idx = logprobs.topk(min(top_num, logprobs.shape[1]), dim=-1)
    return chosen, [list(zip(v, i)) for v, i in zip(vals.tolist(), idx.tolist())]


class Sampler:
    """Samples one token per row of a logits batch; see the module docstring for the order of steps."""

    def __init__(self, eos_token_ids: Sequence[int] = (), vocab_size: Optional[int] = None):
        self.eos_token_ids = [int(t) for t in eos_token_ids]
        self.vocab_size = vocab_size

    def sample(self, logits: torch.Tensor, states: Sequence[SamplingState],
               output_ids_lists: Sequence[Sequence[int]],
               prompt_ids_lists: Optional[Sequence[Sequence[int]]] = None,
               grammars: Optional[Sequence[Optional[object]]] = None,
               top_logprobs_nums: Optional[Sequence[int]] = None,
               eos_token_ids: Optional[Sequence[int]] = None) -> SampleOutput:
        """Sample next tokens. logits: float [B, V]; every list has one entry per row (request).

        Does not advance grammars: the caller calls grammar.accept_token(token) afterwards.
        """
        batch = logits.shape[0]
        if not (len(states) == len(output_ids_lists) == batch):
            raise ValueError(f"sample(): {batch} logit rows but {len(states)} states and "
                             f"{len(output_ids_lists)} output lists")
        eos = self.eos_token_ids if eos_token_ids is None else [int(t) for t in eos_token_ids]
        raw = logits.float()
        params = [s.params for s in states]

        x = raw.clone()
        self._apply_logit_bias(x, params)
        if grammars is not None and any(g is not None for g in grammars):
            from sglang.srt.constrained.xgrammar_backend import apply_masks

            apply_masks(x, grammars)
        apply_penalties(x, params, output_ids_lists, prompt_ids_lists)
        self._apply_min_new_tokens(x, params, output_ids_lists, eos)
        self._fix_empty_rows(x, raw)

        next_ids = self._choose(x, states, output_ids_lists)

        nums = list(top_logprobs_nums) if top_logprobs_nums is not None else [0] * batch
        chosen, tops = logprobs_of(raw, next_ids, max(nums) if nums else 0)
        top_lists: List[Optional[List[Tuple[float, int]]]] = []
        for i, k in enumerate(nums):
            top_lists.append(tops[i][:k] if (tops is not None and k > 0) else None)
        return SampleOutput(next_token_ids=next_ids, next_token_logprobs=chosen, top_logprobs=top_lists)

    # ------------------------------------------------------------------ logit processing steps
    @staticmethod
    def _apply_logit_bias(x: torch.Tensor, params: Sequence[SamplingParams]) -> None:
        rows, toks, vals = [], [], []
        vocab = x.shape[1]
        for i, p in enumerate(params):
            if p.logit_bias:
                for t, v in p.logit_bias.items():
                    t = int(t)
                    if 0 <= t < vocab:
                        rows.append(i)
                        toks.append(t)
                        vals.append(float(v))
        if rows:
            dev = x.device
            x.index_put_((torch.tensor(rows, device=dev), torch.tensor(toks, device=dev)),
                         torch.tensor(vals, dtype=x.dtype, device=dev), accumulate=True)

    @staticmethod
    def _apply_min_new_tokens(x: torch.Tensor, params: Sequence[SamplingParams],
                              output_ids_lists: Sequence[Sequence[int]], eos: Sequence[int]) -> None:
        rows, toks = [], []
        vocab = x.shape[1]
        for i, p in enumerate(params):
            if p.min_new_tokens > 0 and len(output_ids_lists[i]) < p.min_new_tokens:
                banned = set(eos) | set(p.stop_token_ids or ())
                for t in banned:
                    if 0 <= t < vocab:
                        rows.append(i)
                        toks.append(t)
        if not rows:
            return
        dev = x.device
        idx = (torch.tensor(rows, device=dev), torch.tensor(toks, device=dev))
        saved = x[idx].clone()
        x[idx] = float("-inf")
        # A grammar that allows only EOS wins over min_new_tokens: undo the ban on rows left empty.
        row_empty = ~(x > float("-inf")).any(dim=1)
        undo = row_empty[idx[0]]
        if bool(undo.any()):
            x[idx[0][undo], idx[1][undo]] = saved[undo]

    @staticmethod
    def _fix_empty_rows(x: torch.Tensor, raw: torch.Tensor) -> None:
        """A row with no allowed token (should not happen) falls back to its raw logits."""
        empty = ~(x > float("-inf")).any(dim=1)
        if bool(empty.any()):
            x[empty] = raw[empty]
        nan = torch.isnan(x).any(dim=1)
        if bool(nan.any()):
            x[nan] = raw[nan]

    # ------------------------------------------------------------------ choosing tokens
    def _choose(self, x: torch.Tensor, states: Sequence[SamplingState],
                output_ids_lists: Sequence[Sequence[int]]) -> List[int]:
        batch = x.shape[0]
        next_ids = [0] * batch
        greedy = [i for i, s in enumerate(states) if _is_greedy(s.params)]
        greedy_set = set(greedy)
        random_rows = [i for i in range(batch) if i not in greedy_set]
        if greedy:
            g = torch.tensor(greedy, device=x.device)
            for i, t in zip(greedy, x.index_select(0, g).argmax(dim=-1).tolist()):
                next_ids[i] = t
        if random_rows:
            r = torch.tensor(random_rows, device=x.device)
            ps = [states[i].params for i in random_rows]
            probs = filtered_probs(x.index_select(0, r), ps)
            u = [states[i].uniform(len(output_ids_lists[i])) for i in random_rows]
            for i, t in zip(random_rows, inverse_cdf_sample(probs, u)):
                next_ids[i] = t
        return next_ids


def _is_greedy(p: SamplingParams) -> bool:
    return p.is_greedy or p.top_k == 1 or p.temperature < GREEDY_EPS


def filtered_probs(x: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """softmax(x / T) with top_k, top_p and min_p applied in that order; rows sum to 1 (float32).

    top_p is taken over the distribution renormalized after top_k; min_p is relative to the top token.
    """
    dev = x.device
    temps = torch.tensor([p.temperature for p in params], dtype=x.dtype, device=dev).unsqueeze(1)
    probs = torch.softmax(x / temps, dim=-1)
    vocab = x.shape[1]
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_ps = [p.top_p for p in params]
    min_ps = [p.min_p for p in params]
    if all(k == vocab for k in ks) and all(tp >= 1.0 for tp in top_ps) and all(mp <= 0.0 for mp in min_ps):
        return probs
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    positions = torch.arange(vocab, device=dev).unsqueeze(0)
    keep = positions < torch.tensor(ks, device=dev).unsqueeze(1)
    kept = sorted_p * keep
    kept = kept / kept.sum(dim=-1, keepdim=True)
    # top_p: keep the smallest prefix whose mass reaches top_p (the first token is always kept)
    exclusive = torch.cumsum(kept, dim=-1) - kept
    keep &= exclusive < torch.tensor(top_ps, dtype=x.dtype, device=dev).unsqueeze(1)
    # min_p: tokens at least min_p times as likely as the most likely one
    keep &= sorted_p >= sorted_p[:, :1] * torch.tensor(min_ps, dtype=x.dtype, device=dev).unsqueeze(1)
    keep[:, 0] = True
    sorted_p = sorted_p * keep
    out = torch.zeros_like(probs).scatter_(1, order, sorted_p)
    return out / out.sum(dim=-1, keepdim=True)


def inverse_cdf_sample(probs: torch.Tensor, uniforms: Sequence[float]) -> List[int]:
    """Row i: first token id whose cumulative probability (vocab order, float64) exceeds u_i * total."""
    cdf = torch.cumsum(probs.double(), dim=-1)
    u = torch.tensor(list(uniforms), dtype=torch.float64, device=probs.device).unsqueeze(1)
    target = u * cdf[:, -1:]
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)
    idx = idx.clamp_(max=probs.shape[1] - 1)
    # guard against landing on a zero-probability token through rounding: step back to a positive one
    out = idx.tolist()
    bad = torch.nonzero(probs.gather(1, idx.unsqueeze(1)).squeeze(1) <= 0).flatten().tolist()
    for j in bad:
        nz = torch.nonzero(probs[j] > 0).flatten()
        before = nz[nz <= out[j]]
        out[j] = int(before[-1] if before.numel() else nz[0])
    return out
