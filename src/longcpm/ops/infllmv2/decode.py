"""Triton stage 2 of InfLLM-V2 for decode: 1..16 new query tokens per sequence against a KV cache.

Flash-decoding split-K: the (block union of the) step's selected blocks for one (sequence, kv head) is cut into
`num_splits` slices, one program each; every program writes a normalised partial output and its LSE to a
workspace, and `decode_combine_kernel` merges them. Rows are Tq tokens x G heads of one kv head (padded to 16).
Shapes come from the tensors only and lengths stay on the device, so a call can be captured in a CUDA graph.
Key addressing is shared with prefill (parallel._attend_union), the one place a paged layout would change.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .parallel import (
    LN2,
    LOG2E,
    MAX_BT,
    _attend_union,
    _check_block_idx,
    _finalize,
    _last_dim_contiguous,
    _output,
    block_union,
    dot_precision,
    union_width,
)


@triton.jit
def decode_block_sparse_attn_fwd_kernel(
    q, k, v, o_part, lse_part, block_idx, u_idx, u_bits, u_cnt, cache_seqlens,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ib, stride_ih, Tq, W, C_MAX, qk_scale,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BT: tl.constexpr, G_PAD: tl.constexpr,
    M: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, S: tl.constexpr, W_PAD: tl.constexpr, RAW: tl.constexpr,
    PREC: tl.constexpr,
):
    i_s, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    lk = tl.load(cache_seqlens + i_b)
    o_r = tl.arange(0, M)
    r_tok = tl.minimum(o_r // G_PAD, BT - 1)
    r_g = o_r % G_PAD
    r_t = o_r // G_PAD
    m_r = (o_r < BT * G_PAD) & (r_t < Tq) & (r_g < G)
    r_pos = lk - Tq + r_t
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    p_q = q + i_b.to(tl.int64) * stride_qb + r_t[:, None] * stride_qt + (i_h * G + r_g)[:, None] * stride_qh
    b_q = tl.load(p_q + o_d[None, :], mask=m_r[:, None] & m_d[None, :], other=0.)
    if RAW:
        # one token: its own list is the union; count up to the last valid entry
        p_idx = block_idx + i_b.to(tl.int64) * stride_ib + i_h * stride_ih
        p_bits = p_idx
        o_w = tl.arange(0, W_PAD)
        b_i = tl.load(p_idx + o_w, mask=o_w < W, other=-1)
        n_u = tl.max(tl.where(b_i >= 0, o_w + 1, 0), 0)
    else:
        i_u = (i_b * H + i_h).to(tl.int64)
        p_idx = u_idx + i_u * C_MAX
        p_bits = u_bits + i_u * C_MAX
        n_u = tl.load(u_cnt + i_u)
    per = tl.cdiv(n_u, S)
    e_lo = tl.minimum(i_s * per, n_u)
    e_hi = tl.minimum(e_lo + per, n_u)
    k_base = k + i_b.to(tl.int64) * stride_kb + i_h * stride_kh
    v_base = v + i_b.to(tl.int64) * stride_vb + i_h * stride_vh
    b_acc, b_m, b_l = _attend_union(b_q, k_base, v_base, stride_kt, stride_vt, p_idx, p_bits, e_lo * BS, e_hi * BS,
                                    r_tok, r_pos, lk, qk_scale, M, BS, BN, BD, D, RAW, PREC)
    b_o, b_lse = _finalize(b_acc, b_m, b_l)
    i_p = ((i_b * H + i_h) * S + i_s).to(tl.int64) * M
    tl.store(o_part + (i_p + o_r)[:, None] * BD + o_d[None, :], b_o)
    tl.store(lse_part + i_p + o_r, b_lse)


@triton.jit
def decode_combine_kernel(
    o_part, lse_part, o, lse, stride_ob, stride_ot, stride_oh, stride_lb, stride_lt, Tq,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, G_PAD: tl.constexpr, M: tl.constexpr, BD: tl.constexpr,
    S: tl.constexpr, S_PAD: tl.constexpr, STORE_LSE: tl.constexpr,
):
    i_h, i_b = tl.program_id(0), tl.program_id(1)
    o_r = tl.arange(0, M)
    r_g = o_r % G_PAD
    r_t = o_r // G_PAD
    m_r = (r_t < Tq) & (r_g < G)
    o_d = tl.arange(0, BD)
    o_sp = tl.arange(0, S_PAD)
    i_p = ((i_b * H + i_h) * S).to(tl.int64)
    # [S_PAD, M]
    b_lse = tl.load(lse_part + (i_p + o_sp)[:, None] * M + o_r[None, :], mask=(o_sp < S)[:, None],
                    other=float("-inf"))
    b_mx = tl.max(b_lse, 0)
    b_mx = tl.where(b_mx == float("-inf"), 0., b_mx)
    b_sum = tl.sum(tl.exp2(b_lse - b_mx[None, :]), 0)
    b_acc = tl.zeros([M, BD], dtype=tl.float32)
    for i_s in range(S):
        b_w = tl.exp2(tl.load(lse_part + (i_p + i_s) * M + o_r) - b_mx)
        b_acc += b_w[:, None] * tl.load(o_part + ((i_p + i_s) * M + o_r)[:, None] * BD + o_d[None, :])
    m_l = b_sum > 0
    b_o = tl.where(m_l[:, None], b_acc / tl.where(m_l, b_sum, 1.)[:, None], 0.)
    p_o = o + i_b.to(tl.int64) * stride_ob + r_t[:, None] * stride_ot + (i_h * G + r_g)[:, None] * stride_oh
    tl.store(p_o + o_d[None, :], b_o.to(p_o.dtype.element_ty), mask=m_r[:, None] & (o_d < D)[None, :])
    if STORE_LSE:
        b_lse = tl.where(m_l, b_mx + tl.log2(tl.where(m_l, b_sum, 1.)), float("-inf")) * LN2
        tl.store(lse + i_b.to(tl.int64) * stride_lb + r_t * stride_lt + i_h * G + r_g, b_lse, mask=m_r)


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SM_COUNT:
        _SM_COUNT[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SM_COUNT[i]


def default_num_splits(B: int, H: int, n_entries: int, device: torch.device) -> int:
    """About two programs per SM, but at least 6 blocks per split (H200, 96 blocks of 64: 16 splits at batch 1 ran
    in 18 us against 26 us with 48; 8-9 splits at batch 16)."""
    return max(1, min(triton.cdiv(2 * _sm_count(device), B * H), triton.cdiv(n_entries, 6)))


def decode_block_sparse_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  cache_seqlens: torch.Tensor, block_idx: torch.Tensor, block_size: int, *,
                                  window_blocks: int = 0, sm_scale: float | None = None, num_splits: int | None = None,
                                  return_lse: bool = False, out: torch.Tensor | None = None):
    """Block-sparse attention of the last Tq (1..16) tokens of each sequence against its KV cache.

    q [B, Tq, HQ, D]; k_cache, v_cache [B, Tmax, H, D]; cache_seqlens int32 [B] on the device: valid length of
    each sequence, the Tq new tokens included (query t sits at cache_seqlens - Tq + t). block_idx int32
    [B, Tq, H, W], ascending, -1 padded; window_blocks > 0 adds the v1 window. No host synchronisation: CUDA-graph
    capturable. Returns o [B, Tq, HQ, D] in q's dtype, written into `out` when given (and the natural-log LSE fp32
    [B, Tq, HQ] with return_lse). num_splits: programs per (sequence, kv head); default from the shapes.
    """
    if q.dim() != 4 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape or q.shape[0] != k_cache.shape[0] \
            or q.shape[-1] != k_cache.shape[-1]:
        raise ValueError(f"q [B, Tq, HQ, D] and k_cache = v_cache [B, Tmax, H, D] expected, got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    B, Tq, HQ, D = q.shape
    Tmax, H = k_cache.shape[1], k_cache.shape[2]
    if HQ % H or not 1 <= Tq <= MAX_BT or block_size & (block_size - 1) or block_size < 16 or D > 256:
        raise ValueError(f"need HQ % H == 0, 1 <= Tq <= {MAX_BT}, a power-of-2 block_size >= 16, head_dim <= 256; "
                         f"got HQ={HQ}, H={H}, Tq={Tq}, block_size={block_size}, D={D}")
    G = HQ // H
    block_idx = _check_block_idx(block_idx, q, H)
    q, k_cache, v_cache = _last_dim_contiguous(q, k_cache, v_cache)
    if cache_seqlens.dtype != torch.int32:
        cache_seqlens = cache_seqlens.to(torch.int32)
    W = block_idx.shape[-1]
    BT = triton.next_power_of_2(Tq)
    g_pad = triton.next_power_of_2(G)
    M = max(16, BT * g_pad)
    BD = max(16, triton.next_power_of_2(D))
    raw = Tq == 1 and window_blocks == 0
    if raw:
        c_max, n_entries = 1, W
        u_idx = u_bits = u_cnt = block_idx
    else:
        c_max = n_entries = union_width(BT, W, window_blocks, Tmax, block_size)
        u_idx, u_bits, u_cnt = block_union(block_idx, BT=BT, NT=1, grid_t=1, B=B, H=H, Tq=Tq, Tk=Tmax,
                                           block_size=block_size, window_blocks=window_blocks, c_max=c_max, mode=2,
                                           seqlens_k=cache_seqlens)
    S = num_splits or default_num_splits(B, H, n_entries, q.device)
    o_part = torch.empty(B * H * S * M, BD, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(B * H * S * M, dtype=torch.float32, device=q.device)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    decode_block_sparse_attn_fwd_kernel[(S, H, B)](
        q, k_cache, v_cache, o_part, lse_part, block_idx, u_idx, u_bits, u_cnt, cache_seqlens,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_idx.stride(0), block_idx.stride(2),
        Tq, W, c_max, scale * LOG2E,
        H=H, G=G, D=D, BS=block_size, BT=BT, G_PAD=g_pad, M=M, BN=min(64 if D <= 128 else 32, block_size), BD=BD,
        S=S, W_PAD=triton.next_power_of_2(W), RAW=raw, PREC=dot_precision(q.dtype), num_warps=4, num_stages=3,
    )
    o = _output(out, q)
    lse = torch.empty(B, Tq, HQ, dtype=torch.float32, device=q.device) if return_lse else o
    decode_combine_kernel[(H, B)](
        o_part, lse_part, o, lse, o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1), Tq,
        H=H, G=G, D=D, G_PAD=g_pad, M=M, BD=BD, S=S, S_PAD=triton.next_power_of_2(S), STORE_LSE=return_lse,
        num_warps=4,
    )
    return (o, lse) if return_lse else o
