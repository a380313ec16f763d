"""Triton flash-decoding over a paged KV pool: one query token per sequence, all its keys (dense) or only the key
blocks a selection picked (InfLLM-V2 stage 2).

Split-K: each (split, kv head, sequence) program walks a slice of the row's key blocks through the block table,
keeps an online softmax over its G query heads (padded to 16 rows for tl.dot), and writes a normalised partial
output with its log2-sum-exp; `paged_decode_combine_kernel` merges the slices. Lengths and block tables are read on
the device and the grid depends on shapes only, so a call can be captured in a CUDA graph.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def paged_decode_fwd_kernel(
    q, k_pool, v_pool, block_tables, seq_lens, block_idx, o_part, lse_part,
    stride_qb, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh, stride_tb,
    stride_ib, stride_ih, W, qk_scale,
    H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, PS: tl.constexpr,
    BS: tl.constexpr, S: tl.constexpr, W_PAD: tl.constexpr, SPARSE: tl.constexpr, PREC: tl.constexpr,
):
    i_s, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    lk = tl.load(seq_lens + i_b)
    o_g = tl.arange(0, G_PAD)
    m_g = o_g < G
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    p_q = q + i_b.to(tl.int64) * stride_qb + (i_h * G + o_g)[:, None] * stride_qh + o_d[None, :]
    b_q = tl.load(p_q, mask=m_g[:, None] & m_d[None, :], other=0.)  # [G_PAD, BD]
    p_idx = block_idx + i_b.to(tl.int64) * stride_ib + i_h * stride_ih
    if SPARSE:
        o_w = tl.arange(0, W_PAD)
        b_i = tl.load(p_idx + o_w, mask=o_w < W, other=-1)
        n_e = tl.max(tl.where(b_i >= 0, o_w + 1, 0), 0)
    else:
        n_e = tl.cdiv(lk, BS)
    per = tl.cdiv(n_e, S)
    e_lo = tl.minimum(i_s * per, n_e)
    e_hi = tl.minimum(e_lo + per, n_e)
    o_t = tl.arange(0, BS)
    b_m = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([G_PAD], dtype=tl.float32)
    b_acc = tl.zeros([G_PAD, BD], dtype=tl.float32)
    p_tab = block_tables + i_b.to(tl.int64) * stride_tb
    for e in range(e_lo, e_hi):
        if SPARSE:
            blk = tl.load(p_idx + e)
        else:
            blk = e
        page = tl.load(p_tab + (blk * BS) // PS).to(tl.int64)
        off = (blk * BS) % PS + o_t
        m_t = blk * BS + o_t < lk
        m_kv = m_t[:, None] & m_d[None, :]
        b_k = tl.load(k_pool + page * stride_kp + off[:, None] * stride_kt + i_h * stride_kh + o_d[None, :],
                      mask=m_kv, other=0.)  # [BS, BD]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale  # [G_PAD, BS], log2 units
        b_s = tl.where(m_t[None, :], b_s, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_mn = tl.where(b_mn == float("-inf"), 0., b_mn)
        b_p = tl.exp2(b_s - b_mn[:, None])
        b_r = tl.exp2(b_m - b_mn)
        b_l = b_l * b_r + tl.sum(b_p, 1)
        b_v = tl.load(v_pool + page * stride_vp + off[:, None] * stride_vt + i_h * stride_vh + o_d[None, :],
                      mask=m_kv, other=0.)
        b_acc = b_acc * b_r[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PREC)
        b_m = b_mn
    m_l = b_l > 0
    b_o = b_acc / tl.where(m_l, b_l, 1.)[:, None]
    b_lse = tl.where(m_l, b_m + tl.log2(tl.where(m_l, b_l, 1.)), float("-inf"))
    i_p = ((i_b * H + i_h) * S + i_s).to(tl.int64) * G_PAD
    tl.store(o_part + (i_p + o_g)[:, None] * BD + o_d[None, :], b_o)
    tl.store(lse_part + i_p + o_g, b_lse)


@triton.jit
def paged_decode_combine_kernel(
    o_part, lse_part, o, stride_ob, stride_oh,
    H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, S: tl.constexpr,
    S_PAD: tl.constexpr,
):
    i_h, i_b = tl.program_id(0), tl.program_id(1)
    o_g = tl.arange(0, G_PAD)
    o_d = tl.arange(0, BD)
    o_s = tl.arange(0, S_PAD)
    i_p = ((i_b * H + i_h) * S).to(tl.int64)
    b_lse = tl.load(lse_part + (i_p + o_s)[:, None] * G_PAD + o_g[None, :], mask=(o_s < S)[:, None],
                    other=float("-inf"))  # [S_PAD, G_PAD]
    b_mx = tl.max(b_lse, 0)
    b_mx = tl.where(b_mx == float("-inf"), 0., b_mx)
    b_sum = tl.sum(tl.exp2(b_lse - b_mx[None, :]), 0)
    b_acc = tl.zeros([G_PAD, BD], dtype=tl.float32)
    for i_s in range(S):
        b_w = tl.exp2(tl.load(lse_part + (i_p + i_s) * G_PAD + o_g) - b_mx)
        b_acc += b_w[:, None] * tl.load(o_part + ((i_p + i_s) * G_PAD + o_g)[:, None] * BD + o_d[None, :])
    m_l = b_sum > 0
    b_o = tl.where(m_l[:, None], b_acc / tl.where(m_l, b_sum, 1.)[:, None], 0.)
    p_o = o + i_b.to(tl.int64) * stride_ob + (i_h * G + o_g)[:, None] * stride_oh + o_d[None, :]
    tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=(o_g < G)[:, None] & (o_d < D)[None, :])


def _num_splits(B: int, H: int, max_blocks: int, device: torch.device) -> int:
    """About two programs per SM, at least two key blocks per split; from shapes only (graph-stable)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(triton.cdiv(2 * sms, B * H), triton.cdiv(max_blocks, 2), 64))


