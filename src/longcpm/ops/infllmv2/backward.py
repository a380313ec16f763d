"""Triton backward of InfLLM-V2 stage 2 (block-sparse attention): dq, dk, dv from (q, k, v, o, lse, do).

With P = softmax of the selected, token-causal logits, delta = rowsum(o * do), dS = P * (dO V^T - delta):
dq = s * dS K, dk = s * dS^T Q (summed over the G query heads of the group), dv = P^T dO. P is recomputed from
the forward's LSE, never stored. Everything runs in packed form (B = 1 + cu_seqlens); a dense batch is viewed as
B packed sequences of equal length.

How each side finds its work:
- dq walks the selection token-major, as the forward does: a program owns BT tokens x G heads of one kv head
  (BT * G = 64 rows), `tile_union_kernel` merges the BT ascending block lists into one list of distinct blocks
  with a per-block token bitmask, and the program loads each K/V block once, masking the rows that did not
  select it.
- dk/dv need the transpose (key block -> the query tokens that selected it). It is built on the device without
  a host sync: one sort key (kv head, key block, query token) per selected entry, `torch.sort`, then
  `searchsorted` gives a CSR offset per (block, kv head). A program owns one segment of at most `seg` tokens of
  one list and one tile of BN keys; it gathers the tokens' G query heads in chunks of BTC tokens (64 rows), so
  no row is wasted on a token that did not select the block. Lists longer than one segment (block 0 is
  selected by every token) are split across programs, which write fp32 partials that `dkdv_reduce_kernel`
  sums in segment order. No atomics: two runs give bit-equal gradients.
Knows nothing of how blocks are selected; the selection is a constant of the backward.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .parallel import _seg_count, _seg_or

LOG2E = tl.constexpr(1.4426950408889634)
MAX_BT = 16  # tokens per dq tile: the per-block token bitmask is an int32


@triton.jit
def _tile_bounds(i_t, cu_seqlens_q, cu_seqlens_k, tile_table, BT: tl.constexpr):
    """(bos_q, lq, bos_k, lk, t0) of query tile i_t: its sequence's first q / k rows and lengths, and the tile's
    first token within the sequence."""
    i_n = tl.load(tile_table + i_t * 2)
    t0 = tl.load(tile_table + i_t * 2 + 1) * BT
    bos_q = tl.load(cu_seqlens_q + i_n)
    lq = tl.load(cu_seqlens_q + i_n + 1) - bos_q
    bos_k = tl.load(cu_seqlens_k + i_n)
    lk = tl.load(cu_seqlens_k + i_n + 1) - bos_k
    return bos_q, lq, bos_k, lk, t0


@triton.jit
def tile_union_kernel(block_idx, u_idx, u_bits, u_cnt, cu_seqlens_q, cu_seqlens_k, tile_table,
                      stride_ir, stride_ih, W, C_MAX, window_blocks,
                      H: tl.constexpr, BS: tl.constexpr, BT: tl.constexpr, C_PAD: tl.constexpr):
    """Per (query tile, kv head): the distinct blocks its tokens attend, ascending, and for each a mask with bit
    i set when token t0 + i attends it. Listed entries count when 0 <= block <= the token's own block; v1 adds
    the window q_blk - window_blocks + 1 .. q_blk (duplicates merge)."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    bos_q, lq, bos_k, lk, t0 = _tile_bounds(i_t, cu_seqlens_q, cu_seqlens_k, tile_table, BT)
    o_t = tl.arange(0, BT)
    o_c = tl.arange(0, C_PAD)
    m_t = (t0 + o_t) < lq
    # [BT]
    b_qblk = (lk - lq + t0 + o_t) // BS
    p_i = block_idx + (bos_q + t0 + o_t).to(tl.int64)[:, None] * stride_ir + i_h * stride_ih + o_c[None, :]
    # [BT, C_PAD]
    b_i = tl.load(p_i, mask=m_t[:, None] & (o_c < W)[None, :], other=-1)
    m_w = ((o_c >= W) & (o_c < W + window_blocks))[None, :]
    b_i = tl.where(m_w, b_qblk[:, None] - window_blocks + 1 + (o_c[None, :] - W), b_i)
    m_i = (b_i >= 0) & (b_i <= b_qblk[:, None]) & m_t[:, None]
    SENT: tl.constexpr = 0x7FFFFFFF
    # [BT * C_PAD], ascending by (block, token)
    b_key = tl.sort(tl.reshape(tl.where(m_i, b_i * BT + o_t[:, None], SENT), [BT * C_PAD]))
    m_k = b_key != SENT
    b_blk = b_key // BT
    b_bit = tl.where(m_k, tl.full([BT * C_PAD], 1, tl.int32) << (b_key % BT), 0)
    _, b_len = tl.associative_scan((b_blk, tl.full([BT * C_PAD], 1, tl.int32)), 0, _seg_count)
    m_first = (b_len == 1) & m_k
    # scanning the reversed array, each element's value is the OR over it and the rest of its run, so a run's
    # first element holds the whole run's mask
    _, b_or = tl.associative_scan((tl.flip(b_blk, 0), tl.flip(b_bit, 0)), 0, _seg_or)
    b_or = tl.flip(b_or, 0)
    b_slot = tl.cumsum(m_first.to(tl.int32), 0) - 1
    i_u = (i_t * H + i_h).to(tl.int64)
    tl.store(u_idx + i_u * C_MAX + b_slot, b_blk, mask=m_first)
    tl.store(u_bits + i_u * C_MAX + b_slot, b_or, mask=m_first)
    tl.store(u_cnt + i_u, tl.sum(m_first.to(tl.int32), 0))


