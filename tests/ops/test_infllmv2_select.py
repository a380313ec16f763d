"""Triton InfLLM-V2 selection (compress.py, select.py) against the PyTorch reference (naive.py).

Selections are compared by score, not by raw index (ties): per (token, kv head) the forced blocks (+inf) must be the
same set, the number of -1 pads the same, and the reference scores of the picked blocks the same sorted multiset.
CPU runs go through TRITON_INTERPRET=1 (tests/ops/conftest.py) on tiny shapes; `gpu` tests use real shapes in bf16.
"""

from __future__ import annotations

import pytest
import torch

from longcpm.config import SparseConfig
from longcpm.ops.infllmv2.common import num_blocks
from longcpm.ops.infllmv2.compress import append_compressed, compress_keys
from longcpm.ops.infllmv2.naive import (
    naive_block_scores,
    naive_compress,
    naive_select_one,
    naive_stage1_scores,
    selection_width,
)
from longcpm.ops.infllmv2.select import decode_infllmv2_select, parallel_infllmv2_select

DEV = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SMALL = dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, window_size=32, topk=4, dense_len=-1,
             lse_kernel_size=16, lse_kernel_stride=8)
TOL = {torch.float32: (1e-4, 1e-6), torch.float16: (3e-2, 1e-3), torch.bfloat16: (5e-2, 1e-3)}


def small_cfg(**kw) -> SparseConfig:
    return SparseConfig(**{**SMALL, **kw})


def ref_block_scores(q1: torch.Tensor, k1: torch.Tensor, cfg: SparseConfig) -> torch.Tensor:
    """Reference block scores [H, Tq, n_blk] (fp32, +inf forced, -inf excluded) of one sequence."""
    Tq, Tk = q1.shape[0], k1.shape[0]
    pos = torch.arange(Tk - Tq, Tk, device=q1.device)
    c1 = naive_compress(k1, cfg.kernel_size, cfg.kernel_stride)
    c2 = naive_compress(k1, cfg.lse_kernel_size, cfg.lse_kernel_stride) if cfg.uses_c2() else None
    S = naive_stage1_scores(q1, c1, c2, pos, cfg)
    return naive_block_scores(S, pos, num_blocks(Tk, cfg.block_size), cfg)


def assert_same_selection(idx: torch.Tensor, ref: torch.Tensor, scores: torch.Tensor, dtype: torch.dtype) -> None:
    """idx / ref int32 [T, H, W]; scores [H, T, n] the reference block scores of that sequence."""
    assert idx.shape == ref.shape, (idx.shape, ref.shape)
    idx, ref = idx.long().cpu(), ref.long().cpu()
    sc = scores.permute(1, 0, 2).cpu()
    n = sc.shape[-1]
    valid = idx >= 0
    # -1 only as trailing padding, valid entries strictly ascending and in range
    assert torch.equal(valid, torch.sort(valid.int(), -1, descending=True).values.bool()), "padding not at the end"
    assert (idx < n).all()
    inc = idx[..., 1:] > idx[..., :-1]
    assert (inc | ~valid[..., 1:]).all(), "indices not strictly ascending"
    assert torch.equal(valid.sum(-1), (ref >= 0).sum(-1)), "different number of selected blocks"

    def picked(x):
        v = sc.gather(-1, x.clamp(min=0))
        return torch.where(x >= 0, v, torch.full_like(v, -3e38))

    v_idx, v_ref = picked(idx), picked(ref)
    assert not torch.isneginf(v_idx).any(), "picked a block the reference excludes"

    def forced(x, v):
        m = torch.zeros(*x.shape[:-1], n + 1, dtype=torch.bool)
        m.scatter_(-1, torch.where(torch.isposinf(v), x, n), True)
        return m[..., :n]

    assert torch.equal(forced(idx, v_idx), forced(ref, v_ref)), "forced blocks differ"
    rtol, atol = TOL[dtype]
    s_idx = v_idx.sort(-1, descending=True).values
    s_ref = v_ref.sort(-1, descending=True).values
    fin = torch.isfinite(s_ref)
    assert torch.equal(fin, torch.isfinite(s_idx))
    scale = sc.masked_fill(~torch.isfinite(sc), 0).amax(-1, keepdim=True).clamp(min=1e-30)
    torch.testing.assert_close(s_idx[fin] / scale.expand_as(s_idx)[fin], s_ref[fin] / scale.expand_as(s_ref)[fin],
                               rtol=rtol, atol=atol)


