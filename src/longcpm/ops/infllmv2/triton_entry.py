"""Triton path of the public InfLLM-V2 entry points: dense rows through SDPA, sparse rows through
selection (select.py) + block-sparse attention (parallel.py / decode.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ...config import SparseConfig
from .common import check_qkv, seq_bounds


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal GQA attention, queries bottom-right aligned. [B, Tq, HQ, D] in and out."""
    Tq, Tk = q.shape[1], k.shape[1]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    with sdpa_kernel(_VARLEN_BACKENDS):
        if Tq == Tk:
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
        else:
            from torch.nn.attention.bias import causal_lower_right
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=causal_lower_right(Tq, Tk), enable_gqa=True)
    return o.transpose(1, 2)


# Rows arrive with ever new lengths; cuDNN would build a new execution graph for each (up to 100+ ms of CPU).
_VARLEN_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _window_blocks(cfg: SparseConfig) -> int:
    return cfg.local_blocks if cfg.variant == "v1" else 0


def triton_infllmv2_attention(q, k, v, cfg: SparseConfig, *, cu_seqlens=None, cu_seqlens_k=None, q_sel=None,
                              k_sel=None) -> torch.Tensor:
    from .autograd import sparse_attention_with_grad  # the plain forward unless q, k or v needs a gradient
    from .select import parallel_infllmv2_select

    check_qkv(q, k, v, cu_seqlens, cu_seqlens_k)
    if cu_seqlens is None:
        if not cfg.is_sparse(k.shape[1]):
            return _dense(q, k, v)
        idx = parallel_infllmv2_select(q, k, cfg, q_sel=q_sel, k_sel=k_sel)
        return sparse_attention_with_grad(q, k, v, idx, cfg.block_size, window_blocks=_window_blocks(cfg))
    bounds = seq_bounds(1, q.shape[1], k.shape[1], cu_seqlens, cu_seqlens_k)
    sparse = [cfg.is_sparse(lk) for *_, lk in bounds]
    if all(sparse):
        idx = parallel_infllmv2_select(q, k, cfg, cu_seqlens=cu_seqlens, cu_seqlens_k=cu_seqlens_k, q_sel=q_sel,
                                       k_sel=k_sel)
        return sparse_attention_with_grad(q, k, v, idx, cfg.block_size, window_blocks=_window_blocks(cfg),
                                          cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens_k)
    out = torch.empty_like(q)
    for (_, qs, lq, ks, lk), is_sparse in zip(bounds, sparse):
        if lq == 0:
            continue
        qq, kk, vv = q[:, qs: qs + lq], k[:, ks: ks + lk], v[:, ks: ks + lk]
        if not is_sparse:
            out[:, qs: qs + lq] = _dense(qq, kk, vv)
            continue
        qsel = None if q_sel is None else q_sel[:, qs: qs + lq]
        ksel = None if k_sel is None else k_sel[:, ks: ks + lk]
        idx = parallel_infllmv2_select(qq, kk, cfg, q_sel=qsel, k_sel=ksel)
        out[:, qs: qs + lq] = sparse_attention_with_grad(qq, kk, vv, idx, cfg.block_size,
                                                         window_blocks=_window_blocks(cfg))
    return out


def triton_infllmv2_decode(q, k_cache, v_cache, cache_seqlens, cfg: SparseConfig, *, c1=None, c2=None) -> torch.Tensor:
    from .compress import compress_keys
    from .decode import decode_block_sparse_attention
    from .select import decode_infllmv2_select

    if c1 is None or (cfg.uses_c2() and c2 is None):
        # no compressed cache given: pool it from the whole cache (costly; the model keeps c1/c2 incrementally)
        c1 = compress_keys(k_cache, cfg.kernel_size, cfg.kernel_stride)[0]
        c2 = compress_keys(k_cache, cfg.lse_kernel_size, cfg.lse_kernel_stride)[0] if cfg.uses_c2() else None
    idx = decode_infllmv2_select(q, c1, c2, cache_seqlens, cfg, cfg.budget)
    return decode_block_sparse_attention(q, k_cache, v_cache, cache_seqlens, idx, cfg.block_size,
                                         window_blocks=_window_blocks(cfg))
