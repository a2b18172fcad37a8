"""Pydantic models of the OpenAI-compatible API (requests as clients send them, responses as we answer).

Data flow:
    HTTP JSON body --pydantic validation--> CompletionRequest / ChatCompletionRequest
        --serving.py maps to--> GenerateReqInput --TokenizerManager--> SGLang outputs
        --serving.py formats--> CompletionResponse / ChatCompletionResponse / *StreamResponse chunks

Field names follow the OpenAI API; SGLang's extra sampling fields (top_k, min_p, regex, json_schema, ebnf,
ignore_eos, ...) are accepted in the body the way SGLang accepts them ("extra_body" in the openai client).
Unknown fields are ignored (OpenAI clients send fields we have no use for), but every field we do use is
type-checked and range-checked, and a violation is a 400 with a message naming the field.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


# ----------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------
class ErrorResponse(_Model):
    """The body of every 4xx/5xx of this server: {"error": {"message", "type", "param", "code"}}."""

    class Detail(_Model):
        message: str
        type: str
        param: Optional[str] = None
        code: int

    error: Detail


class StreamOptions(_Model):
    include_usage: Optional[bool] = False
    continuous_usage_stats: Optional[bool] = False


class PromptTokensDetails(_Model):
    cached_tokens: int = 0


class UsageInfo(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: Optional[PromptTokensDetails] = None


class ModelCard(_Model):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "sglang"
    root: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(_Model):
    object: str = "list"
    data: List[ModelCard] = Field(default_factory=list)


class JsonSchemaResponseFormat(_Model):
    name: Optional[str] = None
    description: Optional[str] = None
    # "schema" shadows a BaseModel attribute in pydantic, hence the alias.
    schema_: Optional[Dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = False

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaResponseFormat] = None


class _SamplingFields(_Model):
    """Sampling fields common to completions and chat completions (OpenAI + SGLang extras)."""

    model: Optional[str] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: int = 1
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[Dict[str, float]] = None
    user: Optional[str] = None
    # ---- SGLang extras ----
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    min_tokens: Optional[int] = None
    repetition_penalty: Optional[float] = None
    stop_token_ids: Optional[List[int]] = None
    ignore_eos: Optional[bool] = None
    skip_special_tokens: Optional[bool] = None
    no_stop_trim: Optional[bool] = None
    regex: Optional[str] = None
    json_schema: Optional[str] = None
    ebnf: Optional[str] = None
    rid: Optional[str] = None
    # ---- SGLang / OpenAI features this server does not have: a 400 naming the field unless null / false ----
    lora_path: Optional[Any] = None
    custom_logit_processor: Optional[Any] = None
    custom_params: Optional[Dict[str, Any]] = None
    return_hidden_states: Optional[bool] = None

    @model_validator(mode="after")
    def _unsupported(self):
        for name in ("lora_path", "custom_logit_processor"):
            if getattr(self, name) is not None:
                raise ValueError(f"{name} is not supported by this server; leave it out or null")
        if self.custom_params:
            raise ValueError("custom_params is only read by a custom_logit_processor, which this server does "
                             "not support; leave it out or null")
        if self.return_hidden_states:
            raise ValueError("return_hidden_states is not supported by this server; leave it out or false")
        if self.rid == "":
            raise ValueError("rid must be a non-empty string")
        return self

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v):
        if v is not None and v < 0:
            raise ValueError(f"temperature must be >= 0, got {v}")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v):
        if v is not None and not 0 < v <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {v}")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v):
        if v < 1:
            raise ValueError(f"n must be >= 1, got {v}")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list) and any(s == "" for s in v) or v == "":
            raise ValueError("stop strings must be non-empty")
        return v


# ----------------------------------------------------------------------------------------------------------
# /v1/completions
# ----------------------------------------------------------------------------------------------------------
class CompletionRequest(_SamplingFields):
    prompt: Union[str, List[str], List[int], List[List[int]]]
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = None
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, v):
        if v is not None and v < 0:
            raise ValueError(f"max_tokens must be >= 0, got {v}")
        return v

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v):
        if v is not None and not 0 <= v <= 20:
            raise ValueError(f"logprobs must be between 0 and 20, got {v}")
        return v

    @model_validator(mode="after")
    def _checks(self):
        p = self.prompt
        if p == "" or p == [] or (isinstance(p, list) and any(x == "" or x == [] for x in p)):
            raise ValueError("prompt must not be empty")
        if self.best_of is not None and self.best_of != self.n and self.best_of != 1:
            raise ValueError("best_of is not supported (only best_of == n or 1)")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self


class CompletionLogprobs(_Model):
    text_offset: List[int] = Field(default_factory=list)
    token_logprobs: List[Optional[float]] = Field(default_factory=list)
    tokens: List[str] = Field(default_factory=list)
    top_logprobs: List[Optional[Dict[str, float]]] = Field(default_factory=list)


class CompletionChoice(_Model):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None
    matched_stop: Union[None, int, str] = None


class CompletionResponse(_Model):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: List[CompletionChoice]
    usage: Optional[UsageInfo] = None


class CompletionStreamChoice(_Model):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None
    matched_stop: Union[None, int, str] = None


class CompletionStreamResponse(_Model):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: List[CompletionStreamChoice]
    usage: Optional[UsageInfo] = None


# ----------------------------------------------------------------------------------------------------------
# /v1/chat/completions
# ----------------------------------------------------------------------------------------------------------
class ChatMessage(_Model):
    role: Literal["system", "user", "assistant", "tool", "developer", "function"]
    # A string, or a list of content parts ({"type": "text", "text": ...}); null for tool-call turns.
    content: Optional[Union[str, List[Dict[str, Any]]]] = None
    name: Optional[str] = None
    tool_calls: Optional[List[Dict[str, Any]]] = None
    tool_call_id: Optional[str] = None

    @field_validator("content")
    @classmethod
    def _content(cls, v):
        if isinstance(v, list):
            for part in v:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part["text"] for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: List[ChatMessage]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    response_format: Optional[ResponseFormat] = None
    tools: Optional[List[Dict[str, Any]]] = None
    tool_choice: Optional[Any] = None
    # SGLang extras for chat: pass the rendered prompt through the template with these kwargs.
    chat_template_kwargs: Optional[Dict[str, Any]] = None
    continue_final_message: bool = False
    # Output modalities ("text" only here) and audio output parameters (not supported: 400 unless null).
    modalities: Optional[List[str]] = None
    audio: Optional[Dict[str, Any]] = None

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, v):
        other = sorted({m for m in v or [] if m != "text"})
        if other:
            raise ValueError(f"modalities {other} are not supported by this server (text only)")
        return v

    @field_validator("audio")
    @classmethod
    def _audio(cls, v):
        if v is not None:
            raise ValueError("audio output is not supported by this server; leave it out or null")
        return v

    @field_validator("max_tokens", "max_completion_tokens")
    @classmethod
    def _max_tokens(cls, v, info):
        if v is not None and v < 0:
            raise ValueError(f"{info.field_name} must be >= 0, got {v}")
        return v

    @model_validator(mode="after")
    def _checks(self):
        if not self.messages:
            raise ValueError("messages must not be empty")
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= 20:
                raise ValueError(f"top_logprobs must be between 0 and 20, got {self.top_logprobs}")
            if self.top_logprobs > 0 and not self.logprobs:
                raise ValueError("top_logprobs requires logprobs=true")
        if self.response_format is not None and self.response_format.type == "json_schema":
            if self.response_format.json_schema is None or self.response_format.json_schema.schema_ is None:
                raise ValueError("response_format of type json_schema needs json_schema.schema")
        return self


class TopLogprob(_Model):
    token: str
    logprob: float
    bytes: Optional[List[int]] = None


class ChatCompletionTokenLogprob(_Model):
    token: str
    logprob: float
    bytes: Optional[List[int]] = None
    top_logprobs: List[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(_Model):
    content: List[ChatCompletionTokenLogprob] = Field(default_factory=list)


class ChatResponseMessage(_Model):
    role: str = "assistant"
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: Optional[List[Dict[str, Any]]] = None


class ChatCompletionChoice(_Model):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[str] = None
    matched_stop: Union[None, int, str] = None


class ChatCompletionResponse(_Model):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: str = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: List[ChatCompletionChoice]
    usage: Optional[UsageInfo] = None


class DeltaMessage(_Model):
    role: Optional[str] = None
    content: Optional[str] = None
    # Always present (null here: no reasoning or tool-call parser runs), as SGLang sends them.
    reasoning_content: Optional[str] = None
    tool_calls: Optional[List[Dict[str, Any]]] = None


class ChatCompletionStreamChoice(_Model):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[str] = None
    matched_stop: Union[None, int, str] = None


class ChatCompletionStreamResponse(_Model):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: List[ChatCompletionStreamChoice]
    usage: Optional[UsageInfo] = None


# ----------------------------------------------------------------------------------------------------------
# /v1/score (SGLang's scoring API)
# ----------------------------------------------------------------------------------------------------------
class ScoringRequest(_Model):
    """Probability of each label token right after query + item (item + query with item_first)."""

    query: Union[str, List[int]]
    items: Union[str, List[str], List[List[int]]]
    label_token_ids: List[int]
    apply_softmax: bool = False  # normalize over the label tokens instead of the whole vocabulary
    item_first: bool = False
    model: Optional[str] = None

    @model_validator(mode="after")
    def _checks(self):
        if not self.label_token_ids:
            raise ValueError("label_token_ids must not be empty")
        items = [self.items] if isinstance(self.items, str) else self.items
        if not items:
            raise ValueError("items must not be empty")
        text_query = isinstance(self.query, str)
        if any(isinstance(i, str) != text_query for i in items):
            raise ValueError("query and items must both be text or both be token ids")
        return self

    def item_list(self) -> List[Union[str, List[int]]]:
        return [self.items] if isinstance(self.items, str) else list(self.items)


class ScoringResponse(_Model):
    scores: List[List[float]]  # [item][label], in label_token_ids order
    model: str
    usage: Optional[UsageInfo] = None
    object: str = "scoring"


# ----------------------------------------------------------------------------------------------------------
# /v1/embeddings (OpenAI's embeddings API as SGLang serves it for generation models: last-token pooling)
# ----------------------------------------------------------------------------------------------------------
class EmbeddingRequest(_Model):
    # One text, a batch of texts, one prompt's token ids or a batch of them (no multimodal inputs).
    input: Union[str, List[str], List[int], List[List[int]]]
    model: Optional[str] = None
    # "float": lists of numbers; "base64": the float32 little-endian bytes, base64-encoded (the openai client's
    # default when it is not given).
    encoding_format: Literal["float", "base64"] = "float"
    # Only the model's hidden size (embeddings are not truncated).
    dimensions: Optional[int] = None
    user: Optional[str] = None
    rid: Optional[Union[str, List[str]]] = None

    @model_validator(mode="after")
    def _checks(self):
        items = [self.input] if isinstance(self.input, str) else self.input
        if not items:
            raise ValueError("input must not be empty")
        if any(isinstance(i, str) and not i.strip() for i in items):
            raise ValueError("input must not hold empty or whitespace-only texts")
        if any(isinstance(i, list) and not i for i in items):
            raise ValueError("input must not hold empty token id lists")
        return self


class EmbeddingObject(_Model):
    embedding: Union[List[float], str]  # [hidden_size] floats, or their base64 (encoding_format)
    index: int
    object: str = "embedding"


class EmbeddingResponse(_Model):
    data: List[EmbeddingObject]
    model: str
    object: str = "list"
    usage: Optional[UsageInfo] = None


# ----------------------------------------------------------------------------------------------------------
# /v1/responses (OpenAI's Responses API: text in, one assistant message out)
# ----------------------------------------------------------------------------------------------------------
class ResponsesRequest(_Model):
    model: Optional[str] = None
    # A string (one user turn) or a list of {"role", "content"} items; content is a string or a list of
    # {"type": "input_text" | "output_text" | "text", "text": ...} parts.
    input: Union[str, List[Dict[str, Any]]]
    instructions: Optional[str] = None  # a system message before the input
    max_output_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stream: bool = False
    store: Optional[bool] = None  # accepted; nothing is stored
    previous_response_id: Optional[str] = None
    tools: Optional[List[Dict[str, Any]]] = None
    metadata: Optional[Dict[str, Any]] = None
    user: Optional[str] = None

    @model_validator(mode="after")
    def _checks(self):
        if self.previous_response_id:
            raise ValueError("previous_response_id is not supported: this server stores no responses; send "
                             "the whole conversation as input")
        if self.tools:
            raise ValueError("tools are not supported on /v1/responses by this server")
        if self.max_output_tokens is not None and self.max_output_tokens < 0:
            raise ValueError(f"max_output_tokens must be >= 0, got {self.max_output_tokens}")
        if self.input == "" or self.input == []:
            raise ValueError("input must not be empty")
        return self

    def messages(self) -> List[Dict[str, str]]:
        out: List[Dict[str, str]] = []
        if self.instructions:
            out.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            return out + [{"role": "user", "content": self.input}]
        for item in self.input:
            if item.get("type", "message") != "message":
                raise ValueError(f"input items of type {item.get('type')!r} are not supported (messages only)")
            content = item.get("content")
            if isinstance(content, list):
                parts = []
                for p in content:
                    if p.get("type") not in ("input_text", "output_text", "text") or not isinstance(
                            p.get("text"), str):
                        raise ValueError("only text content parts are supported (no images or files)")
                    parts.append(p["text"])
                content = "".join(parts)
            if not isinstance(content, str) or item.get("role") not in ("system", "developer", "user", "assistant"):
                raise ValueError("each input item needs a role (system, developer, user, assistant) and text "
                                 "content")
            out.append({"role": item["role"], "content": content})
        return out
