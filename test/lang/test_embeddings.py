"""/v1/embeddings and SGLang's native /encode on the package-scoped server (random demo Llama, float32):
each embedding is the final hidden state (after the last norm) of the prompt's last token, L2-normalized,
as transformers computes it on the same checkpoint; batches, token-id inputs, the openai client (base64 by
default) and /encode give the same vectors; bad requests are a 400 and the server keeps serving."""

import base64

import numpy as np
import openai
import pytest
import requests
import torch

pytestmark = pytest.mark.slow
TEXTS = ["The capital of France is", "Embeddings pool the last token", "a"]


def post(runtime, path, **body):
    return requests.post(runtime.url + path, json=body, timeout=120)


@pytest.fixture(scope="module")
def reference(test_model):
    """text -> (token ids as the server tokenizes them, transformers' pooled embedding [hidden])."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = test_model("llama")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = {}
    for text in TEXTS:
        ids = tok.encode(text)
        with torch.no_grad():
            last = model.model(torch.tensor([ids])).last_hidden_state[0, -1]  # [hidden], after the final norm
        out[text] = (ids, torch.nn.functional.normalize(last, dim=-1).numpy())
    return out


def vectors(resp) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == list(range(len(body["data"])))
    assert all(d["object"] == "embedding" for d in body["data"])
    return np.array([d["embedding"] for d in body["data"]], dtype=np.float32)


def test_embeddings_equal_transformers_last_token_pooling(runtime, reference):
    ids, want = reference[TEXTS[0]]
    r = post(runtime, "/v1/embeddings", input=TEXTS[0], model="any-name")
    got = vectors(r)
    assert got.shape == (1, want.shape[0])
    assert np.linalg.norm(got[0]) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(got[0], want, atol=2e-4)
    body = r.json()
    assert body["model"] == "any-name"
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == len(ids)
    assert body["usage"]["completion_tokens"] == 0


def test_batches_token_ids_base64_and_encode_agree(runtime, reference):
    want = np.stack([reference[t][1] for t in TEXTS])
    np.testing.assert_allclose(vectors(post(runtime, "/v1/embeddings", input=TEXTS)), want, atol=2e-4)
    ids = [reference[t][0] for t in TEXTS]
    np.testing.assert_allclose(vectors(post(runtime, "/v1/embeddings", input=ids)), want, atol=2e-4)
    np.testing.assert_allclose(vectors(post(runtime, "/v1/embeddings", input=ids[1])), want[1:2], atol=2e-4)
    b64 = post(runtime, "/v1/embeddings", input=TEXTS[:2], encoding_format="base64").json()["data"]
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in b64])
    np.testing.assert_allclose(decoded, want[:2], atol=2e-4)
    # the openai client asks for base64 when encoding_format is not given, and decodes it
    client = openai.OpenAI(base_url=runtime.url + "/v1", api_key="none", max_retries=0)
    res = client.embeddings.create(model="m", input=TEXTS)
    np.testing.assert_allclose(np.array([d.embedding for d in res.data]), want, atol=2e-4)
    assert res.usage.prompt_tokens == sum(len(i) for i in ids)
    # SGLang's native route: one dict for one prompt, a list for a batch
    one = post(runtime, "/encode", text=TEXTS[0])
    assert one.status_code == 200, one.text
    assert one.json()["meta_info"]["prompt_tokens"] == len(ids[0])
    np.testing.assert_allclose(one.json()["embedding"], want[0], atol=2e-4)
    many = post(runtime, "/encode", input_ids=ids[1:])
    assert many.status_code == 200, many.text
    np.testing.assert_allclose([o["embedding"] for o in many.json()], want[1:], atol=2e-4)


@pytest.mark.parametrize("path,body,words", [
    ("/v1/embeddings", {"input": ""}, "empty"),
    ("/v1/embeddings", {"input": []}, "empty"),
    ("/v1/embeddings", {"input": ["ok", "  "]}, "whitespace"),
    ("/v1/embeddings", {"input": [[1, 2], []]}, "empty"),
    ("/v1/embeddings", {"input": [1, 10**6]}, "vocabulary"),
    ("/v1/embeddings", {"input": "x", "dimensions": 7}, "dimensions"),
    ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ("/v1/embeddings", {"input": [{"text": "a", "image": "http://x/cat.png"}]}, "input"),
    ("/v1/embeddings", {}, "input"),
    ("/encode", {"text": "x", "image_data": "http://x/cat.png"}, "image_data"),
    ("/encode", {"text": "x", "input_ids": [1]}, "exactly one"),
    ("/encode", {"input_ids": [1, 2], "rid": ""}, "rid"),
])
def test_bad_embedding_request_is_a_400(runtime, path, body, words):
    r = post(runtime, path, **body)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"], r.text
    ok = post(runtime, "/v1/embeddings", input="still serving")
    assert ok.status_code == 200 and len(ok.json()["data"][0]["embedding"]) > 0
