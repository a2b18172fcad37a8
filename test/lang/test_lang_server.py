"""Frontend programs written with this package's own language against a real server of the random demo
model, where only the protocol matters: each program's outputs are compared with what the server answers
to the equivalent raw /generate (or /v1) requests, select scores with ones computed by hand from the
server's logprobs, constrained outputs are parsed, and errors carry the server's message."""

import asyncio
import json
import os
import re
import runpy
import sys

import openai
import pytest
import requests
from transformers import AutoTokenizer

import sglang as sgl
from sglang.lang.backend.runtime_endpoint import ServerError

pytestmark = pytest.mark.slow
HERE = os.path.dirname(os.path.abspath(__file__))


def generate(runtime, **body):
    r = requests.post(runtime.url + "/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def tok(runtime):
    return AutoTokenizer.from_pretrained(runtime.endpoint.get_model_name())


# ---- gen ------------------------------------------------------------------------------------------------
def test_gen_every_parameter_reaches_the_server(backend, runtime):
    params = dict(max_tokens=6, min_tokens=2, stop=["zzz"], stop_token_ids=[7], temperature=0, top_p=0.9,
                  top_k=20, min_p=0.05, frequency_penalty=0.4, presence_penalty=0.3, ignore_eos=True)

    @sgl.function
    def prog(s):
        s += "Once upon a time"
        s += sgl.gen("out", return_logprob=True, logprob_start_len=0, top_logprobs_num=3,
                     return_text_in_logprobs=True, **params)

    st = prog.run(backend=backend)
    sp = {"max_new_tokens": 6, "min_new_tokens": 2, "stop": ["zzz"], "stop_token_ids": [7], "temperature": 0,
          "top_p": 0.9, "top_k": 20, "min_p": 0.05, "frequency_penalty": 0.4, "presence_penalty": 0.3,
          "ignore_eos": True}
    ref = generate(runtime, text="Once upon a time", sampling_params=sp, return_logprob=True,
                   logprob_start_len=0, top_logprobs_num=3, return_text_in_logprobs=True)
    assert st["out"] == ref["text"] and st.text() == "Once upon a time" + ref["text"]
    meta = st.get_meta_info("out")
    assert meta["completion_tokens"] == ref["meta_info"]["completion_tokens"]
    assert [e[1] for e in meta["output_token_logprobs"]] == [e[1] for e in ref["meta_info"]["output_token_logprobs"]]
    assert len(meta["input_token_logprobs"]) == meta["prompt_tokens"]
    assert all(len(top) == 3 and all(isinstance(t[2], str) for t in top) for top in meta["output_top_logprobs"])

    # run()'s sampling keyword arguments are every gen's defaults; a gen's own value wins
    @sgl.function
    def two(s):
        s += "Hello" + sgl.gen("a") + sgl.gen("b", max_tokens=2)

    st = two.run(backend=backend, max_new_tokens=3, temperature=0, ignore_eos=True)
    assert st.get_meta_info("a")["completion_tokens"] == 3 and st.get_meta_info("b")["completion_tokens"] == 2
    ref = generate(runtime, text="Hello", sampling_params={"max_new_tokens": 3, "temperature": 0,
                                                           "ignore_eos": True})
    assert st["a"] == ref["text"]


def test_gen_n_samples(backend):
    @sgl.function
    def prog(s):
        s += "Numbers:" + sgl.gen("x", n=3, max_tokens=4, temperature=1.0, ignore_eos=True)

    st = prog.run(backend=backend)
    assert isinstance(st["x"], list) and len(st["x"]) == 3
    assert st.text() == "Numbers:" + st["x"][0]


# ---- select ---------------------------------------------------------------------------------------------
def hand_scores(runtime, prefix, choices, unconditional=False):
    """Each choice's score from the server's logprobs, computed the way SGLang's language defines it."""
    n = generate(runtime, text=prefix, sampling_params={"max_new_tokens": 0})["meta_info"]["prompt_tokens"]
    outs = generate(runtime, text=[prefix + c for c in choices],
                    sampling_params={"max_new_tokens": 0, "temperature": 0}, return_logprob=True,
                    return_text_in_logprobs=True, logprob_start_len=max(n - 2, 0))
    rows, norms = [], []
    for o in outs:
        lps = o["meta_info"]["input_token_logprobs"]
        vals = [x[0] for x in lps if x[0]]
        norm = sum(vals) / len(vals)
        if prefix.endswith(lps[0][2]):  # no token merged across the boundary: drop the prefix's last token
            norm = (norm * len(lps) - lps[0][0]) / (len(lps) - 1)
            lps = lps[1:]
        rows.append(lps)
        norms.append(norm)
    uncond = None
    if unconditional:
        res = generate(runtime, input_ids=[[e[1] for e in r] for r in rows], sampling_params={"max_new_tokens": 0},
                       return_logprob=True)
        uncond = []
        for r, u in zip(rows, res):
            base = [x[0] or 0.0 for x in u["meta_info"]["input_token_logprobs"]]
            uncond.append(sum(a[0] - b for a, b in zip(r, base)) / len(r))
    return rows, norms, uncond


PREFIX = "The weather is sunny, the sky is"
CHOICES = [" blue", " green", " purple and orange", " b"]


@pytest.mark.parametrize("method", ["token_length_normalized", "greedy_token_selection",
                                    "unconditional_likelihood_normalized"])
def test_select_scores_match_server_logprobs(backend, runtime, method):
    @sgl.function
    def prog(s):
        s += PREFIX + sgl.select("c", choices=CHOICES, choices_method=getattr(sgl, method))

    st = prog.run(backend=backend)
    meta = st.get_meta_info("c")
    rows, norms, uncond = hand_scores(runtime, PREFIX, CHOICES, unconditional=method.startswith("uncond"))
    assert meta["normalized_prompt_logprobs"] == pytest.approx(norms, abs=1e-4)
    assert [[e[1] for e in r] for r in meta["input_token_logprobs"]] == [[e[1] for e in r] for r in rows]
    assert [e[0] for r in meta["input_token_logprobs"] for e in r] == pytest.approx(
        [e[0] for r in rows for e in r], abs=1e-4)
    # The decision, from the numbers the server gave the program (requests batched differently can differ
    # in the last bits, which decides exact ties between choices sharing a first token, like " b"/" blue").
    got = meta["input_token_logprobs"]
    if method == "token_length_normalized":
        scores = meta["normalized_prompt_logprobs"]
        expected = CHOICES[scores.index(max(scores))]
    elif method == "unconditional_likelihood_normalized":
        assert meta["normalized_unconditional_prompt_logprobs"] == pytest.approx(uncond, abs=1e-4)
        scores = meta["normalized_unconditional_prompt_logprobs"]
        expected = CHOICES[scores.index(max(scores))]
    else:
        width = max(len(r) for r in got)
        mat = [[e[0] for e in r] + [sum(e[0] for e in r) / len(r)] * (width - len(r)) for r in got]
        assert meta["greedy_logprob_matrix"] == mat
        alive = list(range(len(CHOICES)))
        for col in range(width):
            best = max(mat[i][col] for i in alive)
            alive = [i for i in alive if mat[i][col] == best]
            if len(alive) == 1:
                break
        expected = CHOICES[alive[0]]
    assert st["c"] == expected and st.text() == PREFIX + expected


def test_gen_with_choices_is_a_select(backend):
    @sgl.function
    def prog(s):
        s += PREFIX + sgl.gen("a", choices=CHOICES)
        s += "." + sgl.select("b", choices=CHOICES)

    st = prog.run(backend=backend)
    assert st["a"] in CHOICES and st["b"] in CHOICES


# ---- constrained decoding ---------------------------------------------------------------------------------
def test_regex_json_and_typed_gens(backend):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer"}}, "required": ["name", "age"],
              "additionalProperties": False}

    @sgl.function
    def prog(s):
        s += "Code:" + sgl.gen("code", regex=r"[0-9]{3}-[a-z]{2}", max_tokens=16, temperature=0.8)
        s += "\nPerson:" + sgl.gen("person", json_schema=json.dumps(schema), max_tokens=64, temperature=0)
        s += "\nCount:" + sgl.gen_int("count", max_tokens=4)
        s += "\nWord:" + sgl.gen_string("word", max_tokens=12)
        s += "\nRatio:" + sgl.gen("ratio", dtype=float, max_tokens=6)
        s += "\nOk:" + sgl.gen("ok", dtype=bool, max_tokens=8)

    st = prog.run(backend=backend)
    assert st.error() is None, st.error()
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", st["code"])
    person = json.loads(st["person"], strict=False)  # xgrammar lets raw control characters into strings
    assert set(person) == {"name", "age"} and isinstance(person["age"], int) and len(person["name"]) <= 8
    assert re.fullmatch(sgl.lang.ir.REGEX_INT, st["count"]) and int(st["count"]) == int(st["count"].strip())
    # a quoted string, closed unless the token budget ran out first
    closed = re.fullmatch(sgl.lang.ir.REGEX_STR, st["word"])
    assert closed or (re.fullmatch(r'"[\w\d\s]*', st["word"])
                      and st.get_meta_info("word")["finish_reason"]["type"] == "length"), st["word"]
    float(st["ratio"])
    assert st["ok"] in ("True", "False")


