"""The HTTP server: SGLang's native API and the OpenAI API on FastAPI + uvicorn (uvloop, orjson).

Data flow:
    launch_server(server_args)
      -> engine.launch_subprocesses()            controller, workers, detokenizer; returns the TokenizerManager
      -> MetricsCollector attached to the TM     (the TM reports latencies and token counts into it)
      -> create_app(tm)                          FastAPI routes below
      -> uvicorn (uvloop, h11) serves; on start-up a warm-up generation runs, and only when it finished does
         /health answer 200 (503 before, 503 while any instance has failed, with each failed instance's
         devices and reason, and 503 when shutting down)
      -> SIGINT / SIGTERM: every in-flight request is failed with a 503 (JSON; streams get an error event and
         'data: [DONE]'), uvicorn stops accepting and finishes, then tm.shutdown() stops every child process
         and removes the ipc socket files, so nothing outlives the server; exit code 0.
      -> no instance left serving, or the controller / detokenizer died: the same shutdown, exit code 1.

    connection -> [HeaderTimeoutH11Protocol: headers within --timeout-request-read, else dropped]
    request -> [BodyLimitMiddleware: 413 beyond --max-request-body-size (Content-Length checked first),
                408 when the body is slower than --timeout-request-read] -> [ApiKeyMiddleware] -> route
      /generate            JSON -> GenerateReqInput -> tm.generate_request -> JSON, or SSE
                           ("data: {json}\n\n" with cumulative text ..., "data: [DONE]\n\n")
      /v1/*                pydantic models (openai/protocol.py) -> OpenAIServing (openai/serving.py)
      /get_server_info     server args + KV capacity + version + tm.get_internal_state()
      /metrics             tm.get_internal_state() -> load gauges -> Prometheus text
      /openapi.json        every route with its request and response models (native_protocol.py, openai/)

Errors: every 4xx/5xx body is {"error": {"message", "type", "param", "code"}}. ValueError from the TM means
the client sent something invalid (400); ServerUnavailableError means the workers are gone (503). A bad
request never affects other requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import time
from contextlib import asynccontextmanager
from typing import Any, Dict, List, Optional

import h11
import orjson
import psutil
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

import sglang
from sglang.srt.entrypoints.native_protocol import (
    AbortRequestBody,
    CloseSessionBody,
    EncodeRequest,
    EncodeResponse,
    GenerateRequest,
    GenerateResponse,
    HealthError,
    LoadInfo,
    ModelInfo,
    OpenSessionBody,
    ServerInfo,
    VersionInfo,
)
from sglang.srt.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    EmbeddingRequest,
    EmbeddingResponse,
    ResponsesRequest,
    ScoringRequest,
    ScoringResponse,
)
from sglang.srt.entrypoints.openai.embedding import EmbeddingServing
from sglang.srt.entrypoints.openai.responses import ResponsesServing
from sglang.srt.entrypoints.openai.scoring import ScoreServing
from sglang.srt.entrypoints.openai.serving import (
    SSE_DONE,
    APIError,
    ORJSONResponse,
    OpenAIServing,
    error_body,
    error_response,
    first_output,
    is_unavailable,
    sse,
)
from sglang.srt.managers.io_struct import EmbeddingReqInput
from sglang.srt.managers.io_struct import CloseSessionReqInput, GenerateReqInput, OpenSessionReqInput
from sglang.srt.metrics.collector import CONTENT_TYPE as METRICS_CONTENT_TYPE
from sglang.srt.metrics.collector import MetricsCollector

logger = logging.getLogger(__name__)

HEALTH_GENERATE_TIMEOUT_S = 60.0
# Top-level fields of /generate that reach GenerateReqInput (it rejects the unsupported ones when set).
_GENERATE_FIELDS = ("text", "input_ids", "sampling_params", "rid", "return_logprob", "logprob_start_len",
                    "top_logprobs_num", "return_text_in_logprobs", "stream", "log_metrics", "modalities",
                    "lora_path", "image_data", "audio_data", "video_data", "custom_logit_processor",
                    "return_hidden_states", "session_params")
_BOOL_FIELDS = ("stream", "return_text_in_logprobs", "return_hidden_states", "log_metrics")
# Other SGLang /generate fields for features this server does not have: a 400 unless null / false / empty
# (unknown fields are ignored, as SGLang does).
_UNSUPPORTED_GENERATE_FIELDS = ("input_embeds", "token_ids_logprob", "data_parallel_rank",
                                "bootstrap_host", "bootstrap_port", "bootstrap_room", "return_routed_experts",
                                "return_bytes")


# ----------------------------------------------------------------------------------------------------------
# Shared state of one server
# ----------------------------------------------------------------------------------------------------------
class ServerState:
    """What the routes need: the TM, the args, readiness, the OpenAI adapter, the metrics."""

    def __init__(self, tokenizer_manager, metrics: Optional[MetricsCollector]):
        self.tm = tokenizer_manager
        self.server_args = tokenizer_manager.server_args
        self.metrics = metrics
        self.openai = OpenAIServing(tokenizer_manager)
        self.score = ScoreServing(tokenizer_manager, self.openai)
        self.responses = ResponsesServing(self.openai)
        self.embedding = EmbeddingServing(tokenizer_manager, self.openai)
        self.ready = False  # set once the warm-up generation finished
        self.warmup_error: Optional[str] = None
        self.fatal_reason: Optional[str] = None  # why the server stopped serving for good (exit code 1)
        self.loop: Optional[asyncio.AbstractEventLoop] = None  # the serving event loop (set on start-up)

    def healthy(self) -> bool:
        return not self.health_problems()

    def health_problems(self) -> List[str]:
        """Why the server is not healthy (empty: healthy)."""
        if not self.ready:
            return [self.warmup_error or "the server is starting (warm-up not finished)"]
        try:
            return list(self.tm.health_problems())
        except Exception as e:  # noqa: BLE001 - a broken TM is not healthy
            return [f"{type(e).__name__}: {e}"]

    def health_error(self) -> ORJSONResponse:
        problems = self.health_problems()
        body = error_body(503, "; ".join(problems))
        body["failed_instances"] = [{"devices": d, "reason": r} for d, r in self.tm.failed_instances]
        return ORJSONResponse(body, status_code=503)

    def warmup_request(self, max_new_tokens: int = 1) -> GenerateReqInput:
        sp = {"max_new_tokens": max_new_tokens, "temperature": 0.0}
        if self.tm.tokenizer is not None:
            return GenerateReqInput(text="The capital city of France is", sampling_params=sp)
        return GenerateReqInput(input_ids=[1, 2, 3, 4], sampling_params=sp)

    async def warmup(self) -> None:
        if self.server_args.skip_warmup:
            self.ready = True
            logger.info("Warm-up skipped; the server is ready.")
            return
        t0 = time.perf_counter()
        try:
            async for _ in self.tm.generate_request(self.warmup_request()):
                pass
        except Exception as e:  # noqa: BLE001 - report and stop the server: it cannot serve
            self.warmup_error = f"{type(e).__name__}: {e}"
            logger.exception("Warm-up generation failed; shutting the server down.")
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self.ready = True
        logger.info("Warm-up done in %.2f s. The server is fired up and ready to roll!", time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------------------
# Middleware
# ----------------------------------------------------------------------------------------------------------
class ApiKeyMiddleware:
    """Pure ASGI middleware: 401 unless 'Authorization: Bearer <key>'; /health* and /metrics are open."""

    OPEN_PREFIXES = ("/health", "/metrics")

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" or scope["path"].startswith(
                self.OPEN_PREFIXES):
            return await self.app(scope, receive, send)
        auth = dict(scope.get("headers") or []).get(b"authorization")
        if auth != self.expected:
            resp = error_response(401, "Unauthorized: missing or wrong 'Authorization: Bearer <api key>' header",
                                  type="AuthenticationError")
            return await resp(scope, receive, send)
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Pure ASGI middleware bounding request bodies: a Content-Length above max_bytes gets a 413 before
    anything is read; a body that grows past it while being read (chunked) raises a 413 to the route; a
    body not complete within timeout_s raises a 408."""

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    def _too_large(self, size: Optional[int] = None) -> APIError:
        got = f" ({size} bytes)" if size is not None else ""
        return APIError(413, f"request body too large{got}: at most {self.max_bytes} bytes are accepted "
                             f"(--max-request-body-size)")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            exc = self._too_large(int(length))
            return await error_response(exc.status, exc.message)(scope, receive, send)
        received = 0
        complete = False
        deadline = time.monotonic() + self.timeout_s

        async def bounded_receive():
            nonlocal received, complete
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise APIError(408, f"the request body did not arrive within {self.timeout_s:g} s "
                                    f"(--timeout-request-read)") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large()
                complete = not message.get("more_body", False)
            else:
                complete = True
            return message

        return await self.app(scope, bounded_receive, send)


