"""Backward of Triton stage 2 (backward.py, autograd.py) against autograd through the PyTorch reference.

Error method of the flash-attention tests: each gradient's error against the exact one (float64 on CPU, fp32 naive
on the GPU) must stay within twice the error of the same computation done by PyTorch autograd at the kernel's
precision, plus the rounding of the exact gradient to the output dtype. CPU runs go through the Triton
interpreter (tiny shapes, fp32/fp16) and mostly call the backward directly with the exact o and LSE, which keeps
the slow interpreter to the kernels under test; `gpu` tests use real shapes and selections in bf16.
"""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("triton")

from longcpm.config import SparseConfig  # noqa: E402
from longcpm.ops.infllmv2.autograd import sparse_attention_with_grad  # noqa: E402
from longcpm.ops.infllmv2.backward import parallel_block_sparse_attention_bwd  # noqa: E402
from longcpm.ops.infllmv2.naive import naive_block_sparse_attention  # noqa: E402

from . import helpers  # noqa: E402
from .helpers import DEV, check_close, gpu, masked_logits, token_mask  # noqa: E402

# block 0 and the current block with `local` blocks before it always, other past blocks at random
rand_block_idx = functools.partial(helpers.rand_block_idx, local=1, drop=0.3)


def torch_attention(q, k, v, idx, bs, wb, dtype, with_lse=False):
    """Block-sparse attention of one sequence computed by PyTorch in `dtype` (differentiable): the naive
    reference's math at a chosen precision. q [Tq, HQ, D], k/v [Tk, H, D] -> [Tq, HQ, D] (and the LSE [Tq, HQ]
    with_lse)."""
    Tq, HQ, D = q.shape
    s = masked_logits(q, k, token_mask(Tq, k.shape[0], idx, bs, wb), dtype)
    o = torch.einsum("thgj,jhd->thgd", torch.softmax(s, -1).nan_to_num(0.0), v.to(dtype)).reshape(Tq, HQ, D)
    return (o, s.float().logsumexp(-1).reshape(Tq, HQ)) if with_lse else o


def grads(fn, q, k, v, do):
    """(out, dq, dk, dv) of out = fn(q, k, v) for upstream gradient do; inputs are leaves cloned from q, k, v."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(do.to(out.dtype))
    return out.detach(), q.grad, k.grad, v.grad


def seq_slices(B, Tq, Tk, cu_q=None, cu_k=None):
    """(batch row, q slice, k slice) per sequence."""
    if cu_q is None:
        return [(b, slice(0, Tq), slice(0, Tk)) for b in range(B)]
    cq, ck = cu_q.tolist(), cu_k.tolist()
    return [(0, slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])) for i in range(len(cq) - 1)]


def check_backward(q, k, v, idx, bs, *, wb=0, cu_q=None, cu_k=None, config=None, through_autograd=False):
    """Kernel gradients vs exact (float64) and vs PyTorch at the kernel's precision,
    sequence by sequence. Returns the kernel's (dq, dk, dv)."""
    B, Tq, HQ, D = q.shape
    Tk = k.shape[1]
    dtype = q.dtype
    exact_dtype = torch.float64  # on GPU too: an fp32 "exact" equals torch's fp32 result and leaves no margin
    do = torch.randn_like(q)
    sl = seq_slices(B, Tq, Tk, cu_q, cu_k)
    if through_autograd:
        _, dq, dk, dv = grads(lambda a, b, c: sparse_attention_with_grad(
            a, b, c, idx, bs, window_blocks=wb, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k), q, k, v, do)
    else:
        o = torch.full_like(q, float("nan"))
        lse = torch.full(q.shape[:3], float("nan"), dtype=torch.float32, device=q.device)
        for b, qs, ks in sl:
            ob, lb = torch_attention(q[b, qs], k[b, ks], v[b, ks], idx[b, qs], bs, wb, exact_dtype, True)
            o[b, qs], lse[b, qs] = ob.to(dtype), lb
        dq, dk, dv = parallel_block_sparse_attention_bwd(q, k, v, o, lse, do, idx, bs, window_blocks=wb,
                                                         cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, config=config)
    assert dq.dtype == dtype and dk.shape == k.shape and dv.shape == v.shape
    for i, (b, qs, ks) in enumerate(sl):
        args, ib = (q[b, qs], k[b, ks], v[b, ks], do[b, qs]), idx[b, qs]
        ex = grads(lambda a, c, e, ib=ib: torch_attention(a, c, e, ib, bs, wb, exact_dtype),
                   *(x.to(exact_dtype) for x in args))
        pt = grads(lambda a, c, e, ib=ib: torch_attention(a, c, e, ib, bs, wb, dtype), *args)
        if q.device.type == "cpu" and i == 0:  # the naive reference agrees with the float64 computation
            nv = grads(lambda a, c, e, ib=ib: naive_block_sparse_attention(a, c, e, ib, bs, wb),
                       *(x.float() for x in args))
            for x, y in zip(nv[1:], ex[1:]):
                assert (x.double() - y.double()).abs().max() < 1e-4
        for name, kern, e, p in zip(("dq", "dk", "dv"), (dq[b, qs], dk[b, ks], dv[b, ks]), ex[1:], pt[1:]):
            check_close(kern, e, p, f"sequence {i} {name}")
    return dq, dk, dv