# ---- fork / join ----------------------------------------------------------------------------------------
def test_fork_join_shares_the_prefix(backend, runtime):
    backend.flush_cache()
    prefix = ("A paged key value cache stores attention state in fixed size pages. " * 2).strip()

    @sgl.function
    def prog(s):
        s += prefix
        forks = s.fork(3)
        forks += lambda i: f"\nBranch {i}:"
        forks += sgl.gen("cont", max_tokens=4, temperature=0, ignore_eos=True)
        s["texts"] = [f.text() for f in forks]
        s["cached"] = [f.get_meta_info("cont")["cached_tokens"] for f in forks]
        forks.join()
        s += "Done"

    st = prog.run(backend=backend)
    assert st.error() is None
    for i, (text, cont) in enumerate(zip(st["texts"], st["cont"])):
        ref = generate(runtime, text=prefix + f"\nBranch {i}:", sampling_params={"max_new_tokens": 4,
                                                                              "temperature": 0,
                                                                              "ignore_eos": True})
        assert cont == ref["text"] and text == prefix + f"\nBranch {i}:" + cont
    # the prefix was prefilled once before the forks ran: each fork's request found it cached
    assert min(st["cached"]) >= cacheable(runtime, prefix) > 0, st["cached"]
    assert st.text() == prefix + "Done"


