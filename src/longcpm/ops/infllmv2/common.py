"""Shape arithmetic and argument checks shared by the InfLLM-V2 reference and kernels."""

from __future__ import annotations

import torch

from ...config import SparseConfig
from ...errors import ConfigError


def as_sparse_config(cfg: SparseConfig | dict) -> SparseConfig:
    if isinstance(cfg, SparseConfig):
        return cfg
    if isinstance(cfg, dict):
        return SparseConfig.from_dict(cfg)
    raise ConfigError(f"sparse_config must be a SparseConfig or a dict, got {type(cfg).__name__}")


def compressed_len(total_len, kernel: int, stride: int):
    """Number of complete mean-pooling windows over `total_len` keys (int or int tensor)."""
    if isinstance(total_len, torch.Tensor):
        return torch.where(total_len >= kernel, (total_len - kernel) // stride + 1, torch.zeros_like(total_len))
    return 0 if total_len < kernel else (total_len - kernel) // stride + 1


def num_blocks(total_len: int, block_size: int) -> int:
    return -(-total_len // block_size)


def pool_window_range(k: int, block_size: int, kernel: int, stride: int) -> tuple[int, int]:
    """c1 windows [lo, hi] (inclusive) that overlap token block k: stride*i < bs*(k+1) and stride*i + kernel > bs*k.
    For 64/32/16 that is 4k-1 .. 4k+3 (the official 5/4/1 max-pool with padding 1)."""
    lo = max(0, (block_size * k - kernel) // stride + 1)
    hi = (block_size * (k + 1) - 1) // stride
    return lo, hi


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q=None, cu_seqlens_k=None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
    if cu_seqlens_q is not None:
        if q.shape[0] != 1:
            raise ValueError("packed sequences (cu_seqlens) need B = 1")
        ck = cu_seqlens_k if cu_seqlens_k is not None else cu_seqlens_q
        if cu_seqlens_q.dim() != 1 or ck.shape != cu_seqlens_q.shape:
            raise ValueError("cu_seqlens must be 1-D with one more entry than sequences, for q and k alike")
    elif q.shape[1] > k.shape[1]:
        raise ValueError(f"more queries ({q.shape[1]}) than keys ({k.shape[1]}): queries are the last keys' tokens")


def seq_bounds(B: int, Tq: int, Tk: int, cu_seqlens_q=None, cu_seqlens_k=None) -> list[tuple[int, int, int, int, int]]:
    """(batch row, q start, q len, k start, k len) per sequence; queries are the last q len tokens of their keys."""
    if cu_seqlens_q is None:
        return [(b, 0, Tq, 0, Tk) for b in range(B)]
    cq = cu_seqlens_q.tolist()
    ck = (cu_seqlens_k if cu_seqlens_k is not None else cu_seqlens_q).tolist()
    out = []
    for i in range(len(cq) - 1):
        lq, lk = cq[i + 1] - cq[i], ck[i + 1] - ck[i]
        if lq > lk:
            raise ValueError(f"sequence {i}: {lq} queries but only {lk} keys")
        out.append((0, cq[i], lq, ck[i], lk))
    return out
