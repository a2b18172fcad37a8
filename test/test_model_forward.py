"""ModelRunner against HF transformers: log-probs of every position of a 40-token sequence, fed as one prefill,
as a cached prefix + the rest, token by token, and batched with other requests; TP2 over gloo; clear errors."""

import json
import os
import shutil
import socket

import pytest
import torch

from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.distributed.parallel_state import get_tp_group
from sglang.srt.model_executor.forward_batch import ForwardBatch
from sglang.srt.model_executor.model_runner import ModelRunner
from sglang.srt.server_args import ServerArgs

MODELS = ["llama", "llama_tied", "llama_sharded", "llama3_rope", "qwen2", "qwen3"]
PAGE_SIZES = [1, 16]
SEQ_LEN = 40
PREFIX = 17
ATOL = 2e-3


def _tokens(vocab, n=SEQ_LEN, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=gen).tolist()


_HF_CACHE = {}


def hf_logprobs(path, ids):
    """log-softmax of transformers' float32 logits at every position."""
    from transformers import AutoModelForCausalLM

    key = (path, tuple(ids))
    if key not in _HF_CACHE:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            _HF_CACHE[key] = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return _HF_CACHE[key]


def make_runner(path, page_size=16, tp_group=None, **kw):
    args = dict(model_path=path, page_size=page_size, device_memory="64MiB")
    args.update(kw)
    sa = ServerArgs(**args)
    return ModelRunner(sa, ModelConfig.from_server_args(sa), tp_group or get_tp_group([0]), "cpu",
                       show_progress=False)