def header_timeout_protocol(timeout_s: float):
    """uvicorn's h11 protocol, dropping connections that do not send a complete request head within
    timeout_s of connecting (or of the previous response): slow clients cannot hold connections open."""

    class HeaderTimeoutH11Protocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._head_timer = self.loop.call_later(timeout_s, self._head_timeout)

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.logger.debug("dropping a connection that sent no complete request head in %s s", timeout_s)
                self.transport.close()

        def _cancel_head_timer(self) -> None:
            timer = getattr(self, "_head_timer", None)
            if timer is not None:
                timer.cancel()
                self._head_timer = None

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._cancel_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._cancel_head_timer()
                self._head_timer = self.loop.call_later(timeout_s, self._head_timeout)

        def connection_lost(self, exc) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

    return HeaderTimeoutH11Protocol


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------
async def read_json(request: Request, allow_empty: bool = False) -> Dict[str, Any]:
    body = await request.body()
    if not body.strip():
        if allow_empty:
            return {}
        raise APIError(400, "empty request body; send a JSON object")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise APIError(400, f"malformed JSON in request body: {e}") from e
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}")
    return data


def validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        msg = err.get("msg", "invalid")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or str(e)


def generate_input_from_json(data: Dict[str, Any]) -> GenerateReqInput:
    for k in _UNSUPPORTED_GENERATE_FIELDS:
        if data.get(k) not in (None, False, [], {}):
            raise APIError(400, f"'{k}' is not supported by this server; leave it out or null", param=k)
    kwargs = {k: data[k] for k in _GENERATE_FIELDS if k in data}
    for k in _BOOL_FIELDS:
        if k in kwargs and not isinstance(kwargs[k], bool):
            raise APIError(400, f"'{k}' must be a boolean, got {kwargs[k]!r}")
    if "sampling_params" in kwargs and kwargs["sampling_params"] is not None and not isinstance(
            kwargs["sampling_params"], (dict, list)):
        raise APIError(400, "'sampling_params' must be an object or a list of objects")
    if kwargs.get("rid") is not None and not isinstance(kwargs["rid"], (str, list)):
        raise APIError(400, "'rid' must be a string or a list of strings")
    return GenerateReqInput(**kwargs)


