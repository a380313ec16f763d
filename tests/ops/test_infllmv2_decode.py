"""Triton decode stage 2 (decode_block_sparse_attention) against naive_block_sparse_attention per sequence.

Same error method as test_infllmv2_stage2.py. Sequences in a batch have different cache lengths; Tq new tokens
sit at the end of each. GPU tests also capture the call in a CUDA graph and replay it on new inputs.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from longcpm.ops.infllmv2.decode import decode_block_sparse_attention  # noqa: E402
from longcpm.ops.infllmv2.naive import naive_block_sparse_attention  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def rand_block_idx(lq: int, lk: int, H: int, W: int, bs: int, *, init: int = 1, local: int = 2, drop: float = 0.2,
                   device=DEV) -> torch.Tensor:
    """Valid random lists int32 [lq, H, W] (init, current and `local` previous blocks always; other past blocks at
    random), ascending, distinct, -1 padded."""
    pos = torch.arange(lk - lq, lk, device=device)
    qb = (pos // bs)[:, None, None]
    n_blk = -(-lk // bs)
    kk = torch.arange(n_blk, device=device)[None, None, :]
    forced = (kk < init) | ((kk >= qb - local) & (kk <= qb))
    s = torch.rand(lq, H, n_blk, device=device)
    s = s.masked_fill(torch.rand(lq, H, n_blk, device=device) < drop, float("-inf")).masked_fill(forced, 2.0)
    s = s.masked_fill(kk > qb, float("-inf"))
    kw = min(W, n_blk)
    vals, idx = s.topk(kw, dim=-1)
    big = torch.iinfo(torch.int32).max
    idx = torch.where(torch.isneginf(vals), big, idx).sort(-1).values
    idx = torch.where(idx == big, -1, idx).to(torch.int32)
    if kw < W:
        idx = torch.cat([idx, idx.new_full((lq, H, W - kw), -1)], -1)
    return idx


def torch_block_sparse(q, k, v, block_idx, bs, window_blocks, dtype):
    """The naive reference's math in `dtype` (the kernel's precision, or float64)."""
    Tq, HQ, D = q.shape
    Tk, H = k.shape[:2]
    pos = torch.arange(Tk - Tq, Tk, device=q.device)
    n_blk = -(-Tk // bs)
    sel = torch.zeros(Tq, H, n_blk + 1, dtype=torch.bool, device=q.device)
    sel.scatter_(-1, torch.where(block_idx < 0, n_blk, block_idx).long(), True)
    sel = sel[..., :n_blk]
    if window_blocks:
        kb = torch.arange(n_blk, device=q.device)[None, :]
        sel = sel | ((kb > (pos // bs)[:, None] - window_blocks) & (kb <= (pos // bs)[:, None]))[:, None, :]
    tok = sel.repeat_interleave(bs, -1)[..., :Tk] & (torch.arange(Tk, device=q.device) <= pos[:, None])[:, None]
    s = torch.einsum("thgd,jhd->thgj", q.to(dtype).view(Tq, H, HQ // H, D), k.to(dtype)) / math.sqrt(D)
    p = torch.softmax(s.masked_fill(~tok[:, :, None], float("-inf")), -1).nan_to_num(0.0)
    return torch.einsum("thgj,jhd->thgd", p.to(dtype), v.to(dtype)).reshape(Tq, HQ, D)


def check_close(out, exact, pt, what=""):
    """|out - exact| <= 2 |pt - exact| + 2 * (rounding of exact to out's dtype) + 1e-6."""
    out, exact, pt = out.double(), exact.double(), pt.double()
    assert not torch.isnan(out).any(), f"{what}: NaN in output"
    rnd = (exact.to(out.dtype) - exact).abs().max().item()
    err, err_pt = (out - exact).abs().max().item(), (pt - exact).abs().max().item()
    assert err <= 2 * err_pt + 2 * rnd + 1e-6, f"{what}: kernel error {err:.3g} vs torch {err_pt:.3g}"


def make_inputs(lens, Tq, Tmax, HQ, H, D, bs, W, dtype, local=2):
    B = len(lens)
    q = torch.randn(B, Tq, HQ, D, device=DEV, dtype=dtype)
    kc = torch.randn(B, Tmax, H, D, device=DEV, dtype=dtype)
    vc = torch.randn(B, Tmax, H, D, device=DEV, dtype=dtype)
    idx = torch.stack([rand_block_idx(Tq, L, H, W, bs, local=local) for L in lens])
    return q, kc, vc, torch.tensor(lens, dtype=torch.int32, device=DEV), idx


def check_decode(o, q, kc, vc, lens, idx, bs, wb):
    for b, L in enumerate(lens):
        naive = naive_block_sparse_attention(q[b], kc[b, :L], vc[b, :L], idx[b], bs, wb)
        if DEV == "cpu":
            exact = torch_block_sparse(q[b], kc[b, :L], vc[b, :L], idx[b], bs, wb, torch.float64)
            assert (naive.double() - exact).abs().max() < 1e-5
        else:
            exact = naive
        pt = torch_block_sparse(q[b], kc[b, :L], vc[b, :L], idx[b], bs, wb, q.dtype)
        check_close(o[b], exact, pt, f"sequence {b}")


def run_case(lens, Tq, Tmax, HQ, H, D, bs, W, dtype, wb=0, local=2, num_splits=None):
    q, kc, vc, seqlens, idx = make_inputs(lens, Tq, Tmax, HQ, H, D, bs, W, dtype, local)
    o = torch.full_like(q, float("nan"))
    res = decode_block_sparse_attention(q, kc, vc, seqlens, idx, bs, window_blocks=wb, num_splits=num_splits, out=o)
    assert res is o
    check_decode(o, q, kc, vc, lens, idx, bs, wb)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("Tq,HQ,H,D", [(1, 4, 2, 32), (3, 2, 2, 16), (1, 8, 1, 16), (4, 3, 1, 16)])
def test_decode_small(Tq, HQ, H, D, dtype):
    """Tq = 1 (the list is its own union) and Tq > 1; G = 2, 1, 8, 3; different cache lengths per sequence."""
    run_case([150, 37, 199], Tq, 200, HQ, H, D, 16, 6, dtype)


@pytest.mark.parametrize("Tq", [1, 2])
def test_decode_block64(Tq):
    """64-token blocks: key tiles are one block's rows (the real-shape path)."""
    run_case([150, 64, 199, 65], Tq, 200, 4, 2, 16, 64, 3, torch.float32, local=1)


def test_decode_window_splits():
    """v1 window, one split and many splits (more splits than blocks: empty splits)."""
    for ns in (1, 7, 40):
        run_case([130, 64], 2, 160, 4, 2, 16, 16, 3, torch.float32, wb=3, local=0, num_splits=ns)
    run_case([99, 17], 1, 120, 4, 2, 16, 16, 3, torch.float32, wb=2, local=0)


def test_decode_lse():
    lens, Tq, HQ, H, D, bs = [90, 45], 2, 4, 2, 16, 16
    q, kc, vc, seqlens, idx = make_inputs(lens, Tq, 100, HQ, H, D, bs, 4, torch.float32)
    o, lse = decode_block_sparse_attention(q, kc, vc, seqlens, idx, bs, return_lse=True, num_splits=3)
    for b, L in enumerate(lens):
        pos = torch.arange(L - Tq, L, device=DEV)
        n_blk = -(-L // bs)
        sel = torch.zeros(Tq, H, n_blk + 1, dtype=torch.bool, device=DEV)
        sel.scatter_(-1, torch.where(idx[b] < 0, n_blk, idx[b]).long(), True)
        tok = sel[..., :n_blk].repeat_interleave(bs, -1)[..., :L]
        tok = tok & (torch.arange(L, device=DEV) <= pos[:, None])[:, None]
        s = torch.einsum("thgd,jhd->thgj", q[b].double().view(Tq, H, HQ // H, D), kc[b, :L].double()) / math.sqrt(D)
        exact = s.masked_fill(~tok[:, :, None], float("-inf")).logsumexp(-1).reshape(Tq, HQ)
        assert torch.allclose(lse[b].double(), exact, atol=1e-5, rtol=0)


# ---- GPU: real shapes, bf16, CUDA graphs -------------------------------------------------------------------------

@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("Tq", [1, 4])
@pytest.mark.parametrize("HQ,H,D", [(32, 2, 128), (16, 2, 64)])
def test_decode_gpu_real(Tq, HQ, H, D):
    """96 selected 64-token blocks, sequences of 8K-33K tokens with different lengths."""
    run_case([33000, 8191, 20001, 12345], Tq, 33000, HQ, H, D, 64, 96, torch.bfloat16, local=32)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("bs", [16, 32])
def test_decode_gpu_block_sizes(bs):
    """Small blocks, G = 1, head_dim 64, Tq = 1 and 3."""
    for tq in (1, 3):
        run_case([3000, 1001], tq, 3000, 2, 2, 64, bs, 64, torch.bfloat16, local=4)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("Tq", [1, 4])
def test_decode_gpu_cuda_graph(Tq):
    """Capture once, then replay on new q, cache lengths and block lists written in place."""
    lens, HQ, H, D, bs, W = [20000, 3001, 16384], 32, 2, 128, 64, 96
    q, kc, vc, seqlens, idx = make_inputs(lens, Tq, 20000, HQ, H, D, bs, W, torch.bfloat16, local=32)
    o = torch.full_like(q, float("nan"))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        decode_block_sparse_attention(q, kc, vc, seqlens, idx, bs, out=o)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_block_sparse_attention(q, kc, vc, seqlens, idx, bs, out=o)
    for new_lens in ([19000, 64, 16385], [5, 20000, 777]):
        q2, _, _, seq2, idx2 = make_inputs(new_lens, Tq, 20000, HQ, H, D, bs, W, torch.bfloat16, local=32)
        q.copy_(q2)
        seqlens.copy_(seq2)
        idx.copy_(idx2)
        o.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check_decode(o, q, kc, vc, new_lens, idx, bs, 0)
