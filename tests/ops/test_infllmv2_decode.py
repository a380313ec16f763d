"""Triton decode stage 2 (decode_block_sparse_attention) against naive_block_sparse_attention per sequence.

Same error method as test_infllmv2_stage2.py. Sequences in a batch have different cache lengths; Tq new tokens
sit at the end of each. GPU tests also capture the call in a CUDA graph and replay it on new inputs.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from longcpm.ops.infllmv2.decode import decode_block_sparse_attention  # noqa: E402
from longcpm.ops.infllmv2.naive import naive_block_sparse_attention  # noqa: E402

from .helpers import DEV, check_close, gpu, masked_logits, rand_block_idx, token_mask, torch_block_sparse  # noqa: E402


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
        mask = token_mask(Tq, L, idx[b], bs)
        exact = masked_logits(q[b], kc[b, :L], mask, torch.float64).logsumexp(-1).reshape(Tq, HQ)
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
