"""InfLLM-V2 prefill in plain PyTorch whose cost follows the selected blocks: the "torch" backend (CPU or GPU).

Same contract as naive_infllmv2_attention (naive.py) and the same selected blocks, but stage 2's work grows with
tokens x budget and memory stays linear in the length: queries go through in chunks and nothing of size [Tq, Tk]
is ever built. (Selection still scores every query against every c1 window, Tq x Tk / stride, by design.)

Selection repeats naive's stage-1 arithmetic over query chunks, cut after the last block a chunk can see, and gets
bit-identical scores, so top-k picks the same blocks, ties included. That takes care: PyTorch rounds the last few
elements of a reduction differently when a tensor's size is not a multiple of the vector width, and MKL rounds
tiny matmuls differently. So chunks start at multiples of 64, the last chunk keeps the reference's shape, and no
matmul gets fewer than 64 rows or columns.

Stage 2 splits each token's blocks in two. The band (init blocks and the local window, the same for all tokens of
a block) goes through one matmul per 64-token tile. The other selected blocks go through (kv head, block) items:
up to 64 tokens that picked a block, against that block. Not a union of blocks per tile: unrelated neighbouring
queries (random inputs, a change of topic) make a tile's union nearly every past block, i.e. dense cost.
Softmax sums are accumulated per token (_Accumulator); temporaries are slices of a few MiB, reused from slice to
slice when no gradient is needed (_Scratch).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ...config import SparseConfig
from .common import as_sparse_config, check_qkv, num_blocks, pool_window_range, seq_bounds
from .naive import forced_block_scores, naive_compress, selection_width

_ALIGN = 64  # query chunks start at multiples of this (see the module docstring)
_ROWS = 64  # tokens per stage-2 item: a useful matmul, little padding per (head, block) group
# Per-op temporaries stay at 8-16 MiB: they come back from the heap (glibc maps anything above 32 MiB afresh, and
# page-faulting it in costs more than the math here) and mostly stay in cache. Much smaller slices mean more ops,
# and every op costs a thread fork/join, which gets expensive when other processes compete for the cores.
_SCORE_ELEMS = 1 << 22  # stage-1 scores [HQ, chunk, n1] per selection chunk
_LOGIT_ELEMS = 1 << 21  # stage-2 logits per slice of (head, block) items
_BAND_ELEMS = 1 << 22  # stage-2 logits per slice of band tiles
_PAIR_TOKENS = 8192  # queries whose pairs are packed together: more tokens per block, fuller items
_EXP_LIMIT = 60.0  # |logit| below this: exp cannot overflow or go subnormal, no running max is needed


def blocked_infllmv2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sparse_config, *,
                               cu_seqlens=None, cu_seqlens_k=None, q_sel=None, k_sel=None) -> torch.Tensor:
    """naive_infllmv2_attention's contract: q [B, Tq, HQ, D], k/v [B, Tk, H, D] (queries are the last Tq tokens),
    or B = 1 packed with cu_seqlens; dense below dense_len per sequence, block-sparse at or above. fp32 math,
    output in q's dtype."""
    cfg = as_sparse_config(sparse_config)
    check_qkv(q, k, v, cu_seqlens, cu_seqlens_k)
    B, Tq = q.shape[:2]
    q_sel = q if q_sel is None else q_sel
    k_sel = k if k_sel is None else k_sel
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    for b, qs, lq, ks, lk in seq_bounds(B, Tq, k.shape[1], cu_seqlens, cu_seqlens_k):
        if lq == 0:
            continue
        qq, kk, vv = q[b, qs: qs + lq], k[b, ks: ks + lk], v[b, ks: ks + lk]
        if not cfg.is_sparse(lk):
            o = _dense(qq, kk, vv)
        else:
            o = _sparse(qq, kk, vv, q_sel[b, qs: qs + lq], k_sel[b, ks: ks + lk], cfg)
        out[b, qs: qs + lq] = o.to(q.dtype)
    return out


