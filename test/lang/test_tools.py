"""`python -m sglang.bench_serving` of this package against the package-scoped server: the same request and
token counts as PyPI sglang 0.5.2's bench_serving (from the compat venv) on the same dataset; every backend
and dataset kind completes its requests; the JSONL line has upstream's keys. Plus check_env and the helper
modules upstream programs import."""

import json
import os
import subprocess

import pytest

from sglang import bench_serving

pytestmark = pytest.mark.slow
COMPAT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "compat")


@pytest.fixture(scope="module")
def venv_python():
    r = subprocess.run(["bash", os.path.join(COMPAT, "setup_venv.sh")], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        pytest.fail(f"cannot create the compat venv (sglang==0.5.2 from PyPI): {r.stderr[-2000:]}")
    return r.stdout.strip().splitlines()[-1]


def bench_args(runtime, tokenizer, out_file, *extra):
    return ["--host", "127.0.0.1", "--port", str(runtime.port), "--tokenizer", tokenizer, "--seed", "3",
            "--disable-tqdm", "--output-file", str(out_file), *extra]


def last_line(path):
    return json.loads(path.read_text().strip().splitlines()[-1])


def test_same_counts_as_pypi_bench_serving(runtime, venv_python, tmp_path, capsys):
    tokenizer = runtime.endpoint.get_model_name()
    common = ["--backend", "sglang", "--dataset-name", "random-ids", "--num-prompts", "8", "--random-input-len",
              "40", "--random-output-len", "8", "--random-range-ratio", "0.5"]
    ours = bench_serving.main(bench_args(runtime, tokenizer, tmp_path / "ours.jsonl", *common))
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result" in printed and "Successful requests:                     8" in printed
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([venv_python, "-m", "sglang.bench_serving",
                        *bench_args(runtime, tokenizer, tmp_path / "pypi.jsonl", *common)],
                       capture_output=True, text=True, timeout=600, cwd=str(tmp_path), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = last_line(tmp_path / "pypi.jsonl")
    mine = last_line(tmp_path / "ours.jsonl")
    for key in ("completed", "total_input_tokens", "total_output_tokens", "total_output_tokens_retokenized"):
        assert mine[key] == theirs[key] == ours[key], key
    assert mine["completed"] == 8 and set(mine) == set(theirs)  # the same JSONL record


def sharegpt_file(path, n=6):
    data = [{"id": str(i), "conversations": [
        {"from": "human", "value": f"Question {i}: tell me about the scheduler and the paged cache, please."},
        {"from": "gpt", "value": "The scheduler batches requests continuously and reuses cached prefixes."}]}
        for i in range(n)]
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("backend,dataset", [
    ("sglang-oai-chat", "sharegpt"), ("vllm", "random"), ("sglang-oai", "generated-shared-prefix")])
def test_backends_and_datasets(runtime, tmp_path, backend, dataset):
    extra = ["--backend", backend, "--dataset-name", dataset, "--num-prompts", "6"]
    if dataset == "sharegpt":
        extra += ["--dataset-path", sharegpt_file(tmp_path / "sg.json"), "--sharegpt-output-len", "5"]
    elif dataset == "random":
        extra += ["--dataset-path", sharegpt_file(tmp_path / "sg.json"), "--random-input-len", "30",
                  "--random-output-len", "6", "--max-concurrency", "2", "--request-rate", "50"]
    else:
        extra += ["--gsp-num-groups", "2", "--gsp-prompts-per-group", "3", "--gsp-system-prompt-len", "40",
                  "--gsp-question-len", "8", "--gsp-output-len", "4", "--flush-cache"]
    res = bench_serving.main(bench_args(runtime, runtime.endpoint.get_model_name(), tmp_path / "r.jsonl", *extra))
    assert res["completed"] == 6, res["errors"]
    out_lens = {"sharegpt": 5, "generated-shared-prefix": 4}
    if dataset in out_lens:  # ignore_eos: every request generates exactly its output length
        assert res["total_output_tokens"] == 6 * out_lens[dataset]
    assert last_line(tmp_path / "r.jsonl")["backend"] == backend


def test_check_env_and_helpers(tmp_path, capsys):
    from sglang import check_env

    check_env.main()
    out = capsys.readouterr().out
    assert "Python:" in out and "torch: 2." in out and "sglang: " in out
    from sglang.lang.ir import REGEX_FLOAT, REGEX_INT, REGEX_STR  # noqa: F401 - importable as upstream's
    from sglang.srt.hf_transformers_utils import get_tokenizer
    from sglang.utils import download_and_cache_file, read_jsonl

    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert [r["a"] for r in read_jsonl(str(p))] == [1, 2]
    assert download_and_cache_file("http://unused.invalid/x", filename=str(p)) == str(p)  # cached: no download
    assert callable(get_tokenizer)


def test_bench_one_batch_and_offline_flags():
    from sglang import bench_offline_throughput, bench_one_batch

    argv = bench_one_batch.translate(["--model-path", "/m", "--batch-size", "1", "8", "--input-len", "64",
                                      "--output-len", "4", "--tp-size", "1", "2", "--dtype", "auto", "--skip-hf"])
    assert argv == ["--model-path", "/m", "--batch-sizes", "1", "8", "--input-len", "64", "--output-len", "4",
                    "--tp-sizes", "1", "2", "--skip-hf"]
    bench = bench_one_batch.load_benchmark()  # the repository's benchmark accepts what translate produces
    parsed = bench.parse_args(argv)
    assert parsed.batch_sizes == [1, 8] and parsed.tp_sizes == [1, 2] and parsed.skip_hf
    with pytest.raises(SystemExit):
        bench_one_batch.translate(["--input-len", "8", "16"])
    args = bench_offline_throughput.build_parser().parse_args(
        ["--model-path", "/m", "--tp-size", "2", "--dataset-name", "random-ids", "--num-prompts", "5"])
    assert (args.model_path, args.tp_size, args.dataset_name, args.num_prompts) == ("/m", 2, "random-ids", 5)