@triton.jit
def parallel_block_sparse_attn_bwd_dq_kernel(
    q, k, v, do, lse, delta, dq, u_idx, u_bits, u_cnt, cu_seqlens_q, cu_seqlens_k, tile_table,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_lt, C_MAX, qk_scale, sm_scale,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BT: tl.constexpr, G_PAD: tl.constexpr,
    M: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
):
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    bos_q, lq, bos_k, lk, t0 = _tile_bounds(i_t, cu_seqlens_q, cu_seqlens_k, tile_table, BT)
    # row r = token r // G_PAD of the tile x head r % G_PAD of the group; rows past BT * G_PAD pad M up to 16
    o_r = tl.arange(0, M)
    r_tok = tl.minimum(o_r // G_PAD, BT - 1)
    r_g = o_r % G_PAD
    r_t = t0 + o_r // G_PAD
    m_r = (o_r < BT * G_PAD) & (r_t < lq) & (r_g < G)
    r_pos = lk - lq + r_t
    r_row = (bos_q + r_t).to(tl.int64)
    r_head = i_h * G + r_g
    o_d = tl.arange(0, BD)
    m_rd = m_r[:, None] & (o_d < D)[None, :]
    # [M, BD]
    b_q = tl.load(q + r_row[:, None] * stride_qt + r_head[:, None] * stride_qh + o_d[None, :], mask=m_rd, other=0.)
    b_do = tl.load(do + r_row[:, None] * stride_dot + r_head[:, None] * stride_doh + o_d[None, :], mask=m_rd,
                   other=0.)
    # [M]
    b_lse = tl.load(lse + r_row * stride_lt + r_head, mask=m_r, other=0.) * LOG2E
    b_delta = tl.load(delta + r_row * stride_lt + r_head, mask=m_r, other=0.)
    o_n = tl.arange(0, BN)
    m_d = (o_d < D)[None, :]
    k_base = k + bos_k.to(tl.int64) * stride_kt + i_h * stride_kh
    v_base = v + bos_k.to(tl.int64) * stride_vt + i_h * stride_vh
    i_u = (i_t * H + i_h).to(tl.int64)
    n_u = tl.load(u_cnt + i_u)
    b_dq = tl.zeros([M, BD], dtype=tl.float32)
    for s0 in range(0, n_u * BS, BN):
        b_blk = tl.load(u_idx + i_u * C_MAX + s0 // BS)
        b_bits = tl.load(u_bits + i_u * C_MAX + s0 // BS)
        # [BN]
        o_j = b_blk * BS + s0 % BS + o_n
        m_j = (o_j < lk)[:, None] & m_d
        b_k = tl.load(k_base + o_j.to(tl.int64)[:, None] * stride_kt + o_d[None, :], mask=m_j, other=0.)
        b_v = tl.load(v_base + o_j.to(tl.int64)[:, None] * stride_vt + o_d[None, :], mask=m_j, other=0.)
        # [M, BN]
        m_s = (((b_bits >> r_tok) & 1) != 0)[:, None] & (o_j[None, :] <= r_pos[:, None]) & m_r[:, None]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale
        b_p = tl.where(m_s, tl.exp2(b_s - b_lse[:, None]), 0.)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PREC)
    b_dq *= sm_scale
    p_dq = dq + r_row[:, None] * stride_dqt + r_head[:, None] * stride_dqh + o_d[None, :]
    tl.store(p_dq, b_dq.to(p_dq.dtype.element_ty), mask=m_rd)


@triton.jit
def parallel_block_sparse_attn_bwd_dkdv_kernel(
    q, k, v, do, lse, delta, dk, dv, dk_part, dv_part, keys, seg_group, seg_first, grp_off, blk_seq, blk_off,
    cu_seqlens_q, cu_seqlens_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lt, R, NG, SEG, qk_scale, sm_scale,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BTC: tl.constexpr, G_PAD: tl.constexpr,
    M: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
):
    i_s, i_n = tl.program_id(0), tl.program_id(1)
    # segment i_s belongs to group g = (global key block) * H + kv head; g == NG: a spare program
    i_g = tl.load(seg_group + i_s)
    live = i_g < NG
    i_g = tl.minimum(i_g, NG - 1)
    i_gb = i_g // H
    i_h = i_g % H
    i_seq = tl.load(blk_seq + i_gb)
    i_blk = i_gb - tl.load(blk_off + i_seq)
    bos_q = tl.load(cu_seqlens_q + i_seq)
    lq = tl.load(cu_seqlens_q + i_seq + 1) - bos_q
    bos_k = tl.load(cu_seqlens_k + i_seq)
    lk = tl.load(cu_seqlens_k + i_seq + 1) - bos_k
    g_lo = tl.load(grp_off + i_g)
    g_hi = tl.load(grp_off + i_g + 1)
    n_seg = tl.cdiv(g_hi - g_lo, SEG)
    lo = g_lo + (i_s - tl.load(seg_first + i_g)) * SEG
    hi = tl.where(live, tl.minimum(g_hi, lo + SEG), lo)

    o_n = tl.arange(0, BN)
    o_d = tl.arange(0, BD)
    m_d = (o_d < D)[None, :]
    # [BN] keys of this tile, local to the sequence
    o_j = i_blk * BS + i_n * BN + o_n
    m_j = (o_j < lk)[:, None] & m_d
    r_kj = (bos_k + o_j).to(tl.int64)
    b_k = tl.load(k + r_kj[:, None] * stride_kt + i_h * stride_kh + o_d[None, :], mask=m_j, other=0.)
    b_v = tl.load(v + r_kj[:, None] * stride_vt + i_h * stride_vh + o_d[None, :], mask=m_j, other=0.)
    # row r of a chunk = token r // G_PAD of the chunk x head r % G_PAD of the group
    o_r = tl.arange(0, M)
    r_c = o_r // G_PAD
    r_g = o_r % G_PAD
    m_rr = (o_r < BTC * G_PAD) & (r_g < G)
    r_head = i_h * G + r_g
    g_base = i_g.to(tl.int64) * R
    b_dk = tl.zeros([BN, BD], dtype=tl.float32)
    b_dv = tl.zeros([BN, BD], dtype=tl.float32)
    for c0 in range(lo, hi, BTC):
        m_r = m_rr & (c0 + r_c < hi)
        # [M] packed query row of each chunk row
        r_row = tl.load(keys + c0 + r_c, mask=m_r, other=0).to(tl.int64) - g_base
        r_row = tl.where(m_r, r_row, 0)
        r_pos = lk - lq + (r_row - bos_q)
        m_rd = m_r[:, None] & m_d
        # [M, BD]
        b_q = tl.load(q + r_row[:, None] * stride_qt + r_head[:, None] * stride_qh + o_d[None, :], mask=m_rd,
                      other=0.)
        b_do = tl.load(do + r_row[:, None] * stride_dot + r_head[:, None] * stride_doh + o_d[None, :],
                       mask=m_rd, other=0.)
        b_lse = tl.load(lse + r_row * stride_lt + r_head, mask=m_r, other=0.) * LOG2E
        b_delta = tl.load(delta + r_row * stride_lt + r_head, mask=m_r, other=0.)
        # [BN, M]: transposed scores, keys along rows
        b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PREC) * qk_scale
        m_st = (o_j[:, None] <= r_pos[None, :]) & m_r[None, :]
        b_pt = tl.where(m_st, tl.exp2(b_st - b_lse[None, :]), 0.)
        b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PREC)
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PREC)
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PREC)
    b_dk *= sm_scale
    # a list in one segment writes the gradient itself; longer lists leave fp32 partials for the reduction.
    # (Scalar conditions enter masks through the bounds they compare with.)
    lk_one = tl.where(live & (n_seg == 1), lk, 0)
    m_one = (o_j < lk_one)[:, None] & m_d
    p_dk = dk + r_kj[:, None] * stride_dkt + i_h * stride_dkh + o_d[None, :]
    p_dv = dv + r_kj[:, None] * stride_dvt + i_h * stride_dvh + o_d[None, :]
    tl.store(p_dk, b_dk.to(p_dk.dtype.element_ty), mask=m_one)
    tl.store(p_dv, b_dv.to(p_dv.dtype.element_ty), mask=m_one)
    p_part = i_s.to(tl.int64) * BS * D + (i_n * BN + o_n)[:, None] * D + o_d[None, :]
    m_part = (o_n < tl.where(live & (n_seg > 1), BN, 0))[:, None] & m_d
    tl.store(dk_part + p_part, b_dk, mask=m_part)
    tl.store(dv_part + p_part, b_dv, mask=m_part)


