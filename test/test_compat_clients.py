"""Clients nobody here wrote, unchanged, against a real server: PyPI sglang==0.5.2's frontend language and
bench_serving (both backends), and the openai package. They run in a separate venv
(test/.cache/compat-venv, made by test/compat/setup_venv.sh) because that sglang is also named `sglang`.

The module fails when the venv cannot be created (CI installs it with PyPI reachable).
"""

import json
import os
import signal
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from server_utils import ServerProcess, stop_and_check

HERE = os.path.dirname(os.path.abspath(__file__))
COMPAT = os.path.join(HERE, "compat")
MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def venv_python():
    try:
        r = subprocess.run(["bash", os.path.join(COMPAT, "setup_venv.sh")], capture_output=True, text=True,
                           timeout=1800)
    except subprocess.TimeoutExpired:
        pytest.fail("creating the compat venv timed out")
    if r.returncode != 0:
        pytest.fail(f"cannot create the compat venv (sglang==0.5.2 from PyPI): {r.stderr[-2000:]}")
    return r.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def server(test_model, venv_python):
    srv = ServerProcess(test_model("llama"), "--served-model-name", MODEL)
    yield srv
    stop_and_check(srv, sig=signal.SIGINT)  # Ctrl-C must stop every process too


def run_client(venv_python, *args, timeout=600, cwd=COMPAT) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    r = subprocess.run([venv_python, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    assert r.returncode == 0, f"{args} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r.stdout


def test_client_sglang_is_pypi_release(venv_python):
    out = run_client(venv_python, "-c", "import sglang, os; print(sglang.__version__, os.path.dirname(sglang.__file__))")
    version, path = out.split()
    assert version == "0.5.2" and ".cache/compat-venv" in path


def test_frontend_language(server, venv_python, test_model):
    res = json.loads(run_client(venv_python, "frontend_program.py", server.url).strip().splitlines()[-1])
    assert res["model_path"] == test_model("llama")
    plain = res["plain"]
    assert plain["text"].endswith(plain["answer"]) and plain["text"].startswith("Q: What is the capital")
    assert plain["meta"]["completion_tokens"] <= 8 and plain["meta"]["prompt_tokens"] > 5
    assert res["constrained"]["city"] in (" Paris", " London", " Rome")
    num = res["constrained"]["number"]
    assert num.startswith(" ") and num[1:].isdigit() and 1 <= len(num) - 1 <= 2
    assert res["select"] in (" blue", " green", " purple")
    assert len(res["fork"]) == 3 and all(isinstance(x, str) for x in res["fork"])
    assert "\n" not in res["stop"]
    assert res["batch"] == res["batch_single"]  # run_batch keeps order and matches single runs (greedy)
    stream = res["stream"]
    assert stream["joined"] == stream["final"] == plain["answer"]
    assert len(stream["pieces"]) >= 1


def test_frontend_select_matches_logprobs(server, venv_python):
    """select() must pick the choice with the best normalized prompt logprob, as computed from /generate."""
    res = json.loads(run_client(venv_python, "frontend_program.py", server.url).strip().splitlines()[-1])
    choices = [" blue", " green", " purple"]
    prefix = "The weather is sunny, the sky is"
    body = {"text": prefix, "sampling_params": {"max_new_tokens": 0}}
    prompt_len = server.generate(**body)["meta_info"]["prompt_tokens"]
    outs = server.generate(text=[prefix + c for c in choices], sampling_params={"max_new_tokens": 0, "temperature": 0},
                           return_logprob=True, return_text_in_logprobs=True, logprob_start_len=max(prompt_len - 2, 0))
    scores = []
    for o in outs:
        lps = o["meta_info"]["input_token_logprobs"]
        vals = [x[0] for x in lps if x[0]]
        score = sum(vals) / len(vals)
        if prefix.endswith(lps[0][2]):  # the frontend drops the healed token the same way
            score = (score * len(lps) - lps[0][0]) / (len(lps) - 1)
        scores.append(score)
    assert res["select"] == choices[scores.index(max(scores))]


def test_openai_package(server, venv_python, test_model):
    res = json.loads(run_client(venv_python, "openai_client.py", server.url, MODEL).strip().splitlines()[-1])
    tok = AutoTokenizer.from_pretrained(test_model("llama"))
    assert res["models"] == [MODEL]
    comp = res["completion"]
    assert comp["finish_reason"] == "length"
    assert comp["usage"]["completion_tokens"] == 8
    assert comp["usage"]["prompt_tokens"] == len(tok.encode("The capital of France is"))
    assert res["completion_stream"]["text"] == comp["text"]
    assert res["completion_stream"]["usage"]["completion_tokens"] == 8
    chat = res["chat"]
    assert chat["role"] == "assistant" and chat["usage"]["completion_tokens"] == 8
    assert res["chat_stream"]["first_role"] == "assistant"
    assert res["chat_stream"]["content"] == chat["content"]
    assert res["chat_stream"]["usage"]["prompt_tokens"] == chat["usage"]["prompt_tokens"]
    assert res["other_model_name"] == {"model": "no-such-model", "completion_tokens": 1}


@pytest.mark.parametrize("backend", ["sglang", "sglang-oai"])
def test_bench_serving(server, venv_python, test_model, tmp_path, backend):
    out_file = tmp_path / f"bench-{backend}.jsonl"
    n = 20
    stdout = run_client(
        venv_python, "-m", "sglang.bench_serving", "--backend", backend, "--host", "127.0.0.1",
        "--port", str(server.port), "--dataset-name", "random-ids", "--num-prompts", str(n),
        "--random-input-len", "32", "--random-output-len", "16", "--random-range-ratio", "0.5",
        "--tokenizer", test_model("llama"), "--seed", "1", "--disable-tqdm", "--output-file", str(out_file),
        cwd=str(tmp_path))
    assert "Successful requests:" in stdout
    result = json.loads(out_file.read_text().strip().splitlines()[-1])
    assert result["completed"] == n, stdout[-3000:]
    assert result["total_output_tokens"] > 0
    assert result["total_input_tokens"] > 0
