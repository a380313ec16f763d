"""The PyTorch reference against hand-derived facts of the spec, and the public op's contract (CPU, naive)."""

import math

import pytest
import torch

from longcpm.config import SparseConfig
from longcpm.errors import ConfigError
from longcpm.ops import infllmv2_attention, infllmv2_decode, infllmv2_select, update_compressed_cache
from longcpm.ops.infllmv2.common import compressed_len, pool_window_range
from longcpm.ops.infllmv2.naive import (
    naive_block_scores,
    naive_compress,
    naive_dense_attention,
    naive_stage1_scores,
)

from .helpers import SMALL_SPARSE

SMALL = SMALL_SPARSE


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def test_official_pool_window_is_5_4_1_with_padding():
    # spec §2.3: block k max-pools c1 windows 4k-1 .. 4k+3; block 0 uses 0..3
    assert pool_window_range(0, 64, 32, 16) == (0, 3)
    assert pool_window_range(5, 64, 32, 16) == (19, 23)


def test_compressed_len_and_mean():
    assert compressed_len(31, 32, 16) == 0 and compressed_len(32, 32, 16) == 1 and compressed_len(80, 32, 16) == 4
    k = rand(70, 2, 8)
    c = naive_compress(k, 32, 16)
    assert c.shape == (3, 2, 8)
    torch.testing.assert_close(c[2], k[32:64].mean(0))


