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
         (truncated rows work on their top candidates from torch.topk, not a full-vocab sort)
      -> SampleOutput(next_token_ids, next_token_logprobs, top_logprobs)

Fast path (the scheduler passes return_logprob per row): rows that asked for no logprobs get none, and when
no row asked, no full-vocabulary logsumexp runs at all. The chosen ids of greedy and sampled rows are
written into one device tensor [B] and copied to the host once (`.tolist()`): the only host sync of a step,
except a top_p-only row whose nucleus is wider than TOP_P_PROBE candidates (then its vocabulary is sorted,
decided on the host) and the rare rows needing a fallback on CPU, where a check costs no transfer.

Reproducibility: the only randomness is one uniform number u per (request, output position), computed
from (seed, sample_index, position) by a fixed integer hash (`position_uniform`). The token is the first
vocab id whose cumulative processed probability (in vocab-id order, float64) exceeds u. Nothing depends
on the batch composition, on the row of the request, or on the TP degree (logits are identical on every
TP degree up to reduction order), so a seeded request gives the same tokens in any batch and after a
Gyges transformation. SamplingState is plain python data (picklable) and moves with the request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

from sglang.srt.sampling.penalties import PenaltyCounts, apply_penalties, uses_penalties
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
    # The prompt ids, kept only when the repetition penalty needs them and sample() gets no
    # prompt_ids_lists (a reference to the request's list, not a copy).
    prompt_ids: Optional[Sequence[int]] = None
    # Token counts of the penalties, folded in one new token at a time (created at the first sample()).
    penalty_counts: Optional[PenaltyCounts] = field(default=None, compare=False)

    @classmethod
    def create(cls, params: SamplingParams, prompt_ids: Optional[Sequence[int]] = None,
               default_seed: int = 0, sample_index: int = 0) -> "SamplingState":
        seed = params.sampling_seed if params.sampling_seed is not None else default_seed
        keep = prompt_ids if (prompt_ids is not None and params.repetition_penalty != 1.0) else None
        return cls(params=params, seed=int(seed), sample_index=int(sample_index),
                   prompt_len=len(prompt_ids) if prompt_ids is not None else 0, prompt_ids=keep)

    from_params = create  # alias

    def uniform(self, position: int) -> float:
        return position_uniform(self.seed, position, self.sample_index)


@dataclass
class SampleOutput:
    next_token_ids: List[int]
    # log_softmax(raw logits)[next token], one per request (None for a row that did not ask for logprobs)
    next_token_logprobs: List[Optional[float]]
    # per request: None (not asked) or [(logprob, token_id), ...] best first, from raw logits
    top_logprobs: List[Optional[List[Tuple[float, int]]]] = field(default_factory=list)


def logprobs_of(logits: torch.Tensor, token_ids: Sequence[int], top_num: int = 0
                ) -> Tuple[List[float], Optional[List[List[Tuple[float, int]]]]]:
    """log_softmax(logits)[row, token_ids[row]] and, if top_num > 0, each row's top_num alternatives.

    Also for prompt logprobs: pass the logits of the prompt positions and the next prompt tokens.
    """
    x = logits if logits.dtype == torch.float32 else logits.float()
    lse = torch.logsumexp(x, dim=-1, keepdim=True)  # no [N, V] log_softmax buffer
    ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=x.device)
    chosen = (x.gather(1, ids.unsqueeze(1)) - lse).squeeze(1).tolist()
    if top_num <= 0:
        return chosen, None
    vals, idx = x.topk(min(top_num, x.shape[1]), dim=-1)
    vals = vals - lse
    return chosen, [list(zip(v, i)) for v, i in zip(vals.tolist(), idx.tolist())]


