"""OpenAI-compatible serving: /v1/models, /v1/completions, /v1/chat/completions.

Data flow:
    CompletionRequest / ChatCompletionRequest (protocol.py, already validated)
      -> OpenAIServing._sampling_params(): OpenAI names -> SGLang sampling params
      -> GenerateReqInput (text or input_ids; chat: messages -> chat template -> input_ids)
      -> TokenizerManager.generate_request()
      -> non-stream: one dict / list of dicts (prompt-major, n per prompt) -> *Response JSON
         stream:     cumulative dicts tagged with "index" -> per-choice text deltas -> SSE chunks
                     ("data: {json}\n\n"), optional usage chunk, "data: [DONE]\n\n"

Errors are raised as APIError (status, message, type); http_server turns them into
{"error": {"message", "type", "param", "code"}} responses. Invalid input detected by the TokenizerManager
(ValueError) becomes a 400 the same way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any, AsyncIterator, Dict, List, Optional, Union

import orjson
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from sglang.srt.entrypoints.openai.protocol import (
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatCompletionTokenLogprob,
    ChatResponseMessage,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChoice,
    CompletionStreamResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    TopLogprob,
    UsageInfo,
    random_id,
)
from sglang.srt.managers.io_struct import GenerateReqInput

logger = logging.getLogger(__name__)

SSE_DONE = b"data: [DONE]\n\n"


class ORJSONResponse(JSONResponse):
    """JSON response serialized with orjson (FastAPI's own ORJSONResponse is deprecated). A JSONResponse, so
    that FastAPI documents routes answering it as JSON in /openapi.json."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


class APIError(Exception):
    """An error the client caused (4xx) or the server cannot help (5xx), with a message for the client."""

    def __init__(self, status: int, message: str, type: Optional[str] = None, param: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _ERROR_TYPES.get(status, "InternalServerError")
        self.param = param


async def first_output(gen):
    """Start a generation so that input errors surface as a 4xx before a 200 (or an SSE stream) is sent."""
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        return None
    except ValueError as e:
        raise APIError(400, str(e)) from e


_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                405: "MethodNotAllowed", 408: "RequestTimeoutError", 413: "RequestTooLargeError",
                422: "BadRequestError", 503: "ServiceUnavailableError", 500: "InternalServerError"}


def is_unavailable(exc: BaseException) -> bool:
    """tokenizer_manager.ServerUnavailableError (HTTP 503), matched by name so the HTTP layer imports without
    the TokenizerManager (tests run it on a stub)."""
    return any(t.__name__ == "ServerUnavailableError" for t in type(exc).__mro__)


def error_body(status: int, message: str, type: Optional[str] = None, param: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type or _ERROR_TYPES.get(status, "InternalServerError"),
                      "param": param, "code": status}}


def error_response(status: int, message: str, type: Optional[str] = None,
                   param: Optional[str] = None) -> ORJSONResponse:
    return ORJSONResponse(error_body(status, message, type, param), status_code=status)