def _rids(obj: GenerateReqInput) -> List[str]:
    if obj.rid is None:
        return []
    return [obj.rid] if isinstance(obj.rid, str) else list(obj.rid)


# ----------------------------------------------------------------------------------------------------------
# OpenAPI: request bodies (the routes parse them themselves) and documented responses
# ----------------------------------------------------------------------------------------------------------
_REF = "#/components/schemas/"
# Request models documented through openapi_extra; install_openapi() adds them to the components.
_BODY_MODELS = (GenerateRequest, AbortRequestBody, OpenSessionBody, CloseSessionBody, CompletionRequest, ChatCompletionRequest, ScoringRequest,
                ResponsesRequest, EmbeddingRequest, EncodeRequest)
_ERROR_TEXT = {400: "Invalid request (the message says what is wrong).", 401: "Missing or wrong API key.",
               404: "Unknown route, model or disabled feature.", 408: "The request body arrived too slowly.",
               413: "Request body too large.", 500: "The server failed this request.",
               503: "Not serving: starting, shutting down, or instances failed."}


def _body(model) -> Dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": _REF + model.__name__}}}}}


def _responses(*codes: int, ok: Any = None) -> Dict[int, Any]:
    out: Dict[int, Any] = {}
    for code in (*codes, 401):
        if code == 200:
            if isinstance(ok, type) and issubclass(ok, BaseModel):
                out[200] = {"model": ok, "description": "Success."}
            elif ok is not None:
                out[200] = ok
        else:
            out[code] = {"model": HealthError if code == 503 else ErrorResponse, "description": _ERROR_TEXT[code]}
    return out


def _generate_ok() -> Dict[str, Any]:
    one = {"$ref": _REF + "GenerateResponse"}
    return {"description": "One output, or a list for a batch or n > 1; with stream=true, server-sent events "
                           "('data: {output}' ..., 'data: [DONE]').",
            "content": {"application/json": {"schema": {"anyOf": [one, {"type": "array", "items": one}]}},
                        "text/event-stream": {"schema": {"type": "string"}}}}