def triton_paged_decode(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                        seq_lens: torch.Tensor, block_idx: torch.Tensor | None = None, block_size: int = 64,
                        num_splits: int | None = None) -> torch.Tensor:
    """q [B, HQ, D]; pools [P, PS, H, D]; block_tables int32 [B, NP]; seq_lens int32 [B] (query at L-1); block_idx
    int32 [B, H, W] (ascending, -1 padded) or None for all keys. Returns [B, HQ, D] in q's dtype."""
    B, HQ, D = q.shape
    PS, H = k_pool.shape[1], k_pool.shape[2]
    G = HQ // H
    BS = block_size if block_idx is not None else min(64, PS)
    if PS % BS or BS < 16 or BS & (BS - 1):
        raise ValueError(f"page size {PS} must be a multiple of the key block {BS} (a power of 2 >= 16)")
    q = q.contiguous()
    G_PAD = max(16, triton.next_power_of_2(G))
    BD = max(16, triton.next_power_of_2(D))
    max_blocks = block_idx.shape[-1] if block_idx is not None else block_tables.shape[1] * PS // BS
    S = num_splits or _num_splits(B, H, max_blocks, q.device)
    o_part = torch.empty(B * H * S * G_PAD, BD, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(B * H * S * G_PAD, dtype=torch.float32, device=q.device)
    idx = block_idx.contiguous() if block_idx is not None else block_tables
    W = idx.shape[-1]
    stride_ib, stride_ih = (idx.stride(0), idx.stride(1)) if block_idx is not None else (0, 0)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    paged_decode_fwd_kernel[(S, H, B)](
        q, k_pool, v_pool, block_tables, seq_lens, idx, o_part, lse_part,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), v_pool.stride(0),
        v_pool.stride(1), v_pool.stride(2), block_tables.stride(0), stride_ib, stride_ih, W,
        LOG2E / math.sqrt(D),
        H=H, G=G, G_PAD=G_PAD, D=D, BD=BD, PS=PS, BS=BS, S=S, W_PAD=triton.next_power_of_2(W),
        SPARSE=block_idx is not None, PREC=prec, num_warps=4, num_stages=2,
    )
    o = torch.empty_like(q)
    paged_decode_combine_kernel[(H, B)](o_part, lse_part, o, o.stride(0), o.stride(1), H=H, G=G, G_PAD=G_PAD, D=D,
                                        BD=BD, S=S, S_PAD=triton.next_power_of_2(S), num_warps=4)
    return o
