"""Pydantic models of SGLang's native HTTP API, for /openapi.json (request bodies and responses).

The routes parse their bodies themselves (orjson, SGLang's lenient field handling, a 413 before parsing a
body that is too large, GET /generate with query parameters), so these models document the API rather than
parse it: http_server puts them in the OpenAPI document as each route's request body and responses. The
documented types are what the server accepts; values beyond a --max-* limit get a 400 (see README, "Limits,
timeouts and failures").
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from sglang.srt.entrypoints.openai.protocol import ErrorResponse


class _Doc(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class SamplingParamsModel(_Doc):
    """SGLang's sampling parameters (unknown keys get a 400)."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: Optional[int] = Field(128, ge=0, description="Output tokens at most (0: prefill only).")
    stop: Optional[Union[str, List[str]]] = Field(None, description="Stop strings (see --max-stop-strings, "
                                                  "--max-stop-str-len).")
    stop_token_ids: Optional[List[int]] = None
    stop_regex: Optional[Union[str, List[str]]] = None
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, description="-1 disables; otherwise >= 1.")
    min_p: float = Field(0.0, ge=0, le=1)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=2)
    min_new_tokens: int = Field(0, ge=0)
    n: int = Field(1, ge=1, description="Parallel samples (at most --max-parallel-samples).")
    json_schema: Optional[Union[str, Dict[str, Any]]] = None
    regex: Optional[str] = None
    ebnf: Optional[str] = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    logit_bias: Optional[Dict[str, float]] = None
    sampling_seed: Optional[int] = Field(None, ge=0)
    custom_params: Optional[Dict[str, Any]] = None
    structural_tag: None = Field(None, description="Not supported (400 unless null).")
    stream_interval: Optional[int] = None


class SessionParamsModel(_Doc):
    """session_params of /generate (SGLang's session API)."""

    id: str = Field(description="The session, from POST /open_session.")
    rid: Optional[str] = Field(None, description="Earlier request of the session to append to (null: a new "
                               "branch, from nothing).")
    offset: Optional[int] = Field(None, description="Keep only the first offset tokens of that request's prompt + "
                                  "output (negative: from the end; null / 0: all).")
    replace: Optional[bool] = Field(None, description="Drop that request's later turns (with rid null: the whole "
                                    "session) first.")
    drop_previous_output: Optional[bool] = Field(None, description="Append to that request's prompt only.")


class OpenSessionBody(_Doc):
    """Body of POST /open_session."""

    capacity_of_str_len: int = Field(description="Accepted for SGLang compatibility (not a limit here).")
    session_id: Optional[str] = Field(None, description="Id to give the session (400 if one is open with it).")


class CloseSessionBody(_Doc):
    """Body of POST /close_session."""

    session_id: str


class GenerateRequest(_Doc):
    """Body of POST /generate: exactly one of text / input_ids; lists make a batch."""

    text: Optional[Union[str, List[str]]] = Field(None, description="Prompt(s) (at most --max-prompt-chars "
                                                  "characters each, --max-batch-prompts prompts).")
    input_ids: Optional[Union[List[int], List[List[int]]]] = None
    sampling_params: Optional[Union[SamplingParamsModel, List[SamplingParamsModel]]] = None
    rid: Optional[Union[str, List[str]]] = Field(None, description="Request id(s): non-empty, unique among "
                                                 "the requests in flight.")
    return_logprob: Optional[Union[bool, List[bool]]] = None
    logprob_start_len: Optional[Union[int, List[int]]] = None
    top_logprobs_num: Optional[Union[int, List[int]]] = Field(None, description="At most "
                                                              "--max-top-logprobs-num.")
    return_text_in_logprobs: bool = False
    stream: bool = Field(False, description="Server-sent events: one cumulative response per event, then "
                         "'data: [DONE]'.")
    log_metrics: bool = True
    modalities: Optional[List[str]] = Field(None, description="Only 'text' is supported.")
    lora_path: None = Field(None, description="Not supported (400 unless null).")
    image_data: None = Field(None, description="Not supported (400 unless null).")
    audio_data: None = Field(None, description="Not supported (400 unless null).")
    video_data: None = Field(None, description="Not supported (400 unless null).")
    custom_logit_processor: None = Field(None, description="Not supported (400 unless null).")
    return_hidden_states: bool = Field(False, description="Not supported (400 unless false).")
    session_params: Optional[Union[SessionParamsModel, List[SessionParamsModel]]] = Field(
        None, description="Append this input to an earlier request of an open session (SGLang's session API).")