def cacheable(runtime, text):
    """Tokens of `text` the radix cache can serve (whole KV pages, the last prompt token excluded)."""
    n = generate(runtime, text=text, sampling_params={"max_new_tokens": 0})["meta_info"]["prompt_tokens"]
    page = runtime.endpoint.get_server_info()["page_size"]
    return (n - 1) // page * page


# ---- run_batch ------------------------------------------------------------------------------------------
def test_run_batch_32_with_progress_bar(backend, runtime, capfd):
    system = ("You answer questions about the weather with a single short word. " * 2).strip()

    @sgl.function
    def qa(s, question):
        s += system + "\nQ: " + question + "\nA:"
        s += sgl.gen("answer", max_tokens=3, temperature=0, ignore_eos=True)

    backend.flush_cache()
    questions = [f"Is it sunny on day {i}?" for i in range(32)]
    states = qa.run_batch([{"question": q} for q in questions], backend=backend, progress_bar=True)
    err = capfd.readouterr().err
    assert "32/32" in err  # tqdm's bar reached the end
    assert len(states) == 32 and all(s.error() is None for s in states), [s.error() for s in states]
    for i in (0, 13, 31):
        ref = generate(runtime, text=system + "\nQ: " + questions[i] + "\nA:",
                       sampling_params={"max_new_tokens": 3, "temperature": 0, "ignore_eos": True})
        assert states[i]["answer"] == ref["text"]
    # the traced constant prefix was sent once before the batch: every program found it in the cache
    assert min(s.get_meta_info("answer")["cached_tokens"] for s in states) >= cacheable(runtime, system) > 0
    # tuples in argument order, one thread, and the generator form
    assert [s["answer"] for s in qa.run_batch([(q,) for q in questions[:3]], backend=backend, num_threads=1)] == \
        [s["answer"] for s in states[:3]]
    gen_states = qa.run_batch([{"question": q} for q in questions[:4]], backend=backend, generator_style=True)
    assert [s["answer"] for s in gen_states] == [s["answer"] for s in states[:4]]


