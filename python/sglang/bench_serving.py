"""Online serving benchmark, with SGLang's `python -m sglang.bench_serving` flags and summary.

    python -m sglang.bench_serving --backend sglang --port 30000 --dataset-name random-ids \
        --num-prompts 100 --random-input-len 256 --random-output-len 64 --tokenizer /tmp/demo-llama

Data flow:
    dataset (sharegpt file | random: ShareGPT text cut/repeated to the sampled lengths | random-ids: token
    ids | generated-shared-prefix: groups of prompts sharing a long system prompt)
      -> DatasetRow(prompt, prompt_len, output_len)
      -> optional warm-up request, optional /flush_cache
      -> arrivals: all at once (--request-rate inf) or Poisson at the given rate; --max-concurrency bounds
         how many are in flight
      -> one request function per backend (aiohttp, streaming by default):
           sglang           POST /generate             (cumulative text events; completion_tokens from meta)
           sglang-oai, vllm POST /v1/completions        (text deltas; tokens from the usage chunk)
           sglang-oai-chat  POST /v1/chat/completions   (one user message)
         -> RequestFuncOutput(success, latency, ttft, itl, output_len, error)
      -> metrics (throughput, TTFT / ITL / TPOT / E2E percentiles) -> printed summary -> one JSON line
         appended to --output-file
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Dict, List, Optional

import numpy as np

SHAREGPT_URL = ("https://huggingface.co/datasets/anon8231489123/ShareGPT_Vicuna_unfiltered/resolve/main/"
                "ShareGPT_V3_unfiltered_cleaned_split.json")
AIOHTTP_TIMEOUT_S = 6 * 60 * 60


@dataclass
class DatasetRow:
    prompt: Any  # text, or token ids (--tokenize-prompt / random-ids without --return-text)
    prompt_len: int
    output_len: int


@dataclass
class RequestFuncInput:
    prompt: Any
    api_url: str
    prompt_len: int
    output_len: int
    model: str
    extra_request_body: Dict[str, Any] = field(default_factory=dict)


@dataclass
class RequestFuncOutput:
    generated_text: str = ""
    success: bool = False
    latency: float = 0.0
    ttft: float = 0.0
    itl: List[float] = field(default_factory=list)  # seconds between streamed chunks
    prompt_len: int = 0
    output_len: int = 0
    error: str = ""


# ----------------------------------------------------------------------------------------------------------
# Request functions
# ----------------------------------------------------------------------------------------------------------
def _headers() -> Dict[str, str]:
    key = os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


async def _sse_payloads(response):
    """The data payloads of an SSE body, as they arrive ("[DONE]" ends it)."""
    buf = b""
    async for chunk in response.content.iter_any():
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                return
            yield json.loads(payload)


async def _run_request(session, url: str, payload: dict, inp: RequestFuncInput, stream: bool,
                       read_event: Callable[[dict, RequestFuncOutput], str]) -> RequestFuncOutput:
    """POST payload; `read_event(event, out)` returns the new text of one event (and may set output_len)."""
    out = RequestFuncOutput(prompt_len=inp.prompt_len, output_len=inp.output_len)
    start = time.perf_counter()
    last = start
    try:
        async with session.post(url, json=payload, headers=_headers()) as resp:
            if resp.status != 200:
                out.error = f"{resp.status} {(await resp.text())[:500]}"
                return out
            if not stream:
                event = await resp.json()
                out.generated_text = read_event(event, out)
                out.latency = out.ttft = time.perf_counter() - start
                out.success = True
                return out
            async for event in _sse_payloads(resp):
                if "error" in event:
                    out.error = str(event["error"])
                    return out
                piece = read_event(event, out)
                now = time.perf_counter()
                if piece:
                    if not out.generated_text and out.ttft == 0.0:
                        out.ttft = now - start
                    else:
                        out.itl.append(now - last)
                    last = now
                    out.generated_text += piece
            out.latency = time.perf_counter() - start
            out.success = True
    except Exception:  # noqa: BLE001 - a failed request is counted, the benchmark goes on
        out.error = "".join(traceback.format_exception(*sys.exc_info()))[-2000:]
    return out


async def request_sglang_generate(session, inp: RequestFuncInput, args) -> RequestFuncOutput:
    prompt_key = "input_ids" if isinstance(inp.prompt, list) else "text"
    payload = {prompt_key: inp.prompt, "stream": not args.disable_stream,
               "sampling_params": {"temperature": 0.0, "max_new_tokens": inp.output_len,
                                   "ignore_eos": not args.disable_ignore_eos},
               **({"return_logprob": True} if args.return_logprob else {}), **inp.extra_request_body}
    seen = {"text": ""}

    def read(event, out):
        text = event.get("text", "")
        piece = text[len(seen["text"]):]
        seen["text"] = text
        out.output_len = event.get("meta_info", {}).get("completion_tokens", out.output_len)
        return piece

    return await _run_request(session, inp.api_url, payload, inp, not args.disable_stream, read)


def _usage_tokens(event, out) -> None:
    usage = event.get("usage")
    if usage and usage.get("completion_tokens") is not None:
        out.output_len = usage["completion_tokens"]


async def request_openai_completions(session, inp: RequestFuncInput, args) -> RequestFuncOutput:
    stream = not args.disable_stream
    payload = {"model": inp.model, "prompt": inp.prompt, "temperature": 0.0, "best_of": 1,
               "max_tokens": inp.output_len, "stream": stream, "ignore_eos": not args.disable_ignore_eos,
               **({"stream_options": {"include_usage": True}} if stream else {}), **inp.extra_request_body}

    def read(event, out):
        _usage_tokens(event, out)
        choices = event.get("choices") or []
        return choices[0].get("text") or "" if choices else ""

    return await _run_request(session, inp.api_url, payload, inp, stream, read)


async def request_openai_chat(session, inp: RequestFuncInput, args) -> RequestFuncOutput:
    stream = not args.disable_stream
    content = inp.prompt if isinstance(inp.prompt, str) else json.dumps(inp.prompt)
    payload = {"model": inp.model, "messages": [{"role": "user", "content": content}], "temperature": 0.0,
               "max_tokens": inp.output_len, "stream": stream, "ignore_eos": not args.disable_ignore_eos,
               **({"stream_options": {"include_usage": True}} if stream else {}), **inp.extra_request_body}

    def read(event, out):
        _usage_tokens(event, out)
        choices = event.get("choices") or []
        if not choices:
            return ""
        part = choices[0].get("delta") if stream else choices[0].get("message")
        return (part or {}).get("content") or ""

    return await _run_request(session, inp.api_url, payload, inp, stream, read)


# backend -> (request function, API path)
BACKENDS = {
    "sglang": (request_sglang_generate, "/generate"),
    "sglang-native": (request_sglang_generate, "/generate"),
    "sglang-oai": (request_openai_completions, "/v1/completions"),
    "vllm": (request_openai_completions, "/v1/completions"),
    "sglang-oai-chat": (request_openai_chat, "/v1/chat/completions"),
    "vllm-chat": (request_openai_chat, "/v1/chat/completions"),
}


# ----------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------
def _sharegpt_pairs(dataset_path: Optional[str]) -> List[tuple]:
    from sglang.utils import download_and_cache_file, is_file_valid_json

    if not is_file_valid_json(dataset_path):
        if dataset_path:
            raise SystemExit(f"--dataset-path {dataset_path!r} is not a JSON file")
        dataset_path = download_and_cache_file(SHAREGPT_URL)
    with open(dataset_path, encoding="utf-8") as f:
        data = json.load(f)
    pairs = []
    for d in data:
        turns = d.get("conversations", d.get("conversation", []))
        if len(turns) >= 2:
            pairs.append((turns[0]["value"], turns[1]["value"]))
    random.shuffle(pairs)
    return pairs


def sample_sharegpt_requests(dataset_path: Optional[str], num_requests: int, tokenizer,
                             fixed_output_len: Optional[int] = None,
                             context_len: Optional[int] = None) -> List[DatasetRow]:
    rows = []
    for prompt, completion in _sharegpt_pairs(dataset_path):
        if len(rows) == num_requests:
            break
        prompt_len = len(tokenizer.encode(prompt))
        output_len = fixed_output_len or len(tokenizer.encode(completion))
        if prompt_len < 2 or output_len < 2:
            continue
        if context_len and prompt_len + output_len > context_len:
            continue
        rows.append(DatasetRow(prompt, prompt_len, output_len))
    return rows


def _lengths(mean: int, ratio: float, n: int, minimum: int) -> np.ndarray:
    return np.random.randint(max(int(mean * ratio), minimum), mean + 1, size=n)


def sample_random_requests(input_len: int, output_len: int, num_prompts: int, range_ratio: float, tokenizer,
                           dataset_path: Optional[str], random_sample: bool = True,
                           return_text: bool = True) -> List[DatasetRow]:
    """random: ShareGPT prompts cut or repeated to lengths drawn from [ratio * len, len]; random-ids: token ids
    counting up from a random offset (decoded to text unless return_text is False)."""
    in_lens = _lengths(input_len, range_ratio, num_prompts, 1)
    out_lens = _lengths(output_len, range_ratio, num_prompts, 0)
    rows = []
    if random_sample:
        for prompt, _ in _sharegpt_pairs(dataset_path):
            i = len(rows)
            if i == num_prompts:
                break
            ids = tokenizer.encode(prompt)
            if not ids:
                continue
            ids = (ids * ((int(in_lens[i]) + len(ids) - 1) // len(ids)))[:int(in_lens[i])]
            rows.append(DatasetRow(tokenizer.decode(ids) if return_text else ids, int(in_lens[i]),
                                   int(out_lens[i])))
        return rows
    vocab = tokenizer.vocab_size
    offsets = np.random.randint(0, vocab, size=num_prompts)
    for i in range(num_prompts):
        ids = [int((offsets[i] + i + j) % vocab) for j in range(int(in_lens[i]))]
        rows.append(DatasetRow(tokenizer.decode(ids) if return_text else ids, int(in_lens[i]), int(out_lens[i])))
    return rows


def _random_text(tokenizer, num_tokens: int) -> str:
    vocab = tokenizer.vocab_size
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = []
    while len(ids) < num_tokens:
        t = random.randrange(vocab)
        if t not in specials:
            ids.append(t)
    return tokenizer.decode(ids)


def sample_generated_shared_prefix_requests(num_groups: int, prompts_per_group: int, system_prompt_len: int,
                                            question_len: int, output_len: int, tokenizer) -> List[DatasetRow]:
    """num_groups long system prompts, each followed by prompts_per_group different questions (shuffled)."""
    rows = []
    for _ in range(num_groups):
        system = _random_text(tokenizer, system_prompt_len)
        for _ in range(prompts_per_group):
            prompt = f"{system}\n\n{_random_text(tokenizer, question_len)}"
            rows.append(DatasetRow(prompt, len(tokenizer.encode(prompt)), output_len))
    random.shuffle(rows)
    print(f"\nGenerated shared prefix dataset: {num_groups} groups x {prompts_per_group} prompts, "
          f"{sum(r.prompt_len for r in rows)} input tokens, {sum(r.output_len for r in rows)} output tokens")
    return rows


def get_dataset(args, tokenizer) -> List[DatasetRow]:
    name = args.dataset_name
    if name == "sharegpt":
        rows = sample_sharegpt_requests(args.dataset_path, args.num_prompts, tokenizer, args.sharegpt_output_len,
                                        args.sharegpt_context_len)
    elif name in ("random", "random-ids"):
        rows = sample_random_requests(args.random_input_len, args.random_output_len, args.num_prompts,
                                      args.random_range_ratio, tokenizer, args.dataset_path,
                                      random_sample=name == "random", return_text=not args.tokenize_prompt)
    elif name == "generated-shared-prefix":
        rows = sample_generated_shared_prefix_requests(args.gsp_num_groups, args.gsp_prompts_per_group,
                                                       args.gsp_system_prompt_len, args.gsp_question_len,
                                                       args.gsp_output_len, tokenizer)
    else:
        raise SystemExit(f"unknown --dataset-name {name!r}")
    if args.prompt_suffix:
        for r in rows:
            if isinstance(r.prompt, str):
                r.prompt += args.prompt_suffix
    if args.apply_chat_template:
        for r in rows:
            if isinstance(r.prompt, str):
                r.prompt = tokenizer.apply_chat_template([{"role": "user", "content": r.prompt}], tokenize=False,
                                                         add_generation_prompt=True)
    return rows


# ----------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------
@dataclass
class BenchmarkMetrics:
    completed: int
    total_input: int
    total_output: int
    total_output_retokenized: int
    request_throughput: float
    input_throughput: float
    output_throughput: float
    total_throughput: float
    concurrency: float
    stats: Dict[str, float]  # {mean,median,std,p95,p99,max}_{ttft,itl,tpot,e2e_latency}_ms


def _stats(name: str, values_s: List[float]) -> Dict[str, float]:
    ms = np.array(values_s or [0.0]) * 1000
    return {f"mean_{name}_ms": float(np.mean(ms)), f"median_{name}_ms": float(np.median(ms)),
            f"std_{name}_ms": float(np.std(ms)), f"p95_{name}_ms": float(np.percentile(ms, 95)),
            f"p99_{name}_ms": float(np.percentile(ms, 99)), f"max_{name}_ms": float(np.max(ms))}


def calculate_metrics(outputs: List[RequestFuncOutput], duration_s: float, tokenizer) -> tuple:
    ok = [o for o in outputs if o.success]
    output_lens = [o.output_len if o.success else 0 for o in outputs]
    retok = sum(len(tokenizer.encode(o.generated_text, add_special_tokens=False)) for o in ok)
    total_in = sum(o.prompt_len for o in ok)
    total_out = sum(o.output_len for o in ok)
    tpots = [(o.latency - o.ttft) / (o.output_len - 1) for o in ok if o.output_len > 1]
    stats = {**_stats("ttft", [o.ttft for o in ok]), **_stats("itl", [x for o in ok for x in o.itl]),
             **_stats("tpot", tpots), **_stats("e2e_latency", [o.latency for o in ok])}
    dur = max(duration_s, 1e-9)
    metrics = BenchmarkMetrics(
        completed=len(ok), total_input=total_in, total_output=total_out, total_output_retokenized=retok,
        request_throughput=len(ok) / dur, input_throughput=total_in / dur, output_throughput=total_out / dur,
        total_throughput=(total_in + total_out) / dur, concurrency=sum(o.latency for o in ok) / dur,
        stats=stats)
    return metrics, output_lens


def print_summary(backend: str, request_rate, max_concurrency, m: BenchmarkMetrics, duration_s: float) -> None:
    row = "{:<40} {:<10}".format
    num = "{:<40} {:<10.2f}".format
    s = m.stats
    print("\n{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="))
    print(row("Backend:", backend))
    print(row("Traffic request rate:", request_rate))
    print(row("Max request concurrency:", max_concurrency if max_concurrency else "not set"))
    print(row("Successful requests:", m.completed))
    print(num("Benchmark duration (s):", duration_s))
    print(row("Total input tokens:", m.total_input))
    print(row("Total generated tokens:", m.total_output))
    print(row("Total generated tokens (retokenized):", m.total_output_retokenized))
    print(num("Request throughput (req/s):", m.request_throughput))
    print(num("Input token throughput (tok/s):", m.input_throughput))
    print(num("Output token throughput (tok/s):", m.output_throughput))
    print(num("Total token throughput (tok/s):", m.total_throughput))
    print(num("Concurrency:", m.concurrency))
    print("{s:{c}^{n}}".format(s="End-to-End Latency", n=50, c="-"))
    print(num("Mean E2E Latency (ms):", s["mean_e2e_latency_ms"]))
    print(num("Median E2E Latency (ms):", s["median_e2e_latency_ms"]))
    print("{s:{c}^{n}}".format(s="Time to First Token", n=50, c="-"))
    print(num("Mean TTFT (ms):", s["mean_ttft_ms"]))
    print(num("Median TTFT (ms):", s["median_ttft_ms"]))
    print(num("P99 TTFT (ms):", s["p99_ttft_ms"]))
    print("{s:{c}^{n}}".format(s="Inter-Token Latency", n=50, c="-"))
    print(num("Mean ITL (ms):", s["mean_itl_ms"]))
    print(num("Median ITL (ms):", s["median_itl_ms"]))
    print(num("P95 ITL (ms):", s["p95_itl_ms"]))
    print(num("P99 ITL (ms):", s["p99_itl_ms"]))
    print(num("Max ITL (ms):", s["max_itl_ms"]))
    print("=" * 50)


# ----------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------
async def _arrivals(rows: List[DatasetRow], rate: float):
    for row in rows:
        yield row
        if rate != float("inf"):
            await asyncio.sleep(np.random.exponential(1.0 / rate))


async def benchmark(args, rows: List[DatasetRow], api_url: str, model: str, extra: Dict[str, Any]) -> tuple:
    import aiohttp

    func = BACKENDS[args.backend][0]
    timeout = aiohttp.ClientTimeout(total=AIOHTTP_TIMEOUT_S)
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        if args.warmup_requests and rows:
            print(f"Starting warmup with {args.warmup_requests} sequences...")
            first = rows[0]
            warm = RequestFuncInput(first.prompt, api_url, first.prompt_len, min(first.output_len, 16), model, extra)
            outs = await asyncio.gather(*[func(session, warm, args) for _ in range(args.warmup_requests)])
            if not all(o.success for o in outs):
                raise SystemExit(f"warm-up failed: {next(o.error for o in outs if not o.success)}")
            print("Warmup completed. Starting main benchmark run...")
        if args.flush_cache:
            async with session.post(api_url.split("/v1/")[0].removesuffix("/generate") + "/flush_cache") as r:
                await r.read()

        bar = None
        if not args.disable_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(rows))

        async def one(row: DatasetRow) -> RequestFuncOutput:
            inp = RequestFuncInput(row.prompt, api_url, row.prompt_len, row.output_len, model, extra)
            if limit is None:
                out = await func(session, inp, args)
            else:
                async with limit:
                    out = await func(session, inp, args)
            if bar is not None:
                bar.update()
            return out

        start = time.perf_counter()
        tasks = [asyncio.create_task(one(row)) async for row in _arrivals(rows, args.request_rate)]
        outputs = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        if bar is not None:
            bar.close()
    return list(outputs), duration


def _base_url(args) -> str:
    return args.base_url.rstrip("/") if args.base_url else f"http://{args.host}:{args.port}"


def _served_model(base: str) -> Optional[str]:
    import requests

    try:
        r = requests.get(base + "/v1/models", headers=_headers(), timeout=30)
        if r.status_code == 200 and r.json().get("data"):
            return r.json()["data"][0]["id"]
    except (requests.RequestException, ValueError):
        pass
    return None


def run_benchmark(args) -> Dict[str, Any]:
    random.seed(args.seed)
    np.random.seed(args.seed)
    if args.backend not in BACKENDS:
        raise SystemExit(f"unknown --backend {args.backend!r}; choose from {sorted(BACKENDS)}")
    base = _base_url(args)
    api_url = base + BACKENDS[args.backend][1]
    model = args.model or _served_model(base)
    if model is None:
        raise SystemExit(f"no --model given and {base}/v1/models did not name one")
    from sglang.srt.hf_transformers_utils import get_tokenizer

    tokenizer = get_tokenizer(args.tokenizer or model)
    extra = json.loads(args.extra_request_body) if args.extra_request_body else {}
    if args.lora_name:
        extra["lora_path"] = args.lora_name
    rows = get_dataset(args, tokenizer)
    print(f"#Input tokens: {sum(r.prompt_len for r in rows)}")
    print(f"#Output tokens: {sum(r.output_len for r in rows)}")

    outputs, duration = asyncio.run(benchmark(args, rows, api_url, model, extra))
    metrics, output_lens = calculate_metrics(outputs, duration, tokenizer)
    print_summary(args.backend, args.request_rate, args.max_concurrency, metrics, duration)
    failed = [o.error for o in outputs if not o.success]
    if failed:
        print(f"{len(failed)} request(s) failed; first error: {failed[0][:500]}")

    s = metrics.stats
    result = {
        "backend": args.backend, "dataset_name": args.dataset_name, "request_rate": args.request_rate,
        "max_concurrency": args.max_concurrency, "sharegpt_output_len": args.sharegpt_output_len,
        "random_input_len": args.random_input_len, "random_output_len": args.random_output_len,
        "random_range_ratio": args.random_range_ratio, "duration": duration, "completed": metrics.completed,
        "total_input_tokens": metrics.total_input, "total_output_tokens": metrics.total_output,
        "total_output_tokens_retokenized": metrics.total_output_retokenized,
        "request_throughput": metrics.request_throughput, "input_throughput": metrics.input_throughput,
        "output_throughput": metrics.output_throughput, "concurrency": metrics.concurrency,
        **{k: v for k, v in s.items() if not k.startswith(("max_", "p95_")) or k == "p95_itl_ms"},
        "accept_length": None,  # speculative decoding's; none here
    }
    details = {"input_lens": [o.prompt_len for o in outputs], "output_lens": output_lens,
               "ttfts": [o.ttft for o in outputs], "itls": [o.itl for o in outputs],
               "generated_texts": [o.generated_text for o in outputs], "errors": [o.error for o in outputs]}
    out_file = args.output_file or _default_output_name(args)
    with open(out_file, "a", encoding="utf-8") as f:
        f.write(json.dumps({**result, **details} if args.output_details else result) + "\n")
    return {**result, **details}


def _default_output_name(args) -> str:
    day = datetime.now().strftime("%m%d")
    if args.dataset_name.startswith("random"):
        return f"{args.backend}_{day}_{args.num_prompts}_{args.random_input_len}_{args.random_output_len}.jsonl"
    return f"{args.backend}_{day}_{args.num_prompts}_{args.dataset_name}.jsonl"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sglang.bench_serving",
                                description="Benchmark a running server's online serving throughput and latency.")
    a = p.add_argument
    a("--backend", default="sglang", choices=sorted(BACKENDS), help="API to drive.")
    a("--base-url", default=None, help="Server URL (default: http://HOST:PORT).")
    a("--host", default="0.0.0.0", help="Server host.")
    a("--port", type=int, default=30000, help="Server port.")
    a("--dataset-name", default="sharegpt",
      choices=["sharegpt", "random", "random-ids", "generated-shared-prefix"], help="Where prompts come from.")
    a("--dataset-path", default="", help="ShareGPT JSON file (sharegpt and random datasets).")
    a("--model", default=None, help="Model name sent to OpenAI-style APIs (default: the server's first model).")
    a("--tokenizer", default=None, help="Tokenizer path (default: the model name).")
    a("--num-prompts", type=int, default=1000, help="Number of requests.")
    a("--sharegpt-output-len", type=int, default=None, help="Output length of every ShareGPT request.")
    a("--sharegpt-context-len", type=int, default=None, help="Skip ShareGPT requests longer than this.")
    a("--random-input-len", type=int, default=1024, help="Input tokens per random request (upper bound).")
    a("--random-output-len", type=int, default=1024, help="Output tokens per random request (upper bound).")
    a("--random-range-ratio", type=float, default=0.0, help="Lengths are drawn from [ratio * len, len].")
    a("--request-rate", type=float, default=float("inf"), help="Requests per second (Poisson); inf: all at once.")
    a("--max-concurrency", type=int, default=None, help="Most requests in flight at once.")
    a("--output-file", default=None, help="JSONL file the result line is appended to.")
    a("--output-details", action="store_true", help="Also write per-request lengths, latencies and texts.")
    a("--disable-tqdm", action="store_true", help="No progress bar.")
    a("--disable-stream", action="store_true", help="Non-streaming requests.")
    a("--return-logprob", action="store_true", help="Ask for logprobs (sglang backend).")
    a("--seed", type=int, default=1, help="Random seed of the dataset and arrivals.")
    a("--disable-ignore-eos", action="store_true", help="Let requests stop at EOS.")
    a("--extra-request-body", default=None, help="JSON object merged into every request body.")
    a("--apply-chat-template", action="store_true", help="Wrap each prompt in the tokenizer's chat template.")
    a("--lora-name", default=None, help="LoRA adapter name (sent as lora_path).")
    a("--prompt-suffix", default="", help="Text appended to every prompt.")
    a("--flush-cache", action="store_true", help="POST /flush_cache before the benchmark.")
    a("--warmup-requests", type=int, default=1, help="Requests sent before the measured run.")
    a("--tokenize-prompt", action="store_true", help="Send token ids instead of text (random datasets).")
    a("--gsp-num-groups", type=int, default=64, help="generated-shared-prefix: number of system prompts.")
    a("--gsp-prompts-per-group", type=int, default=16, help="generated-shared-prefix: questions per system prompt.")
    a("--gsp-system-prompt-len", type=int, default=2048, help="generated-shared-prefix: system prompt tokens.")
    a("--gsp-question-len", type=int, default=128, help="generated-shared-prefix: question tokens.")
    a("--gsp-output-len", type=int, default=256, help="generated-shared-prefix: output tokens.")
    return p


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    return run_benchmark(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