class MetaInfo(_Doc):
    id: str
    finish_reason: Optional[Dict[str, Any]] = Field(description="null while running; {'type': 'stop' | "
                                                    "'length' | 'abort', ...} when finished.")
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    e2e_latency: float
    input_token_logprobs: Optional[List[List[Any]]] = None
    output_token_logprobs: Optional[List[List[Any]]] = None
    input_top_logprobs: Optional[List[Optional[List[List[Any]]]]] = None
    output_top_logprobs: Optional[List[Optional[List[List[Any]]]]] = None


class GenerateResponse(_Doc):
    """One output of /generate (cumulative text and output_ids); a batch or n > 1 answers a list of these."""

    text: str
    output_ids: List[int]
    meta_info: MetaInfo
    index: Optional[int] = Field(None, description="Which output of a batch / n > 1 (streams only).")


class AbortRequestBody(_Doc):
    """Body of POST /abort_request: a rid, or abort_all (the operator's abort-everything)."""

    rid: Optional[str] = Field(None, min_length=1)
    abort_all: bool = False


class ModelInfo(_Doc):
    model_path: str
    tokenizer_path: Optional[str] = None
    served_model_name: Optional[str] = None
    is_generation: bool
    preferred_sampling_params: Optional[Dict[str, Any]] = None
    weight_version: str
    has_image_understanding: bool
    has_audio_understanding: bool
    model_type: Optional[str] = None
    architectures: Optional[List[Optional[str]]] = None
    context_length: Optional[int] = None
    vocab_size: Optional[int] = None
    chat_template: Optional[str] = None  # the Jinja template of the chat API (the frontend's roles use it)
    eos_token: Optional[str] = None


class LoadInfo(_Doc):
    """/get_load: "load" is the KV tokens in use over every instance."""

    load: int
    instances: List[Dict[str, Any]]
    max_request_tokens_now: int = Field(description="Prompt + output tokens of the largest request an instance "
                                        "of the current shape holds (min of the context and its KV pool).")
    max_request_tokens_merged: int = Field(description="The largest request this host accepts: with Gyges, on the "
                                           "largest instance it forms by merging; without, max_request_tokens_now.")


class ServerInfo(_Doc):
    """Every server flag (api_key redacted) plus these."""

    max_total_num_tokens: int
    max_req_input_len: int
    version: str
    internal_states: List[Dict[str, Any]]
    max_request_tokens_now: int = Field(description="As in /get_load.")
    max_request_tokens_merged: int = Field(description="As in /get_load.")


class VersionInfo(_Doc):
    version: str


class FailedInstance(_Doc):
    devices: List[int]
    reason: str


class HealthError(_Doc):
    """503 body of /health and /health_generate: the error, and each failed instance with its reason."""

    error: ErrorResponse.Detail
    failed_instances: List[FailedInstance] = Field(default_factory=list)


class EncodeRequest(_Doc):
    """Body of POST /encode (SGLang's native embedding route): exactly one of text / input_ids; lists make a
    batch."""

    text: Optional[Union[str, List[str]]] = None
    input_ids: Optional[Union[List[int], List[List[int]]]] = None
    rid: Optional[Union[str, List[str]]] = None
    image_data: None = Field(None, description="Not supported (400 unless null).")


class EncodeResponse(_Doc):
    """One prompt's embedding: its last token's final hidden state, L2-normalized; a batch answers a list."""

    embedding: List[float]
    meta_info: MetaInfo