def make_qkv(B, Tq, Tk, HQ, H, D, dtype, scale=1.0):
    q = torch.randn(B, Tq, HQ, D, device=DEV, dtype=dtype) * scale
    k = torch.randn(B, Tk, H, D, device=DEV, dtype=dtype) * scale
    v = torch.randn(B, Tk, H, D, device=DEV, dtype=dtype)
    return q, k, v


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_batch_prefix(dtype):
    """G = 2, batch 2, queries are the last 50 of 83 keys (bottom-right aligned), a partial last block."""
    q, k, v = make_qkv(2, 50, 83, 4, 2, 16, dtype)
    idx = torch.stack([rand_block_idx(50, 83, 2, 3, 16) for _ in range(2)])
    check_backward(q, k, v, idx, 16)


def test_backward_group3_window_split_lists():
    """G = 3 (heads padded to 4 rows per token), v1 window blocks on top of the lists (some listed twice), and
    segments of 16 tokens (one chunk), so that long lists are split over several programs and reduced in order."""
    q, k, v = make_qkv(1, 61, 61, 6, 2, 16, torch.float32)
    idx = rand_block_idx(61, 61, 2, 2, 16, local=0)
    check_backward(q, k, v, idx[None], 16, wb=2, config={"seg_rows": 16})


def test_backward_varlen_subtiles():
    """Packed sequences of odd lengths, one with a cached prefix and one of a single token; 32-token blocks
    walked in 16-key tiles by both kernels; D = 32, G = 4."""
    lens_q, lens_k = [37, 1, 40], [37, 20, 71]
    cu_q = torch.tensor([0] + lens_q, device=DEV).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k, device=DEV).cumsum(0).to(torch.int32)
    q, k, v = make_qkv(1, sum(lens_q), sum(lens_k), 4, 1, 32, torch.float32)
    idx = torch.cat([rand_block_idx(lq, lk, 1, 2, 32) for lq, lk in zip(lens_q, lens_k)])[None]
    check_backward(q, k, v, idx, 32, cu_q=cu_q, cu_k=cu_k, config={"BN": 16, "BN_KV": 16})


def test_backward_row_without_keys():
    """A token whose list is empty has zero gradient and contributes nothing to dk/dv; G = 1, one kv head."""
    q, k, v = make_qkv(1, 40, 40, 1, 1, 16, torch.float32)
    idx = rand_block_idx(40, 40, 1, 2, 16)[None]
    idx[0, 7] = -1
    dq, _, _ = check_backward(q, k, v, idx, 16)
    assert (dq[0, 7] == 0).all()


