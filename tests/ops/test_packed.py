"""Packed causal attention: documents never see each other; the CUDA varlen path equals the per-document loop."""

import pytest
import torch
import torch.nn.functional as F

from longcpm.ops.packed import packed_causal_attention


def _reference(q, k, v, cu):
    out = []
    G = q.shape[2] // k.shape[2]
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qq = q[0, s:e].transpose(0, 1).double()
        kk = k[0, s:e].repeat_interleave(G, dim=1).transpose(0, 1).double()
        vv = v[0, s:e].repeat_interleave(G, dim=1).transpose(0, 1).double()
        out.append(F.scaled_dot_product_attention(qq, kk, vv, is_causal=True).transpose(0, 1))
    return torch.cat(out)[None]


def _inputs(lens, HQ=8, H=1, D=64, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q, k, v = (torch.randn(1, T, h, D, generator=g).to(device, dtype) for h in (HQ, H, H))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu


def test_cpu_loop_matches_per_document_reference():
    q, k, v, cu = _inputs([5, 1, 37, 64, 3], HQ=4, H=2, D=16)
    out = packed_causal_attention(q, k, v, cu)
    torch.testing.assert_close(out.double(), _reference(q, k, v, cu), rtol=1e-5, atol=1e-5)
    q2 = q.clone()
    q2[0, :5] += 1.0  # the first document changes; the others must not
    out2 = packed_causal_attention(q2, k, v, cu)
    assert torch.equal(out2[0, 5:], out[0, 5:]) and not torch.equal(out2[0, :5], out[0, :5])


def test_shape_errors():
    q, k, v, cu = _inputs([4, 4], HQ=3, H=2, D=8)
    with pytest.raises(ValueError, match="packed attention"):
        packed_causal_attention(q, k, v, cu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only (flash varlen)")
@pytest.mark.parametrize("H", [1, 2])
def test_cuda_varlen_matches_loop(H):
    q, k, v, cu = _inputs([700, 1, 129, 2048, 64, 333], HQ=8, H=H, D=64, device="cuda", dtype=torch.bfloat16)
    fast = packed_causal_attention(q, k, v, cu, use_varlen=True)
    torch.testing.assert_close(fast.double(), _reference(q, k, v, cu.cuda()), rtol=2e-2, atol=2e-2)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    packed_causal_attention(qg, kg, vg, cu, use_varlen=True).float().square().sum().backward()
    ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
    packed_causal_attention(ql, kl, vl, cu, use_varlen=False).float().square().sum().backward()
    for a, b in ((qg, ql), (kg, kl), (vg, vl)):
        torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=5e-2, atol=5e-2)