class Sampler:
    """Samples one token per row of a logits batch; see the module docstring for the order of steps."""

    def __init__(self, vocab_size: Optional[int] = None, eos_token_ids: Iterable[int] = ()):
        self.vocab_size = vocab_size
        self.eos_token_ids = [int(t) for t in eos_token_ids]

    def sample(self, logits: torch.Tensor, states: Sequence[SamplingState],
               output_ids_lists: Optional[Sequence[Sequence[int]]] = None,
               prompt_ids_lists: Optional[Sequence[Sequence[int]]] = None,
               grammars: Optional[Sequence[Optional[object]]] = None,
               top_logprobs_nums: Optional[Sequence[int]] = None,
               eos_token_ids: Optional[Iterable[int]] = None,
               output_ids: Optional[Sequence[Sequence[int]]] = None,
               return_logprob: Optional[Sequence[bool]] = None) -> SampleOutput:
        """Sample next tokens. logits: float [B, V]; every list has one entry per row (request).

        return_logprob: per row, whether it needs next_token_logprobs (rows with top_logprobs_nums > 0 get
        them too); None: every row gets them. Rows not asking get None, and no work is spent on them.

        output_ids_lists (alias output_ids): tokens generated so far per request (the sampled token's
        position is its length). prompt_ids_lists: per request prompt ids for the repetition penalty;
        when None, SamplingState.prompt_ids is used. eos_token_ids overrides the constructor's.
        Does not advance grammars: the caller calls grammar.accept_token(token) afterwards.
        """
        if output_ids_lists is None:
            output_ids_lists = output_ids
        if output_ids_lists is None:
            raise ValueError("sample() needs output_ids_lists (the tokens generated so far per request)")
        if prompt_ids_lists is None:
            prompt_ids_lists = [s.prompt_ids if s.prompt_ids is not None else () for s in states]
        batch = logits.shape[0]
        if not (len(states) == len(output_ids_lists) == batch):
            raise ValueError(f"sample(): {batch} logit rows but {len(states)} states and "
                             f"{len(output_ids_lists)} output lists")
        eos = self.eos_token_ids if eos_token_ids is None else [int(t) for t in eos_token_ids]
        raw = logits if logits.dtype == torch.float32 else logits.float()
        params = [s.params for s in states]
        has_grammar = grammars is not None and any(g is not None for g in grammars)

        x = raw
        if has_grammar or any(_edits_logits(p) for p in params):
            x = raw.clone()
            self._apply_logit_bias(x, params)
            if has_grammar:
                from sglang.srt.constrained.xgrammar_backend import apply_masks

                apply_masks(x, grammars)
            for s in states:
                if s.penalty_counts is None and uses_penalties(s.params):
                    s.penalty_counts = PenaltyCounts()
            apply_penalties(x, params, output_ids_lists, prompt_ids_lists, [s.penalty_counts for s in states])
            self._apply_min_new_tokens(x, params, output_ids_lists, eos)
            self._fix_empty_rows(x, raw)

        next_ids_t = self._choose(x, states, output_ids_lists)  # int64 [B] on the logits' device
        next_ids = next_ids_t.tolist()  # the step's one host sync

        nums = [int(k) for k in top_logprobs_nums] if top_logprobs_nums is not None else [0] * batch
        if return_logprob is None:
            wanted = list(range(batch))
        else:
            wanted = [i for i in range(batch) if return_logprob[i] or nums[i] > 0]
        chosen: List[Optional[float]] = [None] * batch
        top_lists: List[Optional[List[Tuple[float, int]]]] = [None] * batch
        if wanted:  # fast path otherwise: no logsumexp over the vocabulary
            sub = raw if len(wanted) == batch else raw[torch.tensor(wanted, device=raw.device)]
            top_num = max(nums[i] for i in wanted)
            picked, tops = logprobs_of(sub, [next_ids[i] for i in wanted], top_num)
            for j, i in enumerate(wanted):
                chosen[i] = picked[j]
                if tops is not None and nums[i] > 0:
                    top_lists[i] = tops[j][:nums[i]]
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
        # A grammar that allows only EOS wins over min_new_tokens: undo the ban on rows left empty
        # (a masked write, no host sync).
        row_empty = ~(x > float("-inf")).any(dim=1)
        undo = row_empty[idx[0]]
        x[idx] = torch.where(undo, saved, x[idx])

    @staticmethod
    def _fix_empty_rows(x: torch.Tensor, raw: torch.Tensor) -> None:
        """A row with no allowed token or a NaN (should not happen) falls back to its raw logits."""
        bad = ~(x.amax(dim=1) > float("-inf"))  # amax propagates NaN; NaN > -inf is False
        if x.device.type == "cpu" and not bool(bad.any()):
            return  # on CPU a check is free and skips a pass over [B, V]
        torch.where(bad.unsqueeze(1), raw, x, out=x)

    # ------------------------------------------------------------------ choosing tokens
    def _choose(self, x: torch.Tensor, states: Sequence[SamplingState],
                output_ids_lists: Sequence[Sequence[int]]) -> torch.Tensor:
        """int64 [B] next token ids on x's device (no host sync)."""
        batch = x.shape[0]
        dev = x.device
        greedy = [i for i, s in enumerate(states) if _is_greedy(s.params)]
        if len(greedy) == batch:
            return x.argmax(dim=-1)
        greedy_set = set(greedy)
        random_rows = [i for i in range(batch) if i not in greedy_set]
        ps = [states[i].params for i in random_rows]
        u = [states[i].uniform(len(output_ids_lists[i])) for i in random_rows]
        if not greedy:
            return sample_from_logits_tensor(x, ps, u)
        next_ids = torch.empty(batch, dtype=torch.long, device=dev)
        g = torch.tensor(greedy, device=dev)
        next_ids[g] = x[g].argmax(dim=-1)
        r = torch.tensor(random_rows, device=dev)
        next_ids[r] = sample_from_logits_tensor(x[r], ps, u)
        return next_ids


