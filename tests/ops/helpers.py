"""Shared pieces of the InfLLM-V2 kernel tests: random block lists, the PyTorch reference and the error check.

Error method of the flash-attention tests: a kernel's error against the exact result must stay within twice the
error of the same computation done in PyTorch at the kernel's precision, plus the output rounding.
"""

from __future__ import annotations

import math

import pytest
import torch

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
# a small InfLLM-V2 setting (blocks of 16 tokens) that keeps reference-vs-kernel tests fast; always sparse
SMALL_SPARSE = dict(kernel_size=8, kernel_stride=4, block_size=16, window_size=32, topk=4, init_blocks=1,
                    lse_kernel_size=32, lse_kernel_stride=16, dense_len=-1)
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def rand_block_idx(lq: int, lk: int, H: int, W: int, bs: int, *, init: int = 1, local: int = 2, drop: float = 0.2,
                   device=DEV) -> torch.Tensor:
    """Valid random lists int32 [lq, H, W] for the last lq of lk tokens: init blocks and the current block with
    `local` blocks before it always, other past blocks at random (some dropped so lists are ragged), ascending,
    distinct, -1 padded."""
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


def token_mask(Tq, Tk, block_idx, bs, window_blocks=0):
    """bool [Tq, H, Tk]: key j visible to (token, kv head), as in the naive reference."""
    dev = block_idx.device
    pos = torch.arange(Tk - Tq, Tk, device=dev)
    n_blk = -(-Tk // bs)
    sel = torch.zeros(*block_idx.shape[:2], n_blk + 1, dtype=torch.bool, device=dev)
    sel.scatter_(-1, torch.where(block_idx < 0, n_blk, block_idx).long(), True)
    sel = sel[..., :n_blk]
    if window_blocks:
        kb = torch.arange(n_blk, device=dev)[None, :]
        qb = (pos // bs)[:, None]
        sel = sel | ((kb > qb - window_blocks) & (kb <= qb))[:, None, :]
    return sel.repeat_interleave(bs, -1)[..., :Tk] & (torch.arange(Tk, device=dev) <= pos[:, None])[:, None]


def masked_logits(q, k, mask, dtype):
    """Scaled logits [Tq, H, G, Tk] of q [Tq, HQ, D] against k [Tk, H, D] in `dtype`, -inf where mask is False."""
    Tq, HQ, D = q.shape
    H = k.shape[1]
    s = torch.einsum("thgd,jhd->thgj", q.to(dtype).view(Tq, H, HQ // H, D), k.to(dtype)) / math.sqrt(D)
    return s.masked_fill(~mask[:, :, None], float("-inf"))


def torch_block_sparse(q, k, v, block_idx, bs, window_blocks=0, dtype=None):
    """The same math as the naive reference, computed in `dtype` (the kernel's precision, or float64)."""
    dtype = dtype or q.dtype
    Tq, HQ, D = q.shape
    mask = token_mask(Tq, k.shape[0], block_idx, bs, window_blocks)
    p = torch.softmax(masked_logits(q, k, mask, dtype), -1).nan_to_num(0.0)
    return torch.einsum("thgj,jhd->thgd", p.to(dtype), v.to(dtype)).reshape(Tq, HQ, D)


def check_close(out, exact, pt, what=""):
    """|out - exact| <= 2 |pt - exact| + 2 * (rounding of exact to out's dtype) + 1e-6."""
    rnd = (exact.to(out.dtype).double() - exact.double()).abs().max().item()  # before out becomes float64
    out, exact, pt = out.double(), exact.double(), pt.double()
    assert not torch.isnan(out).any(), f"{what}: NaN in output"
    err, err_pt = (out - exact).abs().max().item(), (pt - exact).abs().max().item()
    assert err <= 2 * err_pt + 2 * rnd + 1e-6, f"{what}: kernel error {err:.3g} vs torch {err_pt:.3g}"
