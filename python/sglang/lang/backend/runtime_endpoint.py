"""RuntimeEndpoint: runs programs on a server with SGLang's native API (this one, or SGLang's), over HTTP;
Runtime: starts this package's server in a subprocess and serves through a RuntimeEndpoint.

Requests (the same ones SGLang's language sends, so that a server sees the same traffic):

    connect          GET  /get_model_info                    model path, chat template
    gen              POST /generate {"text": s.text_, "sampling_params": {...}, logprob fields}
                     (stream=True: SSE, cumulative "text" per event -> deltas)
    typed gen        dtype int/float/str/bool -> the matching REGEX_* (ir.py); int/float also stop at " "/"\\n"
    select           1. POST /generate {"text": prefix, max_new_tokens 0}      -> prompt_tokens; the prefix
                        is now in the radix cache
                     2. POST /generate {"text": [prefix + c for c in choices], max_new_tokens 0,
                        return_logprob, logprob_start_len = prompt_tokens - 2}  -> each choice's prompt
                        logprobs from one token before the prefix's end (token healing, choices.py)
                     3. unconditional_likelihood_normalized only: POST /generate {"input_ids": the choices'
                        token ids alone, return_logprob}
    fork / run_batch POST /generate {"text": shared prefix, max_new_tokens 0}   (prefill once, cache it)
    flush_cache      POST /flush_cache;  get_server_info: GET /get_server_info

Any non-200 answer raises RuntimeError carrying the status and the server's error message; an unreachable
server raises RuntimeError naming the URL.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import requests

from sglang.lang.backend.base_backend import BaseBackend
from sglang.lang.chat_template import chat_template_for_server, get_chat_template
from sglang.lang.choices import (
    ChoicesDecision,
    ChoicesSamplingMethod,
    drop_unhealed_token,
    normalized_prompt_logprob,
)
from sglang.lang.global_config import global_config
from sglang.lang.ir import LOGPROB_FIELDS, REGEX_BOOL, REGEX_FLOAT, REGEX_INT, REGEX_STR, SglSamplingParams

CONNECT_TIMEOUT_S = 10.0


class ServerError(RuntimeError):
    """A request the server answered with an error (status and message from its body)."""

    def __init__(self, status: int, message: str, url: str):
        super().__init__(f"{url} answered {status}: {message}")
        self.status = status
        self.message = message


def error_message(res: requests.Response) -> str:
    try:
        body = res.json()
    except ValueError:
        return res.text.strip() or res.reason
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", body))
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])
    return json.dumps(body)


def dtype_regex(params: SglSamplingParams) -> None:
    """dtype=int/float/str/bool -> the regex that constrains the output (in place)."""
    dtype = params.dtype
    if dtype is None:
        return
    table = {"int": (REGEX_INT, True), "float": (REGEX_FLOAT, True), "str": (REGEX_STR, False),
             "bool": (REGEX_BOOL, False)}
    key = dtype.__name__ if isinstance(dtype, type) else dtype
    if key not in table:
        raise ValueError(f"dtype must be int, float, str or bool, got {dtype!r}")
    regex, stops = table[key]
    params.regex = regex
    if stops:
        params.stop = params.stop_list() + [" ", "\n"]


class RuntimeEndpoint(BaseBackend):
    support_concate_and_append = False

    def __init__(self, base_url: str, api_key: Optional[str] = None, verify: Optional[str] = None,
                 chat_template_name: Optional[str] = None):
        super().__init__()
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.verify = verify
        self._local = threading.local()  # one HTTP session (connection pool) per thread
        self.model_info = self._get("/get_model_info").json()
        self.chat_template = (get_chat_template(chat_template_name) if chat_template_name
                              else chat_template_for_server(self.model_info))

    # ---- HTTP ----------------------------------------------------------------------------------------
    def _session(self) -> requests.Session:
        sess = getattr(self._local, "session", None)
        if sess is None:
            sess = requests.Session()
            if self.api_key:
                sess.headers["Authorization"] = f"Bearer {self.api_key}"
            if self.verify is not None:
                sess.verify = self.verify
            self._local.session = sess
        return sess

    def _request(self, method: str, path: str, **kw) -> requests.Response:
        url = self.base_url + path
        try:
            res = self._session().request(method, url, timeout=(CONNECT_TIMEOUT_S, None), **kw)
        except requests.RequestException as e:
            raise RuntimeError(f"cannot reach the SGLang server at {self.base_url}: {e}") from e
        if res.status_code != 200:
            raise ServerError(res.status_code, error_message(res), url)
        return res

    def _get(self, path: str) -> requests.Response:
        return self._request("GET", path)

    def _post(self, path: str, body: Optional[dict] = None, stream: bool = False) -> requests.Response:
        return self._request("POST", path, json=body, stream=stream)

    def _generate(self, body: dict) -> Any:
        return self._post("/generate", body).json()

    # ---- server info ---------------------------------------------------------------------------------
    def get_model_name(self) -> str:
        return self.model_info["model_path"]

    def flush_cache(self) -> None:
        self._post("/flush_cache")

    def get_server_info(self) -> dict:
        return self._get("/get_server_info").json()

    def cache_prefix(self, prefix_str: str) -> None:
        self._generate({"text": prefix_str, "sampling_params": {"max_new_tokens": 0}})

    def commit_lazy_operations(self, s) -> None:
        self._generate({"text": s.text_, "sampling_params": {"max_new_tokens": 0}})

    # ---- gen -----------------------------------------------------------------------------------------
    def _gen_body(self, s, params: SglSamplingParams) -> dict:
        dtype_regex(params)
        body: Dict[str, Any] = {"text": s.text_, "sampling_params": {
            "skip_special_tokens": global_config.skip_special_tokens_in_output,
            "spaces_between_special_tokens": global_config.spaces_between_special_tokens_in_out,
            **params.to_srt_kwargs()}}
        for name in LOGPROB_FIELDS:
            value = getattr(params, name)
            if value is not None:
                body[name] = value
        return body

    def generate(self, s, sampling_params: SglSamplingParams):
        out = self._generate(self._gen_body(s, sampling_params))
        if isinstance(out, list):  # n > 1
            return [o["text"] for o in out], [o["meta_info"] for o in out]
        return out["text"], out["meta_info"]

    def generate_stream(self, s, sampling_params: SglSamplingParams) -> Iterator[Tuple[str, dict]]:
        body = self._gen_body(s, sampling_params)
        body["stream"] = True
        res = self._post("/generate", body, stream=True)
        sent = 0
        with res:
            for line in res.iter_lines(decode_unicode=False):
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                event = json.loads(payload)
                if "error" in event:  # the stream had started when the request failed
                    err = event["error"]
                    raise ServerError(err.get("code", 500), err.get("message", str(err)),
                                      self.base_url + "/generate")
                text = event["text"]
                piece = text[sent:]
                sent = len(text)
                yield piece, event["meta_info"]

    # ---- select --------------------------------------------------------------------------------------
    def select(self, s, choices: List[str], temperature: float,
               choices_method: ChoicesSamplingMethod) -> ChoicesDecision:
        if temperature > 1e-5:
            raise ValueError(f"select scores the choices greedily; temperature must be 0, got {temperature}")
        prefix = s.text_
        prompt_len = self._generate({"text": prefix, "sampling_params": {"max_new_tokens": 0}})[
            "meta_info"]["prompt_tokens"]
        outs = self._generate({
            "text": [prefix + c for c in choices],
            "sampling_params": {"max_new_tokens": 0, "temperature": 0},
            "return_logprob": True, "return_text_in_logprobs": True,
            "logprob_start_len": max(prompt_len - 2, 0)})
        inputs, normalized, outputs = [], [], []
        for o in outs:
            entries = o["meta_info"]["input_token_logprobs"]
            entries, norm = drop_unhealed_token(prefix, entries, normalized_prompt_logprob(entries))
            inputs.append(entries)
            normalized.append(norm)
            outputs.append(o["meta_info"].get("output_token_logprobs"))
        unconditional = None
        if choices_method.requires_unconditional_logprobs:
            ids = [[e[1] for e in entries] for entries in inputs]
            res = self._generate({"input_ids": ids, "sampling_params": {"max_new_tokens": 0},
                                  "return_logprob": True})
            unconditional = [r["meta_info"]["input_token_logprobs"] for r in res]
        return choices_method(choices=choices, normalized_prompt_logprobs=normalized,
                              input_token_logprobs=inputs, output_token_logprobs=outputs,
                              unconditional_token_logprobs=unconditional)


# ----------------------------------------------------------------------------------------------------------
def _server_cli_args(kwargs: Dict[str, Any]) -> List[str]:
    """ServerArgs keyword arguments -> launch_server flags (unknown names: TypeError listing the known)."""
    import dataclasses

    from sglang.srt.server_args import ServerArgs

    fields = {f.name: f for f in dataclasses.fields(ServerArgs)}
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise TypeError(f"unknown server argument(s) {unknown}; see python -m sglang.launch_server --help")
    argv: List[str] = []
    for name, value in kwargs.items():
        flag = "--" + name.replace("_", "-")
        if fields[name].type in ("bool", bool):
            if value:
                argv.append(flag)
            elif fields[name].default:
                argv.append("--no-" + name.replace("_", "-"))
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def _answers_healthy(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.RequestException:
        return False


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Runtime:
    """This package's server in a subprocess (`python -m sglang.launch_server`), for programs:

        runtime = sgl.Runtime(model_path="/tmp/demo-llama", device="cpu")
        sgl.set_default_backend(runtime)
        ...
        runtime.shutdown()
    """

    def __init__(self, log_level: str = "error", start_timeout: float = 600.0, **server_args):
        server_args.setdefault("host", "127.0.0.1")
        if "port" not in server_args:
            server_args["port"] = _free_port()
        self.port = server_args["port"]
        self.url = f"http://{server_args['host']}:{self.port}"
        self.generate_url = self.url + "/generate"
        self.api_key = server_args.get("api_key")
        argv = [sys.executable, "-m", "sglang.launch_server", *_server_cli_args(
            {"log_level": log_level, **server_args})]
        self.proc: Optional[subprocess.Popen] = subprocess.Popen(argv, start_new_session=True)
        self.pid = self.proc.pid
        atexit.register(self.shutdown)
        try:
            self._wait_healthy(start_timeout)
            self.endpoint = RuntimeEndpoint(self.url, api_key=self.api_key)
        except BaseException:
            self.shutdown()
            raise

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not _answers_healthy(self.url + "/health"):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode} during start-up "
                                   f"(its log is above)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server at {self.url} was not healthy within {timeout:.0f} s")
            time.sleep(0.5)

    def shutdown(self) -> None:
        """Stop the server (SIGTERM: it stops every process it started) and wait for it."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    # conveniences SGLang's Runtime has
    def cache_prefix(self, prefix: str) -> None:
        self.endpoint.cache_prefix(prefix)

    def get_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.endpoint.model_info.get("tokenizer_path")
                                             or self.endpoint.get_model_name())

    def generate(self, prompt, sampling_params: Optional[dict] = None, return_logprob: bool = False,
                 logprob_start_len: int = -1, top_logprobs_num: int = 0) -> str:
        body = {"text": prompt, "sampling_params": sampling_params or {}, "return_logprob": return_logprob,
                "logprob_start_len": logprob_start_len, "top_logprobs_num": top_logprobs_num}
        return json.dumps(self.endpoint._generate(body))

    def __del__(self):
        try:
            self.shutdown()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
