"""Constrained decoding through xgrammar: random logits + grammar masks must yield valid outputs."""

import json
import re

import pytest
import torch

from sglang.srt.constrained.xgrammar_backend import Grammar, GrammarBackend, apply_masks
from sglang.srt.sampling.sampler import Sampler, SamplingState
from sglang.srt.sampling.sampling_params import SamplingParams

MODEL_VOCAB = 520  # larger than the tokenizer's 512, like a padded lm_head


@pytest.fixture(scope="module")
def tokenizer(test_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(test_model("llama"))


@pytest.fixture(scope="module")
def backend(tokenizer):
    return GrammarBackend(tokenizer, vocab_size=MODEL_VOCAB, eos_token_ids=[tokenizer.eos_token_id])


def decode_loop(backend, tokenizer, params_dict, seed, max_steps=80, eos_bias=0.0):
    """Scheduler-like loop: sample with grammar masks, accept, stop at EOS. Returns (text, finished)."""
    params = SamplingParams.from_dict(params_dict)
    params.verify(MODEL_VOCAB)
    params.normalize(tokenizer)
    grammar = backend.create_for_params(params)
    state = SamplingState.create(params, [1], default_seed=seed)
    sampler = Sampler(eos_token_ids=[tokenizer.eos_token_id])
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(max_steps):
        logits = torch.randn(1, MODEL_VOCAB, generator=gen) * 2
        logits[0, tokenizer.eos_token_id] += eos_bias
        tok = sampler.sample(logits, [state], [out], [[1]], grammars=[grammar]).next_token_ids[0]
        assert grammar.accept_token(tok), f"sampler produced a token the grammar forbids: {tok}"
        if tok == tokenizer.eos_token_id:
            assert grammar.is_terminated()
            return tokenizer.decode(out), True
        out.append(tok)
    return tokenizer.decode(out), False


@pytest.mark.parametrize("seed", range(6))
def test_regex_decode_matches(backend, tokenizer, seed):
    pattern = r"[0-9]{3}-[a-z]+"
    text, finished = decode_loop(backend, tokenizer, {"regex": pattern, "temperature": 1.0}, seed, eos_bias=3.0)
    assert finished, text
    assert re.fullmatch(pattern, text), text


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("seed", range(4))
def test_json_schema_decode_validates(backend, tokenizer, seed):
    text, finished = decode_loop(backend, tokenizer, {"json_schema": SCHEMA, "temperature": 0.8},
                                 seed, max_steps=200, eos_bias=5.0)
    assert finished, text
    obj = json.loads(text)
    assert set(obj) == {"name", "age", "ok"}
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 8
    assert isinstance(obj["age"], int) and not isinstance(obj["age"], bool) and 0 <= obj["age"] <= 120
    assert isinstance(obj["ok"], bool)
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.validate(obj, SCHEMA)


def test_ebnf_decode(backend, tokenizer):
    grammar = 'root ::= ("yes" | "no") " " [0-9]'
    text, finished = decode_loop(backend, tokenizer, {"ebnf": grammar}, seed=3, eos_bias=2.0)
    assert finished and re.fullmatch(r"(yes|no) [0-9]", text), text


@pytest.mark.parametrize("kind, value, fragment", [
    ("regex", "[0-9", "Unclosed"),
    ("json_schema", '{"type": "foo"}', "foo"),
    ("ebnf", "root ::= ", "Expect"),
])
def test_invalid_grammar_is_value_error(backend, kind, value, fragment):
    with pytest.raises(ValueError, match=f"Invalid {kind}:.*{fragment}"):
        backend.compile(kind, value)
    with pytest.raises(ValueError, match="Unknown grammar kind"):
        backend.compile("lark", "x")


def test_compile_cache(backend):
    hits = backend.cache_hits
    a = backend.compile("regex", "ab+c")
    b = backend.compile("regex", "ab+c")
    assert a is b and backend.cache_hits == hits + 1


def test_eos_allowed_only_when_complete(backend, tokenizer):
    eos = tokenizer.eos_token_id
    g = backend.create("regex", "ab")
    assert not g.allowed_token_mask()[eos]
    for tok in tokenizer.encode("ab", add_special_tokens=False):
        assert g.accept_token(tok)
    mask = g.allowed_token_mask()
    assert mask[eos] and mask.sum() == 1 and g.is_completed() and not g.is_terminated()
    assert not g.accept_token(tokenizer.encode("a", add_special_tokens=False)[0])
    assert g.accept_token(eos) and g.is_terminated()
    assert mask.shape[0] == MODEL_VOCAB and not mask[512:].any()


def test_apply_masks_batch_with_unconstrained_rows(backend, tokenizer):
    g = backend.create("regex", "[0-9]+")
    logits = torch.zeros(3, MODEL_VOCAB)
    apply_masks(logits, [None, g, None])
    assert torch.isfinite(logits[0]).all() and torch.isfinite(logits[2]).all()
    allowed = torch.isfinite(logits[1])
    assert torch.equal(allowed, g.allowed_token_mask())
    for t in torch.nonzero(allowed).flatten().tolist():
        assert tokenizer.decode([t]).isdigit()
    row = torch.zeros(MODEL_VOCAB)
    g.fill_mask(row)
    assert torch.equal(torch.isfinite(row), allowed)


def test_copy_and_restore_state(backend, tokenizer):
    g = backend.create("regex", "[a-z]{2}[0-9]{2}")
    toks = tokenizer.encode("ab1", add_special_tokens=False)
    for t in toks:
        assert g.accept_token(t)
    fork = g.copy()
    restored = backend.restore(g.state_dict())
    assert restored.accepted_tokens == g.accepted_tokens == toks
    assert torch.equal(restored.allowed_token_mask(), g.allowed_token_mask())
    digit = tokenizer.encode("5", add_special_tokens=False)[0]
    assert fork.accept_token(digit) and fork.is_completed()
    assert not g.is_completed()  # the original is independent of its fork
    import pickle
    pickle.dumps(g.state_dict())
    with pytest.raises(TypeError, match="state_dict"):
        pickle.dumps(g)


def test_greedy_constrained_with_min_new_tokens_does_not_break(backend, tokenizer):
    """Grammar allows only EOS while min_new_tokens wants more: the grammar wins, no NaN."""
    g = backend.create("regex", "a")
    for t in tokenizer.encode("a", add_special_tokens=False):
        g.accept_token(t)
    p = SamplingParams(temperature=0, min_new_tokens=5).normalize(tokenizer)
    out = Sampler(eos_token_ids=[tokenizer.eos_token_id]).sample(torch.randn(1, MODEL_VOCAB), [SamplingState.create(p)],
                                                   [[5]], grammars=[g])
    assert out.next_token_ids == [tokenizer.eos_token_id]
