"""/v1/responses: OpenAI's Responses API over the chat path (text in, one assistant message out).

    ResponsesRequest -> messages (instructions as a system turn + input items) -> ChatCompletionRequest
    -> OpenAIServing.chat_completions (same template, sampling and errors as /v1/chat/completions)
    -> a "response" object: output = [one "message" item with one "output_text" part], usage in
       input/output tokens

Streaming, stored responses (previous_response_id) and tools are refused with a 400.
"""

from __future__ import annotations

import time
from typing import Optional

import orjson

from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest, ResponsesRequest, random_id


class ResponsesServing:
    def __init__(self, openai_serving):
        self.openai = openai_serving

    async def create(self, req: ResponsesRequest, raw_request: Optional[object] = None) -> dict:
        if req.stream:
            raise ValueError("stream=true is not supported on /v1/responses by this server; use "
                             "/v1/chat/completions for streaming")
        chat = ChatCompletionRequest(model=req.model, messages=req.messages(), max_tokens=req.max_output_tokens,
                                     temperature=req.temperature, top_p=req.top_p)
        resp = await self.openai.chat_completions(chat, raw_request)
        body = orjson.loads(resp.body)
        choice = body["choices"][0]
        usage = body.get("usage") or {}
        status = "incomplete" if choice.get("finish_reason") == "length" else "completed"
        text = choice["message"].get("content") or ""
        return {
            "id": random_id("resp"),
            "object": "response",
            "created_at": int(time.time()),
            "model": body["model"],
            "status": status,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "output": [{"type": "message", "id": random_id("msg"), "role": "assistant", "status": status,
                        "content": [{"type": "output_text", "text": text, "annotations": []}]}],
            "usage": {"input_tokens": usage.get("prompt_tokens", 0),
                      "output_tokens": usage.get("completion_tokens", 0),
                      "total_tokens": usage.get("total_tokens", 0),
                      "input_tokens_details": {"cached_tokens": (usage.get("prompt_tokens_details") or {}).get(
                          "cached_tokens", 0)}},
            "metadata": req.metadata or {},
            "error": None,
        }
