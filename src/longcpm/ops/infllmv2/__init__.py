"""InfLLM-V2 dense/sparse switchable attention: the public entry points.

`infllmv2_attention` (causal prefill, dense below dense_len), `infllmv2_select` (block selection alone),
`infllmv2_decode` (queries against a KV cache with compressed keys), `update_compressed_cache` (incremental c1/c2).
The backend is chosen in ops/dispatch.py: naive (the PyTorch reference in naive.py), torch (blocked.py: the
efficient PyTorch prefill, the default off CUDA; infllmv2_attention only) or triton.
"""

from __future__ import annotations

import torch

from ...config import SparseConfig
from ..dispatch import resolve_backend
from .blocked import blocked_infllmv2_attention
from .common import as_sparse_config, compressed_len
from .naive import naive_infllmv2_attention, naive_infllmv2_decode, naive_infllmv2_select

__all__ = ["SparseConfig", "infllmv2_attention", "infllmv2_select", "infllmv2_decode", "update_compressed_cache"]


def infllmv2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sparse_config, *, cu_seqlens=None,
                       cu_seqlens_k=None, backend: str | None = None, q_sel=None, k_sel=None) -> torch.Tensor:
    """Causal InfLLM-V2 attention. q [B, Tq, HQ, D], k/v [B, Tk, H, D] post-RoPE (Tk >= Tq, queries are the last
    Tq tokens), or B = 1 packed with cu_seqlens (int32 [N+1]; cu_seqlens_k when keys differ). Dense below
    dense_len (per sequence, total length), block-sparse at or above. q_sel/k_sel: the tensors used for block
    selection when they differ from q/k (use_nope: pre-RoPE). Returns [B, Tq, HQ, D] in q's dtype."""
    cfg = as_sparse_config(sparse_config)
    chosen = resolve_backend(backend, q, ("naive", "torch", "triton"))
    if chosen == "naive":
        return naive_infllmv2_attention(q, k, v, cfg, cu_seqlens=cu_seqlens, cu_seqlens_k=cu_seqlens_k,
                                        q_sel=q_sel, k_sel=k_sel)
    if chosen == "torch":
        return blocked_infllmv2_attention(q, k, v, cfg, cu_seqlens=cu_seqlens, cu_seqlens_k=cu_seqlens_k,
                                          q_sel=q_sel, k_sel=k_sel)
    from .triton_entry import triton_infllmv2_attention
    return triton_infllmv2_attention(q, k, v, cfg, cu_seqlens=cu_seqlens, cu_seqlens_k=cu_seqlens_k,
                                     q_sel=q_sel, k_sel=k_sel)


def infllmv2_select(q: torch.Tensor, k: torch.Tensor, sparse_config, *, cu_seqlens=None, cu_seqlens_k=None,
                    backend: str | None = None, q_sel=None, k_sel=None) -> torch.Tensor:
    """Selected key blocks per (token, kv head): int32 [B, Tq, H, K], ascending, padded with -1."""
    cfg = as_sparse_config(sparse_config)
    if resolve_backend(backend, q) == "naive":
        return naive_infllmv2_select(q, k, cfg, cu_seqlens=cu_seqlens, cu_seqlens_k=cu_seqlens_k,
                                     q_sel=q_sel, k_sel=k_sel)
    from .select import parallel_infllmv2_select
    return parallel_infllmv2_select(q, k, cfg, cu_seqlens=cu_seqlens, cu_seqlens_k=cu_seqlens_k,
                                    q_sel=q_sel, k_sel=k_sel)


def infllmv2_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                    sparse_config, *, c1: torch.Tensor | None = None, c2: torch.Tensor | None = None,
                    backend: str | None = None) -> torch.Tensor:
    """Sparse attention of the last Tq tokens of each sequence against its cache (the new tokens already written).

    q [B, Tq, HQ, D]; k_cache/v_cache [B, Tmax, H, D]; cache_seqlens int32 [B] on device: valid length per row;
    c1/c2 [B, N, H, D]: compressed-key caches kept by update_compressed_cache (the triton path reads them; the
    reference recomputes from k_cache). Always the sparse path: callers route rows below dense_len to dense
    attention. The triton path has no host synchronisation, so it can be captured in a CUDA graph."""
    cfg = as_sparse_config(sparse_config)
    if resolve_backend(backend, q) == "naive":
        return naive_infllmv2_decode(q, k_cache, v_cache, cache_seqlens, _always_sparse(cfg))
    from .triton_entry import triton_infllmv2_decode
    return triton_infllmv2_decode(q, k_cache, v_cache, cache_seqlens, cfg, c1=c1, c2=c2)


def update_compressed_cache(k_cache: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor | None, past_lens, total_lens,
                            sparse_config) -> None:
    """Write the c1 (and c2) windows that became complete when row b grew from past_lens[b] to total_lens[b] keys.
    Window i of (kernel, stride) exists once i*stride + kernel <= L, so only those new windows are pooled."""
    cfg = as_sparse_config(sparse_config)
    pairs = [(c1, cfg.kernel_size, cfg.kernel_stride)]
    if c2 is not None:
        pairs.append((c2, cfg.lse_kernel_size, cfg.lse_kernel_stride))
    if k_cache.is_cuda and resolve_backend(None, k_cache) == "triton" and k_cache.is_contiguous():
        from .compress import append_compressed
        old = torch.as_tensor(past_lens, dtype=torch.int32).to(k_cache.device, non_blocking=True)
        new = torch.as_tensor(total_lens, dtype=torch.int32).to(k_cache.device, non_blocking=True)
        grow = max((t - p for p, t in zip(past_lens, total_lens)), default=0)
        for c, ks, st in pairs:
            append_compressed(k_cache, c, old, new, ks, st, -(-grow // st) + 1 if grow > 0 else 0)
        return
    for c, ks, st in pairs:
        for b, (p, t) in enumerate(zip(past_lens, total_lens)):
            lo, hi = compressed_len(p, ks, st), compressed_len(t, ks, st)
            if hi <= lo:
                continue
            win = k_cache[b, lo * st: (hi - 1) * st + ks].float().unfold(0, ks, st)  # [n, H, D, ks]
            c[b, lo:hi] = win.mean(-1).to(c.dtype)


def _always_sparse(cfg: SparseConfig) -> SparseConfig:
    from dataclasses import replace
    return cfg if cfg.dense_len == -1 else replace(cfg, dense_len=-1)
