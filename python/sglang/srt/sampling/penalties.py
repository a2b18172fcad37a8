"""Token penalties applied to a batch of logits, vectorized over the rows that use them.

Data flow (inside Sampler.sample, after logit_bias and grammar masks):

    per-request PenaltyCounts (in its SamplingState)     updated with each NEW output token only:
                                                          distinct output ids + counts, distinct
                                                          prompt+output ids (prompt folded in once)
      -> flat (row, token) index tensors                  one torch.tensor() per batch, no vocab loop
                                                          (sparse gather/scatter: O(distinct tokens))
      -> repetition penalty  on prompt+output tokens      HF's rule: logit<0 ? logit*p : logit/p
      -> frequency/presence  on output tokens             logit -= freq*count + presence*(count>0)

Without counts (apply_penalties(..., counts=None)) the counts are recomputed from the full token lists
each call: the reference the incremental path is tested against (same float operations, equal results).
Rows whose parameters disable a penalty are not touched (and cost nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch


def _grown(buf: torch.Tensor, need: int) -> torch.Tensor:
    """buf, or a copy with room for `need` entries (capacity doubles: O(1) amortized per append)."""
    if need <= buf.shape[0]:
        return buf
    out = torch.zeros(max(need, 2 * buf.shape[0], 16), dtype=buf.dtype)
    out[: buf.shape[0]] = buf
    return out


@dataclass
class PenaltyCounts:
    """One request's token counts for its penalties, folded in token by token (plain data: pickles).

    Kept as CPU tensors that grow by appending, so a step costs O(new tokens) python work and the batch's
    index tensors are one torch.cat of these (no python list of every token per step).
    The output list it follows only grows by appending (the scheduler's req.output_ids); if it is seen
    shorter or with another last token, the counts are rebuilt from scratch.
    """

    folded: int = 0  # output tokens folded in so far
    last_token: int = -1  # output_ids[folded - 1], to notice a list that is not the one followed
    prompt_folded: bool = False
    out_index: Dict[int, int] = field(default_factory=dict)  # token id -> j (distinct output ids)
    num_out: int = 0
    out_ids: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # [cap] ids j
    out_counts: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # [cap]
    rep_seen: set = field(default_factory=set)  # distinct prompt + output ids (repetition penalty)
    num_rep: int = 0
    rep_ids: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # [cap]

    def output_counts(self) -> Dict[int, int]:
        """{token id: occurrences in the output} (for tests and debugging)."""
        return {t: int(self.out_counts[j]) for t, j in self.out_index.items()}

    def update(self, prompt: Sequence[int], output: Sequence[int], repetition: bool) -> None:
        n = len(output)
        if n < self.folded or (self.folded and output[self.folded - 1] != self.last_token):
            self.__init__()  # not the list followed so far: start again
        if repetition and not self.prompt_folded:
            self._add_rep(prompt)
            self.prompt_folded = True
        if n == self.folded:
            return
        new = output[self.folded:]
        index = self.out_index
        fresh = [t for t in dict.fromkeys(new) if t not in index]
        if fresh:
            k = self.num_out
            self.out_ids = _grown(self.out_ids, k + len(fresh))
            self.out_counts = _grown(self.out_counts, k + len(fresh))
            self.out_ids[k:k + len(fresh)] = torch.tensor(fresh, dtype=torch.long)
            for j, t in enumerate(fresh):
                index[t] = k + j
            self.num_out = k + len(fresh)
        if len(new) == 1:
            self.out_counts[index[new[0]]] += 1
        else:
            self.out_counts.index_add_(0, torch.tensor([index[t] for t in new], dtype=torch.long),
                                       torch.ones(len(new), dtype=torch.long))
        if repetition:
            self._add_rep(new)
        self.folded = n
        self.last_token = output[n - 1]

    def _add_rep(self, tokens: Sequence[int]) -> None:
        seen = self.rep_seen
        fresh = [t for t in dict.fromkeys(tokens) if t not in seen]
        if not fresh:
            return
        seen.update(fresh)
        k = self.num_rep
        self.rep_ids = _grown(self.rep_ids, k + len(fresh))
        self.rep_ids[k:k + len(fresh)] = torch.tensor(fresh, dtype=torch.long)
        self.num_rep = k + len(fresh)


def _flat_indices(rows: Sequence[int], token_lists: Sequence[Sequence[int]], device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(row, token_id) int64 tensors for every token of token_lists[j], row = rows[j]."""
    lengths = [len(t) for t in token_lists]
    flat: List[int] = []
    for toks in token_lists:
        flat.extend(toks)
    row_idx = torch.repeat_interleave(torch.tensor(list(rows), dtype=torch.long),
                                      torch.tensor(lengths, dtype=torch.long))
    tok_idx = torch.tensor(flat, dtype=torch.long)
    return row_idx.to(device), tok_idx.to(device)


def _flat_tensor_indices(rows: Sequence[int], token_tensors: Sequence[torch.Tensor], device
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """_flat_indices for per-row int64 tensors (one cat, no python list of tokens)."""
    lengths = torch.tensor([t.shape[0] for t in token_tensors], dtype=torch.long)
    row_idx = torch.repeat_interleave(torch.tensor(list(rows), dtype=torch.long), lengths)
    return row_idx.to(device), torch.cat(list(token_tensors)).to(device)


def apply_repetition_penalty(logits: torch.Tensor, rows: Sequence[int], penalties: Sequence[float],
                             token_lists: Sequence[Sequence[int]]) -> None:
    """In place on logits[rows]: HF RepetitionPenaltyLogitsProcessor over each row's token set.

    Sparse: gathers and scatters only the listed (row, token) entries. A token listed twice is written
    twice with the same value (computed from the unpenalized logit), so it is penalized once, like HF.
    """
    if not rows:
        return
    device = logits.device
    if isinstance(token_lists[0], torch.Tensor):
        r_idx, t_idx = _flat_tensor_indices(rows, token_lists, device)
    else:
        r_idx, t_idx = _flat_indices(rows, token_lists, device)
    if not t_idx.numel():
        return
    pen_of_row = torch.ones(logits.shape[0], dtype=logits.dtype, device=device)
    pen_of_row[torch.tensor(list(rows), dtype=torch.long, device=device)] = torch.tensor(
        list(penalties), dtype=logits.dtype, device=device)
    pen = pen_of_row[r_idx]
    vals = logits[r_idx, t_idx]
    logits[r_idx, t_idx] = torch.where(vals < 0, vals * pen, vals / pen)


def uses_penalties(p) -> bool:
    """Whether SamplingParams p asks for any of the penalties."""
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _per_row(logits: torch.Tensor, rows: Sequence[int], values: Sequence[float]) -> torch.Tensor:
    """[batch] tensor: values[j] at rows[j], 0 elsewhere."""
    out = torch.zeros(logits.shape[0], dtype=logits.dtype, device=logits.device)
    out[torch.tensor(list(rows), dtype=torch.long, device=logits.device)] = torch.tensor(
        list(values), dtype=logits.dtype, device=logits.device)
    return out


def apply_frequency_presence_penalty(logits: torch.Tensor, rows: Sequence[int], frequency: Sequence[float],
                                     presence: Sequence[float], output_lists: Sequence[Sequence[int]]) -> None:
    """In place on logits[rows]: subtract freq*count(token) + presence*[count(token) > 0] (recomputed)."""
    if not rows:
        return
    r_idx, t_idx = _flat_indices(rows, output_lists, logits.device)
    if not t_idx.numel():
        return
    vocab = logits.shape[1]
    keys, counts = torch.unique(r_idx * vocab + t_idx, return_counts=True)  # each distinct (row, token)
    _subtract_counts(logits, keys // vocab, keys % vocab, counts, _per_row(logits, rows, frequency),
                     _per_row(logits, rows, presence))


def _subtract_counts(logits, r_idx, t_idx, counts, freq_of_row, pres_of_row) -> None:
    """logits[r, t] -= freq[r] * count + presence[r] for distinct (r, t) pairs (one float expression)."""
    logits[r_idx, t_idx] -= freq_of_row[r_idx] * counts.to(logits.dtype) + pres_of_row[r_idx]


def apply_penalties(logits: torch.Tensor, params_list: Sequence, output_ids_lists: Sequence[Sequence[int]],
                    prompt_ids_lists: Optional[Sequence[Sequence[int]]] = None,
                    counts: Optional[Sequence[Optional[PenaltyCounts]]] = None) -> None:
    """Apply each row's repetition / frequency / presence penalties in place (rows = requests).

    counts: per row, the request's PenaltyCounts (updated here with its new output tokens), or None for
    every row: recompute from the token lists.
    """
    if counts is None:
        _apply_recomputed(logits, params_list, output_ids_lists, prompt_ids_lists)
        return
    rep_rows, rep_vals, rep_tokens = [], [], []
    fp_rows, fp_freq, fp_pres, fp_ids, fp_counts = [], [], [], [], []
    for i, p in enumerate(params_list):
        rep = p.repetition_penalty != 1.0
        fp = p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
        if not (rep or fp):
            continue
        c = counts[i]
        c.update(prompt_ids_lists[i] if prompt_ids_lists is not None else (), output_ids_lists[i], rep)
        if rep and c.num_rep:
            rep_rows.append(i)
            rep_vals.append(p.repetition_penalty)
            rep_tokens.append(c.rep_ids[:c.num_rep])
        if fp and c.num_out:
            fp_rows.append(i)
            fp_freq.append(p.frequency_penalty)
            fp_pres.append(p.presence_penalty)
            fp_ids.append(c.out_ids[:c.num_out])
            fp_counts.append(c.out_counts[:c.num_out])
    apply_repetition_penalty(logits, rep_rows, rep_vals, rep_tokens)
    if fp_rows:
        r_idx, t_idx = _flat_tensor_indices(fp_rows, fp_ids, logits.device)
        _subtract_counts(logits, r_idx, t_idx, torch.cat(fp_counts).to(logits.device),
                         _per_row(logits, fp_rows, fp_freq), _per_row(logits, fp_rows, fp_pres))


def _apply_recomputed(logits: torch.Tensor, params_list: Sequence, output_ids_lists: Sequence[Sequence[int]],
                      prompt_ids_lists: Optional[Sequence[Sequence[int]]]) -> None:
    rep_rows, rep_vals, rep_tokens = [], [], []
    fp_rows, fp_freq, fp_pres, fp_tokens = [], [], [], []
    for i, p in enumerate(params_list):
        out = output_ids_lists[i]
        if p.repetition_penalty != 1.0:
            prompt = prompt_ids_lists[i] if prompt_ids_lists is not None else []
            rep_rows.append(i)
            rep_vals.append(p.repetition_penalty)
            rep_tokens.append(list(prompt) + list(out))
        if (p.frequency_penalty != 0.0 or p.presence_penalty != 0.0) and len(out):
            fp_rows.append(i)
            fp_freq.append(p.frequency_penalty)
            fp_pres.append(p.presence_penalty)
            fp_tokens.append(out)
    apply_repetition_penalty(logits, rep_rows, rep_vals, rep_tokens)
    apply_frequency_presence_penalty(logits, fp_rows, fp_freq, fp_pres, fp_tokens)
