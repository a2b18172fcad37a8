"""sgl_kernel's Triton kernels on CPU, in Triton's interpreter (TRITON_INTERPRET=1, set here for the import only).

Triton decides at definition time (when a @triton.jit function is created) whether a kernel is compiled or
interpreted, and its interpreter checks the variable again while it runs (triton 3.9). So this module sets
TRITON_INTERPRET=1 while it imports (or re-imports) the kernel modules and while its own tests run (an autouse
fixture), and restores the environment otherwise: other test modules and their subprocesses never see it.
The same kernel source is what CUDA compiles.

    backend     TritonAttnBackend against TorchNativeAttnBackend (the reference) on one mixed batch per case (decodes,
                prefills, chunks over a cached prefix, a request with no new tokens) over shuffled pages: the new
                tokens' K/V land in the same slots bit for bit, outputs agree (float32 1e-5; 16-bit within rounding);
                head_dim 16-256 (and 80), GQA 1-8 and 12, page size 1-16, float32 / bfloat16 / float16
    kernels     sgl_kernel.triton_ops.check's cases (the GPU self-check): decode_attention / extend_attention with
                the launchers' tiles and small ones (several key tiles, query blocks and key splits, empty splits)
                against reference.paged_attention_ref
    block copy  copy_runs / gather_runs / scatter_runs against slice copies, for every word width, and pages of
                a pool slice
    engine      ModelRunner with --attention-backend triton: logits of a tiny random Llama equal transformers' (prefill,
                cached prefix + rest, token-by-token decode, a mixed batch)
    choice      --attention-backend triton resolution, and sgl_kernel without triton
Shapes are tiny: the interpreter runs each program instance in Python.
"""

import importlib
import math
import os
import sys

import pytest
import torch


def _restore_interpret(saved):
    if saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = saved


_saved = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    import sgl_kernel.triton_ops as triton_ops
    from sgl_kernel.triton_ops import check

    pa, bc = triton_ops.attention_kernels(), triton_ops.copy_kernels()
    if not pa.INTERPRETED:  # imported earlier in this process without the interpreter
        pa = importlib.reload(pa)
    if not bc.INTERPRETED:
        bc = importlib.reload(bc)
finally:
    _restore_interpret(_saved)

from sglang.srt.layers.attention.selection import create_attention_backend, resolve_attention_backend  # noqa: E402
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend  # noqa: E402
from sglang.srt.layers.attention.triton_backend import TritonAttnBackend  # noqa: E402
from sglang.srt.mem_cache.kv_pool import HeadCentricKVPool  # noqa: E402
from sglang.srt.model_executor.forward_batch import ForwardBatch  # noqa: E402

from test_cpu_attention import NUM_LAYERS, _batch, _pool, _run  # noqa: E402 - the same batches and pools


@pytest.fixture(autouse=True, scope="module")
def _interpret():
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    _restore_interpret(saved)

# (head_dim, query heads, KV heads, page size, dtype, [(prefix, extend), ...])
CASES = [
    (64, 4, 4, 16, torch.float32, [(0, 1), (5, 1), (37, 1)]),  # decode only, MHA
    (64, 8, 2, 4, torch.float32, [(0, 23), (0, 1), (12, 9), (33, 1), (16, 0)]),  # mixed, GQA 4, empty request
    (128, 8, 1, 1, torch.float32, [(3, 20), (17, 1)]),  # page size 1, MQA (GQA 8)
    (256, 2, 1, 16, torch.float32, [(31, 5), (20, 1)]),  # head_dim 256, a chunk across a page boundary
    (80, 12, 1, 8, torch.float32, [(9, 6), (4, 1)]),  # head_dim not a power of two, GQA 12
    (16, 4, 2, 16, torch.float32, [(0, 70)]),  # prefill only: two query blocks of 64, several key tiles
    (64, 4, 2, 16, torch.bfloat16, [(0, 1), (20, 1), (0, 9)]),
    (128, 4, 2, 4, torch.bfloat16, [(11, 1), (10, 6)]),
    (64, 4, 1, 8, torch.float16, [(5, 4), (30, 1)]),
]