def sse(obj: Any) -> bytes:
    """One server-sent event carrying a JSON object."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def finish_reason_str(fr: Optional[dict]) -> Optional[str]:
    """SGLang's finish_reason dict -> OpenAI's string ("stop", "length", "abort")."""
    if not fr:
        return None
    return {"stop": "stop", "length": "length"}.get(fr.get("type"), fr.get("type"))


def matched_stop(fr: Optional[dict]):
    return fr.get("matched") if fr else None


def _as_list(ret) -> List[dict]:
    return ret if isinstance(ret, list) else [ret]


def _abort_message(outputs: List[dict]) -> Optional[str]:
    for o in outputs:
        fr = o["meta_info"].get("finish_reason")
        if fr and fr.get("type") == "abort":
            return fr.get("message") or "request aborted"
    return None


class OpenAIServing:
    """Maps OpenAI requests onto the TokenizerManager and formats its outputs as OpenAI responses."""

    def __init__(self, tokenizer_manager):
        self.tm = tokenizer_manager
        self.server_args = tokenizer_manager.server_args
        self.model_name = self.server_args.served_model_name
        self._chat_template = self._load_chat_template(self.server_args.chat_template)

    # ---- models ----------------------------------------------------------------------------------------
    def served_names(self) -> List[str]:
        names = [self.model_name]
        if self.server_args.model_path not in names:
            names.append(self.server_args.model_path)
        return names

    def list_models(self) -> dict:
        card = ModelCard(id=self.model_name, root=self.model_name,
                         max_model_len=getattr(self.tm.model_config, "context_len", None))
        return ModelList(data=[card]).model_dump()

    def response_model(self, name: Optional[str]) -> str:
        """Completions and chat accept any model name and echo it back (as SGLang does: one model is
        served, whatever the client calls it); only /v1/models/{id} answers 404 for other names."""
        return name or self.model_name

    def check_model(self, name: Optional[str]) -> None:
        if name is None or name in self.served_names():
            return
        raise APIError(404, f"The model `{name}` does not exist. This server serves `{self.model_name}`.",
                       param="model")

    # ---- shared mapping --------------------------------------------------------------------------------
    @staticmethod
    def _sampling_params(req, max_new_tokens: Optional[int]) -> Dict[str, Any]:
        sp: Dict[str, Any] = {
            "temperature": req.temperature,
            "top_p": req.top_p,
            "top_k": req.top_k,
            "min_p": req.min_p,
            "presence_penalty": req.presence_penalty,
            "frequency_penalty": req.frequency_penalty,
            "repetition_penalty": req.repetition_penalty,
            "stop": req.stop,
            "stop_token_ids": req.stop_token_ids,
            "ignore_eos": req.ignore_eos,
            "skip_special_tokens": req.skip_special_tokens,
            "no_stop_trim": req.no_stop_trim,
            "regex": req.regex,
            "json_schema": req.json_schema,
            "ebnf": req.ebnf,
            "logit_bias": req.logit_bias,
            "min_new_tokens": req.min_tokens,
            "sampling_seed": req.seed,
            "max_new_tokens": max_new_tokens,
        }
        sp = {k: v for k, v in sp.items() if v is not None}
        if req.n != 1:
            sp["n"] = req.n
        return sp

    async def _run(self, obj: GenerateReqInput, raw_request: Optional[Request]) -> List[dict]:
        """Non-streaming generation: the list of outputs, prompt-major."""
        try:
            gen = self.tm.generate_request(obj, raw_request)
            ret = await gen.__anext__()
            await gen.aclose()
        except ValueError as e:
            raise APIError(400, str(e)) from e
        outputs = _as_list(ret)
        msg = _abort_message(outputs)
        if msg is not None:
            raise APIError(400, msg)
        return outputs

    def _usage(self, outputs: List[dict], n: int) -> UsageInfo:
        prompt = sum(outputs[i]["meta_info"]["prompt_tokens"] for i in range(0, len(outputs), n))
        cached = sum(outputs[i]["meta_info"].get("cached_tokens", 0) or 0 for i in range(0, len(outputs), n))
        completion = sum(o["meta_info"]["completion_tokens"] for o in outputs)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                         prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))

    def _token_text(self, entry) -> str:
        """Text of one logprob entry [logprob, token_id, text_or_None]."""
        if len(entry) > 2 and entry[2] is not None:
            return entry[2]
        tok = self.tm.tokenizer
        return tok.decode([entry[1]]) if tok is not None else str(entry[1])

    def _stream_response(self, gen: AsyncIterator[bytes], rids_of) -> StreamingResponse:
        """SSE response; aborts the requests when the stream ends early (client gone, error)."""

        async def body():
            done = False
            try:
                async for chunk in gen:
                    yield chunk
                done = True
            finally:
                if not done:
                    for rid in rids_of():
                        asyncio.get_running_loop().create_task(self._abort_quietly(rid))

        return StreamingResponse(body(), media_type="text/event-stream")

    async def _abort_quietly(self, rid: str) -> None:
        try:
            await self.tm.abort_request(rid)
        except Exception:  # noqa: BLE001 - best effort: the request may already be gone
            logger.debug("abort of %s failed", rid, exc_info=True)

    # ---- /v1/completions -------------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, raw_request: Optional[Request]):
        prompt = req.prompt
        if isinstance(prompt, str):
            obj = GenerateReqInput(text=prompt)
            prompts: List[Union[str, List[int]]] = [prompt]
        elif all(isinstance(p, str) for p in prompt):
            obj = GenerateReqInput(text=list(prompt))
            prompts = list(prompt)
        elif all(isinstance(p, int) for p in prompt):
            obj = GenerateReqInput(input_ids=list(prompt))
            prompts = [list(prompt)]
        else:
            obj = GenerateReqInput(input_ids=[list(p) for p in prompt])
            prompts = [list(p) for p in prompt]
        obj.sampling_params = self._sampling_params(req, req.max_tokens)
        obj.stream = req.stream
        obj.rid = req.rid
        if req.logprobs is not None:
            obj.return_logprob = True
            obj.top_logprobs_num = req.logprobs
            obj.return_text_in_logprobs = True
            obj.logprob_start_len = 0 if req.echo else -1
        n = req.n
        echo_texts = [self._prompt_text(p) for p in prompts] if req.echo else None

        if req.stream:
            return await self._completions_stream(req, obj, raw_request, n, echo_texts)

        outputs = await self._run(obj, raw_request)
        choices = []
        for i, out in enumerate(outputs):
            text = out["text"]
            meta = out["meta_info"]
            logprobs = None
            if req.logprobs is not None:
                entries = list(meta.get("output_token_logprobs") or [])
                tops = list(meta.get("output_top_logprobs") or [None] * len(entries))
                if req.echo:
                    entries = list(meta.get("input_token_logprobs") or []) + entries
                    tops = list(meta.get("input_top_logprobs") or [None] * (len(entries) - len(tops))) + tops
                logprobs = self._completion_logprobs(entries, tops, req.logprobs, 0)
            if echo_texts is not None:
                text = echo_texts[i // n] + text
            fr = meta.get("finish_reason")
            choices.append(CompletionChoice(index=i, text=text, logprobs=logprobs,
                                            finish_reason=finish_reason_str(fr), matched_stop=matched_stop(fr)))
        resp = CompletionResponse(id=_response_id("cmpl", outputs), model=self.response_model(req.model),
                                  choices=choices,
                                  usage=self._usage(outputs, n))
        return ORJSONResponse(resp.model_dump(exclude_none=False))

    def _prompt_text(self, prompt: Union[str, List[int]]) -> str:
        if isinstance(prompt, str):
            return prompt
        tok = self.tm.tokenizer
        return tok.decode(prompt) if tok is not None else ""

    def _completion_logprobs(self, entries, tops, k: int, offset: int) -> CompletionLogprobs:
        lp = CompletionLogprobs()
        for j, e in enumerate(entries):
            text = self._token_text(e)
            lp.tokens.append(text)
            lp.token_logprobs.append(e[0])
            lp.text_offset.append(offset)
            offset += len(text)
            top = tops[j] if j < len(tops) else None
            if top is None or (e[0] is None):
                lp.top_logprobs.append(None if e[0] is None else {})
            else:
                lp.top_logprobs.append({self._token_text(t): t[0] for t in top[:k]})
        return lp

    async def _completions_stream(self, req: CompletionRequest, obj: GenerateReqInput, raw_request, n: int,
                                  echo_texts: Optional[List[str]]):
        gen = self.tm.generate_request(obj, raw_request)
        first = await first_output(gen)
        rid_base = random_id("cmpl")
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def chunks():
            sent_text: Dict[int, int] = {}
            sent_lps: Dict[int, int] = {}
            offsets: Dict[int, int] = {}
            finals: Dict[int, dict] = {}
            echoed = set()
            items = _chain(first, gen)
            async for out in items:
                idx = out.get("index", 0)
                meta = out["meta_info"]
                text = out["text"]
                delta = text[sent_text.get(idx, 0):]
                sent_text[idx] = max(sent_text.get(idx, 0), len(text))
                lps = None
                if req.logprobs is not None:
                    entries = list(meta.get("output_token_logprobs") or [])
                    tops = list(meta.get("output_top_logprobs") or [])
                    if idx not in sent_lps and req.echo:
                        entries = list(meta.get("input_token_logprobs") or []) + entries
                        tops = list(meta.get("input_top_logprobs") or []) + tops
                        start = 0
                    else:
                        start = sent_lps.get(idx, 0)
                    lps = self._completion_logprobs(entries[start:], tops[start:], req.logprobs,
                                                    offsets.get(idx, 0))
                    sent_lps[idx] = len(meta.get("output_token_logprobs") or [])
                    offsets[idx] = offsets.get(idx, 0) + sum(len(t) for t in lps.tokens)
                if echo_texts is not None and idx not in echoed:
                    echoed.add(idx)
                    delta = echo_texts[idx // n] + delta
                fr = meta.get("finish_reason")
                if fr is not None:
                    finals[idx] = out
                if not delta and fr is None and lps is None:
                    continue
                chunk = CompletionStreamResponse(
                    id=f"{rid_base}", created=created, model=self.response_model(req.model),
                    choices=[CompletionStreamChoice(index=idx, text=delta, logprobs=lps,
                                                    finish_reason=finish_reason_str(fr),
                                                    matched_stop=matched_stop(fr))])
                yield sse(chunk.model_dump())
            if include_usage and finals:
                outs = [finals[i] for i in sorted(finals)]
                chunk = CompletionStreamResponse(id=rid_base, created=created,
                                                 model=self.response_model(req.model),
                                                 choices=[], usage=self._usage(outs, n))
                yield sse(chunk.model_dump())
            yield SSE_DONE

        return self._stream_response(_guard_stream(chunks()), lambda: _rids(obj))

    # ---- /v1/chat/completions --------------------------------------------------------------------------
    @staticmethod
    def _load_chat_template(spec: Optional[str]) -> Optional[str]:
        if not spec:
            return None
        if os.path.isfile(spec):
            with open(spec, encoding="utf-8") as f:
                text = f.read()
            if spec.endswith(".json"):  # SGLang/vLLM style {"chat_template": "..."}
                try:
                    text = json.loads(text).get("chat_template", text)
                except (ValueError, AttributeError):
                    pass
            return text
        if "{%" in spec or "{{" in spec:
            return spec
        raise ValueError(f"--chat-template {spec!r} is neither a file nor a Jinja template")

    def chat_template_source(self) -> Optional[str]:
        """The Jinja template chat requests are rendered with (--chat-template, else the tokenizer's)."""
        tok = self.tm.tokenizer
        return self._chat_template or (getattr(tok, "chat_template", None) if tok is not None else None)

    def apply_chat_template(self, req: ChatCompletionRequest) -> List[int]:
        tok = self.tm.tokenizer
        if tok is None:
            raise APIError(400, "chat completions need a tokenizer; the server runs with --skip-tokenizer-init")
        template = self.chat_template_source()
        if not template:
            raise APIError(400, "the model's tokenizer has no chat template; start the server with "
                                "--chat-template")
        messages = []
        for m in req.messages:
            msg: Dict[str, Any] = {"role": m.role, "content": m.text()}
            if m.name is not None:
                msg["name"] = m.name
            if m.tool_calls is not None:
                msg["tool_calls"] = m.tool_calls
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            messages.append(msg)
        continue_final = req.continue_final_message and messages[-1]["role"] == "assistant"
        kwargs = dict(req.chat_template_kwargs or {})
        if req.tools:
            kwargs["tools"] = req.tools
        try:
            prompt = tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=not continue_final,
                                             continue_final_message=continue_final, **kwargs)
        except Exception as e:  # jinja errors: the messages do not fit the template
            raise APIError(400, f"cannot apply the chat template to these messages: {e}") from e
        return tok.encode(prompt, add_special_tokens=False)

    async def chat_completions(self, req: ChatCompletionRequest, raw_request: Optional[Request]):
        chars = sum(len(m.text()) for m in req.messages)
        try:
            self.tm.check_prompt_chars(chars, "the messages")
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        input_ids = await self.tm.offload(chars, self.apply_chat_template, req)  # large: off the event loop
        max_new = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        sp = self._sampling_params(req, max_new)
        rf = req.response_format
        if rf is not None and rf.type != "text":
            if "json_schema" in sp or "regex" in sp or "ebnf" in sp:
                raise APIError(400, "response_format cannot be combined with regex / json_schema / ebnf")
            if rf.type == "json_object":
                sp["json_schema"] = '{"type": "object"}'
            else:
                sp["json_schema"] = json.dumps(rf.json_schema.schema_)
        obj = GenerateReqInput(input_ids=input_ids, sampling_params=sp, stream=req.stream, rid=req.rid)
        if req.logprobs:
            obj.return_logprob = True
            obj.top_logprobs_num = req.top_logprobs or 0
            obj.return_text_in_logprobs = True
            obj.logprob_start_len = -1
        n = req.n

        if req.stream:
            return await self._chat_stream(req, obj, raw_request, n)

        outputs = await self._run(obj, raw_request)
        choices = []
        for i, out in enumerate(outputs):
            meta = out["meta_info"]
            logprobs = None
            if req.logprobs:
                logprobs = self._chat_logprobs(meta.get("output_token_logprobs") or [],
                                               meta.get("output_top_logprobs") or [], req.top_logprobs or 0)
            fr = meta.get("finish_reason")
            choices.append(ChatCompletionChoice(index=i, message=ChatResponseMessage(content=out["text"]),
                                                logprobs=logprobs, finish_reason=finish_reason_str(fr),
                                                matched_stop=matched_stop(fr)))
        resp = ChatCompletionResponse(id=_response_id("chatcmpl", outputs), model=self.response_model(req.model),
                                      choices=choices, usage=self._usage(outputs, n))
        # every field, nulls included (matched_stop, logprobs, reasoning_content, tool_calls), as SGLang does
        return ORJSONResponse(resp.model_dump())

    def _chat_logprobs(self, entries, tops, k: int) -> ChoiceLogprobs:
        content = []
        for j, e in enumerate(entries):
            text = self._token_text(e)
            top = tops[j] if j < len(tops) and tops[j] is not None else []
            content.append(ChatCompletionTokenLogprob(
                token=text, logprob=e[0], bytes=list(text.encode("utf-8")),
                top_logprobs=[TopLogprob(token=(tt := self._token_text(t)), logprob=t[0],
                                         bytes=list(tt.encode("utf-8"))) for t in top[:k]]))
        return ChoiceLogprobs(content=content)

    async def _chat_stream(self, req: ChatCompletionRequest, obj: GenerateReqInput, raw_request, n: int):
        gen = self.tm.generate_request(obj, raw_request)
        first = await first_output(gen)
        rid_base = random_id("chatcmpl")
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices, usage=None) -> bytes:
            c = ChatCompletionStreamResponse(id=rid_base, created=created, model=self.response_model(req.model),
                                             choices=choices, usage=usage)
            return sse(c.model_dump())  # nulls included, as SGLang sends them

        async def chunks():
            sent_text: Dict[int, int] = {}
            sent_lps: Dict[int, int] = {}
            finals: Dict[int, dict] = {}
            async for out in _chain(first, gen):
                idx = out.get("index", 0)
                meta = out["meta_info"]
                if idx not in sent_text:
                    sent_text[idx] = 0
                    yield chunk([ChatCompletionStreamChoice(index=idx,
                                                            delta=DeltaMessage(role="assistant", content=""))])
                text = out["text"]
                delta = text[sent_text[idx]:]
                sent_text[idx] = max(sent_text[idx], len(text))
                lps = None
                if req.logprobs:
                    entries = meta.get("output_token_logprobs") or []
                    tops = meta.get("output_top_logprobs") or []
                    start = sent_lps.get(idx, 0)
                    lps = self._chat_logprobs(entries[start:], tops[start:], req.top_logprobs or 0)
                    sent_lps[idx] = len(entries)
                fr = meta.get("finish_reason")
                if fr is not None:
                    finals[idx] = out
                if not delta and fr is None:
                    continue
                yield chunk([ChatCompletionStreamChoice(
                    index=idx, delta=DeltaMessage(content=delta) if delta else DeltaMessage(),
                    logprobs=lps, finish_reason=finish_reason_str(fr), matched_stop=matched_stop(fr))])
            if include_usage and finals:
                outs = [finals[i] for i in sorted(finals)]
                yield chunk([], usage=self._usage(outs, n))
            yield SSE_DONE

        return self._stream_response(_guard_stream(chunks()), lambda: _rids(obj))


# ----------------------------------------------------------------------------------------------------------
async def _chain(first, gen):
    if first is not None:
        yield first
    async for item in gen:
        yield item


async def _guard_stream(gen: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Errors after the 200 was sent become one error event followed by [DONE]."""
    try:
        async for chunk in gen:
            yield chunk
    except ValueError as e:
        yield sse(error_body(400, str(e)))
        yield SSE_DONE
    except Exception as e:  # noqa: BLE001 - report to the client instead of cutting the stream
        if isinstance(e, (asyncio.CancelledError, GeneratorExit)):
            raise
        unavailable = is_unavailable(e)
        status = 503 if unavailable else getattr(e, "status", 500)
        if status >= 500 and not unavailable:
            logger.exception("error while streaming")
        yield sse(error_body(status, str(e) or type(e).__name__))
        yield SSE_DONE


def _rids(obj: GenerateReqInput) -> List[str]:
    rid = obj.rid
    if rid is None:
        return []
    return [rid] if isinstance(rid, str) else list(rid)


def _response_id(prefix: str, outputs: List[dict]) -> str:
    rid = outputs[0]["meta_info"].get("id") if outputs else None
    return f"{prefix}-{rid}" if rid else random_id(prefix)