def blocked_select_one(q_sel: torch.Tensor, k_sel: torch.Tensor, cfg: SparseConfig, width: int) -> torch.Tensor:
    """naive_select_one computed chunk by chunk: block indices int32 [Tq, H, width] for the last Tq tokens."""
    Tq, Tk = q_sel.shape[0], k_sel.shape[0]
    c1, c2 = _compressed(k_sel, cfg)
    parts = [_select(q_sel[s:e], c1, c2, _positions(s, e, Tq, Tk, q_sel.device), cfg, width)
             for s, e in _chunks(Tq, _select_len(q_sel.shape[1], c1.shape[0]))]
    return torch.cat(parts) if parts else torch.zeros(0, k_sel.shape[1], width, dtype=torch.int32,
                                                      device=q_sel.device)


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal GQA attention of one sequence in fp32, queries bottom-right aligned. [Tq, HQ, D] in and out."""
    Tq, Tk = q.shape[0], k.shape[0]
    qt, kt, vt = (x.float().transpose(0, 1)[None] for x in (q, k, v))
    with sdpa_kernel(_VARLEN_BACKENDS):
        if Tq == Tk:
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
        else:
            from torch.nn.attention.bias import causal_lower_right
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=causal_lower_right(Tq, Tk), enable_gqa=True)
    return o[0].transpose(0, 1)


# every sequence has its own length: on CUDA, cuDNN would build a new execution graph for each
_VARLEN_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sparse(q, k, v, q_sel, k_sel, cfg: SparseConfig) -> torch.Tensor:
    """One sequence: selection over small query chunks, stage 2 over groups of them. [Tq, HQ, D] fp32."""
    Tq, Tk = q.shape[0], k.shape[0]
    width = selection_width(cfg, Tk)
    c1, c2 = _compressed(k_sel, cfg)
    kt, vb = _key_blocks(k, cfg.block_size).transpose(-1, -2).contiguous(), _key_blocks(v, cfg.block_size)
    scratch = _Scratch(not (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))))
    out = []
    for group in _groups(_chunks(Tq, _select_len(q.shape[1], c1.shape[0])), _PAIR_TOKENS):
        s, e = group[0][0], group[-1][1]
        pos = _positions(s, e, Tq, Tk, q.device)
        idx = torch.cat([_select(q_sel[a:b], c1, c2, pos[a - s: b - s], cfg, width) for a, b in group])
        out.append(_attend(q[s:e], kt, vb, idx, pos, cfg, scratch))
    return torch.cat(out)


def _compressed(k_sel: torch.Tensor, cfg: SparseConfig):
    with torch.no_grad():
        c1 = naive_compress(k_sel, cfg.kernel_size, cfg.kernel_stride)
        c2 = naive_compress(k_sel, cfg.lse_kernel_size, cfg.lse_kernel_stride) if cfg.uses_c2() else None
    return c1, c2


def _positions(s: int, e: int, Tq: int, Tk: int, device) -> torch.Tensor:
    return torch.arange(Tk - Tq + s, Tk - Tq + e, device=device)


def _chunks(T: int, size: int) -> list[tuple[int, int]]:
    """[start, end) query ranges starting at multiples of size (itself a multiple of _ALIGN); a last range
    shorter than _ALIGN joins the one before, so no chunk makes a tiny matmul (MKL rounds those differently)."""
    out = [(s, min(T, s + size)) for s in range(0, T, size)]
    if len(out) > 1 and out[-1][1] - out[-1][0] < _ALIGN:
        out[-2:] = [(out[-2][0], T)]
    return out


def _groups(chunks: list[tuple[int, int]], tokens: int) -> list[list[tuple[int, int]]]:
    """Consecutive chunks joined while they hold at most `tokens` queries (always at least one chunk)."""
    out: list[list[tuple[int, int]]] = []
    for c in chunks:
        if out and c[1] - out[-1][0][0] <= tokens:
            out[-1].append(c)
        else:
            out.append([c])
    return out


def _select_len(HQ: int, n1: int) -> int:
    """Queries per selection chunk: a multiple of _ALIGN whose stage-1 scores hold about _SCORE_ELEMS values."""
    return max(_ALIGN, _SCORE_ELEMS // (HQ * max(n1, 1)) // _ALIGN * _ALIGN)


@torch.no_grad()
def _select(q_sel: torch.Tensor, c1: torch.Tensor, c2, pos: torch.Tensor, cfg: SparseConfig,
            width: int) -> torch.Tensor:
    """naive_select_one for the queries at `pos`: int32 [Tc, H, width], ascending, -1 padded.

    Only blocks up to the chunk's last block are scored; the c1 windows that cannot pool into them are dropped,
    except for v1's exact LSE, which runs over every c1 window and must see the same row length as the reference,
    and except below _ALIGN windows (small matmuls take other MKL kernels, rounded differently).
    """
    n_blk = int(pos[-1]) // cfg.block_size + 1
    n1 = c1.shape[0]
    if cfg.uses_c2():
        last = pool_window_range(n_blk - 1, cfg.block_size, cfg.kernel_size, cfg.kernel_stride)[1]
        n1 = min(n1, max(last + 1, _ALIGN))
    S = _stage1_scores(q_sel, c1[:n1], c2, pos, cfg)
    scores = _block_scores(S, pos, n_blk, cfg)
    return _topk(scores, width).permute(1, 0, 2).contiguous()


def _stage1_scores(q: torch.Tensor, c1: torch.Tensor, c2, pos: torch.Tensor, cfg: SparseConfig) -> torch.Tensor:
    """naive_stage1_scores with the same roundings in the same order (so the same bits), in place, and with its
    two masks applied after the sum over the G heads: both depend on the token and window only, so masking the
    sum equals summing the masked terms. That leaves four passes over [H, G, T, n1] instead of eight."""
    T, HQ, D = q.shape
    H = c1.shape[1]
    qf = q.float().view(T, H, HQ // H, D)
    s = 1.0 / math.sqrt(D)
    logit1 = torch.einsum("thgd,nhd->hgtn", qf, c1.float()).mul_(s)  # [H, G, T, n1]
    vis1 = _visible(c1.shape[0], cfg.kernel_size, cfg.kernel_stride, pos)
    if cfg.uses_c2():
        logit2 = torch.einsum("thgd,nhd->hgtn", qf, c2.float()).mul_(s)
        vis2 = _visible(c2.shape[0], cfg.lse_kernel_size, cfg.lse_kernel_stride, pos)
        lse = logit2.masked_fill_(~vis2, float("-inf")).logsumexp(-1)  # [H, G, T]
    else:
        vis2 = vis1
        lse = logit1.masked_fill(~vis1, float("-inf")).logsumexp(-1)
    S = logit1.sub_(lse[..., None]).exp_().sum(1)  # [H, T, n1]
    return S.masked_fill_(~vis1[None] | ~vis2.any(-1)[None, :, None], 0.0)  # the second: an empty LSE set


def _visible(n: int, kernel: int, stride: int, pos: torch.Tensor) -> torch.Tensor:
    """[T, n] bool: window i (keys stride*i .. stride*i + kernel - 1) is complete at each position."""
    end = torch.arange(n, device=pos.device) * stride + kernel - 1
    return end[None, :] <= pos[:, None]


def _block_scores(S: torch.Tensor, pos: torch.Tensor, n_blk: int, cfg: SparseConfig) -> torch.Tensor:
    """naive_block_scores without its loop over blocks: block k max-pools c1 windows r*k - P .. r*k + r - 1
    (r = block / stride c1 windows per block, P = windows that start before the block and reach into it),
    so one unfold of width r + P and step r over S padded with -inf gives every block at once."""
    H, T, n1 = S.shape
    r = cfg.block_size // cfg.kernel_stride
    P = -(-cfg.kernel_size // cfg.kernel_stride) - 1
    right = max(0, r * n_blk - n1)
    padded = F.pad(S, (P, right), value=float("-inf"))[..., : r * n_blk + P]
    return forced_block_scores(padded.unfold(-1, r + P, r).amax(-1), pos, cfg)  # [H, T, n_blk]


def _topk(scores: torch.Tensor, width: int) -> torch.Tensor:
    """naive_topk without its full sort: the same blocks in the same layout (int32 [H, T, width], ascending, -1
    padded). Each score becomes a unique int64 key, order-preserving float bits above the reversed block index,
    so torch.topk (which need not be stable) returns exactly the stable sort's first picks: ties to lower blocks."""
    H, T, n = scores.shape
    kk = min(width, n)
    bits = (scores + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0, as the float comparison sees them
    order = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()  # negative floats: flip the magnitude order
    key = order * (1 << 32) + (n - 1 - torch.arange(n, device=scores.device))
    idx = key.topk(kk, dim=-1).indices
    idx = torch.where(torch.isneginf(scores.gather(-1, idx)), n, idx).sort(-1).values
    idx = torch.where(idx == n, -1, idx).to(torch.int32)
    return F.pad(idx, (0, width - kk), value=-1)


def _key_blocks(k: torch.Tensor, bs: int) -> torch.Tensor:
    """[Tk, H, D] -> fp32 [H, n_blk, bs, D], the last block zero-padded (its padding is masked as future keys)."""
    Tk, H, D = k.shape
    n_blk = num_blocks(Tk, bs)
    kf = F.pad(k.float(), (0, 0, 0, 0, 0, n_blk * bs - Tk))
    return kf.view(n_blk, bs, H, D).permute(2, 0, 1, 3).contiguous()


def _pack_pairs(idx: torch.Tensor, n_blk: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group the (token, kv head, block) pairs of idx [Tc, H, W] by (head, block) and cut each group into items
    of `rows` tokens. Returns item_hb [I] (head * n_blk + block) and item_dst [I * rows]: the row
    token * H + head that each item row belongs to, Tc * H for padding."""
    Tc, H, W = idx.shape
    flat = idx.reshape(-1).long()
    src = (flat >= 0).nonzero().squeeze(1)  # t-major, so a stable sort keeps tokens ascending inside a group
    grp, order = ((src // W % H) * n_blk + flat[src]).sort(stable=True)
    src = src[order]
    counts = torch.bincount(grp, minlength=H * n_blk)
    items = (counts + rows - 1) // rows
    first_pair, first_item = counts.cumsum(0) - counts, items.cumsum(0) - items
    rank = torch.arange(grp.numel(), device=idx.device) - first_pair[grp]
    slot = (first_item[grp] + rank // rows) * rows + rank % rows
    n_items = int(items.sum())
    item_hb = torch.repeat_interleave(torch.arange(H * n_blk, device=idx.device), items, output_size=n_items)
    item_dst = torch.full((n_items * rows,), Tc * H, dtype=torch.long, device=idx.device)
    item_dst[slot] = src // W
    return item_hb, item_dst


def _attend(q: torch.Tensor, kt: torch.Tensor, vb: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor,
            cfg: SparseConfig, scratch: _Scratch) -> torch.Tensor:
    """Stage 2 for a group of consecutive queries: q [Tc, HQ, D]; kt [H, n_blk, D, bs] and vb [H, n_blk, bs, D]
    fp32 (keys stored transposed: bmm runs markedly faster on a contiguous right operand); idx [Tc, H, W]
    selected blocks. Exact softmax over the selected blocks (plus v1's window), token-causal. [Tc, HQ, D] fp32.

    The blocks every token of a block-aligned tile attends (init blocks and the local window: the "band") go
    through one matmul per tile; the remaining selected blocks go through (head, block) items."""
    Tc, HQ, D = q.shape
    H, n_blk, bs = vb.shape[:3]
    G = HQ // H
    qf = (q.float() * (1.0 / math.sqrt(D))).view(Tc, H, G, D)
    kf, vf = kt.view(H * n_blk, D, bs), vb.view(H * n_blk, bs, D)
    keys = (idx.shape[-1] + _band_ids(pos[:1] // bs, cfg).shape[1]) * bs
    acc = _Accumulator(Tc * H + 1, G, D, q.device, not _exp_is_safe(qf, kf, vf, keys), scratch)
    for logits, v, dst in _band_logits(qf, kt, vb, pos, cfg, scratch):
        acc.add(logits, v, dst, fresh=True)
    for logits, v, dst in _pair_logits(qf, kf, vf, _outside_band(idx, pos, cfg), pos, n_blk, scratch):
        acc.add(logits, v, dst)
    return acc.result(Tc * H).view(Tc, HQ, D)


def _window_start(cfg: SparseConfig) -> int:
    """The band's window is q_blk - L .. q_blk: v2 forces local + 1 blocks, v1 attends local on top of top-k."""
    return cfg.local_blocks if cfg.variant == "v2" else cfg.local_blocks - 1


def _band_ids(qb: torch.Tensor, cfg: SparseConfig) -> torch.Tensor:
    """Blocks attended by every token of block qb [n]: [n, init + window] (init blocks first, own block last),
    -1 for blocks before 0, after qb, or repeated (an init block inside the window). No window (v1 with
    window_size 0): no band, every block goes through the items."""
    L = _window_start(cfg)
    if L < 0:
        return qb.new_zeros(qb.numel(), 0)
    win = qb[:, None] - torch.arange(L, -1, -1, device=qb.device)[None, :]
    init = torch.arange(cfg.init_blocks, device=qb.device)[None, :].expand(qb.numel(), -1)
    init = torch.where((init > qb[:, None]) | (init >= qb[:, None] - L), -1, init)
    return torch.cat([init, win.clamp(min=-1)], 1)


def _outside_band(idx: torch.Tensor, pos: torch.Tensor, cfg: SparseConfig) -> torch.Tensor:
    """idx with the band's blocks replaced by -1 (v2 selects them all; v1 selects the init blocks)."""
    if _window_start(cfg) < 0:
        return idx
    qb = (pos // cfg.block_size)[:, None, None]
    k = idx.long()
    band = (k >= 0) & ((k < cfg.init_blocks) | ((k >= qb - _window_start(cfg)) & (k <= qb)))
    return torch.where(band, -1, idx)


def _band_logits(qf: torch.Tensor, kt: torch.Tensor, vb: torch.Tensor, pos: torch.Tensor, cfg: SparseConfig,
                 scratch: _Scratch):
    """Yields (logits [n * H, bs * G, keys], v [n * H, keys, D], dst rows) for slices of block-aligned query
    tiles against their band blocks. Rows of padding tokens (tile parts outside the group) go to the dummy row."""
    Tc, H, G, D = qf.shape
    bs = vb.shape[2]
    qb0, front = int(pos[0]) // bs, int(pos[0]) % bs
    n_t = -(-(front + Tc) // bs)
    ids = _band_ids(torch.arange(qb0, qb0 + n_t, device=qf.device), cfg)
    nb = ids.shape[1]
    if nb == 0:
        return
    qt = F.pad(qf, (0, 0, 0, 0, 0, 0, front, n_t * bs - Tc - front)).view(n_t, bs, H, G, D)
    tok = torch.arange(n_t * bs, device=qf.device) - front
    tok = torch.where((tok >= 0) & (tok < Tc), tok, Tc).view(n_t, 1, bs) * H
    dst = (tok + torch.arange(H, device=qf.device)[None, :, None]).clamp(max=Tc * H)  # [n_t, H, bs]
    future = torch.ones(bs, bs, dtype=torch.bool, device=qf.device).triu(1)  # own block: key offset > query's
    step = max(1, _BAND_ELEMS // (H * bs * G * nb * bs))
    for a in range(0, n_t, step):
        sl = ids[a: a + step]
        n = sl.shape[0]
        q_t = qt[a: a + n].permute(0, 2, 1, 3, 4).reshape(n * H, bs * G, D)
        k_t = kt[:, sl.clamp(min=0)].permute(1, 0, 3, 2, 4).reshape(n * H, D, nb * bs)
        v_t = vb[:, sl.clamp(min=0)].transpose(0, 1).reshape(n * H, nb * bs, D)
        logits = scratch.bmm("logits", q_t, k_t)
        lg = logits.view(n, H, bs, G, nb, bs)
        lg[..., -1, :].masked_fill_(future[None, None, :, None, :], float("-inf"))
        if bool((sl < 0).any()):
            lg.masked_fill_((sl < 0)[:, None, None, None, :, None], float("-inf"))
        yield logits, v_t, dst[a: a + n].reshape(-1)


def _pair_logits(qf: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor,
                 n_blk: int, scratch: _Scratch):
    """Yields (logits [n, rows * G, bs], v [n, bs, D], dst rows) for slices of (head, block) items of idx."""
    Tc, H, G, D = qf.shape
    bs = vf.shape[1]
    item_hb, item_dst = _pack_pairs(idx, n_blk, _ROWS)
    q_rows = F.pad(qf.reshape(Tc * H, G, D), (0, 0, 0, 0, 0, 1))  # + a zero row for padding
    qpos = F.pad(pos.repeat_interleave(H), (0, 1), value=torch.iinfo(torch.long).max)
    step = max(1, _LOGIT_ELEMS // (_ROWS * G * bs))
    for a in range(0, item_hb.numel(), step):
        hb, dst = item_hb[a: a + step], item_dst[a * _ROWS: (a + step) * _ROWS]
        q_i = scratch.index_select("q", q_rows, dst).view(hb.numel(), _ROWS * G, D)  # a memcpy per row
        logits = scratch.bmm("logits", q_i, scratch.index_select("k", kf, hb))
        _mask_future(logits.view(hb.numel(), _ROWS, G, bs), hb % n_blk * bs, qpos[dst].view(-1, _ROWS))
        yield logits, scratch.index_select("v", vf, hb), dst


def _exp_is_safe(qf: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, keys: int) -> bool:
    """|logit| <= |q| |k| (q already scaled; kf holds D in dim -2): below _EXP_LIMIT, exp(logit) is a normal
    float and the sums of exp(logit) * v over `keys` keys stay far from overflow: no running max is needed."""
    qf, kf, vf = qf.detach(), kf.detach(), vf.detach()
    bound = float(qf.norm(dim=-1).max()) * float(kf.norm(dim=-2).max())
    vmax = float(vf.abs().max()) if vf.numel() else 0.0
    return bound <= _EXP_LIMIT and bound + math.log(max(keys, 1)) + math.log1p(vmax) <= 80.0


def _mask_future(logits: torch.Tensor, kstart: torch.Tensor, qpos: torch.Tensor) -> None:
    """-inf where key position > query position, in place. logits [n, rows, G, bs]; kstart [n] first key of each
    item's block; qpos [n, rows]. Only items holding some token's own block need it: the rest are skipped."""
    bs = logits.shape[-1]
    need = (kstart + bs - 1 > qpos.amin(-1)).nonzero().squeeze(1)
    if need.numel() == 0:
        return
    kpos = kstart[need, None] + torch.arange(bs, device=logits.device)
    future = kpos[:, None, None, :] > qpos[need][:, :, None, None]  # [n', rows, 1, bs]
    logits[need] = logits[need].masked_fill(future, float("-inf"))


class _Accumulator:
    """Sums of exp(logit - ref) * v and exp(logit - ref) per output row, fed slice by slice.

    Fast mode (ref = 0): the caller checked that exp(logit) can neither overflow nor underflow. Stable mode:
    ref is a per-row reference, set from the row's first (band) slice, which holds the row's own block and so
    is usually close to its maximum; a later slice whose max exceeds ref by more than _RAISE raises it and
    rescales the row's sums (rare). Terms far below ref underflow to 0, as in any max-subtracted softmax.
    ref is a constant for autograd: it cancels in the final ratio."""

    _RAISE = 30.0  # exp(30) ~ 1e13: far from overflow even summed over many keys

    def __init__(self, n: int, G: int, D: int, device, stable: bool, scratch: _Scratch):
        self.scratch = scratch
        self.o = torch.zeros(n, G, D, device=device)
        self.l = torch.zeros(n, G, device=device)
        self.ref = torch.full((n, G), float("-inf"), device=device) if stable else None

    def add(self, logits: torch.Tensor, v: torch.Tensor, dst: torch.Tensor, fresh: bool = False) -> None:
        """logits [n, rows * G, keys] (rows of dst, G heads each, -inf where masked), v [n, keys, D], dst
        [n * rows]. fresh: the rows of dst get their first values (other than the padding row)."""
        G, D = self.o.shape[1:]
        if self.ref is not None:
            m = logits.detach().amax(-1).view(-1, G)  # finite: every row sees a key of its block
            if fresh:
                self.ref.index_copy_(0, dst, m)
            elif bool((m > self.ref[dst] + self._RAISE).any()):
                self._raise(m, dst)
            logits = logits.sub_(self.ref[dst].view(logits.shape[0], -1, 1))
        p = logits.exp_()
        self.l.index_add_(0, dst, p.sum(-1).view(-1, G))
        self.o.index_add_(0, dst, self.scratch.bmm("pv", p, v).view(-1, G, D))

    def _raise(self, m: torch.Tensor, dst: torch.Tensor) -> None:
        top = self.ref.scatter_reduce(0, dst[:, None].expand_as(m), m, "amax")
        new = torch.where(top > self.ref + self._RAISE, top, self.ref)
        keep = torch.exp(self.ref - new).nan_to_num(0.0)  # -inf - -inf: nothing summed yet
        self.o, self.l, self.ref = self.o * keep[..., None], self.l * keep, new

    def result(self, n: int) -> torch.Tensor:
        return (self.o[:n] / self.l[:n, :, None]).nan_to_num(0.0)


class _Scratch:
    """Output buffers reused from slice to slice when nothing needs gradients. A fresh ~10 MiB tensor per op is
    often given back to the OS by glibc on free and page-faulted in again on the next op: that alone cost 15-25%
    of stage 2 on a 2-core CPU. With autograd on (training), every op allocates as usual."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bufs: dict[str, torch.Tensor] = {}

    def _buf(self, name: str, shape, like: torch.Tensor) -> torch.Tensor:
        n = math.prod(shape)
        b = self.bufs.get(name)
        if b is None or b.numel() < n:
            b = self.bufs[name] = torch.empty(n, dtype=like.dtype, device=like.device)
        return b[:n].view(shape)

    def bmm(self, name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return torch.bmm(a, b)
        return torch.bmm(a, b, out=self._buf(name, (a.shape[0], a.shape[1], b.shape[2]), a))

    def index_select(self, name: str, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x.index_select(0, index)
        return torch.index_select(x, 0, index, out=self._buf(name, (index.numel(), *x.shape[1:]), x))
