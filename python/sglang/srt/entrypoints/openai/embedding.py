"""/v1/embeddings: OpenAI's embeddings API over SGLang's /encode path (last-token pooling of a generation model).

    EmbeddingRequest (texts or token ids, one or a batch) -> EmbeddingReqInput (io_struct.py)
    -> TokenizerManager.generate_request: each prompt prefilled with max_new_tokens 0, marked return_embedding
    -> Scheduler: the final hidden state (after the last norm) of the prompt's last token, L2-normalized
       (ModelRunner.forward_with_hidden), sent with the request's final delta
    -> EmbeddingResponse: data[i].embedding ([hidden_size] floats, or base64 of float32 bytes), usage in
       prompt tokens

This is what SGLang returns for a generation model served for embeddings (its Pooler: LAST, normalize=True).
Prompts sharing a prefix share it through the radix cache as for /generate.
"""

from __future__ import annotations

import base64
from typing import List, Optional, Union

import numpy as np

from sglang.srt.entrypoints.openai.protocol import EmbeddingObject, EmbeddingRequest, EmbeddingResponse, UsageInfo
from sglang.srt.managers.io_struct import EmbeddingReqInput


def encode_embedding(values: List[float], encoding_format: str) -> Union[List[float], str]:
    """The embedding as the client asked: the floats, or base64 of their float32 little-endian bytes."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode("ascii")
    return values


class EmbeddingServing:
    def __init__(self, tokenizer_manager, openai_serving):
        self.tm = tokenizer_manager
        self.openai = openai_serving  # runs the batch (_run) and names the model

    async def embed(self, req: EmbeddingRequest, raw_request: Optional[object] = None) -> dict:
        hidden_size = self.tm.model_config.hidden_size
        if req.dimensions is not None and req.dimensions != hidden_size:
            raise ValueError(f"dimensions {req.dimensions} is not supported: this model's embeddings have "
                             f"{hidden_size} dimensions")
        inp = req.input
        if isinstance(inp, str) or isinstance(inp[0], str):
            obj = EmbeddingReqInput(text=inp, rid=req.rid)
        else:
            obj = EmbeddingReqInput(input_ids=inp, rid=req.rid)
        outputs = await self.openai._run(obj, raw_request)
        data = [EmbeddingObject(embedding=encode_embedding(o["embedding"], req.encoding_format), index=i)
                for i, o in enumerate(outputs)]
        prompt_tokens = sum(o["meta_info"]["prompt_tokens"] for o in outputs)
        return EmbeddingResponse(data=data, model=self.openai.response_model(req.model),
                                 usage=UsageInfo(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens)).model_dump()
