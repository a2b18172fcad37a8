"""`python -m sglang.bench_offline_throughput`: throughput of the in-process Engine (no HTTP) on
bench_serving's datasets, with SGLang's flags and summary.

    python -m sglang.bench_offline_throughput --model-path /tmp/demo-llama --device cpu \
        --dataset-name random-ids --num-prompts 64 --random-input-len 128 --random-output-len 32

Data flow: every server flag (ServerArgs) -> sglang.Engine; dataset flags -> bench_serving.get_dataset ->
prompts with per-prompt max_new_tokens (ignore_eos unless --disable-ignore-eos) -> Engine.generate in
batches of at most --max-batch-prompts, all submitted at once from threads -> token counts from each
output's meta_info -> summary and one JSON line appended to --result-filename.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional

import numpy as np

from sglang.bench_serving import DatasetRow, get_dataset


def _add_dataset_flags(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--dataset-name", default="sharegpt", choices=["sharegpt", "random", "random-ids", "generated-shared-prefix"])
    a("--dataset-path", default="", help="ShareGPT JSON file (sharegpt and random datasets).")
    a("--num-prompts", type=int, default=1000)
    a("--sharegpt-output-len", type=int, default=None)
    a("--sharegpt-context-len", type=int, default=None)
    a("--random-input-len", type=int, default=1024)
    a("--random-output-len", type=int, default=1024)
    a("--random-range-ratio", type=float, default=0.0)
    a("--gsp-num-groups", type=int, default=64)
    a("--gsp-prompts-per-group", type=int, default=16)
    a("--gsp-system-prompt-len", type=int, default=2048)
    a("--gsp-question-len", type=int, default=128)
    a("--gsp-output-len", type=int, default=256)
    a("--prompt-suffix", default="")
    a("--apply-chat-template", action="store_true")
    a("--tokenize-prompt", action="store_true", help="send token ids (random datasets)")
    a("--seed", type=int, default=1)
    a("--disable-ignore-eos", action="store_true")
    a("--extra-request-body", default=None, help="JSON object of extra sampling parameters")
    a("--result-filename", default="", help="JSONL file the result line is appended to")


def build_parser() -> argparse.ArgumentParser:
    from sglang.srt.server_args import ServerArgs

    p = argparse.ArgumentParser(prog="python -m sglang.bench_offline_throughput", description=__doc__.split("\n")[0])
    ServerArgs.add_cli_args(p)
    _add_dataset_flags(p)
    return p


def _generate_all(engine, rows: List[DatasetRow], extra: Dict[str, Any], ignore_eos: bool, chunk: int):
    def one(part: List[DatasetRow]):
        params = [{"max_new_tokens": r.output_len, "temperature": 0.0, "ignore_eos": ignore_eos, **extra} for r in part]
        if isinstance(part[0].prompt, list):
            return engine.generate(input_ids=[r.prompt for r in part], sampling_params=params)
        return engine.generate([r.prompt for r in part], params)

    parts = [rows[i:i + chunk] for i in range(0, len(rows), chunk)]
    with ThreadPoolExecutor(max(1, len(parts))) as pool:
        results = list(pool.map(one, parts))
    return [o for outs in results for o in (outs if isinstance(outs, list) else [outs])]


def throughput_test(args) -> Dict[str, Any]:
    import dataclasses

    import sglang
    from sglang.srt.hf_transformers_utils import get_tokenizer
    from sglang.srt.server_args import ServerArgs

    random.seed(args.seed)
    np.random.seed(args.seed)
    server_kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerArgs)}
    tokenizer = get_tokenizer(args.tokenizer_path or args.model_path)
    rows = get_dataset(args, tokenizer)
    extra = json.loads(args.extra_request_body) if args.extra_request_body else {}
    engine = sglang.Engine(**server_kwargs)
    try:
        if not args.skip_warmup:  # the server flag: no warm-up batch either
            _generate_all(engine, rows[:min(4, len(rows))], extra, True, args.max_batch_prompts)
        start = time.perf_counter()
        outputs = _generate_all(engine, rows, extra, not args.disable_ignore_eos, args.max_batch_prompts)
        duration = time.perf_counter() - start
    finally:
        engine.shutdown()
    total_in = sum(o["meta_info"]["prompt_tokens"] for o in outputs)
    total_out = sum(o["meta_info"]["completion_tokens"] for o in outputs)
    result = {"backend": "engine", "successful_requests": len(outputs), "total_latency": duration,
              "total_input_tokens": total_in, "total_output_tokens": total_out,
              "request_throughput": len(outputs) / duration, "input_throughput": total_in / duration,
              "output_throughput": total_out / duration, "total_throughput": (total_in + total_out) / duration}
    row = "{:<40} {:<10}".format
    num = "{:<40} {:<10.2f}".format
    print("\n{s:{c}^{n}}".format(s=" Offline Throughput Benchmark Result ", n=50, c="="))
    print(row("Backend:", "engine"))
    print(row("Successful requests:", result["successful_requests"]))
    print(num("Benchmark duration (s):", duration))
    print(row("Total input tokens:", total_in))
    print(row("Total generated tokens:", total_out))
    print(num("Request throughput (req/s):", result["request_throughput"]))
    print(num("Input token throughput (tok/s):", result["input_throughput"]))
    print(num("Output token throughput (tok/s):", result["output_throughput"]))
    print(num("Total token throughput (tok/s):", result["total_throughput"]))
    print("=" * 50)
    if args.result_filename:
        with open(args.result_filename, "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
    return result


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    return throughput_test(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
