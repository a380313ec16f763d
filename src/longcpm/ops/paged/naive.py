"""Paged KV addressing in plain PyTorch: the CPU path and the reference for the Triton decode kernel.

A pool is [P, PS, H, D] (P pages of PS tokens); a sequence owns the pages of its block table, in order, so token p
lives at page table[p // PS], offset p % PS. Compressed keys (InfLLM-V2 c1/c2) are paged the same way, one entry
per `stride` tokens, and window i is stored at the entry of its LAST token, (i*stride + kernel - 1) // stride: the
content of a page then depends only on the tokens up to its end, so prefix caching can share it.
Knows nothing of sequences, schedulers or models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

# the model's dense cache path uses the same backends (cuDNN rebuilds a graph per key length): same numbers
from ..packed import MASKED_BACKENDS


def token_slots(block_tables: torch.Tensor, positions: torch.Tensor, page_size: int) -> torch.Tensor:
    """Flat pool slots (page * PS + offset) of absolute positions. block_tables [..., NP], positions [..., N]."""
    pages = block_tables.long().gather(-1, positions // page_size)
    return pages * page_size + positions % page_size


def store_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v [N, H, D] into their pool slots (int64 [N]); no host synchronisation (CUDA-graph safe)."""
    k_pool.view(-1, *k_pool.shape[2:]).index_copy_(0, slot_mapping, k.to(k_pool.dtype))
    v_pool.view(-1, *v_pool.shape[2:]).index_copy_(0, slot_mapping, v.to(v_pool.dtype))


def gather_kv(pool: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence as a contiguous [length, H, D] copy (table: its pages, [NP])."""
    n = -(-length // pool.shape[1])
    return pool[table[:n].long()].flatten(0, 1)[:length]


def compressed_entry(window: torch.Tensor | int, kernel: int, stride: int):
    """Paged entry index of compressed window i: the stride slot of its last token."""
    return window + kernel // stride - 1


def gather_compressed(c_pool: torch.Tensor, block_tables: torch.Tensor, n_windows: int, kernel: int,
                      stride: int) -> torch.Tensor:
    """Windows 0..n_windows-1 of each row as a contiguous [B, n_windows, H, D] (the layout the selection reads).
    Entries past a row's length are whatever its table points at: readers bound them by the row's length."""
    per = c_pool.shape[1]
    e = compressed_entry(torch.arange(n_windows, device=c_pool.device), kernel, stride)
    e = e.clamp(max=block_tables.shape[-1] * per - 1)[None].expand(block_tables.shape[0], -1)
    pages = block_tables.long().gather(-1, e // per)
    return c_pool.view(-1, *c_pool.shape[2:])[pages * per + e % per]


def append_compressed(k_pool: torch.Tensor, c_pool: torch.Tensor, table: torch.Tensor, past: int, total: int,
                      kernel: int, stride: int) -> None:
    """Pool the windows that became complete when one sequence grew from `past` to `total` keys (host lengths)."""
    lo = 0 if past < kernel else (past - kernel) // stride + 1
    hi = 0 if total < kernel else (total - kernel) // stride + 1
    if hi <= lo:
        return
    PS, per = k_pool.shape[1], c_pool.shape[1]
    pos = torch.arange(lo * stride, (hi - 1) * stride + kernel, device=k_pool.device)
    keys = k_pool.view(-1, *k_pool.shape[2:])[token_slots(table, pos, PS)]
    means = keys.float().unfold(0, kernel, stride).mean(-1).to(c_pool.dtype)  # [hi-lo, H, D]
    e = compressed_entry(torch.arange(lo, hi, device=k_pool.device), kernel, stride)
    dest = table.long()[e // per] * per + e % per
    c_pool.view(-1, *c_pool.shape[2:]).index_copy_(0, dest, means)


def append_compressed_decode(k_pool: torch.Tensor, c_pool: torch.Tensor, block_tables: torch.Tensor,
                             seq_lens: torch.Tensor, kernel: int, stride: int) -> None:
    """One new token per row (seq_lens [B] on device, after the step): pool the window that ends at it, if one
    does. Rows without a new window write to page 0 (the engine's scratch page), so shapes and control flow never
    depend on lengths: CUDA-graph safe."""
    PS, per = k_pool.shape[1], c_pool.shape[1]
    L = seq_lens.long()
    new = (L >= kernel) & ((L - kernel) % stride == 0)
    pos = ((L - kernel)[:, None] + torch.arange(kernel, device=L.device)[None]).clamp(min=0)
    keys = k_pool.view(-1, *k_pool.shape[2:])[token_slots(block_tables, pos, PS)]  # [B, kernel, H, D]
    means = keys.float().mean(1).to(c_pool.dtype)
    e = ((L - 1) // stride).clamp(min=0)
    dest = block_tables.long().gather(-1, (e // per)[:, None])[:, 0] * per + e % per
    c_pool.view(-1, *c_pool.shape[2:]).index_copy_(0, torch.where(new, dest, torch.zeros_like(dest)), means)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int) -> torch.Tensor:
    """Causal GQA attention of q [1, n, HQ, D] (positions past..past+n-1) over k, v [1, past+n, H, D], with the
    same boolean mask and SDPA backends as the model's contiguous cache path, so both give the same numbers."""
    n, L = q.shape[1], k.shape[1]
    pos = torch.arange(past, past + n, device=q.device)
    mask = (torch.arange(L, device=q.device)[None, :] <= pos[:, None])[None, None]
    with sdpa_kernel(MASKED_BACKENDS):
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                           enable_gqa=True)
    return o.transpose(1, 2)


def naive_paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                       seq_lens: list[int], block_idx: torch.Tensor | None = None,
                       block_size: int = 64) -> torch.Tensor:
    """One query token per row: q [B, HQ, D] at position seq_lens[b] - 1 against the row's first seq_lens[b] keys.
    block_idx [B, H, W] (ascending, -1 padded) restricts each kv head to those key blocks. Returns [B, HQ, D]."""
    out = torch.empty_like(q)
    for b, L in enumerate(seq_lens):
        kk = gather_kv(k_pool, block_tables[b], L)[None]
        vv = gather_kv(v_pool, block_tables[b], L)[None]
        if block_idx is None:
            out[b] = masked_attention(q[b][None, None], kk, vv, L - 1)[0, 0]
            continue
        H, G = kk.shape[2], q.shape[1] // kk.shape[2]
        keep = torch.zeros(H, -(-L // block_size) + 1, dtype=torch.bool, device=q.device)
        idx = block_idx[b].long()
        keep.scatter_(-1, torch.where(idx < 0, keep.shape[-1] - 1, idx), True)
        tok = keep[:, :-1].repeat_interleave(block_size, -1)[:, :L]  # [H, L]
        s = torch.einsum("hgd,jhd->hgj", q[b].float().view(H, G, -1), kk[0].float()) * q.shape[-1] ** -0.5
        p = s.masked_fill(~tok[:, None], float("-inf")).softmax(-1)
        out[b] = torch.einsum("hgj,jhd->hgd", p, vv[0].float()).reshape(q.shape[1:]).to(q.dtype)
    return out