def _edits_logits(p: SamplingParams) -> bool:
    return bool(p.logit_bias) or uses_penalties(p) or p.min_new_tokens > 0


def _is_greedy(p: SamplingParams) -> bool:
    return p.is_greedy or p.top_k == 1 or p.temperature < GREEDY_EPS


# Candidates examined first for a top_p-only row; rows whose top_p mass is not inside them are sorted.
TOP_P_PROBE = 1024


def sample_from_logits(x: torch.Tensor, params: Sequence[SamplingParams], uniforms: Sequence[float]) -> List[int]:
    """One token per row of processed logits x [R, V]: temperature, top_k, top_p, min_p, inverse CDF.

    Gives the same token as inverse_cdf_sample(filtered_probs(x, params), uniforms) (the dense
    reference) but works on the top candidates of truncated rows instead of sorting the vocabulary.
    """
    return sample_from_logits_tensor(x, params, uniforms).tolist()


def sample_from_logits_tensor(x: torch.Tensor, params: Sequence[SamplingParams],
                              uniforms: Sequence[float]) -> torch.Tensor:
    """sample_from_logits as an int64 [R] tensor on x's device (no host sync but TOP_P_PROBE overflow)."""
    dev = x.device
    vocab = x.shape[1]
    temps = [p.temperature for p in params]
    if all(t == 1.0 for t in temps):
        probs = torch.softmax(x, dim=-1)
    else:
        probs = torch.softmax(x / torch.tensor(temps, dtype=x.dtype, device=dev).unsqueeze(1), dim=-1)
    trunc = [i for i, p in enumerate(params) if 0 < p.top_k < vocab or p.top_p < 1.0]
    trunc_set = set(trunc)
    dense = [i for i in range(len(params)) if i not in trunc_set]
    dense_ids = trunc_ids = None
    if dense:
        sub = probs if len(dense) == len(params) else probs[torch.tensor(dense, device=dev)]
        min_ps = [params[i].min_p for i in dense]
        if any(m > 0.0 for m in min_ps):
            thr = sub.amax(dim=1, keepdim=True) * torch.tensor(min_ps, dtype=sub.dtype, device=dev).unsqueeze(1)
            sub = sub * (sub >= thr)
        dense_ids = inverse_cdf_sample_tensor(sub, [uniforms[i] for i in dense])
    if trunc:
        rows = probs if len(trunc) == len(params) else probs[torch.tensor(trunc, device=dev)]
        trunc_ids = _sample_truncated(rows, [params[i] for i in trunc], [uniforms[i] for i in trunc])
    if trunc_ids is None:
        return dense_ids
    if dense_ids is None:
        return trunc_ids
    out = torch.empty(len(params), dtype=torch.long, device=dev)  # [R]
    out[torch.tensor(dense, device=dev)] = dense_ids
    out[torch.tensor(trunc, device=dev)] = trunc_ids
    return out


