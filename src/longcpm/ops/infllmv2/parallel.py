"""Triton stage 2 of InfLLM-V2 (prefill): exact block-sparse attention over per-token key-block lists.

A program owns a tile of BT consecutive query tokens x the G query heads of one kv head: M = BT*G rows, so the
tensor cores see 64-128 rows even though one token brings only G heads. `block_union_kernel` first merges the BT
tokens' ascending block lists into one ascending list of distinct blocks plus a per-block token bitmask; the
attention kernel walks that list once, loads each K/V block once per tile and kv head, and masks the rows whose
token did not select the block (and, token-causally, keys after the row's position).

The decode kernel (decode.py) reuses `block_union_kernel`, `_seq_bounds` and `_attend_union`: all key addressing
lives in `_attend_union`, the one place a paged layout would change. Knows nothing of how blocks are selected.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)  # natural-log LSE from the base-2 one, inside kernels
MAX_BT = 16  # tokens per tile: the per-block token bitmask is an int32


@triton.jit
def _seg_count(b_blk1, b_c1, b_blk2, b_c2):
    # run length within equal-block runs of a sorted array: on sorted input, b_blk1 == b_blk2 means the right
    # operand is one run continuing the left one, which keeps the combine associative
    return b_blk2, tl.where(b_blk1 == b_blk2, b_c1 + b_c2, b_c2)


@triton.jit
def _seg_or(b_blk1, b_m1, b_blk2, b_m2):
    return b_blk2, tl.where(b_blk1 == b_blk2, b_m1 | b_m2, b_m2)


@triton.jit
def _seq_bounds(i_t, i_b, cu_seqlens_q, cu_seqlens_k, tile_table, seqlens_k, Tq, Tk,
                BT: tl.constexpr, MODE: tl.constexpr):
    """(bos_q, lq, bos_k, lk, t0): first q / k token of the tile's sequence within batch row i_b, the sequence's
    q and k lengths, and the tile's first local query token. MODE 0: dense batch; 1: packed varlen (cu_seqlens,
    tile_table maps tile -> (sequence, tile within it)); 2: decode (k length per batch row from seqlens_k)."""
    if MODE == 1:
        i_n = tl.load(tile_table + i_t * 2)
        t0 = tl.load(tile_table + i_t * 2 + 1) * BT
        bos_q = tl.load(cu_seqlens_q + i_n)
        lq = tl.load(cu_seqlens_q + i_n + 1) - bos_q
        bos_k = tl.load(cu_seqlens_k + i_n)
        lk = tl.load(cu_seqlens_k + i_n + 1) - bos_k
    elif MODE == 2:
        t0 = i_t * BT
        bos_q = i_t * 0
        lq = Tq
        bos_k = i_t * 0
        lk = tl.load(seqlens_k + i_b)
    else:
        t0 = i_t * BT
        bos_q = i_t * 0
        lq = Tq
        bos_k = i_t * 0
        lk = Tk
    return bos_q, lq, bos_k, lk, t0


@triton.jit
def block_union_kernel(block_idx, u_idx, u_bits, u_cnt, cu_seqlens_q, cu_seqlens_k, tile_table, seqlens_k,
                       stride_ib, stride_it, stride_ih, Tq, Tk, W, C_MAX, NT, window_blocks,
                       H: tl.constexpr, BS: tl.constexpr, BT: tl.constexpr, C_PAD: tl.constexpr, MODE: tl.constexpr):
    """Per (tile, kv head): ascending distinct blocks of the tile's tokens and, per block, bit i set when token
    t0 + i attends it. A token attends its listed blocks, plus (window_blocks > 0, v1) blocks q_blk - window + 1 ..
    q_blk; entries that are -1, past the token's own block or past the keys are dropped."""
    i_t, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos_q, lq, bos_k, lk, t0 = _seq_bounds(i_t, i_b, cu_seqlens_q, cu_seqlens_k, tile_table, seqlens_k, Tq, Tk,
                                           BT, MODE)
    o_t = tl.arange(0, BT)
    o_c = tl.arange(0, C_PAD)
    m_t = (t0 + o_t) < lq
    # [BT]
    b_qblk = (lk - lq + t0 + o_t) // BS
    p_i = block_idx + i_b.to(tl.int64) * stride_ib + i_h * stride_ih
    p_i += (bos_q + t0 + o_t).to(tl.int64)[:, None] * stride_it + o_c[None, :]
    # [BT, C_PAD]
    b_i = tl.load(p_i, mask=m_t[:, None] & (o_c < W)[None, :], other=-1)
    m_w = (o_c >= W)[None, :] & (o_c < W + window_blocks)[None, :]
    b_i = tl.where(m_w, b_qblk[:, None] - (o_c[None, :] - W), b_i)
    m_i = (b_i >= 0) & (b_i <= b_qblk[:, None]) & m_t[:, None]
    SENT: tl.constexpr = 0x7FFFFFFF
    b_key = tl.where(m_i, b_i * BT + o_t[:, None], SENT)
    # [BT * C_PAD], ascending by (block, token)
    b_key = tl.sort(tl.reshape(b_key, [BT * C_PAD]))
    b_valid = b_key != SENT
    b_blk = b_key // BT
    b_bit = tl.where(b_valid, tl.full([BT * C_PAD], 1, tl.int32) << (b_key % BT), 0)
    _, b_run = tl.associative_scan((b_blk, tl.full([BT * C_PAD], 1, tl.int32)), 0, _seg_count)
    b_first = (b_run == 1) & b_valid
    # OR of the bits from each element to the end of its run: at a run's first element, the whole run's mask
    _, b_or = tl.associative_scan((tl.flip(b_blk, 0), tl.flip(b_bit, 0)), 0, _seg_or)
    b_or = tl.flip(b_or, 0)
    b_pos = tl.cumsum(b_first.to(tl.int32), 0) - 1
    i_u = ((i_b * NT + i_t) * H + i_h).to(tl.int64)
    tl.store(u_idx + i_u * C_MAX + b_pos, b_blk, mask=b_first)
    tl.store(u_bits + i_u * C_MAX + b_pos, b_or, mask=b_first)
    tl.store(u_cnt + i_u, tl.sum(b_first.to(tl.int32), 0))


