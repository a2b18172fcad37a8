"""/v1/score: the probability of each label token right after `query + item`, per item (SGLang's API).

    ScoringRequest -> per item: prompt ids (text: the tokenizer's encoding of query + item, BOS included as for
    /generate; ids: query + item) -> one /generate-style batch with, for every (item, label), the prompt
    followed by the label token, max_new_tokens 0, return_logprob from the label's position
    -> input_token_logprobs[0] = log p(label | prompt) -> exp (or a softmax over the labels) -> scores

The prompt is shared by an item's label requests, so the radix cache prefills it once.
"""

from __future__ import annotations

import math
from typing import List, Optional

from sglang.srt.entrypoints.openai.protocol import ScoringRequest, ScoringResponse, UsageInfo
from sglang.srt.managers.io_struct import GenerateReqInput


def label_probabilities(logprobs: List[float], apply_softmax: bool) -> List[float]:
    """exp of each logprob (vocabulary-wide probabilities), or their softmax (normalized over the labels)."""
    if not apply_softmax:
        return [math.exp(v) for v in logprobs]
    top = max(logprobs)
    exps = [math.exp(v - top) for v in logprobs]
    total = sum(exps)
    return [e / total for e in exps]


class ScoreServing:
    def __init__(self, tokenizer_manager, openai_serving):
        self.tm = tokenizer_manager
        self.openai = openai_serving  # runs the batch (_run) and names the model

    def _prompt_ids(self, req: ScoringRequest, item) -> List[int]:
        if isinstance(item, str):
            tok = self.tm.tokenizer
            if tok is None:
                raise ValueError("text scoring needs a tokenizer; send token ids (--skip-tokenizer-init)")
            return tok.encode(item + req.query if req.item_first else req.query + item)
        return list(item) + list(req.query) if req.item_first else list(req.query) + list(item)

    async def score(self, req: ScoringRequest, raw_request: Optional[object] = None) -> dict:
        vocab = self.tm.model_config.vocab_size
        bad = [t for t in req.label_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"label_token_ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        prompts = [self._prompt_ids(req, item) for item in req.item_list()]
        if any(not p for p in prompts):
            raise ValueError("query + item is empty")
        labels = req.label_token_ids
        obj = GenerateReqInput(
            input_ids=[p + [label] for p in prompts for label in labels],
            sampling_params={"max_new_tokens": 0},
            return_logprob=True,
            logprob_start_len=[len(p) for p in prompts for _ in labels],
        )
        outputs = await self.openai._run(obj, raw_request)
        scores = []
        for i in range(len(prompts)):
            lps = [outputs[i * len(labels) + j]["meta_info"]["input_token_logprobs"][0][0]
                   for j in range(len(labels))]
            scores.append(label_probabilities(lps, req.apply_softmax))
        prompt_tokens = sum(len(p) for p in prompts)
        return ScoringResponse(scores=scores, model=self.openai.response_model(req.model),
                               usage=UsageInfo(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens)).model_dump()