def _sample_truncated(probs: torch.Tensor, params: Sequence[SamplingParams], uniforms: Sequence[float]) -> torch.Tensor:
    """int64 [R] tokens of rows with top_k / top_p from their best candidates (sorted rows on overflow)."""
    dev = probs.device
    vocab = probs.shape[1]
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    finite_ks = [k for k in ks if k < vocab]
    if len(finite_ks) == len(ks):  # every row has a top_k: its candidates are exactly enough
        width = max(finite_ks)
    else:  # some rows are top_p-only: probe the best TOP_P_PROBE tokens first
        width = min(vocab, max([TOP_P_PROBE] + finite_ks))
    vals, ids = probs.topk(width, dim=-1)  # sorted, best first
    kt = torch.tensor(ks, device=dev).unsqueeze(1)
    keep = torch.arange(width, device=dev).unsqueeze(0) < kt
    kept = vals * keep
    # renormalize over the top_k set (rows without top_k: over the whole vocabulary)
    denom = torch.where(kt < vocab, kept.sum(dim=1, keepdim=True), probs.sum(dim=1, keepdim=True))
    kept = kept / denom
    top_p = torch.tensor([p.top_p for p in params], dtype=probs.dtype, device=dev).unsqueeze(1)
    cum = torch.cumsum(kept, dim=1)
    keep &= (cum - kept) < top_p
    keep &= vals >= vals[:, :1] * torch.tensor([p.min_p for p in params], dtype=probs.dtype, device=dev).unsqueeze(1)
    keep[:, 0] = True
    # rows whose top_p prefix may extend past the probed candidates: sort their whole vocabulary
    overflow = ((kt >= vocab) & (cum[:, -1:] < top_p)).squeeze(1)
    weights = vals * keep
    ids_sorted, perm = ids.sort(dim=1)  # vocab-id order, like the dense inverse CDF
    w = weights.gather(1, perm)
    result = inverse_cdf_sample_tensor(w, uniforms, ids_sorted)
    if width < vocab and bool(overflow.any()):  # a host sync, only with top_p-only rows in the batch
        full = torch.nonzero(overflow).flatten()
        fl = full.tolist()
        dense = filtered_probs_from_probs(probs[full], [params[i] for i in fl])
        result[full] = inverse_cdf_sample_tensor(dense, [uniforms[i] for i in fl])
    return result


def filtered_probs(x: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Dense reference: softmax(x / T), then top_k, top_p (renormalized after top_k) and min_p.

    min_p is relative to the most likely token. Rows sum to 1.
    """
    temps = torch.tensor([p.temperature for p in params], dtype=x.dtype, device=x.device).unsqueeze(1)
    return filtered_probs_from_probs(torch.softmax(x / temps, dim=-1), params)


def filtered_probs_from_probs(probs: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    dev = probs.device
    vocab = probs.shape[1]
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    keep = torch.arange(vocab, device=dev).unsqueeze(0) < torch.tensor(ks, device=dev).unsqueeze(1)
    kept = sorted_p * keep
    kept = kept / kept.sum(dim=-1, keepdim=True)
    # top_p: keep the smallest prefix whose mass reaches top_p (the first token is always kept)
    exclusive = torch.cumsum(kept, dim=-1) - kept
    keep &= exclusive < torch.tensor([p.top_p for p in params], dtype=probs.dtype, device=dev).unsqueeze(1)
    # min_p: tokens at least min_p times as likely as the most likely one
    min_ps = torch.tensor([p.min_p for p in params], dtype=probs.dtype, device=dev).unsqueeze(1)
    keep &= sorted_p >= sorted_p[:, :1] * min_ps
    keep[:, 0] = True
    out = torch.zeros_like(probs).scatter_(1, order, sorted_p * keep)
    return out / out.sum(dim=-1, keepdim=True)


def inverse_cdf_sample(weights: torch.Tensor, uniforms: Sequence[float],
                       token_ids: Optional[torch.Tensor] = None) -> List[int]:
    """Row i: first column whose cumulative weight (float64) exceeds u_i * row total.

    Columns are vocab ids in increasing order (token_ids [R, C] maps columns to ids when given).
    """
    return inverse_cdf_sample_tensor(weights, uniforms, token_ids).tolist()


def inverse_cdf_sample_tensor(weights: torch.Tensor, uniforms: Sequence[float],
                              token_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """inverse_cdf_sample as an int64 [R] tensor on the weights' device (no host sync off CPU)."""
    cdf = torch.cumsum(weights.double(), dim=-1)  # [R, C]
    u = torch.tensor(list(uniforms), dtype=torch.float64, device=weights.device).unsqueeze(1)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=weights.shape[1] - 1)  # [R, 1]
    # guard against landing on a zero-weight column through rounding (u * total rounding up to the total):
    # step back to the last positive column at or before it, else the first positive one
    bad = weights.gather(1, idx) <= 0  # [R, 1]
    if weights.device.type != "cpu" or bool(bad.any()):  # on CPU the check is free and saves a pass
        positive = weights > 0
        cols = torch.arange(weights.shape[1], device=weights.device).unsqueeze(0)  # [1, C]
        before = torch.where(positive & (cols <= idx), cols, -1).amax(dim=1, keepdim=True)
        first = positive.to(torch.int8).argmax(dim=1, keepdim=True)
        idx = torch.where(bad, torch.where(before >= 0, before, first), idx)
    if token_ids is not None:
        idx = token_ids.gather(1, idx)
    return idx.squeeze(1)