@triton.jit
def _attend_union(b_q, k_base, v_base, stride_kt, stride_vt, p_idx, p_bits, s_lo, s_hi, r_tok, r_pos, lk,
                  qk_scale, M: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, D: tl.constexpr,
                  RAW: tl.constexpr, PREC: tl.constexpr):
    """Online softmax (base 2) of the rows b_q [M, BD] over key slots [s_lo, s_hi) of the block list p_idx: slot s
    is key BS * p_idx[s // BS] + s % BS. A row sees slot s when bit r_tok of p_bits[s // BS] is set (RAW: a list of
    one token, where -1 entries are skipped) and the key is at or before r_pos and before lk. s_lo, s_hi are
    multiples of BS and BN divides BS: a key tile is BN contiguous rows of one block, addressed by a scalar.
    Returns the unnormalised accumulator [M, BD], the running max [M] (log2 units) and the running sum [M]."""
    o_n = tl.arange(0, BN)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    # [BN, BD], loop-invariant: each key tile adds one scalar row offset
    o_k = o_n[:, None] * stride_kt + o_d[None, :]
    o_v = o_n[:, None] * stride_vt + o_d[None, :]
    b_acc = tl.zeros([M, BD], dtype=tl.float32)
    b_m = tl.full([M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([M], dtype=tl.float32)
    for s0 in range(s_lo, s_hi, BN):
        b_blk = tl.load(p_idx + s0 // BS)
        if RAW:
            b_bits = (b_blk >= 0).to(tl.int32)
        else:
            b_bits = tl.load(p_bits + s0 // BS)
        j0 = tl.maximum(b_blk, 0) * BS + s0 % BS
        # [BN]
        o_j = j0 + o_n
        m_j = o_j < lk
        m_kv = m_j[:, None] & m_d[None, :] if D < BD else m_j[:, None]
        b_k = tl.load(k_base + j0 * stride_kt + o_k, mask=m_kv, other=0.)
        b_v = tl.load(v_base + j0 * stride_vt + o_v, mask=m_kv, other=0.)
        # [M, BN]; o_j <= r_pos < lk also drops the keys past the sequence
        m_qk = ((((b_bits >> r_tok) & 1) != 0)[:, None]) & (o_j[None, :] <= r_pos[:, None])
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * qk_scale
        b_s = tl.where(m_qk, b_s, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_ms = tl.where(b_mn == float("-inf"), 0., b_mn)
        b_p = tl.exp2(b_s - b_ms[:, None])
        b_a = tl.exp2(b_m - b_ms)
        b_l = b_l * b_a + tl.sum(b_p, 1)
        b_acc = b_acc * b_a[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PREC)
        b_m = b_mn
    return b_acc, b_m, b_l


@triton.jit
def _finalize(b_acc, b_m, b_l):
    """Normalised output [M, BD] and base-2 LSE [M]; a row that saw no key gives 0 and -inf."""
    m_l = b_l > 0
    b_ls = tl.where(m_l, b_l, 1.)
    return tl.where(m_l[:, None], b_acc / b_ls[:, None], 0.), tl.where(m_l, b_m + tl.log2(b_ls), float("-inf"))


@triton.jit
def parallel_block_sparse_attn_fwd_kernel(
    q, k, v, o, lse, u_idx, u_bits, u_cnt, cu_seqlens_q, cu_seqlens_k, tile_table,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh, stride_lb, stride_lt,
    Tq, Tk, C_MAX, NT, qk_scale,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BT: tl.constexpr, G_PAD: tl.constexpr,
    M: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, MODE: tl.constexpr, STORE_LSE: tl.constexpr,
    PREC: tl.constexpr,
):
    i_t, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos_q, lq, bos_k, lk, t0 = _seq_bounds(i_t, i_b, cu_seqlens_q, cu_seqlens_k, tile_table, cu_seqlens_k, Tq, Tk,
                                           BT, MODE)
    # row r = token r // G_PAD of the tile x head r % G_PAD of the group; rows past BT * G_PAD pad M up to 16
    o_r = tl.arange(0, M)
    r_tok = tl.minimum(o_r // G_PAD, BT - 1)
    r_g = o_r % G_PAD
    r_t = t0 + o_r // G_PAD
    m_r = (o_r < BT * G_PAD) & (r_t < lq) & (r_g < G)
    r_pos = lk - lq + r_t
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    p_q = q + i_b.to(tl.int64) * stride_qb + (bos_q + r_t).to(tl.int64)[:, None] * stride_qt
    p_q += (i_h * G + r_g)[:, None] * stride_qh + o_d[None, :]
    b_q = tl.load(p_q, mask=m_r[:, None] & m_d[None, :], other=0.)
    k_base = k + i_b.to(tl.int64) * stride_kb + bos_k.to(tl.int64) * stride_kt + i_h * stride_kh
    v_base = v + i_b.to(tl.int64) * stride_vb + bos_k.to(tl.int64) * stride_vt + i_h * stride_vh
    i_u = ((i_b * NT + i_t) * H + i_h).to(tl.int64)
    n_u = tl.load(u_cnt + i_u)
    b_acc, b_m, b_l = _attend_union(b_q, k_base, v_base, stride_kt, stride_vt, u_idx + i_u * C_MAX,
                                    u_bits + i_u * C_MAX, 0, n_u * BS, r_tok, r_pos, lk, qk_scale,
                                    M, BS, BN, BD, D, False, PREC)
    b_o, b_lse = _finalize(b_acc, b_m, b_l)
    p_o = o + i_b.to(tl.int64) * stride_ob + (bos_q + r_t).to(tl.int64)[:, None] * stride_ot
    p_o += (i_h * G + r_g)[:, None] * stride_oh + o_d[None, :]
    tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=m_r[:, None] & m_d[None, :])
    if STORE_LSE:
        p_l = lse + i_b.to(tl.int64) * stride_lb + (bos_q + r_t).to(tl.int64) * stride_lt + i_h * G + r_g
        tl.store(p_l, b_lse * LN2, mask=m_r)


def prefill_config(G: int, D: int, block_size: int) -> dict:
    """Tile shape and launch parameters: BT tokens x G heads = 64 rows (measured best on the H200 with 64-token
    blocks: fewer distinct blocks per tile than 128 rows, one warpgroup). Key tiles of up to 64 keys of one block.
    Two pipeline stages at D <= 64: 12-16% faster than three at needle-27m's shapes (G 8, D 64) on the model's own
    q/k/v and on random ones, 16K-64K (benchmarks/sparse_tile_sweep.py); three stay at D 128 (MiniCPM4-8B)."""
    g_pad = triton.next_power_of_2(G)
    bt = max(1, min(MAX_BT, 64 // g_pad))
    return dict(BT=bt, BN=min(64 if D <= 128 else 32, block_size), num_warps=4, num_stages=2 if D <= 64 else 3)


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def union_width(BT: int, W: int, window_blocks: int, max_k_len: int, block_size: int) -> int:
    """Entries per (tile, kv head) that the block union can need: at most every distinct block once."""
    return max(1, min(BT * (W + window_blocks), -(-max_k_len // block_size)))


def block_union(block_idx: torch.Tensor, *, BT: int, NT: int, grid_t: int, B: int, H: int, Tq: int, Tk: int,
                block_size: int, window_blocks: int, c_max: int, mode: int, cu_seqlens_q=None, cu_seqlens_k=None,
                tile_table=None, seqlens_k=None):
    """Launch block_union_kernel: (u_idx, u_bits) int32 [B * NT * H, c_max] and u_cnt int32 [B * NT * H]."""
    W = block_idx.shape[-1]
    dev = block_idx.device
    u_idx = torch.empty(B * NT * H, c_max, dtype=torch.int32, device=dev)
    u_bits = torch.empty_like(u_idx)
    u_cnt = torch.empty(B * NT * H, dtype=torch.int32, device=dev)
    dummy = u_cnt
    block_union_kernel[(grid_t, H, B)](
        block_idx, u_idx, u_bits, u_cnt,
        cu_seqlens_q if cu_seqlens_q is not None else dummy, cu_seqlens_k if cu_seqlens_k is not None else dummy,
        tile_table if tile_table is not None else dummy, seqlens_k if seqlens_k is not None else dummy,
        block_idx.stride(0), block_idx.stride(1), block_idx.stride(2), Tq, Tk, W, c_max, NT, window_blocks,
        H=H, BS=block_size, BT=BT, C_PAD=triton.next_power_of_2(W + window_blocks), MODE=mode, num_warps=4,
    )
    return u_idx, u_bits, u_cnt


def _tile_table(cu_seqlens_q: torch.Tensor, BT: int, NT: int) -> torch.Tensor:
    """int32 [NT, 2]: (sequence, tile within it) for each of NT tiles, without a host sync. Tiles past the last
    sequence's end point past its queries and write nothing."""
    lq = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    n = (lq + BT - 1) // BT
    end = torch.cumsum(n, 0)
    tiles = torch.arange(NT, device=cu_seqlens_q.device, dtype=end.dtype)
    seq = torch.searchsorted(end, tiles, right=True).clamp_max(lq.numel() - 1)
    return torch.stack([seq, tiles - (end[seq] - n[seq])], 1).to(torch.int32).contiguous()


def _check_block_idx(block_idx: torch.Tensor, q: torch.Tensor, H: int) -> torch.Tensor:
    if block_idx.dim() != 4 or block_idx.shape[:2] != q.shape[:2] or block_idx.shape[2] != H:
        raise ValueError(f"block_idx must be [B, Tq, H, W] = [{q.shape[0]}, {q.shape[1]}, {H}, W], "
                         f"got {tuple(block_idx.shape)}")
    if block_idx.dtype != torch.int32 or block_idx.stride(-1) != 1:
        block_idx = block_idx.to(torch.int32).contiguous()
    return block_idx


def _output(out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with a contiguous last dim")
    return out


def _last_dim_contiguous(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


def parallel_block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
                                    block_size: int, *, window_blocks: int = 0,
                                    cu_seqlens_q: torch.Tensor | None = None,
                                    cu_seqlens_k: torch.Tensor | None = None, sm_scale: float | None = None,
                                    return_lse: bool = False, out: torch.Tensor | None = None,
                                    config: dict | None = None):
    """Exact softmax of each query over the union of its selected key blocks, token-causal (bottom-right aligned).

    q [B, Tq, HQ, D]; k, v [B, Tk, H, D] with Tk >= Tq (queries are the last Tq tokens), or B = 1 packed with
    cu_seqlens_q / cu_seqlens_k (int32 [N + 1]; q length <= k length per sequence). block_idx int32 [B, Tq, H, W]:
    ascending block indices per (token, kv head), -1 padded. window_blocks > 0 (v1) also attends blocks
    q_blk - window_blocks + 1 .. q_blk. Returns o [B, Tq, HQ, D] in q's dtype (a row that sees no key gives 0), and
    with return_lse the natural-log LSE fp32 [B, Tq, HQ] (-inf for such rows). `out` (q's shape and dtype, last dim
    contiguous) receives o when given; `config` overrides prefill_config (tile and launch parameters).
    """
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q [B, Tq, HQ, D] and k = v [B, Tk, H, D] expected, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, Tq, HQ, D = q.shape
    Tk, H = k.shape[1], k.shape[2]
    if HQ % H:
        raise ValueError(f"query heads ({HQ}) must be a multiple of kv heads ({H})")
    if block_size & (block_size - 1) or block_size < 16 or D > 256:
        raise ValueError(f"block_size must be a power of 2 >= 16 and head_dim <= 256, got {block_size}, {D}")
    G = HQ // H
    block_idx = _check_block_idx(block_idx, q, H)
    q, k, v = _last_dim_contiguous(q, k, v)
    varlen = cu_seqlens_q is not None
    if varlen:
        if B != 1:
            raise ValueError("packed sequences (cu_seqlens_q) need B = 1")
        cu_seqlens_q = cu_seqlens_q.to(torch.int32)
        cu_seqlens_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k.to(torch.int32)
    elif Tq > Tk:
        raise ValueError(f"more queries ({Tq}) than keys ({Tk}): queries are the last keys' tokens")
    cfg = prefill_config(G, D, block_size)
    cfg.update(config or {})
    BT = cfg["BT"]
    W = block_idx.shape[-1]
    o = _output(out, q)
    lse = torch.empty(B, Tq, HQ, dtype=torch.float32, device=q.device) if return_lse else o
    if B * Tq == 0:
        return (o, lse) if return_lse else o
    if varlen:
        n_seq = cu_seqlens_q.numel() - 1
        NT = triton.cdiv(Tq, BT) + n_seq
        tile_table, grid, mode = _tile_table(cu_seqlens_q, BT, NT), (NT, H, 1), 1
    else:
        NT = triton.cdiv(Tq, BT)
        tile_table, grid, mode = None, (NT, H, B), 0
    c_max = union_width(BT, W, window_blocks, Tk, block_size)
    u_idx, u_bits, u_cnt = block_union(block_idx, BT=BT, NT=NT, grid_t=grid[0], B=grid[2], H=H, Tq=Tq, Tk=Tk,
                                       block_size=block_size, window_blocks=window_blocks, c_max=c_max, mode=mode,
                                       cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, tile_table=tile_table)
    g_pad = triton.next_power_of_2(G)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    dummy = u_cnt
    parallel_block_sparse_attn_fwd_kernel[grid](
        q, k, v, o, lse, u_idx, u_bits, u_cnt,
        cu_seqlens_q if varlen else dummy, cu_seqlens_k if varlen else dummy, tile_table if varlen else dummy,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
        Tq, Tk, c_max, NT, scale * LOG2E,
        H=H, G=G, D=D, BS=block_size, BT=BT, G_PAD=g_pad, M=max(16, BT * g_pad), BN=min(cfg["BN"], block_size),
        BD=max(16, triton.next_power_of_2(D)), MODE=mode, STORE_LSE=return_lse, PREC=dot_precision(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return (o, lse) if return_lse else o