def _one_or_list(name: str) -> Dict[str, Any]:
    one = {"$ref": _REF + name}
    return {"description": "One output, or a list for a batch.",
            "content": {"application/json": {"schema": {"anyOf": [one, {"type": "array", "items": one}]}}}}


def _openai_ok(model) -> Dict[str, Any]:
    return {"model": model, "description": "The completion; with stream=true, server-sent events of chunks "
                                           "and 'data: [DONE]'.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}}}


def install_openapi(app: FastAPI) -> None:
    """/openapi.json: FastAPI's document plus the request-body models the routes parse by hand."""

    def openapi() -> Dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                                 description="SGLang's native API and the OpenAI API. Errors: "
                                             '{"error": {"message", "type", "param", "code"}}.')
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (*_BODY_MODELS, GenerateResponse, EncodeResponse):
                js = model.model_json_schema(ref_template=_REF + "{model}")
                for name, sub in js.pop("$defs", {}).items():
                    comps.setdefault(name, sub)
                comps[model.__name__] = js
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


# ----------------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------------
def create_app(tokenizer_manager, metrics: Optional[MetricsCollector] = None, run_warmup: bool = True) -> FastAPI:
    state = ServerState(tokenizer_manager, metrics)
    tm = tokenizer_manager
    args = state.server_args

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.loop = asyncio.get_running_loop()
        task = asyncio.create_task(state.warmup()) if run_warmup else None
        if not run_warmup:
            state.ready = True
        try:
            yield
        finally:
            if task is not None and not task.done():
                task.cancel()

    app = FastAPI(title="SGLang-compatible server (Gyges)", version=sglang.__version__, lifespan=lifespan,
                  default_response_class=ORJSONResponse, openapi_url="/openapi.json", docs_url=None,
                  redoc_url=None)
    app.state.server = state
    if args.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=args.api_key)
    app.add_middleware(BodyLimitMiddleware, max_bytes=tm.limits.max_body_bytes, timeout_s=args.timeout_request_read)
    install_openapi(app)

    # ---- errors ------------------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(400, "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}"
                                             for e in exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        msg = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and msg == "Not Found":
            msg = f"no route {request.method} {request.url.path}"
        return error_response(exc.status_code, msg)

    @app.exception_handler(ValueError)
    async def _value_error(request: Request, exc: ValueError):
        return error_response(400, str(exc))

    @app.exception_handler(Exception)
    async def _any_error(request: Request, exc: Exception):
        if is_unavailable(exc):
            return error_response(503, str(exc) or "the server's workers are not available")
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(500, f"{type(exc).__name__}: {exc}")

    # ---- health ------------------------------------------------------------------------------------------
    @app.get("/health", response_class=Response, responses=_responses(200, 503, ok={
        "description": "Serving (empty body)."}))
    async def health():
        if not state.healthy():
            return state.health_error()
        return Response(status_code=200)

    @app.get("/health_generate", response_class=Response, responses=_responses(200, 503, ok={
        "description": "A one-token generation succeeded (empty body)."}))
    async def health_generate(request: Request):
        if not state.healthy():
            return state.health_error()
        obj = state.warmup_request()
        try:
            async def run():
                async for _ in tm.generate_request(obj):
                    pass
            await asyncio.wait_for(run(), HEALTH_GENERATE_TIMEOUT_S)
        except asyncio.TimeoutError:
            for rid in _rids(obj):
                asyncio.get_running_loop().create_task(tm.abort_request(rid))
            return error_response(503, f"health generation did not finish in {HEALTH_GENERATE_TIMEOUT_S:.0f} s")
        except Exception as e:  # noqa: BLE001 - any failure means unhealthy
            return error_response(503, f"health generation failed: {type(e).__name__}: {e}")
        return Response(status_code=200)

    # ---- info --------------------------------------------------------------------------------------------
    def model_info() -> dict:
        mc = tm.model_config
        hf = getattr(mc, "hf_config", None)
        return {
            "model_path": args.model_path,
            "tokenizer_path": args.tokenizer_path,
            "served_model_name": args.served_model_name,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": getattr(hf, "model_type", None),
            "architectures": getattr(hf, "architectures", None) or [getattr(mc, "architecture", None)],
            "context_length": getattr(mc, "context_len", None),
            "vocab_size": getattr(mc, "vocab_size", None),
            # what the frontend language renders roles with (the chat API's template; null without one)
            "chat_template": state.openai.chat_template_source(),
            "eos_token": getattr(tm.tokenizer, "eos_token", None) if tm.tokenizer is not None else None,
        }

    @app.get("/get_model_info", responses=_responses(200, ok=ModelInfo))
    async def get_model_info():
        return model_info()

    @app.get("/model_info", responses=_responses(200, ok=ModelInfo))
    async def model_info_route():
        return model_info()

    async def server_info() -> dict:
        info = dataclasses.asdict(args)
        if info.get("api_key"):
            info["api_key"] = "<redacted>"
        states = list(await tm.get_internal_state())
        info.update(
            max_total_num_tokens=tm.max_total_num_tokens,
            max_req_input_len=tm.max_req_input_len,
            version=sglang.__version__,
            internal_states=states,
            **_request_capacity(states),
        )
        return info

    @app.get("/get_server_info", responses=_responses(200, 503, ok=ServerInfo))
    async def get_server_info():
        return await server_info()

    @app.get("/server_info", responses=_responses(200, 503, ok=ServerInfo))
    async def server_info_route():
        return await server_info()

    @app.get("/get_load", responses=_responses(200, 503, ok=LoadInfo))
    async def get_load():
        """SGLang's load report: "load" is the KV tokens in use over every instance, plus each instance's
        running / waiting requests and the largest request it holds; and the largest request this host takes
        now (its current shape) and by merging (Gyges)."""
        states = list(await tm.get_internal_state())
        per = [{"instance_id": st.get("instance_id"), "devices": st.get("devices"),
                "num_running_reqs": st.get("running", 0), "num_waiting_reqs": st.get("waiting", 0),
                "num_used_tokens": st.get("kv_used_tokens", 0),
                "max_request_tokens": _instance_request_tokens(st)} for st in states]
        return {"load": sum(p["num_used_tokens"] for p in per), "instances": per, **_request_capacity(states)}

    def _instance_request_tokens(st: Dict[str, Any]) -> int:
        """Prompt + output tokens of the largest request one instance holds: its KV pool, within the context."""
        return min(tm.model_config.context_len, st.get("kv_capacity_tokens", 0))

    def _request_capacity(states: List[Dict[str, Any]]) -> Dict[str, int]:
        """The largest request (prompt + output tokens) this host serves with its instances as they are, and
        the largest it accepts: with Gyges, on the largest instance it can form by merging (what the TM's
        prompt limit allows, plus one output token); without, the same as now."""
        now = max((_instance_request_tokens(st) for st in states), default=0)
        return {"max_request_tokens_now": now,
                "max_request_tokens_merged": max(now, tm.max_req_input_len + 1)}

    @app.get("/version", responses=_responses(200, ok=VersionInfo))
    @app.get("/get_version", responses=_responses(200, ok=VersionInfo))
    async def version():
        return {"version": sglang.__version__}

    # ---- cache / abort -----------------------------------------------------------------------------------
    flushed = {"description": "Flushed.", "content": {"text/plain": {"schema": {"type": "string"}}}}

    @app.get("/flush_cache", response_class=PlainTextResponse, responses=_responses(200, 400, 503, ok=flushed))
    @app.post("/flush_cache", response_class=PlainTextResponse, responses=_responses(200, 400, 503, ok=flushed))
    async def flush_cache():
        ok = await tm.flush_cache()
        if ok:
            return PlainTextResponse("Cache flushed.\n", status_code=200)
        return error_response(400, "Cache not flushed: requests are running or waiting. Retry when idle.")

    @app.post("/abort_request", openapi_extra=_body(AbortRequestBody), response_class=Response,
              responses=_responses(200, 400, 413, ok={"description": "Abort sent (empty body)."}))
    async def abort_request(request: Request):
        data = await read_json(request)
        abort_all = data.get("abort_all", False)
        if not isinstance(abort_all, bool):
            raise APIError(400, "'abort_all' must be a boolean")
        if abort_all:
            await tm.abort_all()
            return Response(status_code=200)
        rid = data.get("rid")
        if not isinstance(rid, str) or not rid:
            raise APIError(400, "'rid' must be a non-empty string (or send {\"abort_all\": true})")
        await tm.abort_request(rid)
        return Response(status_code=200)

    # ---- sessions (SGLang's session API) -----------------------------------------------------------------------
    @app.api_route("/open_session", methods=["GET", "POST"], openapi_extra=_body(OpenSessionBody),
                   responses=_responses(200, 400, ok={"description": "The session id (a JSON string)."}))
    async def open_session(request: Request):
        data = await read_json(request)
        if "capacity_of_str_len" not in data:
            raise APIError(400, "'capacity_of_str_len' is required")
        obj = OpenSessionReqInput(data["capacity_of_str_len"], data.get("session_id"))
        return ORJSONResponse(await _map_errors(tm.open_session(obj)))

    @app.api_route("/close_session", methods=["GET", "POST"], openapi_extra=_body(CloseSessionBody),
                   response_class=Response, responses=_responses(200, 400, ok={"description": "Closed (empty body)."}))
    async def close_session(request: Request):
        data = await read_json(request)
        await _map_errors(tm.close_session(CloseSessionReqInput(data.get("session_id"))))
        return Response(status_code=200)

    @app.post("/sessions/move", responses=_responses(200, 400, ok={
        "description": "{session_id, instance, tokens, bytes}: the session's KV now lives on `instance`."}))
    async def move_session(request: Request):
        """Move an open session's pinned KV to another instance ({"session_id", "instance": leader device id}),
        while both keep serving (any TP degrees on either side)."""
        data = await read_json(request)
        return ORJSONResponse(await _map_errors(tm.move_session(data.get("session_id"), data.get("instance"))))

    # ---- Gyges admin ----------------------------------------------------------------------------------------
    @app.get("/gyges/topology", tags=["gyges-admin"], responses=_responses(200, 404, 503))
    async def gyges_topology():
        if not args.enable_gyges:
            raise APIError(404, "Gyges is off: start the server with --enable-gyges")
        return await tm.gyges_topology()

    @app.post("/gyges/transform", tags=["gyges-admin"], responses=_responses(200, 400, 404, 503))
    async def gyges_transform(request: Request):
        if not args.enable_gyges:
            raise APIError(404, "Gyges is off: start the server with --enable-gyges")
        data = await read_json(request)
        devices, tp = data.get("devices"), data.get("tp")
        return await tm.gyges_transform(devices, tp)  # ValueError (refused) -> 400 with the reason

    # ---- metrics -----------------------------------------------------------------------------------------
    @app.get("/metrics", response_class=PlainTextResponse, responses=_responses(200, 404, ok={
        "description": "Prometheus text format.", "content": {"text/plain": {"schema": {"type": "string"}}}}))
    async def metrics_route():
        if state.metrics is None:
            return error_response(404, "metrics are disabled (start the server with --enable-metrics)")
        try:
            state.metrics.set_load_from_states(await tm.get_internal_state())
        except Exception:  # noqa: BLE001 - render the last known load rather than fail the scrape
            logger.warning("could not refresh load gauges", exc_info=True)
        return Response(state.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    # ---- native generate ---------------------------------------------------------------------------------
    generate_doc = dict(openapi_extra=_body(GenerateRequest),
                        responses=_responses(200, 400, 408, 413, 500, 503, ok=_generate_ok()))

    @app.post("/generate", **generate_doc)
    @app.put("/generate", **generate_doc)
    async def generate(request: Request):
        return await _generate(request)

    @app.get("/generate", include_in_schema=False)
    async def generate_get(request: Request):
        return await _generate(request)

    async def _generate(request: Request):
        data = await read_json(request, allow_empty=request.method == "GET")
        if not data and request.method == "GET":
            data = dict(request.query_params)
            for key in ("sampling_params", "input_ids"):
                if key in data:
                    try:
                        data[key] = orjson.loads(data[key])
                    except orjson.JSONDecodeError as e:
                        raise APIError(400, f"query parameter '{key}' must be JSON: {e}") from e
            if "stream" in data:
                data["stream"] = data["stream"].lower() in ("1", "true", "yes")
        obj = generate_input_from_json(data)
        gen = tm.generate_request(obj, request)
        first = await _map_errors(first_output(gen))
        if not obj.stream:
            await gen.aclose()
            return ORJSONResponse(first)

        async def events():
            finished = False
            try:
                try:
                    if first is not None:
                        yield sse(first)
                    async for out in gen:
                        yield sse(out)
                except ValueError as e:
                    yield sse(error_body(400, str(e)))
                except (asyncio.CancelledError, GeneratorExit):
                    raise
                except Exception as e:  # noqa: BLE001 - the stream already started: report in-band
                    status = 503 if is_unavailable(e) else 500
                    if status == 500:
                        logger.exception("error while streaming /generate")
                    yield sse(error_body(status, str(e) if status == 503 else f"{type(e).__name__}: {e}"))
                yield SSE_DONE
                finished = True
            finally:
                if not finished:  # the client went away: free its pages now
                    for rid in _rids(obj):
                        asyncio.get_running_loop().create_task(_abort_quietly(tm, rid))

        return StreamingResponse(events(), media_type="text/event-stream")

    # ---- OpenAI API --------------------------------------------------------------------------------------
    @app.get("/v1/models", responses=_responses(200, ok=ModelList))
    async def v1_models():
        return state.openai.list_models()

    @app.get("/v1/models/{model_id:path}", responses=_responses(200, 404, ok=ModelCard))
    async def v1_model(model_id: str):
        state.openai.check_model(model_id)
        return state.openai.list_models()["data"][0]

    @app.post("/v1/completions", openapi_extra=_body(CompletionRequest),
              responses=_responses(200, 400, 404, 408, 413, 500, 503, ok=_openai_ok(CompletionResponse)))
    async def v1_completions(request: Request):
        data = await read_json(request)
        try:
            req = CompletionRequest.model_validate(data)
        except ValidationError as e:
            raise APIError(400, validation_message(e)) from e
        return await _map_errors(state.openai.completions(req, request))

    @app.post("/v1/chat/completions", openapi_extra=_body(ChatCompletionRequest),
              responses=_responses(200, 400, 404, 408, 413, 500, 503, ok=_openai_ok(ChatCompletionResponse)))
    async def v1_chat_completions(request: Request):
        data = await read_json(request)
        try:
            req = ChatCompletionRequest.model_validate(data)
        except ValidationError as e:
            raise APIError(400, validation_message(e)) from e
        return await _map_errors(state.openai.chat_completions(req, request))

    @app.post("/v1/score", openapi_extra=_body(ScoringRequest),
              responses=_responses(200, 400, 408, 413, 500, 503, ok=ScoringResponse))
    async def v1_score(request: Request):
        req = _validated(ScoringRequest, await read_json(request))
        return await _map_errors(state.score.score(req, request))

    @app.post("/v1/responses", openapi_extra=_body(ResponsesRequest),
              responses=_responses(200, 400, 408, 413, 500, 503))
    async def v1_responses(request: Request):
        req = _validated(ResponsesRequest, await read_json(request))
        return await _map_errors(state.responses.create(req, request))

    @app.post("/v1/embeddings", openapi_extra=_body(EmbeddingRequest),
              responses=_responses(200, 400, 408, 413, 500, 503, ok=EmbeddingResponse))
    async def v1_embeddings(request: Request):
        req = _validated(EmbeddingRequest, await read_json(request))
        return await _map_errors(state.embedding.embed(req, request))

    @app.api_route("/encode", methods=["POST", "PUT"], openapi_extra=_body(EncodeRequest),
                   responses=_responses(200, 400, 408, 413, 500, 503, ok=_one_or_list("EncodeResponse")))
    async def encode(request: Request):
        """SGLang's native embedding route: {"text" | "input_ids", "rid"} -> {"embedding", "meta_info"}
        (a list for a batch)."""
        data = await read_json(request)
        fields = ("text", "input_ids", "rid", "image_data", "audio_data", "video_data", "lora_path")
        obj = EmbeddingReqInput(**{k: data[k] for k in fields if k in data})
        return ORJSONResponse(await _map_errors(first_output(tm.generate_request(obj, request))))

    return app


def _validated(model, data: Dict[str, Any]):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise APIError(400, validation_message(e)) from e


async def _map_errors(coro):
    """Input errors -> 400, lost workers -> 503 (APIError); anything else propagates."""
    try:
        return await coro
    except APIError:
        raise
    except ValueError as e:
        raise APIError(400, str(e)) from e
    except Exception as e:
        if is_unavailable(e):
            raise APIError(503, str(e) or "the server's workers are not available") from e
        raise


async def _abort_quietly(tm, rid: str) -> None:
    try:
        await tm.abort_request(rid)
    except Exception:  # noqa: BLE001 - best effort
        logger.debug("abort of %s failed", rid, exc_info=True)


# ----------------------------------------------------------------------------------------------------------
# Process lifetime
# ----------------------------------------------------------------------------------------------------------
def _reap_children(timeout: float = 10.0) -> None:
    """Terminate (then kill) any child process of this server still alive: none may outlive it."""
    try:
        children = psutil.Process().children(recursive=True)
        # multiprocessing's resource tracker ignores SIGTERM and exits by itself when this process does.
        children = [p for p in children if "resource_tracker" not in " ".join(p.cmdline())]
    except psutil.Error:
        return
    for p in children:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=timeout)


