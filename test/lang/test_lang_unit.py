"""The frontend language's pure parts, no server: select scoring on given logprobs, role text from a Jinja
chat template (equal to transformers' rendering), reasoning split, tracing a program's constant prefix,
argument handling, and that importing the language pulls in neither torch nor the server."""

import math
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

import sglang as sgl
from sglang.lang.chat_template import JinjaChatTemplate, chat_template_for_server, read_local_chat_template
from sglang.lang.choices import drop_unhealed_token, normalized_prompt_logprob
from sglang.lang.interpreter import StreamExecutor
from sglang.lang.ir import SglSamplingParams
from sglang.lang.reasoning import split_reasoning
from sglang.lang.backend.runtime_endpoint import dtype_regex


def test_import_does_not_load_torch_or_server():
    code = ("import sys, sglang as sgl; sgl.function; sgl.gen; sgl.RuntimeEndpoint; sgl.OpenAI; "
            "import sglang.lang.backend.openai, sglang.lang.tracer; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('sglang.srt')]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def lp(v, tid, text):
    return [v, tid, text]


def test_token_length_normalized_and_healing():
    # the prefix ends with "is"; both choices' first entry is the healing position (the prefix's last token)
    prefix = "the sky is"
    entries = [[lp(-1.0, 5, " is"), lp(-2.0, 7, " blue")],
               [lp(-1.0, 5, " is"), lp(-0.5, 8, " gr"), lp(-4.5, 9, "een")]]
    norm = [normalized_prompt_logprob(e) for e in entries]
    assert norm == [-1.5, pytest.approx(-2.0)]
    healed = [drop_unhealed_token(prefix, e, n) for e, n in zip(entries, norm)]
    assert healed[0] == ([lp(-2.0, 7, " blue")], -2.0)
    assert healed[1][1] == pytest.approx(-2.5)
    dec = sgl.token_length_normalized(choices=[" blue", " green"], normalized_prompt_logprobs=[-2.0, -2.5],
                                      input_token_logprobs=[h[0] for h in healed], output_token_logprobs=[[], []])
    assert dec.decision == " blue"
    # a choice that merged with the prefix's last token keeps it
    assert drop_unhealed_token("the sky i", entries[0], -1.5) == (entries[0], -1.5)


def test_greedy_token_selection_pads_with_mean():
    rows = [[lp(-1.0, 1, "a")], [lp(-1.0, 1, "a"), lp(-3.0, 2, "b")], [lp(-2.0, 3, "c")]]
    dec = sgl.greedy_token_selection(choices=["a", "ab", "c"], normalized_prompt_logprobs=[0, 0, 0],
                                     input_token_logprobs=rows, output_token_logprobs=[[]] * 3)
    # column 0: a and ab tie at -1; column 1: a padded with its mean -1 beats ab's -3
    assert dec.decision == "a"
    assert dec.meta_info["greedy_logprob_matrix"] == [[-1.0, -1.0], [-1.0, -3.0], [-2.0, -2.0]]


def test_unconditional_likelihood_normalized():
    cond = [[lp(-2.0, 1, "x"), lp(-2.0, 2, "y")], [lp(-1.0, 3, "z")]]
    uncond = [[lp(None, 1, "x"), lp(-0.5, 2, "y")], [lp(None, 3, "z")]]
    dec = sgl.unconditional_likelihood_normalized(choices=["xy", "z"], normalized_prompt_logprobs=[-2, -1],
                                                  input_token_logprobs=cond, output_token_logprobs=[[], []],
                                                  unconditional_token_logprobs=uncond)
    assert dec.meta_info["normalized_unconditional_prompt_logprobs"] == [-1.75, -1.0]
    assert dec.decision == "z"
    with pytest.raises(ValueError):
        sgl.unconditional_likelihood_normalized(choices=["a"], normalized_prompt_logprobs=[0],
                                                input_token_logprobs=[[]], output_token_logprobs=[[]])


def test_jinja_roles_match_transformers(test_model):
    path = test_model("llama")
    source, eos = read_local_chat_template(path)
    tmpl = JinjaChatTemplate(source=source, eos_token=eos)
    tok = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    text = ""
    for i, m in enumerate(messages):
        pre, suf = tmpl.get_prefix_and_suffix(m["role"], messages[:i])
        text += pre + m["content"] + suf
    pre, _ = tmpl.get_prefix_and_suffix("assistant", messages)
    text += pre
    assert text == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # a server that reports no template: the local checkpoint's is used
    assert isinstance(chat_template_for_server({"model_path": path}), JinjaChatTemplate)
    assert chat_template_for_server({"model_path": "/nonexistent"}).name == "default"
    # the template a server reports wins (the frontend may run on another machine than the model)
    remote = chat_template_for_server({"model_path": "/nonexistent", "chat_template": source, "eos_token": eos})
    assert remote.get_prefix_and_suffix("user", []) == tmpl.get_prefix_and_suffix("user", [])


@pytest.mark.parametrize("text,fmt,expected", [
    ("<think>step 1</think> Paris", "qwen3", ("step 1", "Paris")),
    ("Paris", "qwen3", ("", "Paris")),
    ("step 1</think>Paris", "deepseek-r1", ("step 1", "Paris")),
    ("<think>still going", "qwen3", ("still going", "")),
])
def test_split_reasoning(text, fmt, expected):
    assert split_reasoning(text, fmt) == expected


def test_separate_reasoning_unknown_format():
    with pytest.raises(ValueError, match="unknown model_type"):
        sgl.separate_reasoning(sgl.gen("x"), model_type="nope")


def test_trace_constant_prefix():
    @sgl.function
    def prog(s, question):
        s += "You are a careful assistant. Answer in one word. " * 3
        s += "Q: " + question
        s += sgl.gen("a")

    traced = prog.trace()
    assert traced.prefix == "You are a careful assistant. Answer in one word. " * 3 + "Q: "
    assert "question" in traced.stopped_by

    @sgl.function
    def fstring(s, question):
        s += "Constant. "
        s += f"Q: {question}"

    assert fstring.trace().prefix == "Constant. "

    @sgl.function
    def prog2(s):
        s += "Fixed. "
        s += sgl.gen("a") + " more"

    traced = prog2.trace()
    assert traced.prefix == "Fixed. " and "generates" in traced.stopped_by


def test_function_arguments():
    def f(s, a, b=2):
        pass

    fn = sgl.function(f)
    assert fn.arg_names == ["a", "b"] and fn._as_kwargs((1,)) == {"a": 1}
    with pytest.raises(TypeError):
        fn._as_kwargs((1, 2, 3))
    with pytest.raises(TypeError, match="first argument"):
        sgl.function(lambda x: None)
    with pytest.raises(TypeError):
        fn.bind(c=1)
    with pytest.raises(TypeError, match="unexpected"):
        fn.run_batch([{"a": 1}], max_tokens=3, backend=object())  # run_batch's name is max_new_tokens
    with pytest.raises(NotImplementedError, match="text-only"):
        sgl.image("x.png")


def test_resolved_sampling_params_and_dtype():
    class Backend:
        def get_chat_template(self):
            from sglang.lang.chat_template import get_chat_template
            return get_chat_template("chatml")

    exe = StreamExecutor(Backend(), {}, SglSamplingParams(max_new_tokens=64, temperature=0.5, stop=["x"]),
                         use_thread=False)
    g = sgl.gen("v", max_tokens=5, stop_token_ids=[3], dtype=int)
    p = exe.resolve_sampling_params(g.sampling_params)
    assert (p.max_new_tokens, p.temperature, p.stop_token_ids) == (5, 0.5, [3])
    assert p.stop == ["x", "<|im_end|>"]  # the template's stop string is added
    dtype_regex(p)
    assert p.regex == sgl.lang.ir.REGEX_INT and p.stop[-2:] == [" ", "\n"]
    kw = p.to_srt_kwargs()
    assert kw["regex"] == p.regex and "json_schema" not in kw and not math.isnan(kw["top_p"])


def test_text_iter_yields_each_piece_the_backend_streams():
    """With stream=True, text_iter hands over every piece as the backend yields it, before the generation ends.
    The backend yields its next piece only after the consumer got the previous one, so a frontend that
    buffered until the end would fail here (it would time out waiting for the first acknowledgement)."""
    import threading

    from sglang.lang.backend.base_backend import BaseBackend

    pieces = [" one", " two", " three"]
    received = threading.Semaphore(0)

    class PacedBackend(BaseBackend):
        def generate_stream(self, s, sampling_params):
            for i, p in enumerate(pieces):
                yield p, {"completion_tokens": i + 1}
                if i + 1 < len(pieces) and not received.acquire(timeout=30):
                    raise AssertionError(f"piece {i} was not handed to the consumer while the stream ran")

    @sgl.function
    def prog(s):
        s += "Count:"
        s += sgl.gen("a", max_tokens=3)
        s += "."

    st = prog.run(backend=PacedBackend(), stream=True)
    got = []
    for piece in st.text_iter("a"):
        got.append(piece)
        received.release()
    assert got == pieces
    assert st.error() is None and st["a"] == "".join(pieces)
    assert st.text() == "Count:" + "".join(pieces) + "."
