"""Attention and cache maintenance over a paged KV pool ([P, PS, H, D] per layer, addressed by block tables).

The backend is chosen in ops/dispatch.py: "naive" (PyTorch, gathers pages; the CPU path and the reference) or
"triton" (a flash-decoding kernel that reads pages in place).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dispatch import resolve_backend
from .naive import (
    append_compressed,
    append_compressed_decode,
    compressed_entry,
    gather_compressed,
    gather_kv,
    masked_attention,
    naive_paged_decode,
    store_kv,
    token_slots,
)

__all__ = ["append_compressed", "append_compressed_decode", "compressed_entry", "gather_compressed", "gather_kv",
           "paged_decode_attention", "prefill_attention", "store_kv", "token_slots"]


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, *, host_lens: list[int] | None = None,
                           block_idx: torch.Tensor | None = None, block_size: int = 64,
                           backend: str | None = None) -> torch.Tensor:
    """One query token per row, q [B, HQ, D], at position seq_lens[b] - 1, against that row's paged keys (all of
    them, or the blocks in block_idx [B, H, W]). The naive backend needs host_lens (it loops over rows)."""
    if resolve_backend(backend, q) == "naive":
        lens = host_lens if host_lens is not None else seq_lens.tolist()
        return naive_paged_decode(q, k_pool, v_pool, block_tables, lens, block_idx, block_size)
    from .decode import triton_paged_decode
    return triton_paged_decode(q, k_pool, v_pool, block_tables, seq_lens, block_idx, block_size)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int,
                      backend: str | None = None) -> torch.Tensor:
    """Dense causal attention of a chunk q [1, n, HQ, D] at positions past.. over its sequence's keys [1, past+n].

    naive: the model's masked SDPA (bit-identical to the contiguous cache); triton: SDPA's causal kernels, which
    never build an [n, L] mask (a 128K-token prompt would need gigabytes for it)."""
    if resolve_backend(backend, q) == "naive":
        return masked_attention(q, k, v, past)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if past == 0:
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
    else:
        from torch.nn.attention.bias import causal_lower_right
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=causal_lower_right(q.shape[1], k.shape[1]),
                                           enable_gqa=True)
    return o.transpose(1, 2)