def test_default_budget_is_96_and_34_forced():
    cfg = SparseConfig()
    assert cfg.budget == 96 and cfg.local_blocks == 32
    # a token in block 200: init block 0 and blocks 168..200 are forced (+inf), later blocks are -inf
    S = torch.rand(1, 1, (201 * 64 - 32) // 16 + 1)
    pos = torch.tensor([200 * 64 + 10])
    sc = naive_block_scores(S, pos, 202, cfg)[0, 0]
    forced = torch.isposinf(sc).nonzero().flatten().tolist()
    assert forced == [0] + list(range(168, 201))
    assert torch.isneginf(sc[201])


def test_v1_excludes_window_from_topk():
    cfg = SparseConfig(variant="v1", window_size=128, block_size=64)  # 2 window blocks
    S = torch.rand(1, 1, 100)
    pos = torch.tensor([10 * 64 + 3])
    sc = naive_block_scores(S, pos, 11, cfg)[0, 0]
    assert torch.isposinf(sc[0])
    assert torch.isneginf(sc[9]) and torch.isneginf(sc[10])  # q_blk-1 .. q_blk are served by the window
    assert torch.isfinite(sc[8])


def test_stage1_scores_against_explicit_formula():
    cfg = SparseConfig(**SMALL)
    T, HQ, H, D = 70, 4, 2, 8
    q, k = rand(T, HQ, D, seed=1), rand(T, H, D, seed=2)
    c1, c2 = naive_compress(k, 8, 4), naive_compress(k, 32, 16)
    t = 60
    S = naive_stage1_scores(q[t:t + 1], c1, c2, torch.tensor([t]), cfg)
    s = 1 / math.sqrt(D)
    for g in range(H):
        want = torch.zeros(c1.shape[0])
        for h in range(g * 2, g * 2 + 2):
            vis2 = [j for j in range(c2.shape[0]) if 16 * j + 31 <= t]
            lse = torch.logsumexp(torch.stack([s * q[t, h] @ c2[j, g] for j in vis2]), 0)
            for i in range(c1.shape[0]):
                if 4 * i + 7 <= t:
                    want[i] += torch.exp(s * q[t, h] @ c1[i, g] - lse)
        torch.testing.assert_close(S[g, 0], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_full_budget_equals_dense(variant):
    cfg = SparseConfig(**{**SMALL, "topk": 64, "variant": variant})
    q, k, v = rand(2, 150, 8, 16, seed=3), rand(2, 150, 2, 16, seed=4), rand(2, 150, 2, 16, seed=5)
    o = infllmv2_attention(q, k, v, cfg, backend="naive")
    ref = infllmv2_attention(q, k, v, {**SMALL, "dense_len": 10**9}, backend="naive")
    torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)


def test_small_budget_differs_from_dense_and_respects_selection():
    cfg = SparseConfig(**SMALL)
    q, k, v = rand(1, 200, 4, 16, seed=6), rand(1, 200, 2, 16, seed=7), rand(1, 200, 2, 16, seed=8)
    o = infllmv2_attention(q, k, v, cfg, backend="naive")
    dense = naive_dense_attention(q[0], k[0], v[0])
    assert (o[0] - dense).abs().max() > 1e-3
    idx = infllmv2_select(q, k, cfg, backend="naive")
    assert idx.shape == (1, 200, 2, cfg.budget) and idx.dtype == torch.int32
    # every row: ascending valid indices then -1; the current block always selected; nothing in the future
    for t in (0, 17, 120, 199):
        for h in range(2):
            row = idx[0, t, h].tolist()
            valid = [x for x in row if x >= 0]
            assert valid == sorted(valid) and row[len(valid):] == [-1] * (len(row) - len(valid))
            assert t // 16 in valid and max(valid) <= t // 16


def test_dense_len_switch_is_exact():
    q, k, v = rand(1, 100, 4, 16, seed=9), rand(1, 100, 2, 16, seed=10), rand(1, 100, 2, 16, seed=11)
    below = infllmv2_attention(q, k, v, {**SMALL, "dense_len": 101}, backend="naive")
    dense = naive_dense_attention(q[0], k[0], v[0])[None]
    assert torch.equal(below, dense)
    at = infllmv2_attention(q, k, v, {**SMALL, "dense_len": 100}, backend="naive")
    assert (at - dense).abs().max() > 1e-3


def test_packed_varlen_equals_per_sequence():
    cfg = SparseConfig(**SMALL)
    lens = [37, 130, 64]
    q, k, v = rand(1, sum(lens), 4, 16, seed=12), rand(1, sum(lens), 2, 16, seed=13), rand(1, sum(lens), 2, 16, seed=14)
    cu = torch.tensor([0, 37, 167, 231], dtype=torch.int32)
    packed = infllmv2_attention(q, k, v, cfg, cu_seqlens=cu, backend="naive")
    for i in range(3):
        s, e = cu[i].item(), cu[i + 1].item()
        one = infllmv2_attention(q[:, s:e], k[:, s:e], v[:, s:e], cfg, backend="naive")
        torch.testing.assert_close(packed[:, s:e], one)


def test_decode_equals_prefill_last_tokens_and_incremental_cache():
    cfg = SparseConfig(**SMALL)
    B, T, Tmax = 2, 180, 200
    k, v = rand(B, T, 2, 16, seed=15), rand(B, T, 2, 16, seed=16)
    q = rand(B, T, 4, 16, seed=17)
    lens = [180, 133]
    kc = torch.zeros(B, Tmax, 2, 16)
    vc = torch.zeros_like(kc)
    c1 = torch.zeros(B, Tmax // 4 + 1, 2, 16)
    c2 = torch.zeros(B, Tmax // 16 + 1, 2, 16)
    past = [0, 0]
    # grow the cache in uneven chunks; the incremental c1/c2 must equal a fresh compression
    for step in (50, 1, 1, 40, 3, 200):
        new = [min(step, L - p) for p, L in zip(past, lens)]
        for b in range(B):
            kc[b, past[b]: past[b] + new[b]] = k[b, past[b]: past[b] + new[b]]
            vc[b, past[b]: past[b] + new[b]] = v[b, past[b]: past[b] + new[b]]
        total = [p + n for p, n in zip(past, new)]
        update_compressed_cache(kc, c1, c2, past, total, cfg)
        past = total
    for b in range(B):
        ref1, ref2 = naive_compress(k[b, :lens[b]], 8, 4), naive_compress(k[b, :lens[b]], 32, 16)
        torch.testing.assert_close(c1[b, :ref1.shape[0]], ref1)
        torch.testing.assert_close(c2[b, :ref2.shape[0]], ref2)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    qd = torch.stack([q[0, 178:180], q[1, 131:133]])
    out = infllmv2_decode(qd, kc, vc, seqlens, cfg, c1=c1, c2=c2, backend="naive")
    for b in range(B):
        L = lens[b]
        full = infllmv2_attention(q[b:b + 1, :L], k[b:b + 1, :L], v[b:b + 1, :L], cfg, backend="naive")
        torch.testing.assert_close(out[b], full[0, L - 2:L])


def test_bad_inputs_raise_clear_errors():
    q, k, v = rand(1, 10, 4, 16), rand(1, 10, 3, 16), rand(1, 10, 3, 16)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        infllmv2_attention(q, k, v, SMALL, backend="naive")
    with pytest.raises(ValueError, match="k and v shapes differ"):
        infllmv2_attention(rand(1, 10, 4, 16), rand(1, 10, 2, 16), rand(1, 9, 2, 16), SMALL, backend="naive")
    with pytest.raises(ValueError, match="more queries"):
        infllmv2_attention(rand(1, 12, 4, 16), rand(1, 10, 2, 16), rand(1, 10, 2, 16), SMALL, backend="naive")
    with pytest.raises(ConfigError, match="window_size"):
        infllmv2_attention(rand(1, 10, 4, 16), rand(1, 10, 2, 16), rand(1, 10, 2, 16), {**SMALL, "window_size": 20})
    with pytest.raises(ConfigError, match="variant"):
        SparseConfig(variant="v3")
    with pytest.raises(ValueError, match="backend"):
        infllmv2_attention(rand(1, 10, 4, 16), rand(1, 10, 2, 16), rand(1, 10, 2, 16), SMALL, backend="cuda")
