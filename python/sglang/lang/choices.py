"""How `select` picks among choices from the server's token logprobs (pure logic, no I/O).

Every method receives, per choice, the logprob entries of the choice's tokens as the server reports them
(`[logprob, token_id, token_text]`, in prompt order, starting at the token-healing position), the
token-length-normalized prompt logprob, and (for the unconditional method) the logprobs of the same token
ids scored with no context. It returns the chosen string and the numbers it used (the select's meta info).

    token_length_normalized              argmax of the mean logprob over the choice's tokens
    greedy_token_selection               compare token by token, keep the choices with the highest logprob at
                                         each position; a choice shorter than the others is padded with its
                                         own mean logprob
    unconditional_likelihood_normalized  argmax of mean(logprob in context - logprob without context); the
                                         first unconditional entry has no logprob and counts as 0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence


@dataclass
class ChoicesDecision:
    """The chosen string and the numbers behind it (stored as the select's meta info)."""

    decision: str
    meta_info: Optional[Dict[str, Any]] = None


def _argmax(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _lp(entry) -> float:
    return entry[0] if entry[0] is not None else 0.0


class ChoicesSamplingMethod:
    """Base class: call with keyword arguments, get a ChoicesDecision."""

    requires_unconditional_logprobs = False

    def __call__(self, *, choices: List[str], normalized_prompt_logprobs: List[float],
                 input_token_logprobs: List[List[Any]], output_token_logprobs: List[List[Any]],
                 unconditional_token_logprobs: Optional[List[List[Any]]] = None) -> ChoicesDecision:
        raise NotImplementedError

    @staticmethod
    def _meta(normalized, inputs, outputs, **extra) -> Dict[str, Any]:
        return {"normalized_prompt_logprobs": normalized, "input_token_logprobs": inputs,
                "output_token_logprobs": outputs, **extra}


class TokenLengthNormalized(ChoicesSamplingMethod):
    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs,
                 unconditional_token_logprobs=None) -> ChoicesDecision:
        best = _argmax(normalized_prompt_logprobs)
        return ChoicesDecision(choices[best], self._meta(normalized_prompt_logprobs, input_token_logprobs,
                                                         output_token_logprobs))


class GreedyTokenSelection(ChoicesSamplingMethod):
    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs,
                 unconditional_token_logprobs=None) -> ChoicesDecision:
        matrix = self.logprob_matrix(input_token_logprobs)
        width = len(matrix[0]) if matrix else 0
        alive = list(range(len(choices)))
        for col in range(width):
            top = max(matrix[i][col] for i in alive)
            alive = [i for i in alive if matrix[i][col] == top]
            if len(alive) == 1:
                break
        return ChoicesDecision(choices[alive[0]], self._meta(normalized_prompt_logprobs, input_token_logprobs,
                                                             output_token_logprobs, greedy_logprob_matrix=matrix))

    @staticmethod
    def logprob_matrix(input_token_logprobs: List[List[Any]]) -> List[List[float]]:
        """One row per choice, as wide as the longest; short rows padded with their own mean."""
        width = max((len(r) for r in input_token_logprobs), default=0)
        rows = []
        for entries in input_token_logprobs:
            vals = [_lp(e) for e in entries]
            rows.append(vals + [_mean(vals)] * (width - len(vals)))
        return rows


class UnconditionalLikelihoodNormalized(ChoicesSamplingMethod):
    requires_unconditional_logprobs = True

    def __call__(self, *, choices, normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs,
                 unconditional_token_logprobs=None) -> ChoicesDecision:
        if unconditional_token_logprobs is None:
            raise ValueError("unconditional_likelihood_normalized needs the unconditional token logprobs")
        scores = []
        for cond, uncond in zip(input_token_logprobs, unconditional_token_logprobs):
            base = [_lp(e) for e in uncond]  # the first entry has no context at all: None -> 0
            scores.append(_mean([_lp(c) - u for c, u in zip(cond, base)]))
        best = _argmax(scores)
        return ChoicesDecision(choices[best], self._meta(
            normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs,
            unconditional_token_logprobs=unconditional_token_logprobs,
            normalized_unconditional_prompt_logprobs=scores))


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()


def normalized_prompt_logprob(entries: List[List[Any]]) -> float:
    """Mean of the entries that carry a logprob (the very first prompt token has none)."""
    vals = [e[0] for e in entries if e[0]]
    return _mean(vals)


def drop_unhealed_token(prefix_text: str, entries: List[List[Any]], normalized: float):
    """The logprobs of a choice start one token before the shared prefix ends, so that a choice merging with
    the prefix's last token (token healing) is scored on that token. When the prefix text still ends with
    that token's text, no merge happened: drop the entry and take it out of the mean.
    Returns (entries, normalized)."""
    if len(entries) < 2 or entries[0][2] is None or not prefix_text.endswith(entries[0][2]):
        return entries, normalized
    n = len(entries)
    return entries[1:], (normalized * n - _lp(entries[0])) / (n - 1)
