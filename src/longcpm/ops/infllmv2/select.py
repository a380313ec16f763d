"""InfLLM-V2 block selection in Triton: fused stage 1 (c2 log-sum-exp, c1 scores, GQA-group sum, max-pool to
token blocks) and a per-row top-k, for prefill (`parallel_infllmv2_select`) and decode (`decode_infllmv2_select`).

Semantics are those of naive.py (`naive_infllmv2_select`); see ../shared/spec/infllmv2.md §2-4. How it is cut:
- Forced blocks (init, v2 local window) and excluded ones (future, v1 window) are known from the position alone,
  so stage 1 scores only the dynamic candidates [a, b) of each row and the top-k writes the forced ones itself.
  Rows whose candidates all fit in the budget (v2: q_blk < budget) need no scores at all.
- Stage 1 never writes per-head or per-window scores: one program holds BT tokens x G heads of one kv head, runs
  an online LSE over the visible c2 windows, then walks the candidate blocks in tiles of BN c1 windows that also
  hold the windows before the tile's first block (so every block's pooling range lies inside one tile). The
  product is computed transposed (windows x rows) so the G-head sum is mostly in registers; the max-pool is a
  reshape plus one gather. Tiles away from the diagonal skip all masks. It writes fp32 block scores
  [H, T, n_blk] for candidate blocks only.
- The top-k finds, per row, the largest threshold on the scores' fp32 bit patterns (non-negative floats order as
  ints) that keeps at least k_dyn blocks, by bisection with early exit, then compacts with a prefix sum. Rows are
  launched in bands of position so that each scans a power-of-2 number of columns close to its candidate count.
- Decode splits the LSE and the block walk across programs (partial LSEs are merged by the scoring kernel); the
  grid depends on shapes only and lengths are read on device, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ...config import SparseConfig
from .common import as_sparse_config, check_qkv, compressed_len, num_blocks, seq_bounds
from .compress import compress_keys
from .naive import selection_width

LOG2E = 1.4426950408889634
_BIG = 1 << 30


@triton.jit
def _seq_info(info, seqlens, i_b, T_q, N1, N2, IS_DECODE: tl.constexpr):
    """(q start in the packed token axis, q len, k len, c1 start, c2 start) of sequence i_b."""
    if IS_DECODE:
        q_start = i_b * T_q
        q_len = T_q
        k_len = tl.load(seqlens + i_b).to(tl.int32)
        c1_start = i_b * N1
        c2_start = i_b * N2
    else:
        q_start = tl.load(info + i_b * 5)
        q_len = tl.load(info + i_b * 5 + 1)
        k_len = tl.load(info + i_b * 5 + 2)
        c1_start = tl.load(info + i_b * 5 + 3)
        c2_start = tl.load(info + i_b * 5 + 4)
    return q_start, q_len, k_len, c1_start, c2_start


@triton.jit
def _n_windows(L, KS: tl.constexpr, S: tl.constexpr):
    return tl.where(L >= KS, (L - KS) // S + 1, 0)


@triton.jit
def _block_range(qb, INIT: tl.constexpr, LOCAL: tl.constexpr, V2: tl.constexpr):
    """Dynamic candidates [a, b) of a row in block q_blk; forced: [0, a) and, for v2, [b, q_blk]."""
    b = tl.maximum(qb - LOCAL + (1 - V2), 0)
    a = tl.minimum(b, INIT)
    return a, b


@triton.jit
def _load_q(q, q_start, t_begin, t_last, i_h, HQ: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
            D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr):
    """Rows r = t * GP + g: token t_begin + t, query head i_h * G + g. Returns q [BT*GP, BD], tokens, heads, mask.
    (Head-major rows were tried: more registers, cross-warp reductions through shared memory, slower.)"""
    o_r = tl.arange(0, BT * GP)
    o_t = t_begin + o_r // GP
    o_g = o_r % GP
    m_r = (o_t <= t_last) & (o_g < G)
    o_d = tl.arange(0, BD)
    p_q = q + ((q_start + o_t).to(tl.int64) * HQ + i_h * G + o_g)[:, None] * D + o_d[None, :]
    b_q = tl.load(p_q, mask=m_r[:, None] & (o_d < D)[None, :], other=0.)
    return b_q, o_t, o_g, m_r


@triton.jit
def _lse_tiles(b_m, b_l, b_q, c2, c2_start, i_h, pos, j_lo, j_hi, scale, H: tl.constexpr, D: tl.constexpr,
               BD: tl.constexpr, LK: tl.constexpr, LS: tl.constexpr, BN2: tl.constexpr, DOT_PREC: tl.constexpr,
               MASKED: tl.constexpr):
    """Online (max, sum) in log2 units of scale * q.c2[j] over windows j in [j_lo, j_hi) visible to each row.
    MASKED=False: the caller guarantees whole tiles that every row sees."""
    o_d = tl.arange(0, BD)
    for j0 in range(j_lo, j_hi, BN2):
        o_j = j0 + tl.arange(0, BN2)
        m_j = o_j < j_hi
        p_c = c2 + ((c2_start + o_j).to(tl.int64) * H + i_h)[:, None] * D + o_d[None, :]
        b_c = tl.load(p_c, mask=m_j[:, None] & (o_d < D)[None, :], other=0.)
        # [BM, BN2]
        b_s = tl.dot(b_q, tl.trans(b_c), input_precision=DOT_PREC) * scale
        if MASKED:
            m_vis = ((o_j * LS + LK - 1)[None, :] <= pos[:, None]) & m_j[None, :]
            b_s = tl.where(m_vis, b_s, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_mu = tl.where(b_mn == float("-inf"), 0., b_mn)
        b_l = b_l * tl.exp2(b_m - b_mu) + tl.sum(tl.exp2(b_s - b_mu[:, None]), 1)
        b_m = b_mn
    return b_m, b_l


@triton.jit
def _lse_partial(b_q, c2, c2_start, i_h, pos, p_first, j_lo, j_hi, scale, H: tl.constexpr, D: tl.constexpr,
                 BD: tl.constexpr, LK: tl.constexpr, LS: tl.constexpr, BN2: tl.constexpr, BM: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    """LSE partial over [j_lo, j_hi): whole tiles every row sees without masks, then the rest with masks."""
    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    n_all = tl.minimum(_n_windows(p_first + 1, LK, LS), j_hi)
    j_mid = j_lo + tl.maximum(n_all - j_lo, 0) // BN2 * BN2
    b_m, b_l = _lse_tiles(b_m, b_l, b_q, c2, c2_start, i_h, pos, j_lo, j_mid, scale, H, D, BD, LK, LS, BN2,
                          DOT_PREC, False)
    b_m, b_l = _lse_tiles(b_m, b_l, b_q, c2, c2_start, i_h, pos, j_mid, j_hi, scale, H, D, BD, LK, LS, BN2,
                          DOT_PREC, True)
    return b_m, b_l


@triton.jit
def _score_tiles(kt_lo, kt_hi, a_first, b_q, b_lse, c1, c1_start, i_h, pos, n1, p_s, a_t, b_t, m_tt, scale,
                 H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, KS: tl.constexpr, S: tl.constexpr,
                 R: tl.constexpr, KC: tl.constexpr, GP: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr,
                 NB: tl.constexpr, NBP: tl.constexpr, W_OFF: tl.constexpr, XG: tl.constexpr,
                 POOL_FAST: tl.constexpr, DOT_PREC: tl.constexpr, MASKED: tl.constexpr):
    """Block scores for block tiles kt in [kt_lo, kt_hi) (NB blocks each, from block a_first). MASKED=False: the
    caller guarantees that every window of these tiles exists and is visible to every row.

    A tile holds BN windows from k0*R + W_OFF, so that every window pooled into its NB blocks is inside it.
    POOL_FAST (R a power of 2, W_OFF = -XG*R): the windows form BN/R groups of R, one per block k0 - XG + g; a block
    is the max of its own group and of the last KC-1 windows before it, i.e. of the previous XG groups' tails,
    brought over by XG gathers. Otherwise R + KC - 1 gathers read each block's windows directly."""
    NG: tl.constexpr = BN // R
    o_d = tl.arange(0, BD)
    for kt in range(kt_lo, kt_hi):
        k0 = a_first + kt * NB
        o_w = k0 * R + W_OFF + tl.arange(0, BN)
        m_w = (o_w >= 0) & (o_w < n1)
        p_c = c1 + ((c1_start + o_w).to(tl.int64) * H + i_h)[:, None] * D + o_d[None, :]
        b_c = tl.load(p_c, mask=m_w[:, None] & (o_d < D)[None, :], other=0.)
        # [BN, BM]: windows x (token, head). Transposed so that each thread holds several heads of a token and
        # the group sum is mostly additions in registers (a few shuffles across 4 lanes)
        b_s = tl.dot(b_c, tl.trans(b_q), input_precision=DOT_PREC)
        b_p = tl.exp2(b_s * scale - b_lse[None, :])
        if MASKED:
            m_vis = (o_w * S + KS - 1)[:, None] <= pos[None, :]
            b_p = tl.where(m_vis, b_p, 0.)
            b_p = tl.where(m_w[:, None], b_p, float("-inf"))
        # [BN, BT]: sum over the group's heads
        b_g = tl.sum(tl.reshape(b_p, [BN, BT, GP]), 2)
        if POOL_FAST:
            # [NG, R, BT] -> [NG, BT]
            b_g3 = tl.reshape(b_g, [NG, R, BT])
            b_own = tl.max(b_g3, 1)
            b_blk = b_own
            o_r = tl.arange(0, R)
            for d in tl.static_range(1, XG + 1):
                if R * d - (KC - 1) > 0:
                    b_tail = tl.max(tl.where((o_r >= R * d - (KC - 1))[None, :, None], b_g3, float("-inf")), 1)
                else:
                    b_tail = b_own
                o_sh = tl.maximum(tl.arange(0, NG) - d, 0)
                b_blk = tl.maximum(b_blk, tl.gather(b_tail, tl.broadcast_to(o_sh[:, None], [NG, BT]), 0))
            o_j = tl.arange(0, NG) - XG
            o_k = k0 + o_j
            m_k = (o_j >= 0)[:, None] & (o_k[:, None] >= a_t[None, :]) & (o_k[:, None] < b_t[None, :])
        else:
            # [NBP, BT]: block j pools windows R*j .. R*j + R + KC - 2 of the tile
            o_j = tl.arange(0, NBP)
            b_blk = tl.full([NBP, BT], float("-inf"), dtype=tl.float32)
            for e in tl.static_range(R + KC - 1):
                o_e = tl.minimum(o_j * R + e, BN - 1)
                b_blk = tl.maximum(b_blk, tl.gather(b_g, tl.broadcast_to(o_e[:, None], [NBP, BT]), 0))
            o_k = k0 + o_j
            m_k = (o_j < NB)[:, None] & (o_k[:, None] >= a_t[None, :]) & (o_k[:, None] < b_t[None, :])
        tl.store(p_s + o_k[:, None], b_blk, mask=m_k & m_tt[None, :])


