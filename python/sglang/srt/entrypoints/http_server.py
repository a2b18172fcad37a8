"""The HTTP server: SGLang's native API and the OpenAI API on FastAPI + uvicorn (uvloop, orjson).

Data flow:
    launch_server(server_args)
      -> engine.launch_subprocesses()            controller, workers, detokenizer; returns the TokenizerManager
      -> MetricsCollector attached to the TM     (the TM reports latencies and token counts into it)
      -> create_app(tm)                          FastAPI routes below
      -> uvicorn (uvloop) serves; on start-up a warm-up generation runs, and only when it finished does
         /health answer 200 (503 before, and 503 again once a worker process died)
      -> SIGINT / SIGTERM: uvicorn stops accepting, the lifespan exit calls tm.shutdown(), and any child
         process still alive afterwards is terminated, so no process outlives the server.

    request -> [ApiKeyMiddleware] -> route
      /generate            JSON -> GenerateReqInput -> tm.generate_request -> JSON, or SSE
                           ("data: {json}\n\n" with cumulative text ..., "data: [DONE]\n\n")
      /v1/*                pydantic models (openai/protocol.py) -> OpenAIServing (openai/serving.py)
      /get_server_info     server args + KV capacity + version + tm.get_internal_state()
      /metrics             tm.get_internal_state() -> load gauges -> Prometheus text

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
import time
from contextlib import asynccontextmanager
from typing import Any, Dict, List, Optional

import orjson
import psutil
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

import sglang
from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from sglang.srt.entrypoints.openai.serving import (
    SSE_DONE,
    APIError,
    ORJSONResponse,
    OpenAIServing,
    error_body,
    error_response,
    first_output,
    sse,
)
from sglang.srt.managers.io_struct import GenerateReqInput
from sglang.srt.metrics.collector import CONTENT_TYPE as METRICS_CONTENT_TYPE
from sglang.srt.metrics.collector import MetricsCollector

logger = logging.getLogger(__name__)

HEALTH_GENERATE_TIMEOUT_S = 60.0
# Top-level fields of /generate that reach GenerateReqInput (the rest of SGLang's fields are ignored).
_GENERATE_FIELDS = ("text", "input_ids", "sampling_params", "rid", "return_logprob", "logprob_start_len",
                    "top_logprobs_num", "return_text_in_logprobs", "stream", "log_metrics", "modalities",
                    "lora_path", "image_data", "custom_logit_processor", "return_hidden_states")
_BOOL_FIELDS = ("stream", "return_text_in_logprobs", "return_hidden_states", "log_metrics")


def _is_unavailable(exc: BaseException) -> bool:
    """tokenizer_manager.ServerUnavailableError, matched by name so this module imports without it."""
    return any(t.__name__ == "ServerUnavailableError" for t in type(exc).__mro__)


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
        self.ready = False  # set once the warm-up generation finished
        self.warmup_error: Optional[str] = None

    def healthy(self) -> bool:
        try:
            return self.ready and bool(self.tm.is_healthy())
        except Exception:  # noqa: BLE001 - a broken TM is not healthy
            return False

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
# The app
# ----------------------------------------------------------------------------------------------------------
def create_app(tokenizer_manager, metrics: Optional[MetricsCollector] = None, run_warmup: bool = True) -> FastAPI:
    state = ServerState(tokenizer_manager, metrics)
    tm = tokenizer_manager
    args = state.server_args

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(state.warmup()) if run_warmup else None
        if not run_warmup:
            state.ready = True
        try:
            yield
        finally:
            if task is not None and not task.done():
                task.cancel()

    app = FastAPI(title="SGLang-compatible server (Gyges)", version=sglang.__version__, lifespan=lifespan,
                  default_response_class=ORJSONResponse, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.server = state
    if args.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=args.api_key)

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
        if _is_unavailable(exc):
            return error_response(503, str(exc) or "the server's workers are not available")
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(500, f"{type(exc).__name__}: {exc}")

    # ---- health ------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not state.ready:
            return error_response(503, state.warmup_error or "the server is starting (warm-up not finished)")
        if not state.healthy():
            return error_response(503, "a worker process died; the server cannot serve")
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_generate(request: Request):
        if not state.healthy():
            return error_response(503, "the server is not ready or a worker process died")
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
        }

    @app.get("/get_model_info")
    async def get_model_info():
        return model_info()

    @app.get("/model_info")
    async def model_info_route():
        return model_info()

    async def server_info() -> dict:
        info = dataclasses.asdict(args)
        if info.get("api_key"):
            info["api_key"] = "<redacted>"
        states = await tm.get_internal_state()
        info.update(
            max_total_num_tokens=tm.max_total_num_tokens,
            max_req_input_len=tm.max_req_input_len,
            version=sglang.__version__,
            internal_states=list(states),
        )
        return info

    @app.get("/get_server_info")
    async def get_server_info():
        return await server_info()

    @app.get("/server_info")
    async def server_info_route():
        return await server_info()

    @app.get("/version")
    @app.get("/get_version")
    async def version():
        return {"version": sglang.__version__}

    # ---- cache / abort -----------------------------------------------------------------------------------
    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        ok = await tm.flush_cache()
        if ok:
            return PlainTextResponse("Cache flushed.\n", status_code=200)
        return error_response(400, "Cache not flushed: requests are running or waiting. Retry when idle.")

    @app.post("/abort_request")
    async def abort_request(request: Request):
        data = await read_json(request)
        if data.get("abort_all"):
            rid = ""
        else:
            rid = data.get("rid")
            if not isinstance(rid, str) or not rid:
                raise APIError(400, "'rid' must be a non-empty string (or send {\"abort_all\": true})")
        await tm.abort_request(rid)
        return Response(status_code=200)

    # ---- Gyges admin ----------------------------------------------------------------------------------------
    @app.get("/gyges/topology")
    async def gyges_topology():
        if not args.enable_gyges:
            raise APIError(404, "Gyges is off: start the server with --enable-gyges")
        return await tm.gyges_topology()

    @app.post("/gyges/transform")
    async def gyges_transform(request: Request):
        if not args.enable_gyges:
            raise APIError(404, "Gyges is off: start the server with --enable-gyges")
        data = await read_json(request)
        devices, tp = data.get("devices"), data.get("tp")
        return await tm.gyges_transform(devices, tp)  # ValueError (refused) -> 400 with the reason

    # ---- metrics -----------------------------------------------------------------------------------------
    @app.get("/metrics")
    async def metrics_route():
        if state.metrics is None:
            return error_response(404, "metrics are disabled (start the server with --enable-metrics)")
        try:
            state.metrics.set_load_from_states(await tm.get_internal_state())
        except Exception:  # noqa: BLE001 - render the last known load rather than fail the scrape
            logger.warning("could not refresh load gauges", exc_info=True)
        return Response(state.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    # ---- native generate ---------------------------------------------------------------------------------
    @app.api_route("/generate", methods=["POST", "PUT", "GET"])
    async def generate(request: Request):
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
                    status = 503 if _is_unavailable(e) else 500
                    if status == 500:
                        logger.exception("error while streaming /generate")
                    yield sse(error_body(status, f"{type(e).__name__}: {e}"))
                yield SSE_DONE
                finished = True
            finally:
                if not finished:  # the client went away: free its pages now
                    for rid in _rids(obj):
                        asyncio.get_running_loop().create_task(_abort_quietly(tm, rid))

        return StreamingResponse(events(), media_type="text/event-stream")

    # ---- OpenAI API --------------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def v1_models():
        return state.openai.list_models()

    @app.get("/v1/models/{model_id:path}")
    async def v1_model(model_id: str):
        state.openai.check_model(model_id)
        return state.openai.list_models()["data"][0]

    @app.post("/v1/completions")
    async def v1_completions(request: Request):
        data = await read_json(request)
        try:
            req = CompletionRequest.model_validate(data)
        except ValidationError as e:
            raise APIError(400, validation_message(e)) from e
        return await _map_errors(state.openai.completions(req, request))

    @app.post("/v1/chat/completions")
    async def v1_chat_completions(request: Request):
        data = await read_json(request)
        try:
            req = ChatCompletionRequest.model_validate(data)
        except ValidationError as e:
            raise APIError(400, validation_message(e)) from e
        return await _map_errors(state.openai.chat_completions(req, request))

    return app


async def _map_errors(coro):
    """Input errors -> 400, lost workers -> 503 (APIError); anything else propagates."""
    try:
        return await coro
    except APIError:
        raise
    except ValueError as e:
        raise APIError(400, str(e)) from e
    except Exception as e:
        if _is_unavailable(e):
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


def launch_server(server_args) -> None:
    """Start every process, serve HTTP until SIGINT/SIGTERM, then stop every process."""
    import uvicorn

    from sglang.srt.entrypoints.engine import launch_subprocesses

    shutdown = _Shutdown()

    def _interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGTERM behaves like Ctrl-C for the whole life of the server: during start-up it interrupts the
    # launch (which stops what it started); while serving, uvicorn captures it, shuts down gracefully and
    # then re-raises it into this handler, so the `finally` below always stops the child processes.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        tm = launch_subprocesses(server_args)
        shutdown.tm = tm
        metrics = None
        if server_args.enable_metrics:
            metrics = MetricsCollector(model_name=server_args.served_model_name)
            tm.metrics = metrics
        app = create_app(tm, metrics)
        config = uvicorn.Config(app, host=server_args.host, port=server_args.port, loop="uvloop",
                                log_level=server_args.log_level, timeout_keep_alive=5,
                                timeout_graceful_shutdown=5, access_log=server_args.log_level == "debug")
        server = uvicorn.Server(config)
        logger.info("HTTP server on http://%s:%d", server_args.host, server_args.port)
        server.run()
        if not server.started:
            raise RuntimeError(f"the HTTP server could not start on {server_args.host}:{server_args.port}")
        if app.state.server.warmup_error:
            raise RuntimeError(f"warm-up failed: {app.state.server.warmup_error}")
    finally:
        shutdown()