def _num_pages(reqs, page_size):
    return sum(math.ceil(max(p + e, 1) / page_size) for p, e in reqs) + 3


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"d{c[0]}-h{c[1]}/{c[2]}-ps{c[3]}-{str(c[4])[6:]}")
def test_backend_matches_torch_reference(case):
    head_dim, heads, kv_heads, page_size, dtype, reqs = case
    tokens = sum(e for _, e in reqs)
    num_pages = _num_pages(reqs, page_size)
    fb = _batch(reqs, page_size, num_pages, seed=head_dim + heads)
    g = torch.Generator().manual_seed(7)
    # q, k, v as the model makes them: views of one fused projection output (rows strided)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)

    pool = _pool(num_pages, page_size, kv_heads, head_dim, dtype, 3)
    ref_pool = _pool(num_pages, page_size, kv_heads, head_dim, torch.float32, 3)
    ref_pool.kv_buffer.copy_(pool.kv_buffer.float())  # the same (16-bit representable) values in float32
    got = _run(TritonAttnBackend(), fb, pool, q, k, v)
    ref = _run(TorchNativeAttnBackend(), fb, ref_pool, q.float(), k.float(), v.float())

    assert got.shape == (tokens, heads, head_dim) and got.dtype == dtype
    assert torch.equal(pool.kv_buffer.float(), ref_pool.kv_buffer)  # same slots written, nothing else touched
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    else:
        native = _run(TorchNativeAttnBackend(), fb, _pool(num_pages, page_size, kv_heads, head_dim, dtype, 3), q, k, v)
        native_err = (native.float() - ref).abs().max().item()
        err = (got.float() - ref).abs().max().item()
        # within a small multiple of torch's own 16-bit error (the kernel also rounds the probabilities to 16 bits
        # before P @ V, as the GPU's tensor cores take them)
        assert err <= max(3 * native_err, 2e-2), (err, native_err)
        torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("case", check.CASES, ids=lambda c: c.name)
def test_kernels_match_reference(case):
    """sgl_kernel.triton_ops.check's cases (what it runs on a GPU): the kernels straight, with the launchers' tiles
    and with small ones (several key tiles, query blocks, key splits, empty splits), against the torch reference."""
    result = check.run_case(case, "cpu")
    assert result["store_equal"]
    assert result["within_tol"], result


def test_extend_blocks_cover_each_request_alone():
    block_req, block_start = pa.extend_blocks(torch.tensor([37, 19, 1, 16, 0]), torch.tensor([0, 1, 3]), 16)
    assert block_req.tolist() == [0, 0, 0, 1, 1, 3] and block_start.tolist() == [0, 16, 32, 0, 16, 0]


def test_decode_row_does_not_depend_on_the_batch():
    """A decode's output is the same alone and next to a long prefill (nothing padded to anything)."""
    head_dim, heads, kv_heads, page_size = 64, 4, 2, 4
    reqs = [(9, 1), (0, 40), (30, 1)]
    fb = _batch(reqs, page_size, 40, seed=1)
    q, k, v = torch.randn(42, heads, head_dim), torch.randn(42, kv_heads, head_dim), torch.randn(42, kv_heads, head_dim)
    together = _run(TritonAttnBackend(), fb, _pool(40, page_size, kv_heads, head_dim, torch.float32, 2), q, k, v)
    alone_fb = ForwardBatch(fb.input_ids[-1:], fb.positions[-1:], fb.extend_lens[2:], fb.prefix_lens[2:],
                            fb.page_table[2:], torch.tensor([0]))
    alone = _run(TritonAttnBackend(), alone_fb, _pool(40, page_size, kv_heads, head_dim, torch.float32, 2), q[-1:],
                 k[-1:], v[-1:])
    torch.testing.assert_close(together[-1:], alone, rtol=0, atol=0)


@pytest.mark.parametrize("unit", [8, 4, 2, 1])
def test_block_copy_matches_slice_copies(unit):
    """Byte runs (offsets and sizes multiples of `unit`) between places of one buffer, into a contiguous buffer
    and back; programs looping over chunks."""
    assert check.run_copy("cpu", unit)


def test_block_copy_moves_pages_of_a_pool_slice():
    """Pages of one pool copied to other page ids through a sliced byte view (the view's offset counts)."""
    pool = _pool(12, 4, 2, 16, torch.bfloat16, 3)
    before = pool.kv_buffer.clone()
    page = pool.bytes_per_page
    flat = pool.kv_buffer.view(-1).view(torch.uint8)[page:]  # bytes from page 1 on
    bc.copy_runs(flat, [0, 2 * page], flat, [8 * page, 10 * page], [2 * page, page])  # pages 1, 2 -> 9, 10; 3 -> 11
    expected = before.clone()
    expected[9:11] = before[1:3]
    expected[11] = before[3]
    assert torch.equal(pool.kv_buffer, expected)
    with pytest.raises(ValueError, match="outside"):
        bc.copy_runs(flat, [0], flat, [flat.numel() - 1], [2])