# ---- streaming ------------------------------------------------------------------------------------------
def test_streaming(backend):
    @sgl.function
    def prog(s):
        s += "Numbers: 0 1 2"
        s += sgl.gen("a", max_tokens=8, temperature=0, ignore_eos=True)
        s += " then"
        s += sgl.gen("b", max_tokens=4, temperature=0, ignore_eos=True)

    final = prog.run(backend=backend)
    st = prog.run(backend=backend, stream=True)
    # how many pieces arrive depends on timing (the server and the frontend coalesce what a slow reader has not
    # taken yet, as SGLang's do); test_lang_unit's paced backend checks that each piece is handed over as it comes
    pieces = list(st.text_iter("a"))
    assert "".join(pieces) == final["a"] and all(pieces)
    assert "".join(st.text_iter("b")) == final["b"]
    st = prog.run(backend=backend, stream=True)
    assert "".join(st.text_iter()) == final.text()

    async def collect():
        st = prog.run(backend=backend, stream=True)
        out = [p async for p in st.text_async_iter("a", return_meta_data=True)]
        return out

    out = asyncio.run(collect())
    assert "".join(p for p, _ in out) == final["a"]
    assert out[-1][1]["completion_tokens"] == 8


# ---- roles ----------------------------------------------------------------------------------------------
def test_roles_render_the_models_chat_template(backend, runtime, tok):
    @sgl.function
    def chat(s, question):
        s += sgl.system("You are a helpful assistant.")
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen("answer", max_tokens=6, temperature=0))
        with s.user():
            s += "Thanks!"
        s += sgl.assistant_begin()
        s += sgl.gen("second", max_tokens=4, temperature=0)
        s += sgl.assistant_end()

    st = chat.run(question="What is the capital of France?", backend=backend)
    assert st.error() is None
    msgs = st.messages()
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[1]["content"] == "What is the capital of France?" and msgs[3]["content"] == "Thanks!"
    assert st.text() == tok.apply_chat_template(msgs, tokenize=False)
    # the first assistant gen was asked for on the template's generation prompt of the first two turns
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    ref = generate(runtime, text=prompt, sampling_params={"max_new_tokens": 6, "temperature": 0})
    assert st["answer"] == ref["text"] and msgs[2]["content"] == ref["text"].lstrip()


# ---- errors ---------------------------------------------------------------------------------------------
def test_errors_carry_the_servers_message(backend):
    @sgl.function
    def bad(s):
        s += "Hi" + sgl.gen("x", regex="((", max_tokens=4)

    st = bad.run(backend=backend)
    err = st.error()
    assert isinstance(err, ServerError) and err.status == 400 and "regex" in err.message.lower()
    with pytest.raises(sgl.ProgramError, match="regex"):
        st["x"]

    @sgl.function
    def reads(s):
        s += "Hi" + sgl.gen("x", max_tokens=-1)
        s += s["x"]  # the program itself reads the failed variable: run() raises

    with pytest.raises(sgl.ProgramError) as e:
        reads.run(backend=backend)
    assert "max_new_tokens must be >= 0" in str(e.value)

    st = bad.run(backend=backend, stream=True)
    assert list(st.text_iter("x")) == [] and isinstance(st.error(), ServerError)

    port = runtime_free_port()
    with pytest.raises(RuntimeError, match="cannot reach"):
        sgl.RuntimeEndpoint(f"http://127.0.0.1:{port}")