@triton.jit
def infllmv2_lse_split_kernel(
    q, c2, lse_part, info, seqlens, scale, T_q, N1, N2,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    LK: tl.constexpr, LS: tl.constexpr, BT: tl.constexpr, BN2: tl.constexpr, NSPLIT2: tl.constexpr,
    IS_DECODE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Decode: partial LSE of each row over one slice of the c2 windows; merged in the scoring kernel."""
    i_t, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    q_start, q_len, k_len, c1_start, c2_start = _seq_info(q, seqlens, i_b, T_q, N1, N2, IS_DECODE)
    t_begin = i_t * BT
    t_last = tl.minimum(t_begin + BT, q_len) - 1
    b_q, o_t, o_g, m_r = _load_q(q, q_start, t_begin, t_last, i_h, HQ, G, GP, D, BD, BT)
    pos = k_len - q_len + o_t
    p_last = k_len - q_len + t_last
    n2 = tl.minimum(_n_windows(p_last + 1, LK, LS), N2)
    per = tl.cdiv(tl.cdiv(n2, NSPLIT2), BN2) * BN2
    j_lo = i_s * per
    j_hi = tl.minimum(j_lo + per, n2)
    b_m, b_l = _lse_partial(b_q, c2, c2_start, i_h, pos, k_len - q_len + t_begin, j_lo, j_hi, scale, H, D, BD,
                            LK, LS, BN2, BT * GP, DOT_PREC)
    p_o = lse_part + ((i_bh * NSPLIT2 + i_s) * 2) * (T_q * GP) + o_t * GP + o_g
    m_o = o_t < q_len
    tl.store(p_o, b_m, mask=m_o)
    tl.store(p_o + T_q * GP, b_l, mask=m_o)


@triton.jit
def infllmv2_stage1_kernel(
    q, c1, c2, lse_part, scores, info, seqlens,
    scale, T_q, N1, N2, g0, g1, K_SEL, NBLK, s_sh,
    HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    KS: tl.constexpr, S: tl.constexpr, LK: tl.constexpr, LS: tl.constexpr, BS: tl.constexpr,
    INIT: tl.constexpr, LOCAL: tl.constexpr, V2: tl.constexpr,
    BT: tl.constexpr, BN: tl.constexpr, BN2: tl.constexpr, NB: tl.constexpr, NBP: tl.constexpr,
    W_OFF: tl.constexpr, XG: tl.constexpr, POOL_FAST: tl.constexpr,
    NSPLIT: tl.constexpr, NSPLIT2: tl.constexpr, IS_DECODE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Block scores of the dynamic candidates for BT tokens x G heads of one kv head (see the module docstring).

    Grid (query tiles, NSPLIT block slices, sequences * H). NSPLIT2 > 0: the LSE comes from `lse_part` (decode).
    """
    R: tl.constexpr = BS // S
    KC: tl.constexpr = (KS + S - 1) // S
    BM: tl.constexpr = BT * GP
    i_t, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if not IS_DECODE:
        # heaviest (latest) tiles first
        i_t = tl.num_programs(0) - 1 - i_t
    i_b, i_h = i_bh // H, i_bh % H
    q_start, q_len, k_len, c1_start, c2_start = _seq_info(info, seqlens, i_b, T_q, N1, N2, IS_DECODE)
    lo = tl.maximum(g0 - q_start, 0)
    hi = tl.minimum(g1 - q_start, q_len)
    t_begin = lo + i_t * BT
    if t_begin >= hi:
        return
    t_last = tl.minimum(t_begin + BT, hi) - 1
    off = k_len - q_len
    qb_last = (off + t_last) // BS
    a_last, b_last = _block_range(qb_last, INIT, LOCAL, V2)
    # rows whose candidates all fit in the budget are finished by the top-k without scores
    if V2:
        need = qb_last + 1 > K_SEL
    else:
        need = b_last > K_SEL
    if not need:
        return
    a_first, b_first = _block_range((off + t_begin) // BS, INIT, LOCAL, V2)
    n_tiles = tl.cdiv(b_last - a_first, NB)
    per = tl.cdiv(n_tiles, NSPLIT)
    kt_lo = i_s * per
    kt_hi = tl.minimum(kt_lo + per, n_tiles)
    if kt_lo >= kt_hi:
        return

    b_q, o_t, o_g, m_r = _load_q(q, q_start, t_begin, t_last, i_h, HQ, G, GP, D, BD, BT)
    pos = off + o_t
    p_first = off + t_begin
    if NSPLIT2 == 0:
        n2 = _n_windows(off + t_last + 1, LK, LS)
        b_m, b_l = _lse_partial(b_q, c2, c2_start, i_h, pos, p_first, 0, n2, scale, H, D, BD, LK, LS, BN2, BM,
                                DOT_PREC)
    else:
        p_l = lse_part + (i_bh * NSPLIT2 * 2) * (T_q * GP) + o_t * GP + o_g
        b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
        b_l = tl.zeros([BM], dtype=tl.float32)
        for s in range(NSPLIT2):
            b_ms = tl.load(p_l + (2 * s) * (T_q * GP), mask=m_r, other=float("-inf"))
            b_ls = tl.load(p_l + (2 * s + 1) * (T_q * GP), mask=m_r, other=0.)
            b_mn = tl.maximum(b_m, b_ms)
            b_mu = tl.where(b_mn == float("-inf"), 0., b_mn)
            b_l = b_l * tl.exp2(b_m - b_mu) + b_ls * tl.exp2(b_ms - b_mu)
            b_m = b_mn
    # rows with no visible LSE window score 0 everywhere (naive: exp(x - lse) masked to 0); so do padding rows
    b_lse = tl.where((b_l > 0) & m_r, b_m + tl.log2(tl.maximum(b_l, 1.)), float("inf"))

    n1 = _n_windows(k_len, KS, S)
    if IS_DECODE:
        n1 = tl.minimum(n1, N1)
    o_tt = t_begin + tl.arange(0, BT)
    m_tt = o_tt <= t_last
    a_t, b_t = _block_range((off + o_tt) // BS, INIT, LOCAL, V2)
    p_s = scores + i_h.to(tl.int64) * s_sh + (q_start + o_tt - g0).to(tl.int64)[None, :] * NBLK
    # interior tiles [kt_a, kt_b): first window >= 0 and every window exists and is visible to the first row
    y = -W_OFF - a_first * R
    kt_a = tl.where(y > 0, tl.cdiv(tl.maximum(y, 0), NB * R), 0)
    x = tl.minimum(n1, _n_windows(p_first + 1, KS, S)) - BN - W_OFF
    k_max = tl.where(x >= 0, tl.maximum(x, 0) // R, -1)
    kt_b = tl.where(k_max >= a_first, (k_max - a_first) // NB + 1, 0)
    i_lo = tl.minimum(tl.maximum(kt_lo, kt_a), kt_hi)
    i_hi = tl.maximum(tl.minimum(kt_hi, kt_b), i_lo)
    _score_tiles(kt_lo, i_lo, a_first, b_q, b_lse, c1, c1_start, i_h, pos, n1, p_s, a_t, b_t, m_tt, scale,
                 H, D, BD, KS, S, R, KC, GP, BT, BN, NB, NBP, W_OFF, XG, POOL_FAST, DOT_PREC, True)
    _score_tiles(i_lo, i_hi, a_first, b_q, b_lse, c1, c1_start, i_h, pos, n1, p_s, a_t, b_t, m_tt, scale,
                 H, D, BD, KS, S, R, KC, GP, BT, BN, NB, NBP, W_OFF, XG, POOL_FAST, DOT_PREC, False)
    _score_tiles(i_hi, kt_hi, a_first, b_q, b_lse, c1, c1_start, i_h, pos, n1, p_s, a_t, b_t, m_tt, scale,
                 H, D, BD, KS, S, R, KC, GP, BT, BN, NB, NBP, W_OFF, XG, POOL_FAST, DOT_PREC, True)


@triton.jit
def infllmv2_topk_kernel(
    scores, out, info, seqlens, T_q, N1, g0, g1, p_lo, p_hi, K_SEL, NBLK, W, s_sh,
    H: tl.constexpr, KS: tl.constexpr, S: tl.constexpr, BS: tl.constexpr,
    INIT: tl.constexpr, LOCAL: tl.constexpr, V2: tl.constexpr,
    RB: tl.constexpr, NBP: tl.constexpr, WP: tl.constexpr, IS_DECODE: tl.constexpr,
):
    """Per row: forced blocks, the top k_dyn candidates by score (ascending), then -1. Grid (row tiles, seqs * H).

    Rows are the tokens of packed range [g0, g1) whose positions lie in [p_lo, p_hi): the caller launches one
    band of positions per register width NBP, so that rows with few candidate blocks scan few columns."""
    R: tl.constexpr = BS // S
    KC: tl.constexpr = (KS + S - 1) // S
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    q_start, q_len, k_len, c1_start, c2_start = _seq_info(info, seqlens, i_b, T_q, N1, N1, IS_DECODE)
    off = k_len - q_len
    lo = tl.maximum(tl.maximum(g0 - q_start, 0), p_lo - off)
    hi = tl.minimum(tl.minimum(g1 - q_start, q_len), p_hi - off)
    t_begin = lo + i_t * RB
    if t_begin >= hi:
        return
    o_t = t_begin + tl.arange(0, RB)
    m_t = o_t < hi
    qb = (off + o_t) // BS
    a, b = _block_range(qb, INIT, LOCAL, V2)
    n_loc = V2 * (qb - b + 1)
    k_dyn = tl.maximum(K_SEL - a - n_loc, 0)
    need = m_t & (b - a > k_dyn)
    n1 = _n_windows(k_len, KS, S)
    if IS_DECODE:
        n1 = tl.minimum(n1, N1)

    o_k = tl.arange(0, NBP)
    m_c = m_t[:, None] & (o_k[None, :] >= a[:, None]) & (o_k[None, :] < b[:, None])
    p_s = scores + i_h.to(tl.int64) * s_sh + (q_start + o_t - g0).to(tl.int64)[:, None] * NBLK + o_k[None, :]
    b_x = tl.load(p_s, mask=m_c & need[:, None], other=float("-inf"))
    # scores are >= 0 or -inf: their bit patterns order as int32; -inf (no existing window) -> -1
    b_key = tl.where(b_x > 0, b_x.to(tl.int32, bitcast=True), tl.where(b_x == 0, 0, -1))
    # rows that keep every candidate were not scored: a candidate exists iff its first pooled window does
    m_e = (n1 >= 1) & (o_k * R - (KC - 1) <= n1 - 1)
    b_key = tl.where(need[:, None], b_key, tl.where(m_c & m_e[None, :], 0, -1))

    # largest T with count(key >= T) >= k_dyn, bit by bit; stop early once a count hits k_dyn exactly
    b_thr = tl.zeros([RB], dtype=tl.int32)
    # count(key >= b_thr), kept up to date so that the common exact case needs no tie pass
    b_nge = tl.sum((b_key >= 0).to(tl.int32), 1)
    active = need & (b_nge > k_dyn)
    bit = tl.full([], 30, dtype=tl.int32)
    while (bit >= 0) & (tl.max(active.to(tl.int32), 0) > 0):
        b_try = b_thr | (1 << bit)
        b_cnt = tl.sum((b_key >= b_try[:, None]).to(tl.int32), 1)
        m_up = active & (b_cnt >= k_dyn)
        b_thr = tl.where(m_up, b_try, b_thr)
        b_nge = tl.where(m_up, b_cnt, b_nge)
        active = active & (b_cnt != k_dyn)
        bit -= 1
    m_sel = b_key >= b_thr[:, None]
    if tl.max(b_nge - k_dyn, 0) > 0:
        # ties at the threshold: keep the lowest indices
        m_gt = b_key > b_thr[:, None]
        m_eq = (b_key == b_thr[:, None]).to(tl.int32)
        n_gt = tl.sum(m_gt.to(tl.int32), 1)
        m_sel = m_gt | ((m_eq > 0) & (tl.cumsum(m_eq, 1) - m_eq < (k_dyn - n_gt)[:, None]))
    i_sel = m_sel.to(tl.int32)
    n_dyn = tl.sum(i_sel, 1)
    slot = a[:, None] + tl.cumsum(i_sel, 1) - i_sel
    p_o = out + ((q_start + o_t).to(tl.int64) * H + i_h)[:, None] * W
    tl.store(p_o + slot, tl.broadcast_to(o_k[None, :], [RB, NBP]), mask=m_sel & (slot < W))
    o_w = tl.arange(0, WP)[None, :]
    j_loc = a[:, None] + n_dyn[:, None]
    b_o = tl.where(o_w < a[:, None], o_w,
                   tl.where((o_w >= j_loc) & (o_w < j_loc + n_loc[:, None]), b[:, None] + o_w - j_loc, -1))
    m_o = m_t[:, None] & (o_w < W) & ((o_w < a[:, None]) | (o_w >= j_loc))
    tl.store(p_o + o_w, b_o, mask=m_o)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _stage1_tiles(G: int, D: int, n_rows: int | None = None) -> tuple[int, int, int, int]:
    """(BT tokens per tile, BN c1 windows per tile, num_warps, num_stages).

    Prefill: 128 rows (tokens x heads) by 64 windows, 4 warps (H200, 128K, HQ=32 H=2 D=128: 14.0 ms; 8 warps or
    128 windows or 256 rows were 5-50% slower). Decode (n_rows = Tq): as few rows as the dot allows, 128 windows."""
    GP = triton.next_power_of_2(G)
    min_bt = max(1, 16 // GP)
    if n_rows is None:
        return max(min_bt, 128 // GP), 64, 4, 2
    return max(min_bt, min(max(1, 128 // GP), triton.next_power_of_2(n_rows))), 128, 8, 2


def _topk_tiles(NBP: int) -> tuple[int, int]:
    """(rows per program, num_warps): one row per program, 2 warps (measured on H200 at 128K: 1 warp 3.98 ms,
    2 warps 3.41, 4 warps 3.77; several rows per program was slower)."""
    if _interpreting():
        return max(1, min(64, 4096 // NBP)), 1
    return 1, 2 if NBP <= 4096 else 4


def _topk_bands(cfg: SparseConfig, NBLKP: int, max_lk: int) -> list[tuple[int, int, int]]:
    """(columns, first position, end position): rows of position p have candidates below
    b = q_blk - local (+1 for v1), so a row lands in the narrowest power-of-2 column count >= b (at least 256)."""
    v1 = int(cfg.variant == "v1")
    bands, p_lo, nbp = [], 0, min(16 if _interpreting() else 256, NBLKP)
    while True:
        p_hi = _BIG if nbp >= NBLKP else (nbp + cfg.local_blocks - v1 + 1) * cfg.block_size
        bands.append((nbp, p_lo, p_hi))
        if p_hi >= max_lk:
            return bands
        p_lo, nbp = p_hi, nbp * 2


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pool_geometry(cfg: SparseConfig, BN: int) -> dict:
    """Block tiling of BN c1 windows: NB blocks per tile and the tile's first window relative to k0 * R."""
    R = cfg.block_size // cfg.kernel_stride
    KC = -(-cfg.kernel_size // cfg.kernel_stride)
    XG = -(-(KC - 1) // R)
    fast = R & (R - 1) == 0 and BN % R == 0 and BN // R > XG
    NB = BN // R - XG if fast else (BN - KC + 1) // R
    if NB < 1:
        raise ValueError(f"BN={BN} c1 windows cannot hold one block's pooling range ({R + KC - 1} windows)")
    return dict(NB=NB, NBP=triton.next_power_of_2(NB), W_OFF=-XG * R if fast else -(KC - 1), XG=XG, POOL_FAST=fast)


def _lse_keys(cfg: SparseConfig) -> tuple[int, int]:
    if cfg.uses_c2():
        return cfg.lse_kernel_size, cfg.lse_kernel_stride
    return cfg.kernel_size, cfg.kernel_stride


def parallel_infllmv2_select(q: torch.Tensor, k: torch.Tensor, sparse_config, *, cu_seqlens=None, cu_seqlens_k=None,
                             q_sel=None, k_sel=None, c1=None, c2=None, max_score_bytes: int = 2 << 30,
                             tiles: tuple[int, int, int, int] | None = None,
                             topk_cfg: tuple[int, int] | None = None) -> torch.Tensor:
    """Block indices int32 [B, Tq, H, W] as `naive_infllmv2_select`: ascending, -1 padded, W = selection_width.

    q [B, Tq, HQ, D], k [B, Tk, H, D] (queries are the last Tq keys), or B = 1 packed with cu_seqlens (and
    cu_seqlens_k). q_sel / k_sel replace q / k for scoring (use_nope). c1 / c2: precomputed compressed keys as
    `compress_keys` returns them (packed alike). Reads cu_seqlens on the host (prefill). The fp32 block-score
    scratch is bounded by `max_score_bytes` by walking the query tokens in chunks.
    """
    cfg = as_sparse_config(sparse_config)
    check_qkv(q, k, k, cu_seqlens, cu_seqlens_k)
    qs = (q if q_sel is None else q_sel).contiguous()
    ks = k if k_sel is None else k_sel
    B, Tq, HQ, D = qs.shape
    Tk, H = ks.shape[1], ks.shape[2]
    G = HQ // H
    bounds = seq_bounds(B, Tq, Tk, cu_seqlens, cu_seqlens_k)
    max_lk = max((lk for *_, lk in bounds), default=1)
    W = selection_width(cfg, max_lk)
    out = torch.empty(B, Tq, H, W, dtype=torch.int32, device=q.device)
    covered = sum(lq for _, _, lq, _, _ in bounds)
    if covered < B * Tq:
        out.fill_(-1)
    if covered == 0:
        return out
    varlen = cu_seqlens is not None
    cu_k = cu_seqlens_k if cu_seqlens_k is not None else cu_seqlens
    LK, LS = _lse_keys(cfg)
    if c1 is None:
        c1 = compress_keys(ks, cfg.kernel_size, cfg.kernel_stride, cu_seqlens=cu_k if varlen else None)[0]
    if cfg.uses_c2() and c2 is None:
        c2 = compress_keys(ks, LK, LS, cu_seqlens=cu_k if varlen else None)[0]
    c1 = c1.contiguous()
    c2 = c1 if not cfg.uses_c2() else c2.contiguous()
    rows, o1, o2 = [], 0, 0
    for b, qs0, lq, _, lk in bounds:
        if varlen:
            rows.append((qs0, lq, lk, o1, o2))
            o1 += compressed_len(lk, cfg.kernel_size, cfg.kernel_stride)
            o2 += compressed_len(lk, LK, LS)
        else:
            rows.append((b * Tq, lq, lk, b * c1.shape[1], b * c2.shape[1]))
    info = torch.tensor(rows, dtype=torch.int32).to(q.device, non_blocking=True)
    n_seq = len(rows)
    max_lq = max(lq for _, lq, *_ in rows)

    NBLK = num_blocks(max_lk, cfg.block_size)
    K_SEL = min(W, cfg.budget)
    GP = triton.next_power_of_2(G)
    BT, BN, nw, ns = tiles if tiles is not None else _stage1_tiles(G, D)
    pool = _pool_geometry(cfg, BN)
    BD = triton.next_power_of_2(D)
    NBLKP = triton.next_power_of_2(NBLK)
    bands = _topk_bands(cfg, NBLKP, max_lk)
    T_all = B * Tq
    chunk = max(BT, min(T_all, max_score_bytes // (4 * H * NBLK)))
    chunk = triton.cdiv(chunk, BT) * BT
    scores = torch.empty(H, min(chunk, T_all), NBLK, dtype=torch.float32, device=q.device)
    scale = LOG2E / math.sqrt(D)
    common = dict(H=H, KS=cfg.kernel_size, S=cfg.kernel_stride, BS=cfg.block_size, INIT=cfg.init_blocks,
                  LOCAL=cfg.local_blocks, V2=int(cfg.variant == "v2"))
    for g0 in range(0, T_all, chunk):
        g1 = min(g0 + chunk, T_all)
        n_t = triton.cdiv(min(g1 - g0, max_lq), BT)
        infllmv2_stage1_kernel[(n_t, 1, n_seq * H)](
            qs, c1, c2, scores, scores, info, info, scale, 0, _BIG, _BIG, g0, g1, K_SEL, NBLK, scores.stride(0),
            HQ=HQ, G=G, GP=GP, D=D, BD=BD, LK=LK, LS=LS, BT=BT, BN=BN, BN2=64, **pool,
            NSPLIT=1, NSPLIT2=0, IS_DECODE=False, DOT_PREC=_dot_precision(qs.dtype), num_warps=nw, num_stages=ns,
            **common)
        for nbp, p_lo, p_hi in bands:
            rb, nw = topk_cfg if topk_cfg is not None else _topk_tiles(nbp)
            n_r = min(g1 - g0, max_lq, p_hi - p_lo)
            infllmv2_topk_kernel[(triton.cdiv(n_r, rb), n_seq * H)](
                scores, out, info, info, 0, _BIG, g0, g1, p_lo, p_hi, K_SEL, NBLK, W, scores.stride(0),
                RB=rb, NBP=nbp, WP=triton.next_power_of_2(W), IS_DECODE=False, num_warps=nw, **common)
    return out


def decode_infllmv2_select(q: torch.Tensor, c1_cache: torch.Tensor, c2_cache: torch.Tensor | None,
                           cache_seqlens: torch.Tensor, sparse_config, width: int, *,
                           num_splits: int | None = None, topk_cfg: tuple[int, int] | None = None) -> torch.Tensor:
    """Selected blocks int32 [B, Tq, H, width] for the last Tq tokens of each cached sequence.

    q [B, Tq, HQ, D] (1..16 tokens, already in the cache); c1_cache [B, N1, H, D] and c2_cache [B, N2, H, D]
    hold at least the complete windows of each row (c2_cache may be None for v1 without use_compress_lse);
    cache_seqlens int [B] on device: total keys per row, new tokens included. No host synchronisation: the grids
    depend on shapes only, so the call can be captured in a CUDA graph. Rows pick min(width, budget) blocks.
    """
    cfg = as_sparse_config(sparse_config)
    B, Tq, HQ, D = q.shape
    _, N1, H, _ = c1_cache.shape
    G = HQ // H
    q = q.contiguous()
    c1_cache = c1_cache.contiguous()
    if cfg.uses_c2():
        if c2_cache is None:
            raise ValueError("variant v2 (or use_compress_lse) needs c2_cache")
        c2 = c2_cache.contiguous()
    else:
        c2 = c1_cache
    N2 = c2.shape[1]
    LK, LS = _lse_keys(cfg)
    out = torch.empty(B, Tq, H, width, dtype=torch.int32, device=q.device)
    # the longest row the c1 capacity can describe bounds the blocks a row can score
    NBLK = max(1, num_blocks(N1 * cfg.kernel_stride + cfg.kernel_size - 1, cfg.block_size))
    K_SEL = min(width, cfg.budget)
    GP = triton.next_power_of_2(G)
    BT, BN, nw, ns = _stage1_tiles(G, D, Tq)
    pool = _pool_geometry(cfg, BN)
    BD = triton.next_power_of_2(D)
    n_t = triton.cdiv(Tq, BT)
    n_prog = B * H * n_t
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    BN2 = 64
    NSPLIT2 = max(1, min(triton.cdiv(max(N2, 1), BN2), triton.cdiv(2 * sms, n_prog)))
    NSPLIT = num_splits or max(1, min(triton.cdiv(NBLK, pool["NB"]), triton.cdiv(2 * sms, n_prog)))
    scale = LOG2E / math.sqrt(D)
    lse_part = torch.empty(B * H, NSPLIT2, 2, Tq * GP, dtype=torch.float32, device=q.device)
    scores = torch.empty(H, B * Tq, NBLK, dtype=torch.float32, device=q.device)
    common = dict(H=H, KS=cfg.kernel_size, S=cfg.kernel_stride, BS=cfg.block_size, INIT=cfg.init_blocks,
                  LOCAL=cfg.local_blocks, V2=int(cfg.variant == "v2"))
    prec = _dot_precision(q.dtype)
    infllmv2_lse_split_kernel[(n_t, NSPLIT2, B * H)](
        q, c2, lse_part, q, cache_seqlens, scale, Tq, N1, N2, HQ=HQ, H=H, G=G, GP=GP, D=D, BD=BD, LK=LK, LS=LS,
        BT=BT, BN2=BN2, NSPLIT2=NSPLIT2, IS_DECODE=True, DOT_PREC=prec, num_warps=4)
    infllmv2_stage1_kernel[(n_t, NSPLIT, B * H)](
        q, c1_cache, c2, lse_part, scores, q, cache_seqlens, scale, Tq, N1, N2, 0, _BIG, K_SEL, NBLK,
        scores.stride(0), HQ=HQ, G=G, GP=GP, D=D, BD=BD, LK=LK, LS=LS, BT=BT, BN=BN, BN2=BN2, **pool,
        NSPLIT=NSPLIT, NSPLIT2=NSPLIT2, IS_DECODE=True, DOT_PREC=prec, num_warps=nw, num_stages=ns, **common)
    NBLKP = triton.next_power_of_2(NBLK)
    if topk_cfg is None:
        # few rows: spread each row over more warps
        topk_cfg = (1, min(8, max(1, NBLKP // 256))) if B * H * Tq <= 4 * sms else _topk_tiles(NBLKP)
    RB, topk_warps = topk_cfg
    infllmv2_topk_kernel[(triton.cdiv(Tq, RB), B * H)](
        scores, out, q, cache_seqlens, Tq, N1, 0, _BIG, 0, _BIG, K_SEL, NBLK, width, scores.stride(0),
        RB=RB, NBP=NBLKP, WP=triton.next_power_of_2(width), IS_DECODE=True, num_warps=topk_warps, **common)
    return out