class _Shutdown:
    """Calls tm.shutdown() once, however many paths (lifespan exit, signal, finally) ask for it."""

    def __init__(self):
        self.tm = None
        self.done = False

    def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        if self.tm is not None:
            try:
                self.tm.shutdown()
            except Exception:  # noqa: BLE001 - still reap below
                logger.exception("tokenizer manager shutdown failed")
        _reap_children()


class ServingFailed(RuntimeError):
    """The server stopped because it could no longer serve (no instance left, a core process died)."""


def uvicorn_config(app, server_args):
    import uvicorn

    return uvicorn.Config(app, host=server_args.host, port=server_args.port, loop="uvloop",
                          http=header_timeout_protocol(server_args.timeout_request_read),
                          log_level=server_args.log_level, timeout_keep_alive=server_args.timeout_keep_alive,
                          limit_concurrency=server_args.limit_concurrency, timeout_graceful_shutdown=5,
                          access_log=server_args.log_level == "debug")


def make_uvicorn_server(app, config):
    """uvicorn.Server that, on SIGINT / SIGTERM, first fails every in-flight request with a 503 (JSON, or an
    error event + [DONE] on streams) so that the graceful shutdown finishes them instead of cutting them."""
    import uvicorn

    state: ServerState = app.state.server

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            loop = state.loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(state.tm.begin_shutdown, f"the server is shutting down (signal {sig})")
            super().handle_exit(sig, frame)

    server = Server(config)

    def on_fatal(reason: str) -> None:  # runs on the event loop
        state.fatal_reason = reason
        logger.error("the server cannot serve any more (%s); exiting", reason)
        server.should_exit = True

    state.tm.on_fatal = on_fatal
    return server


