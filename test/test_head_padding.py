"""Any head count at any TP degree: heads padded with zero query heads and replicated KV heads (gyges.heads).

A model shaped like SmolLM2-135M (9 heads, 3 KV heads) and a Qwen2 with 12 heads / 3 KV heads neither of
which any TP > 1 divides, give transformers' log-probs at TP1, TP2 and TP4 (gloo on CPU), and keep their
greedy tokens through live merges and splits. The padding arithmetic itself is checked in milliseconds.
"""

import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

from gyges.heads import overhead_rows, pad_heads
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.demo_model import DemoModelSpec, make_demo_model
from sglang.srt.model_executor.forward_batch import ForwardBatch
from sglang.srt.model_executor.weight_layout import build_local_shard, head_shard_copies, shard_of
from sglang.srt.server_args import ServerArgs
from test_model_forward import Pages, _check, _free_port, _tokens, hf_logprobs, make_runner

# Small stand-ins with the odd head shapes: SmolLM2-135M's 9 / 3 heads (head_dim 8 instead of 64), and a
# Qwen2 (QKV bias) with 12 / 3 heads.
SPECS = {
    "smollm_like": DemoModelSpec(arch="llama", seed=21, hidden_size=72, num_attention_heads=9,
                                 num_key_value_heads=3, intermediate_size=100),
    "qwen2_12_3": DemoModelSpec(arch="qwen2", seed=22, hidden_size=96, num_attention_heads=12,
                                num_key_value_heads=3, intermediate_size=70),
}
# Checked at TP1 only: per-head q/k RMSNorm over padded (zero) query heads and replicated KV heads.
TP1_ONLY = {"qwen3_6_2": DemoModelSpec(arch="qwen3", seed=23, hidden_size=96, head_dim=16, num_attention_heads=6,
                                       num_key_value_heads=2, intermediate_size=70)}


def _build(tmp_path_factory, specs):
    root = tmp_path_factory.mktemp("odd_heads")
    return {name: make_demo_model(str(root / name), spec) for name, spec in specs.items()}


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory):
    return _build(tmp_path_factory, SPECS)


@pytest.fixture(scope="module")
def qwen3_model(tmp_path_factory):
    return _build(tmp_path_factory, TP1_ONLY)


# ---- the padding arithmetic (pure) ----------------------------------------------------------------------


def test_smollm2_shape_padding():
    lay = pad_heads(9, 3, 4)
    assert (lay.padded_heads, lay.padded_kv_heads) == (12, 4)
    assert lay.kv_source == (0, 0, 1, 2)  # KV head 0 replicated: 4 KV slots for 3 heads
    # which rank holds which real heads at TP4 (slot order = shard order) and TP2
    assert [lay.kv_sources_of_rank(r, 4) for r in range(4)] == [(0,), (0,), (1,), (2,)]
    assert [lay.q_sources_of_rank(r, 4) for r in range(4)] == [(0, 1, -1), (2, -1, -1), (3, 4, 5), (6, 7, 8)]
    assert [lay.kv_sources_of_rank(r, 2) for r in range(2)] == [(0, 0), (1, 2)]
    assert lay.heads_per_rank(1) == 12 and lay.kv_heads_per_rank(1) == 4
    at_g2 = pad_heads(9, 3, 2)  # the same slots for --gyges-max-tp 2
    assert (at_g2.q_source, at_g2.kv_source) == (lay.q_source, lay.kv_source)
    # weight granularity 1 (static TP1): nothing padded
    assert pad_heads(9, 3, 1).is_identity and pad_heads(9, 3, 1).padded_heads == 9