def check_select(q, k, cfg, cu_seqlens=None, cu_seqlens_k=None, dtype=torch.float32):
    out = parallel_infllmv2_select(q, k, cfg, cu_seqlens=cu_seqlens, cu_seqlens_k=cu_seqlens_k)
    B, Tq = q.shape[:2]
    if cu_seqlens is None:
        seqs = [(b, 0, Tq, 0, k.shape[1]) for b in range(B)]
    else:
        cq, ck = cu_seqlens.tolist(), (cu_seqlens if cu_seqlens_k is None else cu_seqlens_k).tolist()
        seqs = [(0, cq[i], cq[i + 1] - cq[i], ck[i], ck[i + 1] - ck[i]) for i in range(len(cq) - 1)]
    W = selection_width(cfg, max(lk for *_, lk in seqs))
    assert out.shape == (B, Tq, k.shape[2], W)
    for b, qs, lq, ks, lk in seqs:
        if lq == 0:
            continue
        q1, k1 = q[b, qs: qs + lq].float(), k[b, ks: ks + lk].float()
        ref = naive_select_one(q1, k1, cfg, W)
        assert_same_selection(out[b, qs: qs + lq], ref, ref_block_scores(q1, k1, cfg), dtype)
    return out


def rand_keys(B, Tk, H, D, seg=8):
    """Noise plus a random direction shared by each segment of `seg` keys, so that windows differ clearly."""
    shared = torch.randn(B, -(-Tk // seg), H, D, device=DEV).repeat_interleave(seg, 1)[:, :Tk]
    return torch.randn(B, Tk, H, D, device=DEV) + 1.5 * shared


def rand_qk(B, Tq, Tk, HQ, H, D, dtype, q_scale=1.0, seg=8):
    q = (torch.randn(B, Tq, HQ, D, device=DEV) * q_scale).to(dtype)
    return q, rand_keys(B, Tk, H, D, seg).to(dtype)


# ---- compression -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kernel,stride", [(8, 4), (16, 8), (6, 3)])
def test_compress_keys(kernel, stride, dtype):
    k = torch.randn(2, 77, 2, 16, device=DEV).to(dtype)
    c, cu = compress_keys(k, kernel, stride)
    assert cu is None and c.dtype == dtype
    for b in range(2):
        torch.testing.assert_close(c[b].float(), naive_compress(k[b], kernel, stride), **_ctol(dtype))
    lens = [0, 5, 40, 31]
    cu_k = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    kp = torch.randn(1, sum(lens) + 3, 2, 16, device=DEV).to(dtype)
    cp, cu_c = compress_keys(kp, kernel, stride, cu_seqlens=cu_k)
    ref = [naive_compress(kp[0, s: s + n], kernel, stride) for s, n in zip(cu_k.tolist(), lens)]
    assert cu_c.tolist() == [0, *torch.tensor([r.shape[0] for r in ref]).cumsum(0).tolist()]
    torch.testing.assert_close(cp[0].float(), torch.cat(ref), **_ctol(dtype))


def _ctol(dtype):
    return dict(rtol=0, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)


def test_append_compressed_matches_fresh():
    B, Tmax, H, D, ks, st = 3, 90, 2, 16, 8, 4
    k_cache = torch.randn(B, Tmax, H, D, device=DEV)
    n_max = (Tmax - ks) // st + 1
    c = torch.full((B, n_max, H, D), float("nan"), device=DEV)
    lens = torch.zeros(B, dtype=torch.int32, device=DEV)
    steps = [torch.tensor(s, dtype=torch.int32, device=DEV) for s in ([7, 0, 20], [1, 16, 3], [5, 1, 1], [9, 30, 16])]
    for new in steps:
        total = lens + new
        append_compressed(k_cache, c, lens, total, ks, st, max_new_windows=30 // st + 2)
        lens = total
    for b, L in enumerate(lens.tolist()):
        ref = naive_compress(k_cache[b, :L], ks, st)
        torch.testing.assert_close(c[b, : ref.shape[0]], ref, rtol=0, atol=1e-6)
        assert torch.isnan(c[b, ref.shape[0]:]).all(), "wrote windows that are not complete"


# ---- prefill selection -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_select_v2_batch(dtype):
    q, k = rand_qk(2, 203, 203, 4, 2, 16, dtype)
    check_select(q, k, small_cfg(), dtype=dtype)


def test_select_v2_prefix_and_gqa():
    # queries are the last 70 of 251 keys; G = 8, head_dim 32
    q, k = rand_qk(1, 70, 251, 16, 2, 32, torch.float32)
    check_select(q, k, small_cfg(init_blocks=2, topk=5))


@pytest.mark.parametrize("use_compress_lse", [False, True])
def test_select_v1(use_compress_lse):
    q, k = rand_qk(1, 180, 180, 4, 1, 16, torch.float32)
    check_select(q, k, small_cfg(variant="v1", topk=6, use_compress_lse=use_compress_lse))


def test_select_varlen():
    lens_q, lens_k = [37, 0, 150, 9], [37, 20, 170, 120]
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    q, _ = rand_qk(1, sum(lens_q), 1, 6, 2, 16, torch.float32)
    _, k = rand_qk(1, 1, sum(lens_k), 6, 2, 16, torch.float32)
    check_select(q, k, small_cfg(), cu_seqlens=cu_q, cu_seqlens_k=cu_k)


@pytest.mark.parametrize("cfg", [
    dict(kernel_size=16, kernel_stride=4, block_size=8, window_size=16, topk=5),   # pooling reaches 3 windows back
    dict(kernel_size=4, kernel_stride=4, block_size=12, window_size=24, topk=4),   # 3 windows a block, no overlap
    dict(kernel_size=8, kernel_stride=4, block_size=16, window_size=0, topk=3, init_blocks=0),  # no local window
    dict(kernel_size=8, kernel_stride=4, block_size=16, window_size=0, topk=3, variant="v1"),
])
def test_select_odd_configs(cfg):
    q, k = rand_qk(1, 150, 150, 2, 2, 16, torch.float32)
    check_select(q, k, small_cfg(**cfg))


# ---- decode ------------------------------------------------------------------------------------------------------

def _decode_case(cfg, lens, Tq, HQ, H, D, dtype, Tmax, seg=8):
    B = len(lens)
    k_cache = rand_keys(B, Tmax, H, D, seg).to(dtype)
    q = torch.randn(B, Tq, HQ, D, device=DEV).to(dtype)
    n1 = (Tmax - cfg.kernel_size) // cfg.kernel_stride + 1
    n2 = (Tmax - cfg.lse_kernel_size) // cfg.lse_kernel_stride + 1
    c1 = torch.full((B, n1, H, D), float("nan"), device=DEV).to(dtype)
    c2 = torch.full((B, n2, H, D), float("nan"), device=DEV).to(dtype)
    zero = torch.zeros(B, dtype=torch.int32, device=DEV)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    append_compressed(k_cache, c1, zero, seqlens, cfg.kernel_size, cfg.kernel_stride, n1)
    append_compressed(k_cache, c2, zero, seqlens, cfg.lse_kernel_size, cfg.lse_kernel_stride, n2)
    return q, k_cache, c1, c2, seqlens


def check_decode(cfg, lens, Tq, HQ, H, D, dtype=torch.float32, Tmax=None, width=None, seg=8):
    Tmax = Tmax or max(lens) + 7
    q, k_cache, c1, c2, seqlens = _decode_case(cfg, lens, Tq, HQ, H, D, dtype, Tmax, seg)
    width = width or cfg.budget
    out = decode_infllmv2_select(q, c1, c2, seqlens, cfg, width)
    assert out.shape == (len(lens), Tq, H, width)
    for b, L in enumerate(lens):
        q1, k1 = q[b].float(), k_cache[b, :L].float()
        # a row never picks more than the budget; a wider output is padded
        ref = naive_select_one(q1, k1, cfg, min(width, cfg.budget))
        ref = torch.cat([ref, ref.new_full((*ref.shape[:2], width - ref.shape[-1]), -1)], -1)
        assert_same_selection(out[b], ref, ref_block_scores(q1, k1, cfg), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_one_token(dtype):
    check_decode(small_cfg(), [250, 37, 131], 1, 4, 2, 16, dtype)


def test_decode_multi_token_v1():
    check_decode(small_cfg(variant="v1", topk=5), [200, 90], 5, 8, 2, 16)
    check_decode(small_cfg(), [200, 17], 3, 4, 1, 32, width=9)


# ---- GPU: real shapes, bf16 --------------------------------------------------------------------------------------

REAL = SparseConfig(dense_len=-1)


@gpu
@needs_cuda
@pytest.mark.parametrize("HQ,H,D,T", [(32, 2, 128, 16384), (16, 2, 64, 32768)])
def test_select_gpu_real(HQ, H, D, T):
    q, k = rand_qk(1, T, T, HQ, H, D, torch.bfloat16, seg=32)
    check_select(q, k, REAL, dtype=torch.bfloat16)


@gpu
@needs_cuda
def test_select_gpu_varlen_v1():
    lens_q, lens_k = [9000, 3001, 12000], [9000, 20000, 12000]
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    q = torch.randn(1, sum(lens_q), 32, 128, device=DEV).bfloat16()
    k = rand_keys(1, sum(lens_k), 2, 128, seg=32).bfloat16()
    check_select(q, k, REAL, cu_seqlens=cu_q, cu_seqlens_k=cu_k, dtype=torch.bfloat16)
    check_select(q, k, SparseConfig(dense_len=-1, variant="v1", window_size=512), cu_seqlens=cu_q,
                 cu_seqlens_k=cu_k, dtype=torch.bfloat16)


@gpu
@needs_cuda
@pytest.mark.parametrize("Tq", [1, 4, 16])
def test_decode_gpu_real(Tq):
    check_decode(REAL, [32768 - 5, 20000, 9001], Tq, 32, 2, 128, torch.bfloat16, seg=32)


@gpu
@needs_cuda
def test_decode_cuda_graph():
    """append c1/c2 + decode select captured once, replayed for growing lengths, against the reference."""
    cfg, B, HQ, H, D, Tq, Tmax = REAL, 2, 16, 2, 64, 2, 24000
    k_cache = rand_keys(B, Tmax, H, D, seg=32).bfloat16()
    n1 = (Tmax - cfg.kernel_size) // cfg.kernel_stride + 1
    n2 = (Tmax - cfg.lse_kernel_size) // cfg.lse_kernel_stride + 1
    c1 = torch.zeros(B, n1, H, D, device=DEV, dtype=torch.bfloat16)
    c2 = torch.zeros(B, n2, H, D, device=DEV, dtype=torch.bfloat16)
    start = torch.tensor([15000, 9000], dtype=torch.int32, device=DEV)
    zero = torch.zeros_like(start)
    append_compressed(k_cache, c1, zero, start, 32, 16, n1)
    append_compressed(k_cache, c2, zero, start, 128, 64, n2)
    old, new = start.clone(), start + Tq
    q = torch.randn(B, Tq, HQ, D, device=DEV).bfloat16()

    def step():
        append_compressed(k_cache, c1, old, new, 32, 16, -(-Tq // 16) + 1)
        append_compressed(k_cache, c2, old, new, 128, 64, -(-Tq // 64) + 1)
        return decode_infllmv2_select(q, c1, c2, new, cfg, cfg.budget)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    lens = start.clone()
    for _ in range(40):
        old.copy_(lens)
        lens = lens + Tq
        new.copy_(lens)
        q.copy_(torch.randn_like(q))
        out.fill_(-7)
        g.replay()
        torch.cuda.synchronize()
    for b, L in enumerate(lens.tolist()):
        torch.testing.assert_close(c1[b, : (L - 32) // 16 + 1].float(), naive_compress(k_cache[b, :L], 32, 16),
                                   rtol=1e-2, atol=1e-2)
        q1, k1 = q[b].float(), k_cache[b, :L].float()
        ref = naive_select_one(q1, k1, cfg, cfg.budget)
        assert_same_selection(out[b], ref, ref_block_scores(q1, k1, cfg), torch.bfloat16)
