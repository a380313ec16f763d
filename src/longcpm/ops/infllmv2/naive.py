"""Plain-PyTorch reference of InfLLM-V2 (../shared/spec/infllmv2.md), fp32, one sequence at a time.

This file is the ground truth for every Triton kernel: readable before fast. Shapes follow the kernels:
q [T, HQ, D], k/v [T, H, D] per sequence; block indices [T, H, K] int32, ascending, padded with -1.
Positions are absolute: query t of a sequence with Tk keys sits at p_t = Tk - Tq + t (bottom-right aligned).
"""

from __future__ import annotations

import math

import torch

from ...config import SparseConfig
from .common import as_sparse_config, check_qkv, compressed_len, num_blocks, pool_window_range, seq_bounds


def naive_compress(k: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Mean of keys over windows [stride*i, stride*i + kernel), complete windows only. k [T, H, D] -> [n, H, D] fp32."""
    n = compressed_len(k.shape[0], kernel, stride)
    if n == 0:
        return k.new_zeros(0, *k.shape[1:], dtype=torch.float32)
    kf = k.float()
    return torch.stack([kf[stride * i: stride * i + kernel].mean(0) for i in range(n)])


def naive_stage1_scores(q: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor | None, pos: torch.Tensor,
                        cfg: SparseConfig) -> torch.Tensor:
    """Stage-1 block-relevance scores S[H, Tq, n1] (fp32).

    S_g(t, i) = sum over heads h of group g of exp(s * q_h(t).c1[i] - lse_h(t)) for visible windows i, else 0.
    lse_h(t) is the log-sum-exp of s * q_h(t).c2[j] over visible c2 windows (v2, or v1 with use_compress_lse);
    otherwise over visible c1 windows (exact, v1). A row whose LSE set is empty scores 0 everywhere.
    """
    T, HQ, D = q.shape
    n1, H = c1.shape[0], c1.shape[1]
    G = HQ // H
    s = 1.0 / math.sqrt(D)
    qf = q.float().view(T, H, G, D)
    logit1 = torch.einsum("thgd,nhd->hgtn", qf, c1.float()) * s  # [H, G, T, n1]
    end1 = torch.arange(n1, device=q.device) * cfg.kernel_stride + cfg.kernel_size - 1
    vis1 = end1[None, :] <= pos[:, None]  # [T, n1]
    if cfg.uses_c2():
        n2 = c2.shape[0]
        logit2 = torch.einsum("thgd,nhd->hgtn", qf, c2.float()) * s
        end2 = torch.arange(n2, device=q.device) * cfg.lse_kernel_stride + cfg.lse_kernel_size - 1
        vis2 = end2[None, :] <= pos[:, None]
        lse = logit2.masked_fill(~vis2, float("-inf")).logsumexp(-1)  # [H, G, T]
    else:
        lse = logit1.masked_fill(~vis1, float("-inf")).logsumexp(-1)
    p = torch.exp(logit1 - lse[..., None]).masked_fill(~vis1, 0.0)
    p = p.masked_fill(torch.isinf(lse)[..., None], 0.0)
    return p.sum(1)  # [H, T, n1]


def naive_block_scores(S: torch.Tensor, pos: torch.Tensor, n_blk: int, cfg: SparseConfig) -> torch.Tensor:
    """Max-pool c1 scores to token blocks and apply the forced / excluded blocks. S [H, T, n1] -> [H, T, n_blk].

    +inf: init blocks, and for v2 the local blocks q_blk - local .. q_blk (33 with the defaults).
    -inf: future blocks (> q_blk), and for v1 the window q_blk - local + 1 .. q_blk (stage 2 adds it back).
    """
    H, T, n1 = S.shape
    bs = cfg.block_size
    out = S.new_full((H, T, n_blk), float("-inf"))
    for k in range(n_blk):
        lo, hi = pool_window_range(k, bs, cfg.kernel_size, cfg.kernel_stride)
        hi = min(hi, n1 - 1)
        if lo <= hi:
            out[:, :, k] = S[:, :, lo: hi + 1].amax(-1)
    return forced_block_scores(out, pos, cfg)


def forced_block_scores(out: torch.Tensor, pos: torch.Tensor, cfg: SparseConfig) -> torch.Tensor:
    """Pooled block scores [H, T, n_blk] with the init / local blocks forced (+inf) and future (and v1 window)
    blocks excluded (-inf). Shared by every implementation so they select the same blocks."""
    kk = torch.arange(out.shape[-1], device=out.device)[None, :]
    qb = (pos // cfg.block_size)[:, None]
    local = cfg.local_blocks
    out = out.masked_fill((kk < cfg.init_blocks)[None], float("inf"))
    if cfg.variant == "v2":
        out = out.masked_fill(((kk >= qb - local) & (kk <= qb))[None], float("inf"))
    else:
        out = out.masked_fill(((kk > qb - local) & (kk <= qb))[None], float("-inf"))
    return out.masked_fill((kk > qb)[None], float("-inf"))


def naive_topk(scores: torch.Tensor, width: int) -> torch.Tensor:
    """Top-`width` blocks per row, -inf picks dropped; ascending indices, then -1 padding. [H, T, n] -> int32 [H, T, width].

    Ties go to the lower block index. They are common, not rare: adjacent blocks share a c1 window in the max-pool,
    so both get the same score whenever that window is the maximum, and an unspecified tie-break would make a token's
    selection depend on the sequence length around it (decode would disagree with prefill).
    """
    H, T, n = scores.shape
    kk = min(width, n)
    vals, idx = scores.sort(dim=-1, descending=True, stable=True)
    vals, idx = vals[..., :kk], idx[..., :kk]
    big = torch.iinfo(torch.int32).max
    idx = torch.where(torch.isneginf(vals), big, idx).sort(-1).values
    idx = torch.where(idx == big, -1, idx).to(torch.int32)
    if kk < width:
        idx = torch.cat([idx, idx.new_full((H, T, width - kk), -1)], -1)
    return idx


def naive_select_one(q_sel: torch.Tensor, k_sel: torch.Tensor, cfg: SparseConfig, width: int) -> torch.Tensor:
    """Block indices [T, H, width] for the last Tq = q_sel.shape[0] tokens of a sequence with keys k_sel."""
    Tq, Tk = q_sel.shape[0], k_sel.shape[0]
    pos = torch.arange(Tk - Tq, Tk, device=q_sel.device)
    c1 = naive_compress(k_sel, cfg.kernel_size, cfg.kernel_stride)
    c2 = naive_compress(k_sel, cfg.lse_kernel_size, cfg.lse_kernel_stride) if cfg.uses_c2() else None
    S = naive_stage1_scores(q_sel, c1, c2, pos, cfg)
    scores = naive_block_scores(S, pos, num_blocks(Tk, cfg.block_size), cfg)
    return naive_topk(scores, width).permute(1, 0, 2).contiguous()


def naive_block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                                 block_size: int, window_blocks: int = 0, sm_scale: float | None = None) -> torch.Tensor:
    """Stage 2: exact softmax over the union of selected key blocks, token-causal, for one sequence.

    q [Tq, HQ, D], k/v [Tk, H, D], block_idx [Tq, H, K] (-1 = none). window_blocks > 0 adds the v1 window
    q_blk - window_blocks + 1 .. q_blk. Returns [Tq, HQ, D] in fp32. A row with nothing visible returns 0.
    """
    Tq, HQ, D = q.shape
    Tk, H = k.shape[0], k.shape[1]
    G = HQ // H
    s = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    pos = torch.arange(Tk - Tq, Tk, device=q.device)
    n_blk = num_blocks(Tk, block_size)
    sel = torch.zeros(Tq, H, n_blk + 1, dtype=torch.bool, device=q.device)
    sel.scatter_(-1, torch.where(block_idx < 0, n_blk, block_idx).long(), True)
    sel = sel[..., :n_blk]
    if window_blocks > 0:
        kb = torch.arange(n_blk, device=q.device)[None, :]
        qb = (pos // block_size)[:, None]
        sel = sel | ((kb > qb - window_blocks) & (kb <= qb))[:, None, :]
    tok = sel.repeat_interleave(block_size, dim=-1)[..., :Tk]  # [Tq, H, Tk]
    tok = tok & (torch.arange(Tk, device=q.device)[None, None, :] <= pos[:, None, None])
    logits = torch.einsum("thgd,jhd->thgj", q.float().view(Tq, H, G, D), k.float()) * s
    logits = logits.masked_fill(~tok[:, :, None, :], float("-inf"))
    p = torch.softmax(logits, -1).nan_to_num(0.0)
    o = torch.einsum("thgj,jhd->thgd", p, v.float())
    return o.reshape(Tq, HQ, D)


def naive_dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float | None = None) -> torch.Tensor:
    """Causal GQA attention for one sequence, queries bottom-right aligned. [Tq, HQ, D] fp32."""
    Tq, HQ, D = q.shape
    Tk, H = k.shape[0], k.shape[1]
    G = HQ // H
    s = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    pos = torch.arange(Tk - Tq, Tk, device=q.device)
    logits = torch.einsum("thgd,jhd->thgj", q.float().view(Tq, H, G, D), k.float()) * s
    mask = torch.arange(Tk, device=q.device)[None, :] <= pos[:, None]
    logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.einsum("thgj,jhd->thgd", torch.softmax(logits, -1), v.float()).reshape(Tq, HQ, D)


def selection_width(cfg: SparseConfig, max_total_len: int) -> int:
    """Columns of the block-index tensor: the budget, capped by the number of blocks of the longest sequence."""
    return max(1, min(cfg.budget, num_blocks(max_total_len, cfg.block_size)))


def naive_infllmv2_select(q: torch.Tensor, k: torch.Tensor, sparse_config, *, cu_seqlens=None, cu_seqlens_k=None,
                          q_sel=None, k_sel=None) -> torch.Tensor:
    """Block indices int32 [B, Tq, H, K] (B=1 and total tokens when packed), ascending, -1 padded."""
    cfg = as_sparse_config(sparse_config)
    q_sel = q if q_sel is None else q_sel
    k_sel = k if k_sel is None else k_sel
    check_qkv(q, k, k, cu_seqlens, cu_seqlens_k)
    B, Tq, _, _ = q.shape
    H = k.shape[2]
    bounds = seq_bounds(B, Tq, k.shape[1], cu_seqlens, cu_seqlens_k)
    width = selection_width(cfg, max((lk for *_, lk in bounds), default=1))
    out = torch.full((B, Tq, H, width), -1, dtype=torch.int32, device=q.device)
    for b, qs, lq, ks, lk in bounds:
        if lq == 0:
            continue
        out[b, qs: qs + lq] = naive_select_one(q_sel[b, qs: qs + lq], k_sel[b, ks: ks + lk], cfg, width)
    return out


def naive_infllmv2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sparse_config, *, cu_seqlens=None,
                             cu_seqlens_k=None, q_sel=None, k_sel=None, block_idx=None) -> torch.Tensor:
    """Full InfLLM-V2 attention: dense below dense_len (per sequence, total length), block-sparse at or above.

    q [B, Tq, HQ, D], k/v [B, Tk, H, D] (Tk >= Tq: the queries are the last Tq tokens). Output in q's dtype.
    block_idx (optional, [B, Tq, H, K]) replaces the selection, for testing stage 2 alone.
    """
    cfg = as_sparse_config(sparse_config)
    check_qkv(q, k, v, cu_seqlens, cu_seqlens_k)
    B, Tq = q.shape[:2]
    q_sel = q if q_sel is None else q_sel
    k_sel = k if k_sel is None else k_sel
    bounds = seq_bounds(B, Tq, k.shape[1], cu_seqlens, cu_seqlens_k)
    width = selection_width(cfg, max((lk for *_, lk in bounds), default=1))
    wb = cfg.local_blocks if cfg.variant == "v1" else 0
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for b, qs, lq, ks, lk in bounds:
        if lq == 0:
            continue
        qq, kk, vv = q[b, qs: qs + lq], k[b, ks: ks + lk], v[b, ks: ks + lk]
        if not cfg.is_sparse(lk):
            out[b, qs: qs + lq] = naive_dense_attention(qq, kk, vv)
            continue
        if block_idx is not None:
            idx = block_idx[b, qs: qs + lq]
        else:
            idx = naive_select_one(q_sel[b, qs: qs + lq], k_sel[b, ks: ks + lk], cfg, width)
        out[b, qs: qs + lq] = naive_block_sparse_attention(qq, kk, vv, idx, cfg.block_size, wb)
    return out.to(q.dtype)


def naive_infllmv2_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                          sparse_config, *, q_sel=None, k_sel_cache=None) -> torch.Tensor:
    """Decode / chunk step against a KV cache that already holds the new tokens.

    q [B, Tq, HQ, D] are the last Tq tokens of each sequence; k_cache/v_cache [B, Tmax, H, D];
    cache_seqlens [B] int: total valid length per sequence (new tokens included). Returns [B, Tq, HQ, D].
    """
    cfg = as_sparse_config(sparse_config)
    B, Tq = q.shape[:2]
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for b, L in enumerate(cache_seqlens.tolist()):
        kk, vv = k_cache[b, :L][None], v_cache[b, :L][None]
        ks = None if k_sel_cache is None else k_sel_cache[b, :L][None]
        qs = None if q_sel is None else q_sel[b: b + 1]
        out[b] = naive_infllmv2_attention(q[b: b + 1], kk, vv, cfg, q_sel=qs, k_sel=ks)[0].float()
    return out.to(q.dtype)
