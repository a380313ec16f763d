"""Causal attention over packed documents (B = 1, cu_seqlens): no attention across documents.

On CUDA with fp16/bf16 this is one flash varlen call (torch.nn.attention.varlen): packed training rows hold
dozens of short documents, and one scaled_dot_product_attention call per document costs more in launches than in
math. Elsewhere (CPU, fp32, a torch without varlen_attn) it loops over the documents with SDPA, restricted to the
backends that do not build a cuDNN graph per new length.
"""

from __future__ import annotations

import inspect
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# cuDNN rebuilds its execution graph for every new sequence length (milliseconds to 100+ ms of CPU per call): in
# decode every step, in packed training every document. Measured on H200: dense training of needle-11m at 4K rows
# ran at 17K-25K tokens/s with cuDNN chosen, 316K without (benchmarks/results/needle-11m-*.jsonl).
MASKED_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def _varlen():
    """(varlen_attn, its keyword for causal masking, whether it takes enable_gqa), or None without it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    return varlen_attn, causal, "enable_gqa" in params


# LONGCPM_PACKED_VARLEN=0 turns the varlen path off (a torch whose varlen_attn misbehaves)
_VARLEN = _varlen() if os.environ.get("LONGCPM_PACKED_VARLEN", "1") != "0" else None


def packed_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                            *, use_varlen: bool | None = None) -> torch.Tensor:
    """q [1, T, HQ, D], k/v [1, T, H, D] (HQ a multiple of H), cu_seqlens int32 [N + 1] -> [1, T, HQ, D]."""
    if q.shape[0] != 1 or k.shape[:2] != q.shape[:2] or v.shape != k.shape or q.shape[2] % k.shape[2]:
        raise ValueError(f"packed attention wants q [1, T, HQ, D] and k, v [1, T, H, D] with H | HQ; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if use_varlen is None:
        use_varlen = _VARLEN is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if use_varlen:
        fn, causal, gqa = _VARLEN
        qq, kk, vv = q[0], k[0], v[0]
        if not gqa and kk.shape[1] != qq.shape[1]:
            kk = kk.repeat_interleave(qq.shape[1] // kk.shape[1], dim=1)
            vv = vv.repeat_interleave(qq.shape[1] // vv.shape[1], dim=1)
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        longest = int((cu[1:] - cu[:-1]).max())
        extra = {"enable_gqa": True} if gqa and kk.shape[1] != qq.shape[1] else {}
        return fn(qq, kk, vv, cu, cu, longest, longest, **causal, **extra)[None]
    o = torch.empty_like(q)
    cu = cu_seqlens.tolist()
    with sdpa_kernel(MASKED_BACKENDS):
        for s, e in zip(cu[:-1], cu[1:]):
            if e > s:
                o[:, s:e] = F.scaled_dot_product_attention(
                    q[:, s:e].transpose(1, 2), k[:, s:e].transpose(1, 2), v[:, s:e].transpose(1, 2),
                    is_causal=True, enable_gqa=True).transpose(1, 2)
    return o
