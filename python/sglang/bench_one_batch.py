"""`python -m sglang.bench_one_batch`: SGLang's flag names over this repository's benchmark/bench_one_batch.py
(one static batch through the ModelRunner, no server; prefill / decode throughput per batch size and TP).

    python -m sglang.bench_one_batch --model-path /tmp/demo-llama --batch-size 1 8 --input-len 128 \
        --output-len 16 --tp-size 1

Upstream's flags map onto the benchmark's (--batch-size -> --batch-sizes, --tp-size -> --tp-sizes,
--attention-backend -> --attention-backends, one --input-len / --output-len); anything else is passed through
(see benchmark/bench_one_batch.py --help, e.g. --skip-hf, --repeats, --result-dir).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from typing import List, Optional

BENCHMARK_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmark",
                              "bench_one_batch.py")


def load_benchmark(path: str = BENCHMARK_FILE):
    """benchmark/bench_one_batch.py of this checkout (it is not part of the installed package)."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path} not found: bench_one_batch runs from a checkout of this repository")
    spec = importlib.util.spec_from_file_location("sglang_benchmark_one_batch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def translate(argv: Optional[List[str]] = None) -> List[str]:
    p = argparse.ArgumentParser(prog="python -m sglang.bench_one_batch", add_help=False)
    p.add_argument("--model-path", default=None)
    p.add_argument("--batch-size", type=int, nargs="+", default=None)
    p.add_argument("--input-len", type=int, nargs="+", default=None)
    p.add_argument("--output-len", type=int, nargs="+", default=None)
    p.add_argument("--tp-size", type=int, nargs="+", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--page-size", type=int, default=None)
    p.add_argument("--attention-backend", nargs="+", default=None)
    p.add_argument("--result-filename", default=None)
    known, rest = p.parse_known_args(argv)
    out: List[str] = []
    if known.model_path:
        out += ["--model-path", known.model_path]
    if known.batch_size:
        out += ["--batch-sizes", *map(str, known.batch_size)]
    for flag, values in (("--input-len", known.input_len), ("--output-len", known.output_len)):
        if values:
            if len(values) > 1:
                raise SystemExit(f"{flag}: one value per run here (got {values})")
            out += [flag, str(values[0])]
    if known.tp_size:
        out += ["--tp-sizes", *map(str, known.tp_size)]
    if known.dtype and known.dtype != "auto":
        out += ["--dtype", known.dtype]
    if known.page_size:
        out += ["--page-size", str(known.page_size)]
    if known.attention_backend:
        out += ["--attention-backends", *known.attention_backend]
    if known.result_filename:
        out += ["--result-dir", os.path.dirname(os.path.abspath(known.result_filename))]
    return out + rest


def main(argv: Optional[List[str]] = None) -> None:
    load_benchmark().main(translate(argv))


if __name__ == "__main__":
    main()