@triton.jit
def dkdv_reduce_kernel(dk, dv, dk_part, dv_part, seg_first, grp_off, blk_seq, blk_off, cu_seqlens_k,
                       stride_dkt, stride_dkh, stride_dvt, stride_dvh, SEG,
                       H: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """Sum, in segment order, the partials of the (key block, kv head) lists split over several programs."""
    i_g, i_n = tl.program_id(0), tl.program_id(1)
    n_seg = tl.cdiv(tl.load(grp_off + i_g + 1) - tl.load(grp_off + i_g), SEG)
    s_lo = tl.load(seg_first + i_g)
    s_hi = tl.where(n_seg > 1, s_lo + n_seg, s_lo)
    i_gb = i_g // H
    i_h = i_g % H
    i_seq = tl.load(blk_seq + i_gb)
    i_blk = i_gb - tl.load(blk_off + i_seq)
    bos_k = tl.load(cu_seqlens_k + i_seq)
    lk = tl.load(cu_seqlens_k + i_seq + 1) - bos_k
    o_n = tl.arange(0, BN)
    o_d = tl.arange(0, BD)
    m_d = (o_d < D)[None, :]
    o_part = (i_n * BN + o_n)[:, None] * D + o_d[None, :]
    b_dk = tl.zeros([BN, BD], dtype=tl.float32)
    b_dv = tl.zeros([BN, BD], dtype=tl.float32)
    p_dkp = dk_part + s_lo.to(tl.int64) * BS * D + o_part
    p_dvp = dv_part + s_lo.to(tl.int64) * BS * D + o_part
    for _ in range(s_lo, s_hi):
        b_dk += tl.load(p_dkp, mask=m_d, other=0.)
        b_dv += tl.load(p_dvp, mask=m_d, other=0.)
        p_dkp += BS * D
        p_dvp += BS * D
    o_j = i_blk * BS + i_n * BN + o_n
    r_kj = (bos_k + o_j).to(tl.int64)
    m = (o_j < tl.where(n_seg > 1, lk, 0))[:, None] & m_d
    p_dk = dk + r_kj[:, None] * stride_dkt + i_h * stride_dkh + o_d[None, :]
    p_dv = dv + r_kj[:, None] * stride_dvt + i_h * stride_dvh + o_d[None, :]
    tl.store(p_dk, b_dk.to(p_dk.dtype.element_ty), mask=m)
    tl.store(p_dv, b_dv.to(p_dv.dtype.element_ty), mask=m)


def backward_config(G: int, D: int, block_size: int) -> dict:
    """Tile shapes and launch parameters. dq: BT tokens x G heads = 64 rows (the forward's tile). dk/dv: key tiles
    of up to 64 keys x chunks of BTC tokens x G heads = 64 rows, 4 warps, 3 stages (H200, G=16, D=128, 32K: the
    dk/dv kernel took half the time of 8 warps / 2 stages; 128-row chunks or 32-row dq tiles were slower)."""
    g_pad = triton.next_power_of_2(G)
    rows = max(1, 64 // g_pad)
    bn = min(64, block_size)
    return dict(BT=min(MAX_BT, rows), BN=bn, num_warps=4, num_stages=2,
                BTC=rows, BN_KV=bn, num_warps_kv=4, num_stages_kv=3, seg_rows=16384)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _tile_table(cu_seqlens_q: torch.Tensor, BT: int, NT: int) -> torch.Tensor:
    """int32 [NT, 2]: (sequence, tile within it) of each of NT query tiles, computed on the device. Tiles past the
    last sequence's end point past its queries and do nothing."""
    lq = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    n = (lq + BT - 1) // BT
    end = torch.cumsum(n, 0)
    tiles = torch.arange(NT, device=cu_seqlens_q.device)
    seq = torch.searchsorted(end, tiles, right=True).clamp_max(lq.numel() - 1)
    return torch.stack([seq, tiles - (end[seq] - n[seq])], 1).to(torch.int32).contiguous()


def transpose_selection(block_idx: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                        block_size: int, window_blocks: int, n_blk_max: int, seg: int):
    """Key block -> query tokens, on the device without a host sync.

    block_idx int32 [R, H, W] (R packed query rows). Groups g = (global key block) * H + kv head, where the
    global key block of block b of sequence n is blk_off[n] + b. Returns a dict: keys (sorted g * R + row, one per
    attended (row, kv head, block); sentinels at the end), grp_off int64 [NG + 1] (CSR offsets into keys),
    seg_first int32 [NG] (first segment of each group when lists are cut into segments of `seg` rows),
    seg_group int32 [max_seg] (group of each segment; NG for spare ones), blk_seq / blk_off (global block ->
    sequence, sequence -> first global block), NG and max_seg."""
    dev = block_idx.device
    R, H, W = block_idx.shape
    n_seq = cu_seqlens_q.numel() - 1
    cq, ck = cu_seqlens_q.long(), cu_seqlens_k.long()
    nb = (ck[1:] - ck[:-1] + block_size - 1) // block_size
    nb_end = torch.cumsum(nb, 0)
    blk_off = nb_end - nb
    NB = n_blk_max  # an upper bound on the global block count, known on the host
    NG = NB * H
    rows = torch.arange(R, device=dev)
    seq = torch.searchsorted(cq[1:], rows, right=True).clamp_max(n_seq - 1)
    t = rows - cq[seq]
    lq, lk = cq[seq + 1] - cq[seq], ck[seq + 1] - ck[seq]
    live = t < lq
    qblk = (lk - lq + t) // block_size
    base = (blk_off[seq] * H)[:, None, None] + torch.arange(H, device=dev)[None, :, None]  # [R, H, 1]
    sent = NG * R
    use64 = (NG + 1) * R >= 2**31
    idx = block_idx.long()
    # listed blocks the window covers are dropped here and come back with it, so no pair appears twice
    ok = (idx >= 0) & (idx <= (qblk - window_blocks)[:, None, None]) & live[:, None, None]
    if W > 1:
        ok[..., 1:] &= idx[..., 1:] != idx[..., :-1]
    key = torch.where(ok, (base + idx * H) * R + rows[:, None, None], sent)
    parts = [key.reshape(-1)]
    if window_blocks > 0:
        wb = qblk[:, None] - window_blocks + 1 + torch.arange(window_blocks, device=dev)[None, :]  # [R, wb]
        okw = ((wb >= 0) & live[:, None])[:, None, :]
        parts.append(torch.where(okw, (base + wb[:, None, :] * H) * R + rows[:, None, None], sent).reshape(-1))
    keys = torch.cat(parts) if len(parts) > 1 else parts[0]
    keys = torch.sort(keys.to(torch.int64 if use64 else torch.int32)).values
    bounds = torch.arange(NG + 1, device=dev, dtype=keys.dtype) * R
    grp_off = torch.searchsorted(keys, bounds)
    cnt = grp_off[1:] - grp_off[:-1]
    n_seg = (cnt + seg - 1) // seg
    seg_end = torch.cumsum(n_seg, 0)
    max_seg = NG + triton.cdiv(keys.numel(), seg)
    seg_group = torch.searchsorted(seg_end, torch.arange(max_seg, device=dev), right=True)
    blk_seq = torch.searchsorted(nb_end, torch.arange(NB, device=dev), right=True).clamp_max(n_seq - 1)
    i32 = lambda x: x.to(torch.int32).contiguous()  # noqa: E731
    if keys.numel() < 2**31 - seg:
        grp_off = i32(grp_off)
    return dict(keys=keys, grp_off=grp_off.contiguous(), seg_first=i32(seg_end - n_seg), seg_group=i32(seg_group),
                blk_seq=i32(blk_seq), blk_off=i32(blk_off), NG=NG, max_seg=max_seg)


def _packed(x: torch.Tensor) -> torch.Tensor:
    """[B, T, ...] -> [B * T, ...] with a contiguous last dim."""
    x = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
    return x if x.stride(-1) == 1 else x.contiguous()


def parallel_block_sparse_attention_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                                        lse: torch.Tensor, do: torch.Tensor, block_idx: torch.Tensor,
                                        block_size: int, *, window_blocks: int = 0,
                                        cu_seqlens_q: torch.Tensor | None = None,
                                        cu_seqlens_k: torch.Tensor | None = None, sm_scale: float | None = None,
                                        config: dict | None = None):
    """Gradients (dq, dk, dv) of parallel_block_sparse_attention, in the dtypes and shapes of q, k, v.

    Arguments as in the forward: q, o, do [B, Tq, HQ, D]; k, v [B, Tk, H, D] (or B = 1 with cu_seqlens_q /
    cu_seqlens_k); lse the forward's natural-log LSE fp32 [B, Tq, HQ]; block_idx int32 [B, Tq, H, W]. `config`
    overrides backward_config. Deterministic: no atomics, fixed reduction order."""
    B, Tq, HQ, D = q.shape
    Tk, H = k.shape[1], k.shape[2]
    G = HQ // H
    W = block_idx.shape[-1]
    dev = q.device
    if cu_seqlens_q is not None:
        cu_q = cu_seqlens_q.to(torch.int32)
        cu_k = cu_q if cu_seqlens_k is None else cu_seqlens_k.to(torch.int32)
    else:
        cu_q = (torch.arange(B + 1, device=dev) * Tq).to(torch.int32)
        cu_k = (torch.arange(B + 1, device=dev) * Tk).to(torch.int32)
    n_seq = cu_q.numel() - 1
    cfg = backward_config(G, D, block_size)
    cfg.update(config or {})
    qf, kf, vf, of, dof = (_packed(x) for x in (q, k, v, o, do))
    lsef = lse.reshape(B * Tq, HQ).contiguous()
    idxf = block_idx.reshape(B * Tq, H, W).to(torch.int32).contiguous()
    R = B * Tq
    # rows outside every sequence (packed input shorter than the tensor) get zero gradients
    dq = torch.empty_like(qf) if cu_seqlens_q is None else torch.zeros_like(qf)
    dk = torch.zeros_like(kf)
    dv = torch.zeros_like(vf)
    if R == 0 or n_seq == 0:
        return dq.view_as(q), dk.view_as(k), dv.view_as(v)
    delta = (of.float() * dof.float()).sum(-1)  # [R, HQ]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    qk_scale = scale * 1.4426950408889634
    g_pad = triton.next_power_of_2(G)
    BD = max(16, triton.next_power_of_2(D))
    prec = _dot_precision(q.dtype)

    BT = cfg["BT"]
    NT = triton.cdiv(R, BT) + n_seq
    tiles = _tile_table(cu_q, BT, NT)
    c_max = max(1, min(BT * (W + window_blocks), triton.cdiv(Tk, block_size)))
    u_idx = torch.empty(NT * H, c_max, dtype=torch.int32, device=dev)
    u_bits = torch.empty_like(u_idx)
    u_cnt = torch.empty(NT * H, dtype=torch.int32, device=dev)
    tile_union_kernel[(NT, H)](
        idxf, u_idx, u_bits, u_cnt, cu_q, cu_k, tiles, idxf.stride(0), idxf.stride(1), W, c_max, window_blocks,
        H=H, BS=block_size, BT=BT, C_PAD=triton.next_power_of_2(W + window_blocks), num_warps=4,
    )
    parallel_block_sparse_attn_bwd_dq_kernel[(NT, H)](
        qf, kf, vf, dof, lsef, delta, dq, u_idx, u_bits, u_cnt, cu_q, cu_k, tiles,
        qf.stride(0), qf.stride(1), kf.stride(0), kf.stride(1), vf.stride(0), vf.stride(1), dof.stride(0),
        dof.stride(1), dq.stride(0), dq.stride(1), lsef.stride(0), c_max, qk_scale, scale,
        H=H, G=G, D=D, BS=block_size, BT=BT, G_PAD=g_pad, M=max(16, BT * g_pad), BN=min(cfg["BN"], block_size),
        BD=BD, PREC=prec, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    del u_idx, u_bits, u_cnt

    BTC = cfg["BTC"]
    seg = max(BTC, cfg["seg_rows"] // g_pad // BTC * BTC)
    n_blk_max = (triton.cdiv(Tk, block_size) * B) if cu_seqlens_q is None else triton.cdiv(Tk, block_size) + n_seq
    tr = transpose_selection(idxf, cu_q, cu_k, block_size, window_blocks, n_blk_max, seg)
    NG, max_seg = tr["NG"], tr["max_seg"]
    BN = min(cfg["BN_KV"], block_size)
    n_sub = block_size // BN
    dk_part = torch.empty(max_seg, block_size, D, dtype=torch.float32, device=dev)
    dv_part = torch.empty_like(dk_part)
    parallel_block_sparse_attn_bwd_dkdv_kernel[(max_seg, n_sub)](
        qf, kf, vf, dof, lsef, delta, dk, dv, dk_part, dv_part, tr["keys"], tr["seg_group"], tr["seg_first"],
        tr["grp_off"], tr["blk_seq"], tr["blk_off"], cu_q, cu_k,
        qf.stride(0), qf.stride(1), kf.stride(0), kf.stride(1), vf.stride(0), vf.stride(1), dof.stride(0),
        dof.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lsef.stride(0), R, NG, seg,
        qk_scale, scale,
        H=H, G=G, D=D, BS=block_size, BTC=BTC, G_PAD=g_pad, M=max(16, BTC * g_pad), BN=BN, BD=BD, PREC=prec,
        num_warps=cfg["num_warps_kv"], num_stages=cfg["num_stages_kv"],
    )
    dkdv_reduce_kernel[(NG, n_sub)](
        dk, dv, dk_part, dv_part, tr["seg_first"], tr["grp_off"], tr["blk_seq"], tr["blk_off"], cu_k,
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), seg,
        H=H, D=D, BS=block_size, BN=BN, BD=BD, num_warps=4,
    )
    return dq.view_as(q), dk.view_as(k), dv.view_as(v)
