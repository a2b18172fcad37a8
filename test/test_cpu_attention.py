"""sgl_kernel's CPU paged attention (backend `cpu`) against the torch-native backend (the reference).

Each case: a head-centric KV pool whose pages already hold random K/V (the cached prefixes), pages handed out
in shuffled order, and one mixed batch: decodes (extend 1), prefills without a prefix, prefill chunks over a
cached prefix, a request with no new tokens. Both backends run the same layer on copies of the pool; the new
tokens' K/V must land in the same slots (bit for bit) and the outputs must agree (float32: 1e-5; bfloat16:
both against the float32 reference, within bfloat16 rounding).
Shapes: head_dim 64-256 (and 72, 80), GQA ratio 1-8 and 72, page size 1-16, float32 and bfloat16; small, so the file runs in seconds.
"""

import math

import pytest
import torch

from sglang.srt.layers.attention.cpu_backend import CpuPagedAttnBackend
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.kv_pool import HeadCentricKVPool
from sglang.srt.model_executor.forward_batch import ForwardBatch

NUM_LAYERS = 2
LAYER = 1

# (head_dim, query heads, KV heads, page size, dtype, [(prefix, extend), ...])
CASES = [
    (64, 4, 4, 16, torch.float32, [(0, 1), (5, 1), (37, 1), (70, 1)]),  # decode only, MHA
    (64, 8, 2, 4, torch.float32, [(0, 23), (0, 1), (12, 9), (33, 1), (16, 0)]),  # mixed, GQA 4, empty request
    (128, 8, 1, 1, torch.float32, [(3, 40), (17, 1), (0, 2)]),  # page size 1, GQA 8 (MQA)
    (256, 2, 1, 16, torch.float32, [(31, 17), (64, 1)]),  # head_dim 256, a chunk past a page boundary
    (80, 6, 3, 8, torch.float32, [(0, 50), (9, 33)]),  # head_dim not a power of two, prefill only
    (72, 72, 1, 4, torch.float32, [(3, 2), (10, 1)]),  # GQA 72 (more rows than one work item holds); 72 % 16 != 0
    (64, 4, 2, 16, torch.bfloat16, [(0, 1), (20, 1), (45, 1)]),
    (128, 8, 2, 4, torch.bfloat16, [(0, 30), (11, 1), (28, 12)]),
    (256, 4, 4, 1, torch.bfloat16, [(5, 7), (40, 1)]),
]