def test_autograd_function_and_determinism():
    """Forward + backward through InfLLMV2SparseFunction; a second backward gives bit-equal gradients."""
    q, k, v = make_qkv(1, 45, 45, 4, 2, 16, torch.float32)
    idx = rand_block_idx(45, 45, 2, 2, 16)[None]
    g1 = check_backward(q, k, v, idx, 16, through_autograd=True)
    do = torch.randn_like(q)
    o, lse = torch_attention(q[0], k[0], v[0], idx[0], 16, 0, torch.float64, True)
    a = parallel_block_sparse_attention_bwd(q, k, v, o[None].float(), lse[None], do, idx, 16)
    b = parallel_block_sparse_attention_bwd(q, k, v, o[None].float(), lse[None], do, idx, 16)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(g1) == 3


def test_no_grad_is_plain_forward():
    q, k, v = make_qkv(1, 20, 20, 2, 1, 16, torch.float32)
    idx = rand_block_idx(20, 20, 1, 2, 16)[None]
    o = sparse_attention_with_grad(q, k, v, idx, 16)
    assert o.grad_fn is None and o.shape == q.shape


# ---- GPU: real shapes and selections, bf16 ----------------------------------------------------------------------

def real_selection(q, k, cfg, cu=None):
    from longcpm.ops import infllmv2_select
    return infllmv2_select(q, k, cfg, cu_seqlens=cu, cu_seqlens_k=cu, backend="triton")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("HQ,H,D", [(32, 2, 128), (16, 2, 64)])
def test_backward_gpu_real(HQ, H, D):
    """G = 16 / D = 128 and G = 8 / D = 64 at T = 8000, 96 selected 64-token blocks from the real selection."""
    T = 8000
    cfg = SparseConfig(dense_len=-1)
    q, k, v = make_qkv(1, T, T, HQ, H, D, torch.bfloat16)
    idx = real_selection(q, k, cfg)
    assert idx.shape[-1] == 96
    check_backward(q, k, v, idx, 64, through_autograd=True)


@gpu
@pytest.mark.gpu
def test_backward_gpu_varlen_window_deterministic():
    """Packed documents (v2 selection per document), then v1 window blocks; two backward runs are bit-equal."""
    lens = [3000, 77, 4100]
    cu = torch.tensor([0] + lens, device=DEV).cumsum(0).to(torch.int32)
    cfg = SparseConfig(dense_len=-1, window_size=512)
    q, k, v = make_qkv(1, sum(lens), sum(lens), 16, 2, 128, torch.bfloat16)
    idx = real_selection(q, k, cfg, cu)
    check_backward(q, k, v, idx, 64, cu_q=cu, cu_k=cu, through_autograd=True)
    v1 = SparseConfig(dense_len=-1, variant="v1", window_size=512, topk=16)
    idx1 = real_selection(q, k, v1, cu)
    check_backward(q, k, v, idx1, 64, wb=v1.local_blocks, cu_q=cu, cu_k=cu)
    do = torch.randn_like(q)
    fn = lambda a, b, c: sparse_attention_with_grad(a, b, c, idx, 64, cu_seqlens_q=cu, cu_seqlens_k=cu,  # noqa: E731
                                                    deterministic=True)
    runs = [grads(fn, q, k, v, do) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@gpu
@pytest.mark.gpu
def test_infllmv2_attention_trains_on_cuda():
    """End to end through the public op on CUDA (Triton selection + autograd Function): gradients equal autograd
    through the naive path given the same block indices."""
    from longcpm.ops import infllmv2_attention
    from longcpm.ops.infllmv2.naive import naive_infllmv2_attention

    T = 3000
    cfg = SparseConfig(dense_len=2048)
    q, k, v = make_qkv(1, T, T, 16, 2, 64, torch.bfloat16)
    do = torch.randn_like(q)
    out, dq, dk, dv = grads(lambda a, b, c: infllmv2_attention(a, b, c, cfg), q, k, v, do)
    idx = real_selection(q, k, cfg)
    ex = grads(lambda a, b, c: naive_infllmv2_attention(a, b, c, cfg, block_idx=idx),
               q.float(), k.float(), v.float(), do.float())
    pt = grads(lambda a, b, c: torch_attention(a[0], b[0], c[0], idx[0], 64, 0, torch.bfloat16)[None], q, k, v, do)
    for name, kern, e, p in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), ex, pt):
        check_close(kern, e, p, name)