def test_sglang_replication_rule_when_heads_divide():
    """Fewer KV heads than the TP degree but query heads divisible: no query padding, and rank r holds KV
    head r * Hkv / tp, exactly SGLang's rule."""
    lay = pad_heads(8, 2, 4)
    assert lay.q_source == tuple(range(8)) and lay.kv_source == (0, 0, 1, 1)
    assert [lay.kv_sources_of_rank(r, 4) for r in range(4)] == [(r * 2 // 4,) for r in range(4)]
    assert pad_heads(32, 8, 8).is_identity and pad_heads(4, 2, 2).is_identity
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        pad_heads(9, 2, 2)
    with pytest.raises(ValueError, match="must divide"):
        lay.heads_per_rank(8)


@settings(max_examples=300, deadline=None)
@given(kv=st.integers(1, 12), group=st.integers(1, 8), log_g=st.integers(0, 3))
def test_padded_layout_properties(kv, group, log_g):
    H, G = kv * group, 1 << log_g
    lay = pad_heads(H, kv, G)
    qk = lay.q_per_kv_slot
    # every TP degree dividing G splits both padded counts evenly, with the fewest KV slots possible
    assert lay.padded_kv_heads == -(-kv // G) * G and lay.padded_heads == qk * lay.padded_kv_heads
    assert (lay.padded_kv_heads == kv) == lay.is_identity == (kv % G == 0)
    # every real query head appears once, every real KV head at least once
    assert sorted(h for h in lay.q_source if h >= 0) == list(range(H))
    assert set(lay.kv_source) == set(range(kv))
    # a query slot attends with a copy of its own KV head
    for slot, h in enumerate(lay.q_source):
        if h >= 0:
            assert lay.kv_source[slot // qk] == h // group
    # the least-replicated KV head bounds the query slots per KV slot
    replicas = [lay.kv_source.count(j) for j in range(kv)]
    assert qk == -(-group // min(replicas)) and max(replicas) - min(replicas) <= 1
    for t in (t for t in (1, 2, 4, 8) if G % t == 0):
        held = [h for r in range(t) for h in lay.q_sources_of_rank(r, t) if h >= 0]
        assert sorted(held) == list(range(H))  # the ranks partition the real query heads


def test_overhead_report_for_smollm2():
    """The numbers README "Head padding" quotes (python -m gyges.heads --config <SmolLM2-135M>/config.json)."""
    cfg = {"num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "hidden_size": 576,
           "intermediate_size": 1536, "num_hidden_layers": 30}
    rows = {(r["G"], r["tp"]): r for r in overhead_rows(cfg)}
    assert rows[(1, 1)]["kv_bytes_per_token"] == rows[(1, 1)]["kv_ideal"] == 30 * 2 * 3 * 64 * 2
    four = rows[(4, 4)]
    assert (four["q_heads"], four["kv_heads"]) == ("3 / 2.25", "1 / 0.75")
    assert four["kv_bytes_per_token"] == 30 * 2 * 64 * 2 and four["kv_bytes_per_token"] / four["kv_ideal"] == 4 / 3
    assert rows[(2, 2)]["layer_weights_ratio"] == pytest.approx((576 * 20 * 64 + 768 * 576 + 3 * 576 * 1536) /
                                                               (576 * 15 * 64 + 576 * 576 + 3 * 576 * 1536))


def _reference_padded(parts, sources, unit, G):
    """The full padded fine-shard-major QKV tensor built by indexing HF heads (zeros for -1)."""
    pieces = []
    for part, src in zip(parts, sources):
        heads = part.view(-1, unit, part.shape[1])
        padded = torch.stack([heads[h] if h >= 0 else torch.zeros_like(heads[0]) for h in src])
        pieces.append(padded.view(G, -1, part.shape[1]))
    return torch.cat(pieces, dim=1).reshape(-1, parts[0].shape[1])


@pytest.mark.parametrize("H,kv,G", [(9, 3, 2), (9, 3, 4), (12, 3, 4), (6, 2, 8), (8, 8, 4)])
def test_head_row_copies_build_every_shard(H, kv, G):
    lay, D = pad_heads(H, kv, G), 3
    gen = torch.Generator().manual_seed(H * 31 + G)
    parts = [torch.randn(H * D, 5, generator=gen), torch.randn(kv * D, 5, generator=gen),
             torch.randn(kv * D, 5, generator=gen)]
    sources = [lay.q_source, lay.kv_source, lay.kv_source]
    padded = [len(s) * D for s in sources]
    full = _reference_padded(parts, sources, D, G)
    for t in (t for t in (1, 2, 4, 8) if G % t == 0):
        for r in range(t):
            local = torch.zeros(full.shape[0] // t, 5)
            for j, part in enumerate(parts):
                for c in head_shard_copies(sources[j], D, padded, j, G, r, t):
                    local[c.dst_start:c.dst_start + c.length] = part[c.src_start:c.src_start + c.length]
            torch.testing.assert_close(local, shard_of(full, r, t), rtol=0, atol=0)
    if lay.is_identity:  # the same rows as the plain (unpadded) layout
        torch.testing.assert_close(full, build_local_shard(parts, padded, G, 0, 1), rtol=0, atol=0)


def test_config_accepts_any_head_count(odd_models):
    cfg = ModelConfig.from_server_args(ServerArgs(model_path=odd_models["smollm_like"], tp_size=4))
    assert (cfg.num_attention_heads, cfg.num_kv_heads) == (9, 3)  # the checkpoint's own counts
    assert (cfg.local_attention_heads, cfg.local_kv_heads) == (3, 1)  # padded 12 / 4 over 4 ranks
    with pytest.raises(ValueError, match="tp_size=4 must divide the weight shard granularity 2"):
        ModelConfig.from_server_args(ServerArgs(model_path=odd_models["smollm_like"], tp_size=4,
                                                enable_gyges=True, gyges_max_tp=2))


# ---- log-probs against transformers at TP1, TP2, TP4 --------------------------------------------------


def _sequence_logits(runner, ids, split=17):
    """Prefill of ids[:split], then two decode steps, then the rest as one extend: logits of every position."""
    pages = Pages(runner).take(len(ids))
    out = [runner.forward(ForwardBatch.build([ids[:split]], [0], [pages], logits="all"))]
    out += [runner.forward(ForwardBatch.build([[ids[p]]], [p], [pages])) for p in (split, split + 1)]
    out.append(runner.forward(ForwardBatch.build([ids[split + 2:]], [split + 2], [pages], logits="all")))
    return torch.cat(out)


# (model, G): the layout a Gyges TP1 instance uses for --gyges-max-tp G, padded in each case
@pytest.mark.parametrize("name,g", [("smollm_like", 2), ("smollm_like", 4), ("qwen2_12_3", 4), ("qwen3_6_2", 4)])
def test_tp1_with_padded_heads_matches_transformers(odd_models, qwen3_model, name, g):
    path = {**odd_models, **qwen3_model}[name]
    runner = make_runner(path, 4, enable_gyges=True, dp_size=g, gyges_max_tp=g)
    heads = runner.model_config.heads
    assert heads.padded_heads > heads.num_heads and heads.padded_kv_heads == 4  # zero q heads, KV replicas
    assert runner.kv_pool.local_kv_heads == 4
    ids = _tokens(runner.model_config.vocab_size, seed=g)
    _check(_sequence_logits(runner, ids), hf_logprobs(path, ids))


def _padded_tp_worker(rank, world, port, paths, out_dir):
    """4 ranks: TP2 of the first model on [0, 1] (weights for G=2, static TP2) while TP2 of the second runs on
    [2, 3] with weights for G=4 (a merged Gyges pair); then TP4 of both."""
    from sglang.srt.distributed.parallel_state import create_aligned_groups, destroy_distributed, get_tp_group
    from sglang.srt.distributed.parallel_state import init_distributed

    torch.set_num_threads(1)
    init_distributed(world, rank, f"tcp://127.0.0.1:{port}", "gloo")
    create_aligned_groups(world)
    pair = get_tp_group([0, 1] if rank < 2 else [2, 3])
    everyone = get_tp_group(list(range(world)))
    names = sorted(paths)
    mine = names[rank // 2]
    g = 2 if rank < 2 else 4
    tp2 = make_runner(paths[mine], 4, tp_group=pair, tp_size=2, enable_gyges=True, dp_size=2, gyges_max_tp=g)
    ids = _tokens(tp2.model_config.vocab_size, seed=7)
    results = {"tp2": {mine: _sequence_logits(tp2, ids)}, "ids": ids, "kv_heads": [tp2.kv_pool.local_kv_heads]}
    results["tp4"] = {}
    for name in names:
        tp4 = make_runner(paths[name], 4, tp_group=everyone, tp_size=4)
        results["tp4"][name] = _sequence_logits(tp4, ids)
        results["kv_heads"].append(tp4.kv_pool.local_kv_heads)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    everyone.barrier()
    destroy_distributed()


@pytest.mark.slow
def test_tp2_and_tp4_with_padded_heads_match_transformers(odd_models, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_padded_tp_worker, args=(4, _free_port(), odd_models, str(tmp_path)), nprocs=4, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    ids = ranks[0]["ids"]
    assert ranks[2]["ids"] == ids
    assert [r["kv_heads"] for r in ranks] == [[2, 1, 1]] * 4  # 4 padded KV heads over 2 / 4 ranks
    for first, name in zip((0, 2), sorted(odd_models)):
        ref = hf_logprobs(odd_models[name], ids)
        torch.testing.assert_close(ranks[first + 1]["tp2"][name], ranks[first]["tp2"][name], rtol=0, atol=0)
        _check(ranks[first]["tp2"][name], ref)
        for r in range(4):
            torch.testing.assert_close(ranks[r]["tp4"][name], ranks[0]["tp4"][name], rtol=0, atol=0)
        _check(ranks[0]["tp4"][name], ref)


# ---- live merges and splits ------------------------------------------------------------------------------


@pytest.mark.slow
def test_live_merges_and_splits_keep_tokens(odd_models):
    """TP1 x 4 -> TP2 + 2 x TP1 -> TP4 -> 2 x TP2 -> TP1 x 4 while decoding: every greedy token equals the run
    without transformations (the SmolLM2-shaped model, weights and KV padded for TP4)."""
    import sglang
    from test_gyges_live import PARAMS, _assert_all_pages_free, _assert_same, _prompts, _run_with_transforms

    eng = sglang.Engine(model_path=odd_models["smollm_like"], dp_size=4, enable_gyges=True, device="cpu",
                        dtype="float32", page_size=4, log_level="warning")
    try:
        prompts = _prompts(6)
        reference = eng.generate(input_ids=prompts, sampling_params=PARAMS, return_logprob=True)
        _assert_all_pages_free(eng)
        outs, bds = _run_with_transforms(eng, prompts, {6: ([0, 1], 2), 14: ([0, 1, 2, 3], 4),
                                                        22: ([0, 1, 2, 3], 2), 30: ([0, 1], 1), 31: ([2, 3], 1)})
        _assert_same(outs, reference)
        assert [(b["kind"], b["tp"]) for b in bds] == [("merge", 2), ("merge", 4), ("split", 2), ("split", 1),
                                                      ("split", 1)]
        assert all(b["running_requests"] > 0 and b["kv_bytes"] > 0 for b in bds[:3]), bds
        assert [i["tp"] for i in eng.gyges_topology()["instances"]] == [1, 1, 1, 1]
        _assert_all_pages_free(eng)
    finally:
        eng.shutdown()
