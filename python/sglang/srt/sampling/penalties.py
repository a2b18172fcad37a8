"""Token penalties applied to a batch of logits, vectorized over the rows that use them.

Data flow (inside Sampler.sample, after logit_bias and grammar masks):

    per-row python token lists (prompt ids, output ids so far)
      -> flat (row, token) index tensors                  one torch.tensor() per batch, no vocab loop
                                                          (sparse gather/scatter: O(tokens), not O(vocab))
      -> repetition penalty  on prompt+output tokens      HF's rule: logit<0 ? logit*p : logit/p
      -> frequency/presence  on output tokens             logit -= freq*count + presence*(count>0)

Rows whose parameters disable a penalty are not touched (and cost nothing).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch


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


def apply_repetition_penalty(logits: torch.Tensor, rows: Sequence[int], penalties: Sequence[float],
                             token_lists: Sequence[Sequence[int]]) -> None:
    """In place on logits[rows]: HF RepetitionPenaltyLogitsProcessor over each row's token set.

    Sparse: gathers and scatters only the listed (row, token) entries. A token listed twice is written
    twice with the same value (computed from the unpenalized logit), so it is penalized once, like HF.
    """
    if not rows:
        return
    device = logits.device
    r_idx, t_idx = _flat_indices(rows, token_lists, device)
    if not t_idx.numel():
        return
    pen_of_row = torch.ones(logits.shape[0], dtype=logits.dtype, device=device)
    pen_of_row[torch.tensor(list(rows), dtype=torch.long, device=device)] = torch.tensor(
        list(penalties), dtype=logits.dtype, device=device)
    pen = pen_of_row[r_idx]
    vals = logits[r_idx, t_idx]
    logits[r_idx, t_idx] = torch.where(vals < 0, vals * pen, vals / pen)


def apply_frequency_presence_penalty(logits: torch.Tensor, rows: Sequence[int], frequency: Sequence[float],
                                     presence: Sequence[float], output_lists: Sequence[Sequence[int]]) -> None:
    """In place on logits[rows]: subtract freq*count(token) + presence*[count(token) > 0]."""
    if not rows:
        return
    device = logits.device
    r_idx, t_idx = _flat_indices(rows, output_lists, device)
    if not t_idx.numel():
        return
    row_t = torch.tensor(list(rows), dtype=torch.long, device=device)
    freq_of_row = torch.zeros(logits.shape[0], dtype=logits.dtype, device=device)
    pres_of_row = torch.zeros(logits.shape[0], dtype=logits.dtype, device=device)
    freq_of_row[row_t] = torch.tensor(list(frequency), dtype=logits.dtype, device=device)
    pres_of_row[row_t] = torch.tensor(list(presence), dtype=logits.dtype, device=device)
    vocab = logits.shape[1]
    keys = torch.unique(r_idx * vocab + t_idx)  # each (row, token) seen at least once
    u_rows, u_toks = keys // vocab, keys % vocab
    # count(token) occurrences of -freq, accumulated; then -presence once per distinct token
    logits.index_put_((r_idx, t_idx), -freq_of_row[r_idx], accumulate=True)
    logits.index_put_((u_rows, u_toks), -pres_of_row[u_rows], accumulate=True)


def apply_penalties(logits: torch.Tensor, params_list: Sequence, output_ids_lists: Sequence[Sequence[int]],
                    prompt_ids_lists: Optional[Sequence[Sequence[int]]] = None) -> None:
    """Apply each row's repetition / frequency / presence penalties in place (rows = requests)."""
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
