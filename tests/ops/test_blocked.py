"""The "torch" backend (ops/infllmv2/blocked.py) against the naive reference: same blocks, same outputs (CPU)."""

import resource
import time

import pytest
import torch

import longcpm.ops.infllmv2.blocked as blocked
from longcpm.config import SparseConfig
from longcpm.ops import infllmv2_attention
from longcpm.ops.dispatch import resolve_backend
from longcpm.ops.infllmv2.blocked import blocked_infllmv2_attention, blocked_select_one
from longcpm.ops.infllmv2.naive import (
    naive_block_scores,
    naive_dense_attention,
    naive_infllmv2_attention,
    naive_select_one,
    naive_topk,
    selection_width,
)

from .helpers import SMALL_SPARSE

SMALL = SMALL_SPARSE
VARIANTS = [dict(variant="v2"), dict(variant="v1"), dict(variant="v1", use_compress_lse=True)]


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks, groups and slices far smaller than the defaults, so short inputs cross every boundary."""
    monkeypatch.setattr(blocked, "_SCORE_ELEMS", 1 << 10)  # 64-query selection chunks
    monkeypatch.setattr(blocked, "_PAIR_TOKENS", 128)
    monkeypatch.setattr(blocked, "_LOGIT_ELEMS", 1 << 14)
    monkeypatch.setattr(blocked, "_BAND_ELEMS", 1 << 15)


@pytest.fixture(autouse=True)
def one_thread():
    """Single-threaded: bit-identity with the reference held for 1 and 2 threads where we tried, but a reduction
    split across many threads rounds a few elements at each split differently; and the many small ops of these
    short inputs run faster without a thread fork/join each (much faster when other processes load the CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def qkv(B, Tq, Tk, H, G, D=16, seed=0, dtype=torch.float32):
    q = rand(B, Tq, H * G, D, seed=seed).to(dtype)
    k = rand(B, Tk, H, D, seed=seed + 1).to(dtype)
    v = rand(B, Tk, H, D, seed=seed + 2).to(dtype)
    return q, k, v


def close(out, ref, dtype):
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16/fp16: both round the same fp32 result once
    assert out.dtype == ref.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("extra", VARIANTS, ids=["v2", "v1", "v1-c2lse"])
@pytest.mark.parametrize("B,Tq,Tk,H,G", [(2, 203, 203, 2, 2), (1, 301, 517, 1, 8), (2, 77, 77, 2, 1),
                                         (1, 5, 9, 1, 2), (1, 3, 7, 2, 1), (1, 1, 300, 2, 2)])
def test_matches_naive_fp32(small_chunks, extra, B, Tq, Tk, H, G):
    cfg = SparseConfig(**SMALL, **extra)
    q, k, v = qkv(B, Tq, Tk, H, G, seed=Tq)
    close(blocked_infllmv2_attention(q, k, v, cfg), naive_infllmv2_attention(q, k, v, cfg), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_matches_naive_half_inputs(small_chunks, dtype, variant):
    cfg = SparseConfig(**SMALL, variant=variant)
    q, k, v = qkv(2, 190, 250, 2, 4, seed=3, dtype=dtype)
    close(blocked_infllmv2_attention(q, k, v, cfg), naive_infllmv2_attention(q, k, v, cfg), dtype)


def test_default_chunking_matches_naive():
    cfg = SparseConfig(**SMALL)
    q, k, v = qkv(1, 700, 700, 2, 4, seed=4)
    close(blocked_infllmv2_attention(q, k, v, cfg), naive_infllmv2_attention(q, k, v, cfg), torch.float32)


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_packed_sequences_mixed_dense_and_sparse(small_chunks, variant):
    """Some documents below dense_len (dense), some at or above it (sparse), keys longer than queries."""
    cfg = SparseConfig(**{**SMALL, "dense_len": 100}, variant=variant)
    lq, lk = [20, 130, 3, 99, 1], [100, 230, 3, 99, 150]
    cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = qkv(1, sum(lq), sum(lk), 2, 4, seed=5)
    kw = dict(cu_seqlens=cu_q, cu_seqlens_k=cu_k)
    close(blocked_infllmv2_attention(q, k, v, cfg, **kw), naive_infllmv2_attention(q, k, v, cfg, **kw),
          torch.float32)
    cu = torch.tensor([0, 40, 170, 177], dtype=torch.int32)  # cu_seqlens alone: keys = queries
    q, k, v = qkv(1, 177, 177, 2, 4, seed=6)
    out = blocked_infllmv2_attention(q, k, v, cfg, cu_seqlens=cu)
    close(out, naive_infllmv2_attention(q, k, v, cfg, cu_seqlens=cu), torch.float32)


def test_dense_rows_with_more_keys_than_queries():
    cfg = SparseConfig(**{**SMALL, "dense_len": 10**6})
    q, k, v = qkv(2, 37, 90, 2, 4, seed=7)
    out = blocked_infllmv2_attention(q, k, v, cfg)
    for b in range(2):
        torch.testing.assert_close(out[b], naive_dense_attention(q[b], k[b], v[b]), rtol=1e-5, atol=1e-5)


def test_selection_pre_rope_tensors(small_chunks):
    """q_sel / k_sel choose the blocks, q / k / v are attended."""
    cfg = SparseConfig(**SMALL)
    q, k, v = qkv(1, 150, 150, 2, 4, seed=8)
    qs, ks = rand(1, 150, 8, 16, seed=9), rand(1, 150, 2, 16, seed=10)
    close(blocked_infllmv2_attention(q, k, v, cfg, q_sel=qs, k_sel=ks),
          naive_infllmv2_attention(q, k, v, cfg, q_sel=qs, k_sel=ks), torch.float32)


@pytest.mark.parametrize("extra", [*VARIANTS, dict(variant="v1", window_size=0)],
                         ids=["v2", "v1", "v1-c2lse", "v1-nowindow"])
def test_large_logits_take_the_stable_path(small_chunks, extra):
    """|q| |k| far above the plain-exp limit: the running-reference softmax (and its raises) must stay exact."""
    cfg = SparseConfig(**{**SMALL, **extra})
    q, k, v = qkv(1, 260, 260, 2, 4, seed=11)
    q, k = q * 30, k * 3
    qf, kf = q[0].float() / 4, blocked._key_blocks(k[0], 16)
    assert not blocked._exp_is_safe(qf, kf.transpose(-1, -2), kf, 256)
    close(blocked_infllmv2_attention(q, k, v, cfg), naive_infllmv2_attention(q, k, v, cfg), torch.float32)


def test_gradients_match_naive(small_chunks):
    cfg = SparseConfig(**SMALL)
    grads = []
    for fn in (blocked_infllmv2_attention, naive_infllmv2_attention):
        q, k, v = (x.requires_grad_(True) for x in qkv(1, 120, 120, 2, 2, seed=12))
        (fn(q, k, v, cfg) * rand(1, 120, 4, 16, seed=13)).sum().backward()
        grads.append([q.grad, k.grad, v.grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def tied_inputs(T, H, G, D=16, seed=0):
    """Keys that repeat every 16 tokens and queries that repeat every 8: many c1 windows, and so many block
    scores, are exactly equal. Ties must go to the lower block, as in the reference."""
    q = rand(8, H * G, D, seed=seed).repeat(-(-T // 8), 1, 1)[:T]
    k = rand(16, H, D, seed=seed + 1).repeat(-(-T // 16), 1, 1)[:T]
    return q, k


@pytest.mark.parametrize("extra", VARIANTS, ids=["v2", "v1", "v1-c2lse"])
@pytest.mark.parametrize("Tq,Tk,H,G", [(333, 333, 1, 8), (250, 401, 2, 2), (700, 700, 1, 1)])
def test_selection_identical_to_naive_with_ties(small_chunks, extra, Tq, Tk, H, G):
    cfg = SparseConfig(**SMALL, **extra)
    q, k = tied_inputs(Tk, H, G, seed=Tq)
    q = q[Tk - Tq:]
    width = selection_width(cfg, Tk)
    want = naive_select_one(q, k, cfg, width)
    assert torch.equal(blocked_select_one(q, k, cfg, width), want)
    q, k = rand(Tq, H * G, 16, seed=Tq + 1), rand(Tk, H, 16, seed=Tq + 2)  # and on random inputs
    assert torch.equal(blocked_select_one(q, k, cfg, width), naive_select_one(q, k, cfg, width))


@pytest.mark.parametrize("chunks", ["small", "default"])
def test_selection_identical_at_published_block_sizes(request, chunks):
    """32/16 kernels, 64-token blocks, 128/64 LSE windows, D = 64: the shapes the model runs."""
    if chunks == "small":
        request.getfixturevalue("small_chunks")
    cfg = SparseConfig(window_size=128, topk=8, dense_len=-1)
    q, k = rand(1100, 8, 64, seed=14), rand(1100, 1, 64, seed=15)
    width = selection_width(cfg, 1100)
    assert torch.equal(blocked_select_one(q, k, cfg, width), naive_select_one(q, k, cfg, width))
    qt, kt = tied_inputs(1100, 1, 8, D=64, seed=16)
    assert torch.equal(blocked_select_one(qt, kt, cfg, width), naive_select_one(qt, kt, cfg, width))


@pytest.mark.parametrize("kernel,stride,bs,variant", [(8, 4, 16, "v2"), (20, 8, 16, "v1"), (16, 16, 32, "v2")])
def test_block_scores_equal_naive(kernel, stride, bs, variant):
    cfg = SparseConfig(kernel_size=kernel, kernel_stride=stride, block_size=bs, window_size=2 * bs, topk=4,
                       variant=variant)
    T = 300
    n1 = (T - kernel) // stride + 1
    S = torch.rand(2, T, n1)
    S[:, :, ::3] = S[:, :, 1::3][..., : S[:, :, ::3].shape[-1]]  # ties
    pos = torch.arange(T)
    n_blk = -(-T // bs)
    assert torch.equal(blocked._block_scores(S, pos, n_blk, cfg), naive_block_scores(S, pos, n_blk, cfg))


@pytest.mark.parametrize("width", [1, 3, 10, 100])
def test_topk_equals_naive_with_ties_and_infinities(width):
    g = torch.Generator().manual_seed(width)
    for trial in range(20):
        n = 1 + trial * 4
        s = torch.randint(0, 5, (2, 30, n), generator=g).float() / 4  # many ties
        r = torch.rand(2, 30, n, generator=g)
        s[r < 0.2], s[r > 0.9] = float("-inf"), float("inf")
        s[(r > 0.4) & (r < 0.5)] = -0.0
        assert torch.equal(blocked._topk(s, width), naive_topk(s, width))


def test_long_sequence_is_fast_and_bounded():
    """8K tokens, one kv head, 8 query heads, the benchmark's sparse config: about a second on one core, and no
    [T, T] tensor (the reference's logits alone would take 2 GiB here)."""
    cfg = SparseConfig(kernel_size=32, kernel_stride=16, block_size=64, window_size=512, topk=16, dense_len=-1)
    T = 8192
    q, k, v = qkv(1, T, T, 1, 8, D=64, seed=17)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    out = blocked_infllmv2_attention(q, k, v, cfg)
    took = time.perf_counter() - t0
    grew_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    assert took < 20 and grew_mib < 700, f"{took:.1f} s, peak memory +{grew_mib:.0f} MiB"
    tail = naive_infllmv2_attention(q[:, -40:], k, v, cfg)  # the last 40 queries against all 8K keys
    torch.testing.assert_close(out[:, -40:], tail, rtol=1e-5, atol=1e-5)


def test_backend_dispatch(monkeypatch):
    monkeypatch.delenv("LONGCPM_BACKEND", raising=False)
    x = torch.zeros(1)
    full = ("naive", "torch", "triton")
    assert resolve_backend(None, x, full) == "torch"
    assert resolve_backend(None, x) == "naive"  # ops without a torch implementation keep the reference
    assert resolve_backend("torch", x) == "naive"
    assert resolve_backend("naive", x, full) == "naive"
    monkeypatch.setenv("LONGCPM_BACKEND", "naive")
    assert resolve_backend(None, x, full) == "naive"
    monkeypatch.setenv("LONGCPM_BACKEND", "torch")
    assert resolve_backend(None, x, full) == "torch" and resolve_backend(None, x) == "naive"
    monkeypatch.delenv("LONGCPM_BACKEND")
    cfg = SparseConfig(**SMALL)
    q, k, v = qkv(1, 90, 90, 2, 2, seed=18)
    assert torch.equal(infllmv2_attention(q, k, v, cfg), blocked_infllmv2_attention(q, k, v, cfg))
    assert torch.equal(infllmv2_attention(q, k, v, cfg, backend="naive"), naive_infllmv2_attention(q, k, v, cfg))
