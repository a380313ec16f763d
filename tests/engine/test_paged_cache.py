"""The paged KV pool: writes and reads equal a contiguous cache, compressed keys equal the contiguous incremental
ones, the model through the pool equals the model without a cache, and the Triton decode kernel equals the
PyTorch reference (interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

from longcpm.config import SparseConfig
from longcpm.kvcache.contiguous import StepMeta
from longcpm.kvcache.paged import PagedKVPool, PagedStep
from longcpm.ops import update_compressed_cache
from longcpm.ops.paged import append_compressed, append_compressed_decode, gather_compressed, gather_kv, store_kv
from longcpm.ops.paged.naive import naive_paged_decode

from .conftest import SPARSE


def _tables(lens: list[int], page_size: int, num_pages: int, seed: int = 0) -> list[list[int]]:
    """Scattered, disjoint pages (never page 0) for sequences of the given lengths."""
    perm = (torch.randperm(num_pages - 1, generator=torch.Generator().manual_seed(seed)) + 1).tolist()
    out = []
    for L in lens:
        n = -(-L // page_size)
        out.append(perm[:n])
        perm = perm[n:]
    return out


def _step(tables, past, new, sparse_rows=None, decode_only=False, page_size=16) -> PagedStep:
    slots = [t[p // page_size] * page_size + p % page_size for t, c, n in zip(tables, past, new)
             for p in range(c, c + n)]
    NP = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (NP - len(t)) for t in tables], dtype=torch.int32)
    return PagedStep(q_lens=list(new), past_lens=list(past), sparse_rows=sparse_rows or [False] * len(new),
                     slot_mapping=torch.tensor(slots), block_tables=bt,
                     seq_lens=torch.tensor([c + n for c, n in zip(past, new)], dtype=torch.int32),
                     decode_only=decode_only)


def test_store_then_gather_equals_contiguous():
    PS, H, D = 16, 2, 8
    pool_k, pool_v = torch.zeros(12, PS, H, D), torch.zeros(12, PS, H, D)
    lens = [5, 37, 16]
    tables = _tables(lens, PS, 12)
    ks = [torch.randn(L, H, D) for L in lens]
    for chunk in range(0, 40, 7):  # written in chunks, interleaved across sequences
        past = [min(chunk, L) for L in lens]
        new = [min(chunk + 7, L) - p for p, L in zip(past, lens)]
        st = _step(tables, past, new, page_size=PS)
        k = torch.cat([x[p: p + n] for x, p, n in zip(ks, past, new)])
        store_kv(pool_k, pool_v, k, -k, st.slot_mapping)
    for t, x in zip(tables, ks):
        assert torch.equal(gather_kv(pool_k, torch.tensor(t), len(x)), x)
        assert torch.equal(gather_kv(pool_v, torch.tensor(t), len(x)), -x)
    assert pool_k[0].abs().sum() == 0  # the scratch page is never written by real tokens


@pytest.mark.parametrize("decode_tail", [False, True])
def test_compressed_keys_equal_contiguous(decode_tail):
    cfg = SparseConfig.from_dict(SPARSE)
    PS, H, D, L = 64, 2, 8, 300
    k = torch.randn(L, H, D)
    table = _tables([L], PS, 10)[0]
    pool = torch.zeros(10, PS, H, D)
    c1p, c2p = torch.zeros(10, PS // 16, H, D), torch.zeros(10, 1, H, D)
    bt = torch.tensor([table], dtype=torch.int32)
    split = 150 if decode_tail else L
    st = _step([table], [0], [split], page_size=PS)
    store_kv(pool, pool, k[:split], k[:split], st.slot_mapping)
    append_compressed(pool, c1p, bt[0], 0, split, 32, 16)
    append_compressed(pool, c2p, bt[0], 0, split, 128, 64)
    for t in range(split, L):  # one token at a time, the graph-safe way
        st = _step([table], [t], [1], page_size=PS)
        store_kv(pool, pool, k[t: t + 1], k[t: t + 1], st.slot_mapping)
        append_compressed_decode(pool, c1p, bt, st.seq_lens, 32, 16)
        append_compressed_decode(pool, c2p, bt, st.seq_lens, 128, 64)
    c1, c2 = torch.zeros(1, L // 16 + 1, H, D), torch.zeros(1, L // 64 + 1, H, D)
    update_compressed_cache(k[None], c1, c2, [0], [L], cfg)
    n1, n2 = (L - 32) // 16 + 1, (L - 128) // 64 + 1
    torch.testing.assert_close(gather_compressed(c1p, bt, n1, 32, 16)[0], c1[0, :n1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gather_compressed(c2p, bt, n2, 128, 64)[0], c2[0, :n2], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sparse", [False, True])
def test_model_through_pool_equals_full_forward(tiny_model, tiny_config, sparse):
    cfg = tiny_config(sparse_config=SPARSE if sparse else None)
    model = tiny_model(config=cfg)
    PS = 64 if sparse else 16
    lens = [400, 200] if sparse else [150, 70]  # sparse: 7 blocks of 64 against a budget of 3
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, cfg.vocab_size, (L,), generator=g) for L in lens]
    pool = PagedKVPool(cfg, 20, PS, dtype=torch.float32)
    tables = _tables(lens, PS, 20)
    mode = "sparse" if sparse else "auto"
    got = [[] for _ in lens]
    past = [0, 0]
    with torch.no_grad():
        for chunk in (60, 30, 1, 1, 1, 400):  # prefill chunks, then single tokens, then the rest
            new = [min(chunk, L - p) for p, L in zip(past, lens)]
            rows = [i for i, n in enumerate(new) if n > 0]
            if not rows:
                break
            st = _step([tables[i] for i in rows], [past[i] for i in rows], [new[i] for i in rows], [sparse] * len(rows),
                       decode_only=all(new[i] == 1 for i in rows), page_size=PS)
            ids = torch.cat([seqs[i][past[i]: past[i] + new[i]] for i in rows])[None]
            pos = torch.cat([torch.arange(past[i], past[i] + new[i]) for i in rows])[None]
            meta = StepMeta(positions=pos, new_lens=[ids.shape[1]], past_lens=[0], attention=mode)
            logits = model.logits(model.model(ids, meta, pool.view(st, mode))[0])
            s = 0
            for i in rows:
                got[i].append(logits[s: s + new[i]])
                s += new[i]
                past[i] += new[i]
        for i, x in enumerate(seqs):
            want = model(x[None], attention=mode)[0]
            torch.testing.assert_close(torch.cat(got[i]), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("page_size,G,D", [(16, 4, 32), (64, 2, 64)])
def test_triton_paged_decode_matches_reference(page_size, G, D):
    pytest.importorskip("triton")
    from longcpm.ops.paged.decode import triton_paged_decode

    H, P = 2, 40
    g = torch.Generator().manual_seed(1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter (tests/engine/conftest.py)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dev == "cpu" else {"rtol": 2e-3, "atol": 2e-3}  # GPU dots may use TF32
    kp, vp = torch.randn(P, page_size, H, D, generator=g), torch.randn(P, page_size, H, D, generator=g)
    lens = [1, 33, page_size, 5 * page_size + 3]
    tables = _tables(lens, page_size, P)
    NP = max(len(t) for t in tables) + 2  # wider than needed, like a captured graph's table
    bt = torch.tensor([t + [0] * (NP - len(t)) for t in tables], dtype=torch.int32)
    sl = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(len(lens), H * G, D, generator=g)
    q, kp, vp, bt, sl = (t.to(dev) for t in (q, kp, vp, bt, sl))
    torch.testing.assert_close(triton_paged_decode(q, kp, vp, bt, sl), naive_paged_decode(q, kp, vp, bt, lens),
                               **tol)
    bs = 16  # sparse: per kv head, an ascending list of selected 16-token blocks (-1 padded)
    idx = torch.full((len(lens), H, 4), -1, dtype=torch.int32)
    for b, L in enumerate(lens):
        nb = -(-L // bs)
        for h in range(H):
            pick = sorted({0, nb - 1, (h * 7 + b) % nb})
            idx[b, h, : len(pick)] = torch.tensor(pick)
    idx = idx.to(dev)
    torch.testing.assert_close(triton_paged_decode(q, kp, vp, bt, sl, idx, bs),
                               naive_paged_decode(q, kp, vp, bt, lens, idx, bs), **tol)
