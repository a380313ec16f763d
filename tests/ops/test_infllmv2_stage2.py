"""Triton stage 2 (parallel_block_sparse_attention) against naive_block_sparse_attention.

Error method of the flash-attention tests: the kernel's error against the exact result must stay within twice
the error of the same computation done in PyTorch at the kernel's precision, plus the output rounding. CPU runs
go through the Triton interpreter (tiny shapes, fp32/fp16); `gpu` tests use real shapes in bf16.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from longcpm.ops.infllmv2.naive import naive_block_sparse_attention  # noqa: E402
from longcpm.ops.infllmv2.parallel import parallel_block_sparse_attention  # noqa: E402

from .helpers import DEV, check_close, gpu, masked_logits, rand_block_idx, token_mask, torch_block_sparse  # noqa: E402


def references(q, k, v, idx, bs, wb):
    """(exact, torch at q's precision) for one sequence; exact is float64 on CPU and the fp32 naive on GPU, and the
    naive reference must agree with the float64 computation."""
    naive = naive_block_sparse_attention(q, k, v, idx, bs, wb)
    if q.device.type == "cpu":
        exact = torch_block_sparse(q, k, v, idx, bs, wb, torch.float64)
        assert (naive.double() - exact).abs().max() < 1e-5
    else:
        exact = naive
    return exact, torch_block_sparse(q, k, v, idx, bs, wb)


def run_case(B, Tq, Tk, HQ, H, D, bs, W, dtype, wb=0, local=2, lse=False, drop=0.2, config=None):
    q = torch.randn(B, Tq, HQ, D, device=DEV, dtype=dtype)
    k = torch.randn(B, Tk, H, D, device=DEV, dtype=dtype)
    v = torch.randn(B, Tk, H, D, device=DEV, dtype=dtype)
    idx = torch.stack([rand_block_idx(Tq, Tk, H, W, bs, local=local, drop=drop) for _ in range(B)])
    o = torch.full_like(q, float("nan"))
    res = parallel_block_sparse_attention(q, k, v, idx, bs, window_blocks=wb, return_lse=lse, out=o, config=config)
    assert (res[0] if lse else res) is o
    assert o.dtype == dtype and o.shape == q.shape
    for b in range(B):
        exact, pt = references(q[b], k[b], v[b], idx[b], bs, wb)
        check_close(o[b], exact, pt, f"batch {b}")
    if lse:
        b = B - 1
        mask = token_mask(Tq, Tk, idx[b], bs, wb)
        exact = masked_logits(q[b], k[b], mask, torch.float64).logsumexp(-1).reshape(Tq, HQ)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert torch.allclose(res[1][b].double(), exact, atol=tol, rtol=0), (res[1][b].double() - exact).abs().max()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,Tq,Tk,HQ,H,D,bs,W", [
    (1, 133, 133, 2, 2, 16, 16, 4),      # G=1
    (2, 45, 150, 4, 2, 32, 16, 5),       # G=2, prefix (Tk > Tq), batch 2
    (1, 90, 90, 8, 1, 16, 32, 3),        # G=8, block 32
])
def test_stage2_small(B, Tq, Tk, HQ, H, D, bs, W, dtype):
    run_case(B, Tq, Tk, HQ, H, D, bs, W, dtype)


def test_stage2_group3_window_lse():
    """G=3 (rows padded to 4 per token), v1 window on top of the lists, LSE output."""
    run_case(1, 101, 160, 6, 2, 16, 16, 3, torch.float32, wb=3, local=0, lse=True)


@pytest.mark.parametrize("BN", [16, 32])
def test_stage2_key_tile_sizes(BN):
    """Key tiles smaller than a 64-token block: one block spans several tiles."""
    run_case(1, 70, 200, 4, 1, 16, 64, 3, torch.float32, local=1, config={"BN": BN})


def test_stage2_block_larger_than_tile():
    """Block 128 > the 64-key tile: one block spans two key tiles."""
    run_case(1, 70, 300, 4, 1, 16, 128, 2, torch.float32, local=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_stage2_varlen(dtype):
    """Packed sequences of odd, different lengths, some with a cached prefix (k longer than q)."""
    lens_q, lens_k, H, HQ, D, bs, W = [37, 1, 17, 40], [37, 20, 100, 129], 2, 4, 16, 16, 5
    cu_q = torch.tensor([0] + lens_q, device=DEV).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k, device=DEV).cumsum(0).to(torch.int32)
    q = torch.randn(1, sum(lens_q), HQ, D, device=DEV, dtype=dtype)
    k = torch.randn(1, sum(lens_k), H, D, device=DEV, dtype=dtype)
    v = torch.randn(1, sum(lens_k), H, D, device=DEV, dtype=dtype)
    idx = torch.cat([rand_block_idx(lq, lk, H, W, bs) for lq, lk in zip(lens_q, lens_k)])[None]
    o = torch.full_like(q, float("nan"))
    parallel_block_sparse_attention(q, k, v, idx, bs, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, out=o)
    for i, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        qs, ks = int(cu_q[i]), int(cu_k[i])
        exact, pt = references(q[0, qs:qs + lq], k[0, ks:ks + lk], v[0, ks:ks + lk], idx[0, qs:qs + lq], bs, 0)
        check_close(o[0, qs:qs + lq], exact, pt, f"sequence {i}")


def test_stage2_row_without_keys():
    """A token whose list is empty gets 0 (and LSE -inf), as in the reference."""
    q = torch.randn(1, 20, 2, 16, device=DEV)
    k = torch.randn(1, 40, 1, 16, device=DEV)
    v = torch.randn(1, 40, 1, 16, device=DEV)
    idx = rand_block_idx(20, 40, 1, 3, 16)[None]
    idx[0, 5] = -1
    o = torch.full_like(q, float("nan"))
    _, lse = parallel_block_sparse_attention(q, k, v, idx, 16, return_lse=True, out=o)
    assert (o[0, 5] == 0).all() and torch.isneginf(lse[0, 5]).all()
    exact, pt = references(q[0], k[0], v[0], idx[0], 16, 0)
    check_close(o[0], exact, pt)


# ---- GPU: real shapes, bf16 ------------------------------------------------------------------------------------

@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("HQ,H,D", [(32, 2, 128), (16, 2, 64), (8, 2, 128), (4, 4, 64)])
def test_stage2_gpu_real(HQ, H, D):
    """G = 16, 8, 4, 1 at T = 8K-ish (odd), 96 selected 64-token blocks (init 1, 33 local, 62 random)."""
    T = 8000
    run_case(1, T, T, HQ, H, D, 64, 96, torch.bfloat16, local=32)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("bs", [16, 32, 128])
@pytest.mark.parametrize("HQ,H,D", [(2, 2, 64), (4, 2, 128), (16, 1, 128)])
def test_stage2_gpu_block_sizes(bs, HQ, H, D):
    """Blocks of 16/32/128 tokens at real head dims, G = 1, 2, 16 (M = 16-row tiles included)."""
    run_case(1, 1999, 2100, HQ, H, D, bs, min(128, 6144 // bs), torch.bfloat16, local=4)


@gpu
@pytest.mark.gpu
def test_stage2_gpu_batch_prefix_window():
    """Batch 2 with a cached prefix (chunked prefill), and the v1 window (32 blocks) on top of 64-block lists."""
    run_case(2, 1500, 5000, 32, 2, 128, 64, 96, torch.bfloat16, local=32)
    run_case(1, 3001, 3001, 16, 2, 64, 64, 64, torch.bfloat16, wb=32, local=0, lse=True)


@gpu
@pytest.mark.gpu
def test_stage2_gpu_varlen():
    lens_q, lens_k, H, HQ, D, bs, W = [1999, 1, 4097, 3], [1999, 700, 6001, 2500], 2, 32, 128, 64, 96
    cu_q = torch.tensor([0] + lens_q, device=DEV).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k, device=DEV).cumsum(0).to(torch.int32)
    q = torch.randn(1, sum(lens_q), HQ, D, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(1, sum(lens_k), H, D, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    idx = torch.cat([rand_block_idx(lq, lk, H, W, bs, local=32) for lq, lk in zip(lens_q, lens_k)])[None]
    o = torch.full_like(q, float("nan"))
    parallel_block_sparse_attention(q, k, v, idx, bs, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, out=o)
    for i, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        qs, ks = int(cu_q[i]), int(cu_k[i])
        exact, pt = references(q[0, qs:qs + lq], k[0, ks:ks + lk], v[0, ks:ks + lk], idx[0, qs:qs + lq], bs, 0)
        check_close(o[0, qs:qs + lq], exact, pt, f"sequence {i}")