def test_bad_inputs_are_rejected():
    pool = HeadCentricKVPool(4, 4, 2, NUM_LAYERS, 64, torch.float32, "cpu")
    fb = ForwardBatch.build([[1, 1]], [0], [[0]])
    backend = TritonAttnBackend()
    backend.prepare(fb, pool, "cpu")
    with pytest.raises(ValueError, match="multiple of the pool's"):
        backend.forward(torch.randn(2, 3, 64), torch.randn(2, 2, 64), torch.randn(2, 2, 64), 0, fb, pool)
    with pytest.raises(ValueError, match="supports"):
        TritonAttnBackend().prepare(fb, HeadCentricKVPool(4, 4, 2, NUM_LAYERS, 64, torch.float64, "cpu"), "cpu")


def test_backend_choice(monkeypatch):
    assert triton_ops.interpreting() and triton_ops.usable_on("cpu")
    assert resolve_attention_backend("triton", "cpu", torch.float32) == "triton"  # interpreted here
    assert isinstance(create_attention_backend("triton", "cpu", torch.bfloat16), TritonAttnBackend)
    assert resolve_attention_backend(None, "cpu", torch.float32) == "cpu"  # the best on CPU stays the C++ kernel
    with pytest.raises(ValueError, match="float32"):
        resolve_attention_backend("triton", "cpu", torch.float64)
    monkeypatch.setattr(triton_ops, "usable_on", lambda device: torch.device(device).type == "cuda")  # a GPU host
    assert resolve_attention_backend(None, "cuda", torch.bfloat16) == "triton"
    assert resolve_attention_backend(None, "cuda", torch.float64) == "torch_native"
    with pytest.raises(ValueError, match="needs triton and a CUDA device"):
        resolve_attention_backend("triton", "cpu", torch.float32)


def test_sgl_kernel_works_without_triton(monkeypatch):
    triton_ops.triton_available.cache_clear()
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` fails
    try:
        assert not triton_ops.triton_available()
        monkeypatch.delitem(sys.modules, "sgl_kernel.triton_ops.paged_attention")
        assert not triton_ops.interpreting() and not triton_ops.usable_on("cuda")
        assert resolve_attention_backend(None, "cuda", torch.bfloat16) == "torch_native"
        assert resolve_attention_backend(None, "cpu", torch.float32) == "cpu"
        importlib.reload(sys.modules["sgl_kernel"])  # the package itself imports no triton
    finally:
        triton_ops.triton_available.cache_clear()


# ---- engine: a tiny random Llama with the triton backend against transformers --------------------------------------
def test_engine_logits_match_transformers(test_model):
    page_size = 4  # several pages per sequence; the kernel tests cover the other page sizes
    from test_model_forward import Pages, _check, _tokens, hf_logprobs, make_runner

    path = test_model("llama")
    runner = make_runner(path, page_size, attention_backend="triton")
    assert isinstance(runner.attn_backend, TritonAttnBackend)
    ids = _tokens(runner.model_config.vocab_size, n=24, seed=2)
    ref = hf_logprobs(path, ids)
    pages = Pages(runner).take(len(ids))
    _check(runner.forward(ForwardBatch.build([ids[:9]], [0], [pages], logits="all")), ref[:9])  # prefill
    _check(runner.forward(ForwardBatch.build([ids[9:20]], [9], [pages], logits="all")), ref[9:20])  # over a prefix
    for pos in range(20, 24):  # decode steps
        _check(runner.forward(ForwardBatch.build([[ids[pos]]], [pos], [pages])), ref[pos:pos + 1])
    # a mixed batch: one decode of the sequence above, one new prompt
    other = _tokens(runner.model_config.vocab_size, n=11, seed=3)
    other_pages = Pages(runner).take(len(other))
    other_pages = [p + len(pages) for p in other_pages]
    mixed = runner.forward(ForwardBatch.build([[ids[23]], other], [23, 0], [pages, other_pages], logits="all"))
    _check(mixed[:1], ref[23:24])
    _check(mixed[1:], hf_logprobs(path, other))