def _batch(reqs, page_size, num_pages, seed):
    """A ForwardBatch over shuffled pages; returns it with the new tokens' count."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_pages, generator=g).tolist()
    tables, new_tokens = [], []
    for prefix, extend in reqs:
        n = math.ceil(max(prefix + extend, 1) / page_size)
        tables.append([perm.pop() for _ in range(n)])
        new_tokens.append([1] * extend)
    return ForwardBatch.build(new_tokens, [p for p, _ in reqs], tables, logits="all")


def _pool(num_pages, page_size, kv_heads, head_dim, dtype, seed):
    pool = HeadCentricKVPool(num_pages, page_size, kv_heads, NUM_LAYERS, head_dim, dtype, "cpu")
    g = torch.Generator().manual_seed(seed)
    pool.kv_buffer.copy_(torch.randn(pool.kv_buffer.shape, generator=g))  # the cached prefixes (and garbage)
    return pool


def _run(backend, fb, pool, q, k, v):
    backend.prepare(fb, pool, "cpu")
    return backend.forward(q, k, v, LAYER, fb, pool)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"d{c[0]}-h{c[1]}/{c[2]}-ps{c[3]}-{str(c[4])[6:]}")
def test_kernel_matches_torch_reference(case):
    head_dim, heads, kv_heads, page_size, dtype, reqs = case
    tokens = sum(e for _, e in reqs)
    num_pages = sum(math.ceil(max(p + e, 1) / page_size) for p, e in reqs) + 3
    fb = _batch(reqs, page_size, num_pages, seed=head_dim + heads)
    g = torch.Generator().manual_seed(7)
    # q, k, v as the model makes them: views of one fused projection output (rows strided)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.view(tokens, heads, head_dim)
    k = k.view(tokens, kv_heads, head_dim)
    v = v.view(tokens, kv_heads, head_dim)

    pool = _pool(num_pages, page_size, kv_heads, head_dim, dtype, seed=3)
    ref_pool = _pool(num_pages, page_size, kv_heads, head_dim, torch.float32, seed=3)
    ref_pool.kv_buffer.copy_(pool.kv_buffer.float())  # the same (bf16-representable) values in float32
    got = _run(CpuPagedAttnBackend(), fb, pool, q, k, v)
    ref = _run(TorchNativeAttnBackend(), fb, ref_pool, q.float(), k.float(), v.float())

    assert got.shape == (tokens, heads, head_dim) and got.dtype == dtype
    # the new tokens' K/V went to the same slots, and nothing else changed
    assert torch.equal(pool.kv_buffer.float(), ref_pool.kv_buffer)
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    else:
        native = _run(TorchNativeAttnBackend(), fb, _pool(num_pages, page_size, kv_heads, head_dim, dtype, seed=3),
                      q, k, v)
        native_err = (native.float() - ref).abs().max().item()
        err = (got.float() - ref).abs().max().item()
        assert err <= max(2 * native_err, 1e-2), (err, native_err)  # no worse than torch in bfloat16
        torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2)


def test_one_token_per_request_equals_one_request_alone():
    """A decode's output does not depend on the other requests of its batch (nothing padded to anything)."""
    head_dim, heads, kv_heads, page_size = 64, 4, 2, 4
    reqs = [(9, 1), (0, 40), (30, 1)]
    num_pages = 40
    fb = _batch(reqs, page_size, num_pages, seed=1)
    q = torch.randn(42, heads, head_dim)
    k, v = torch.randn(42, kv_heads, head_dim), torch.randn(42, kv_heads, head_dim)
    pool = _pool(num_pages, page_size, kv_heads, head_dim, torch.float32, seed=2)
    together = _run(CpuPagedAttnBackend(), fb, pool, q, k, v)
    pool = _pool(num_pages, page_size, kv_heads, head_dim, torch.float32, seed=2)
    alone_fb = ForwardBatch(fb.input_ids[-1:], fb.positions[-1:], fb.extend_lens[2:], fb.prefix_lens[2:],
                            fb.page_table[2:], torch.tensor([0]))
    alone = _run(CpuPagedAttnBackend(), alone_fb, pool, q[-1:], k[-1:], v[-1:])
    torch.testing.assert_close(together[-1:], alone, rtol=0, atol=0)


def test_bad_inputs_are_rejected():
    pool = HeadCentricKVPool(4, 4, 2, NUM_LAYERS, 64, torch.float32, "cpu")
    fb = ForwardBatch.build([[1, 1]], [0], [[0]])
    backend = CpuPagedAttnBackend()
    backend.prepare(fb, pool, "cpu")
    with pytest.raises(RuntimeError, match="multiple of KV heads"):
        backend.forward(torch.randn(2, 3, 64), torch.randn(2, 2, 64), torch.randn(2, 2, 64), 0, fb, pool)
    with pytest.raises(RuntimeError, match="layer"):
        backend.forward(torch.randn(2, 4, 64), torch.randn(2, 2, 64), torch.randn(2, 2, 64), 5, fb, pool)
    with pytest.raises(ValueError, match="float32"):
        CpuPagedAttnBackend().prepare(fb, HeadCentricKVPool(4, 4, 2, NUM_LAYERS, 64, torch.float16, "cpu"), "cpu")


def test_backend_choice(monkeypatch):
    from sglang.srt.distributed.parallel_state import resolve_collective
    from sglang.srt.layers.attention.selection import resolve_attention_backend

    assert resolve_attention_backend(None, "cpu", torch.float32) == "cpu"  # the extension builds here
    assert resolve_attention_backend(None, "cpu", torch.float16) == "torch_native"
    assert resolve_attention_backend("torch_native", "cpu", torch.float32) == "torch_native"
    with pytest.raises(ValueError, match="runs on CPU"):
        resolve_attention_backend("cpu", "cpu", torch.float16)
    with pytest.raises(ValueError, match="expected one of"):
        resolve_attention_backend("triton-x", "cpu", torch.float32)
    monkeypatch.setitem(__import__("sys").modules, "sgl_kernel", None)  # not installed: the torch code serves
    assert resolve_attention_backend(None, "cpu", torch.float32) == "torch_native"
    assert resolve_collective("auto") == "gloo"