def runtime_free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- default backend, cache, info ------------------------------------------------------------------------
def test_default_backend_flush_and_info(runtime):
    sgl.set_default_backend(runtime)  # a Runtime serves through its endpoint
    try:
        @sgl.function
        def prog(s):
            s += "Hello" + sgl.gen("x", max_tokens=2, temperature=0)

        assert prog.run().error() is None
        sgl.flush_cache()
        info = sgl.get_server_info()
        assert info["model_path"] == runtime.endpoint.get_model_name() and "version" in info
    finally:
        sgl.set_default_backend(None)


# ---- OpenAI backend -------------------------------------------------------------------------------------
def test_openai_backend(runtime, backend):
    chat_backend = sgl.OpenAI("any-name", base_url=runtime.url + "/v1")
    comp_backend = sgl.OpenAI("any-name", base_url=runtime.url + "/v1", is_chat_model=False)

    @sgl.function
    def chat(s):
        s += sgl.user("What is the capital of France?")
        s += sgl.assistant(sgl.gen("answer", max_tokens=6, temperature=0))

    st = chat.run(backend=chat_backend)
    assert st.error() is None, st.error()
    assert st.messages()[0] == {"role": "user", "content": "What is the capital of France?"}
    r = requests.post(runtime.url + "/v1/chat/completions", timeout=60, json={
        "model": "any-name", "messages": st.messages()[:1], "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    assert st["answer"] == r.json()["choices"][0]["message"]["content"]

    @sgl.function
    def plain(s):
        s += "Once upon a time" + sgl.gen("x", max_tokens=5, temperature=0, ignore_eos=True)
        s += "." + sgl.gen("n", regex="[0-9]{2}", max_tokens=4)

    st = plain.run(backend=comp_backend)
    ref = plain.run(backend=backend)
    assert st["x"] == ref["x"] and re.fullmatch("[0-9]{2}", st["n"])

    @sgl.function
    def choose(s):
        s += PREFIX + sgl.select("c", choices=[" blue", " green"])

    assert choose.run(backend=comp_backend)["c"] in (" blue", " green")
    with pytest.raises(sgl.ProgramError, match="chat"):
        choose.run(backend=chat_backend)["c"]


# ---- the compatibility programs, with this package's own language -----------------------------------------
def test_compat_frontend_program_with_this_package(runtime, capsys, monkeypatch):
    """test/compat/frontend_program.py (run with PyPI's 0.5.2 by test_compat_clients.py), here in this process
    with this package's language."""
    monkeypatch.setattr(sys, "argv", ["frontend_program.py", runtime.url])
    capsys.readouterr()
    runpy.run_path(os.path.join(HERE, "..", "compat", "frontend_program.py"), run_name="__main__")
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["model_path"] == runtime.endpoint.get_model_name()
    plain = res["plain"]
    assert plain["text"] == "Q: What is the capital of France?\nA:" + plain["answer"]
    assert plain["meta"]["completion_tokens"] <= 8
    assert res["constrained"]["city"] in (" Paris", " London", " Rome")
    assert re.fullmatch(r" [0-9]{1,2}", res["constrained"]["number"])
    assert len(res["fork"]) == 3 and "\n" not in res["stop"]
    assert res["batch"] == res["batch_single"]
    assert res["stream"]["joined"] == res["stream"]["final"] == plain["answer"]
    rows, norms, _ = hand_scores(runtime, "The weather is sunny, the sky is", [" blue", " green", " purple"])
    assert res["select"] == [" blue", " green", " purple"][norms.index(max(norms))]
