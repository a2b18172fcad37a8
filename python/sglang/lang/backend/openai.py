"""OpenAI backend: runs programs on any OpenAI-compatible endpoint with the `openai` package.

    chat models (default)   a gen right after `sgl.assistant_begin()` (or inside `with s.assistant():`)
                            sends the finished turns, s.messages(), to chat.completions
    completion models       a gen sends s.text() to completions (is_chat_model=False)
    select                  completion models: one completions call per choice with echo + logprobs and
                            max_tokens 0, scored as on the native backend (mean prompt logprob of the choice's
                            tokens); chat models cannot score a given text, so select is refused
    regex / json_schema     passed in extra_body (SGLang-compatible servers apply them; OpenAI's refuses)
"""

from __future__ import annotations

import os
from typing import Iterator, List, Optional, Tuple

from sglang.lang.backend.base_backend import BaseBackend
from sglang.lang.chat_template import FixedChatTemplate, get_chat_template
from sglang.lang.choices import ChoicesDecision, ChoicesSamplingMethod
from sglang.lang.ir import SglSamplingParams

# The text form of a chat program on this backend (the model sees messages, not this text).
_CHAT_TEXT = FixedChatTemplate("openai-chat", {r: (f"{r.upper()}: ", "\n") for r in ("system", "user",
                                                                                  "assistant")})
_COMPLETION_ONLY_MODELS = {"gpt-3.5-turbo-instruct", "davinci-002", "babbage-002"}


class OpenAI(BaseBackend):
    def __init__(self, model_name: str, is_chat_model: Optional[bool] = None, chat_template=None,
                 base_url: Optional[str] = None, api_key: Optional[str] = None, **client_kwargs):
        super().__init__()
        try:
            import openai
        except ImportError as e:
            raise ImportError("the OpenAI backend needs the openai package: pip install openai") from e
        # the key: the argument, else OPENAI_API_KEY (the SDK's own default), else a placeholder for servers
        # that need none
        key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.client = openai.OpenAI(base_url=base_url, api_key=key, **client_kwargs)
        self.model_name = model_name
        self.is_chat_model = (model_name not in _COMPLETION_ONLY_MODELS) if is_chat_model is None \
            else is_chat_model
        if isinstance(chat_template, str):
            chat_template = get_chat_template(chat_template)
        self.chat_template = chat_template or (_CHAT_TEXT if self.is_chat_model else get_chat_template("default"))

    def get_model_name(self) -> str:
        return self.model_name

    def _chat_messages(self, s) -> List[dict]:
        if s.cur_role != "assistant" or s.text_[s.cur_role_begin_pos:].strip():
            raise RuntimeError("on an OpenAI chat model, sgl.gen must come right after sgl.assistant_begin() "
                               "(or first inside `with s.assistant():`); use is_chat_model=False for a "
                               "completion model")
        return list(s.messages_)

    def _kwargs(self, params: SglSamplingParams) -> dict:
        if params.dtype is not None:
            from sglang.lang.backend.runtime_endpoint import dtype_regex

            dtype_regex(params)
        kw = params.to_openai_kwargs()
        kw["model"] = self.model_name
        return {k: v for k, v in kw.items() if v is not None}

    @staticmethod
    def _meta(resp, choice) -> dict:
        usage = getattr(resp, "usage", None)
        return {"id": resp.id, "finish_reason": getattr(choice, "finish_reason", None),
                "prompt_tokens": getattr(usage, "prompt_tokens", None),
                "completion_tokens": getattr(usage, "completion_tokens", None)}

    def generate(self, s, sampling_params: SglSamplingParams) -> Tuple[str, dict]:
        kw = self._kwargs(sampling_params)
        if self.is_chat_model:
            resp = self.client.chat.completions.create(messages=self._chat_messages(s), **kw)
            texts = [c.message.content or "" for c in resp.choices]
        else:
            resp = self.client.completions.create(prompt=s.text_, **kw)
            texts = [c.text for c in resp.choices]
        meta = self._meta(resp, resp.choices[0])
        return (texts if len(texts) > 1 else texts[0]), meta

    def generate_stream(self, s, sampling_params: SglSamplingParams) -> Iterator[Tuple[str, dict]]:
        kw = self._kwargs(sampling_params)
        kw["stream"] = True
        if self.is_chat_model:
            stream = self.client.chat.completions.create(messages=self._chat_messages(s), **kw)
        else:
            stream = self.client.completions.create(prompt=s.text_, **kw)
        for chunk in stream:
            if not chunk.choices:
                continue
            c = chunk.choices[0]
            piece = (c.delta.content if self.is_chat_model else c.text) or ""
            meta = {"id": chunk.id, "finish_reason": c.finish_reason}
            if piece or c.finish_reason:
                yield piece, meta

    def select(self, s, choices: List[str], temperature: float,
               choices_method: ChoicesSamplingMethod) -> ChoicesDecision:
        if self.is_chat_model:
            raise NotImplementedError("select needs prompt logprobs, which chat completions do not give; use "
                                      "sgl.gen(choices=...) on RuntimeEndpoint or an OpenAI completion model")
        prefix = s.text_
        scores, entries_all = [], []
        for c in choices:
            resp = self.client.completions.create(model=self.model_name, prompt=prefix + c, max_tokens=0,
                                                  echo=True, logprobs=0, temperature=0)
            lp = resp.choices[0].logprobs
            entries = [[v, None, t] for v, t, off in zip(lp.token_logprobs, lp.tokens, lp.text_offset)
                       if off >= len(prefix) and v is not None]
            entries_all.append(entries)
            scores.append(sum(e[0] for e in entries) / len(entries) if entries else float("-inf"))
        return choices_method(choices=choices, normalized_prompt_logprobs=scores,
                              input_token_logprobs=entries_all, output_token_logprobs=[[] for _ in choices])