def bind_http_socket(host: str, port: int) -> socket.socket:
    """The listening address, bound before any child process starts: the workers' torch.distributed (gloo)
    connections take ephemeral ports, and one of them could otherwise take the HTTP port during start-up
    (the server then failed with 'address already in use' after loading the model). A port in use fails
    here, at once."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise RuntimeError(f"the HTTP server cannot listen on {host}:{port}: {e}") from e
    sock.set_inheritable(False)
    return sock


def launch_server(server_args) -> None:
    """Start every process, serve HTTP until SIGINT/SIGTERM (or until nothing can serve: ServingFailed), then
    stop every process and remove the ipc files."""
    from sglang.srt.entrypoints.engine import launch_subprocesses

    shutdown = _Shutdown()

    def _interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGTERM behaves like Ctrl-C for the whole life of the server: during start-up it interrupts the
    # launch (which stops what it started); while serving, uvicorn captures it, shuts down gracefully and
    # then re-raises it into this handler, so the `finally` below always stops the child processes.
    signal.signal(signal.SIGTERM, _interrupt)
    sock = bind_http_socket(server_args.host, server_args.port)
    try:
        tm = launch_subprocesses(server_args)
        shutdown.tm = tm
        metrics = None
        if server_args.enable_metrics:
            metrics = MetricsCollector(model_name=server_args.served_model_name)
            tm.metrics = metrics
        app = create_app(tm, metrics)
        server = make_uvicorn_server(app, uvicorn_config(app, server_args))
        logger.info("HTTP server on http://%s:%d", server_args.host, server_args.port)
        server.run(sockets=[sock])
        if not server.started:
            raise RuntimeError(f"the HTTP server could not start on {server_args.host}:{server_args.port}")
        if app.state.server.warmup_error:
            raise RuntimeError(f"warm-up failed: {app.state.server.warmup_error}")
        if app.state.server.fatal_reason:
            raise ServingFailed(app.state.server.fatal_reason)
    finally:
        sock.close()
        shutdown()