class Pages:
    """Hands out fresh page ids after the runner's reserved (weight) pages (a stand-in for the allocator)."""

    def __init__(self, runner):
        self.page_size, self.next = runner.page_size, runner.reserved_pages

    def take(self, num_tokens):
        n = -(-num_tokens // self.page_size)
        out = list(range(self.next, self.next + n))
        self.next += n
        return out


def _check(logits, ref):
    torch.testing.assert_close(logits.log_softmax(-1), ref, atol=ATOL, rtol=0)


_RUNNERS = {}


def runner_for(test_model, name, page_size):
    if (name, page_size) not in _RUNNERS:
        _RUNNERS[(name, page_size)] = make_runner(test_model(name), page_size)
    return _RUNNERS[(name, page_size)]


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("name", MODELS)
def test_prefill_matches_transformers(test_model, name, page_size):
    runner = runner_for(test_model, name, page_size)
    ids = _tokens(runner.model_config.vocab_size)
    pages = Pages(runner).take(SEQ_LEN)
    logits = runner.forward(ForwardBatch.build([ids], [0], [pages], logits="all"))
    assert logits.dtype == torch.float32 and logits.shape == (SEQ_LEN, runner.model_config.vocab_size)
    _check(logits, hf_logprobs(test_model(name), ids))


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("name", MODELS)
def test_cached_prefix_then_rest_matches_transformers(test_model, name, page_size):
    runner = runner_for(test_model, name, page_size)
    ids = _tokens(runner.model_config.vocab_size, seed=1)
    ref = hf_logprobs(test_model(name), ids)
    pages = Pages(runner).take(SEQ_LEN)
    first = runner.forward(ForwardBatch.build([ids[:PREFIX]], [0], [pages[: -(-PREFIX // page_size)]], logits="all"))
    rest = runner.forward(ForwardBatch.build([ids[PREFIX:]], [PREFIX], [pages], logits="all"))
    _check(first, ref[:PREFIX])
    _check(rest, ref[PREFIX:])


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("name", MODELS)
def test_token_by_token_decode_matches_transformers(test_model, name, page_size):
    runner = runner_for(test_model, name, page_size)
    ids = _tokens(runner.model_config.vocab_size, seed=2)
    ref = hf_logprobs(test_model(name), ids)
    pages = Pages(runner).take(SEQ_LEN)
    prefill = runner.forward(ForwardBatch.build([ids[:5]], [0], [pages], logits="all"))
    _check(prefill, ref[:5])
    for pos in range(5, SEQ_LEN):
        step = runner.forward(ForwardBatch.build([[ids[pos]]], [pos], [pages[: pos // page_size + 1]]))
        assert step.shape == (1, runner.model_config.vocab_size)
        _check(step, ref[pos:pos + 1])


def _mixed_batch(runner, page_size, seqs):
    """Requests: A decodes its last token after a cached prefix, B extends a cached prefix, C prefills whole.
    Returns (batch, per-request slices of the logits rows, the same requests run alone)."""
    alloc = Pages(runner)
    a, b, c = seqs
    pa, pb, pc = alloc.take(len(a)), alloc.take(len(b)), alloc.take(len(c))
    runner.forward(ForwardBatch.build([a[:-1], b[:PREFIX]], [0, 0], [pa, pb]))  # fill the prefixes
    batch = ForwardBatch.build([a[-1:], b[PREFIX:], c], [len(a) - 1, PREFIX, 0], [pa, pb, pc], logits="all")
    return batch, [slice(0, 1), slice(1, 1 + len(b) - PREFIX), slice(1 + len(b) - PREFIX, None)]


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("name", MODELS)
def test_batched_requests_match_running_alone(test_model, name, page_size):
    runner = runner_for(test_model, name, page_size)
    vocab = runner.model_config.vocab_size
    seqs = [_tokens(vocab, 40, seed=3), _tokens(vocab, 29, seed=4), _tokens(vocab, 9, seed=5)]
    batch, rows = _mixed_batch(runner, page_size, seqs)
    logits = runner.forward(batch)
    alone = [
        runner.forward(ForwardBatch.build([s], [0], [Pages(runner).take(len(s))], logits="all")) for s in seqs
    ]
    starts = [len(seqs[0]) - 1, PREFIX, 0]
    for seq, sl, start, solo in zip(seqs, rows, starts, alone):
        torch.testing.assert_close(logits[sl], solo[start:], atol=1e-4, rtol=1e-4)
        _check(logits[sl], hf_logprobs(test_model(name), seq)[start:])


@pytest.mark.parametrize("name,granularity", [("llama3_rope", 4), ("qwen3", 2), ("qwen2", 2)])
def test_weights_padded_for_larger_tp_give_the_same_logits(test_model, name, granularity):
    """Gyges lays weights out for TP up to gyges_max_tp; at TP1 the result must not change."""
    runner = make_runner(test_model(name), 16, enable_gyges=True, gyges_max_tp=granularity)
    assert runner.model_config.weight_granularity == granularity
    ids = _tokens(runner.model_config.vocab_size)
    logits = runner.forward(ForwardBatch.build([ids], [0], [Pages(runner).take(SEQ_LEN)], logits="all"))
    _check(logits, hf_logprobs(test_model(name), ids))


def test_legacy_rope_keys_give_the_same_model(test_model, tmp_path):
    src = test_model("llama3_rope")
    dst = tmp_path / "legacy"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    (dst / "config.json").write_text(json.dumps(cfg))
    new = ModelConfig.from_server_args(ServerArgs(model_path=src))
    old = ModelConfig.from_server_args(ServerArgs(model_path=str(dst)))
    assert old.rope["rope_type"] == "llama3"
    assert old.rope == new.rope


def test_model_config_fields(test_model):
    path = test_model("qwen3")
    cfg = ModelConfig.from_server_args(ServerArgs(model_path=path, context_length=1000))
    hf = json.loads(open(os.path.join(path, "config.json")).read())
    assert cfg.architecture == "Qwen3ForCausalLM"
    assert (cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 32)
    assert cfg.hidden_size == hf["hidden_size"] and cfg.num_layers == hf["num_hidden_layers"]
    assert cfg.context_len == 1000 and cfg.dtype == torch.float32
    assert hf["eos_token_id"] in cfg.eos_token_ids
    assert ModelConfig.from_server_args(ServerArgs(model_path=path)).context_len == hf["max_position_embeddings"]
    assert ModelConfig.from_server_args(ServerArgs(model_path=path, dtype="bfloat16")).dtype == torch.bfloat16


def test_runner_memory_accounting(test_model):
    runner = make_runner(test_model("llama"), 16)
    cfg = runner.model_config
    assert runner.kv_pool.kv_buffer.shape == (runner.num_pages, cfg.num_kv_heads, cfg.num_layers, 2, 16,
                                               cfg.head_dim)
    budget = int(ServerArgs(device_memory="64MiB").device_memory_bytes() * 0.88)
    page = runner.kv_pool.bytes_per_page
    usable = runner.num_pages - runner.reserved_pages  # pages not covered by the packed weights
    buffers = sum(b.numel() * b.element_size() for b in runner.model.buffers())  # rotary caches, outside the arena
    assert usable == (budget - buffers) // page - runner.reserved_pages
    assert runner.reserved_pages * page >= runner.weight_store.weights_end > (runner.reserved_pages - 1) * page
    assert runner.weight_store.arena_bytes + buffers <= budget  # weights + KV + buffers within the budget
    assert runner.max_total_num_tokens == usable * 16
    assert runner.kv_pool_bytes == usable * page
    capped = make_runner(test_model("llama"), 16, max_total_tokens=100)
    assert capped.num_pages - capped.reserved_pages == 6 and capped.max_total_num_tokens == 96


# ---- errors ------------------------------------------------------------------------------------------


def _copy_with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads(open(os.path.join(dst, "config.json")).read())
    cfg.update(changes)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return str(dst)


def test_unknown_architecture_is_rejected(test_model, tmp_path):
    path = _copy_with_config(test_model("llama"), tmp_path / "m", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM, MistralForCausalLM, "
                                         "Qwen2ForCausalLM, Qwen3ForCausalLM"):
        ModelConfig.from_server_args(ServerArgs(model_path=path))


def test_checkpoint_shape_mismatch_is_reported(test_model, tmp_path):
    path = _copy_with_config(test_model("llama"), tmp_path / "m", intermediate_size=180)
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight .*shape \[\d+, \d+\], but the config expects "
                                         r"\[(180, 64|64, 180)\]"):
        make_runner(path)


def test_missing_tensors_are_listed(test_model, tmp_path):
    from safetensors.torch import load_file, save_file

    dst = tmp_path / "m"
    shutil.copytree(test_model("llama"), dst)
    tensors = load_file(str(dst / "model.safetensors"))
    del tensors["model.norm.weight"], tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing 2 tensor.*model.layers.1.mlp.up_proj.weight, model.norm.weight"):
        make_runner(str(dst))


def test_tp_above_the_kv_heads_replicates_them(test_model):
    """4 heads / 2 KV heads at TP8: KV heads replicated, one per rank (test_head_padding.py covers the rest)."""
    cfg = ModelConfig.from_server_args(ServerArgs(model_path=test_model("llama"), tp_size=8))
    assert (cfg.local_attention_heads, cfg.local_kv_heads) == (1, 1)
    assert cfg.heads.kv_source == (0, 0, 0, 0, 1, 1, 1, 1)


def test_budget_too_small_is_rejected(test_model):
    with pytest.raises(ValueError, match=r"weights take \d+ bytes of the \d+ byte budget"):
        make_runner(test_model("llama"), device_memory="200KB")


# ---- tensor parallel ----------------------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tp_worker(rank, world, port, paths, out_dir):
    from sglang.srt.distributed.parallel_state import create_aligned_groups, destroy_distributed, init_distributed

    torch.set_num_threads(1)
    init_distributed(world, rank, f"tcp://127.0.0.1:{port}", "gloo")
    create_aligned_groups(world)
    group = get_tp_group(list(range(world)))
    assert group.broadcast_object({"hello": rank} if rank == 0 else None) == {"hello": 0}
    results = {}
    for name, path in paths.items():
        runner = make_runner(path, 16, tp_group=group, tp_size=world)
        assert runner.kv_pool.local_kv_heads == runner.model_config.kv_heads_per_rank(world)
        vocab = runner.model_config.vocab_size
        ids = _tokens(vocab)
        pages = Pages(runner).take(SEQ_LEN)
        prefill = runner.forward(ForwardBatch.build([ids[:PREFIX]], [0], [pages], logits="all"))
        decode = [runner.forward(ForwardBatch.build([[ids[p]]], [p], [pages])) for p in range(PREFIX, PREFIX + 4)]
        rest = runner.forward(ForwardBatch.build([ids[PREFIX + 4:]], [PREFIX + 4], [pages], logits="all"))
        logits = torch.cat([prefill] + decode + [rest])
        results[name] = {"ids": ids, "logits": logits, "num_pages": runner.num_pages}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    group.barrier()
    destroy_distributed()


@pytest.mark.slow
def test_tp2_matches_transformers(test_model, tmp_path):
    import torch.multiprocessing as mp

    paths = {name: test_model(name) for name in ("llama", "qwen3")}
    mp.spawn(_tp_worker, args=(2, _free_port(), paths, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name, path in paths.items():
        torch.testing.assert_close(r0[name]["logits"], r1[name]["logits"], rtol=0, atol=0)
        assert r0[name]["num_pages"] == r1[name]["num_pages"]
        _check(r0[name]["logits"], hf_logprobs(path, r0[name]["ids"]))
