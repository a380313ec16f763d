"""Model-level InfLLM-V2: cached decode equals a fresh prefill, the dense/sparse switch sits exactly at dense_len,
and a budget covering every block equals dense (CPU, reference backend)."""

from dataclasses import replace

import pytest
import torch

from longcpm.config import ModelConfig, SparseConfig
from longcpm.models.checkpoint import build_model

SMALL = SparseConfig(kernel_size=8, kernel_stride=4, block_size=16, window_size=32, topk=3, init_blocks=1,
                     lse_kernel_size=32, lse_kernel_stride=16, dense_len=-1)


def tiny(sparse: SparseConfig | None) -> torch.nn.Module:
    cfg = ModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=300, head_dim=16, scale_emb=12, scale_depth=1.4,
                      dim_model_base=16, max_position_embeddings=4096, sparse_config=sparse)
    m = build_model(cfg, "cpu")
    m.init_weights(seed=0)
    return m.eval()


@torch.no_grad()
def test_cached_sparse_decode_equals_fresh_prefill():
    m = tiny(SMALL)
    ids = torch.randint(0, 300, (2, 150), generator=torch.Generator().manual_seed(0))
    cache = m.new_cache(2, 160)
    lens = [120, 97]
    prompt = torch.zeros(2, 120, dtype=torch.long)
    prompt[0], prompt[1, :97] = ids[0, :120], ids[1, :97]
    m(prompt, cache=cache, new_lens=lens, attention="sparse")
    for step in range(25):
        tok = torch.stack([ids[0, lens[0]], ids[1, lens[1]]])[:, None]
        got = m(tok, cache=cache, attention="sparse", last_only=True)
        lens = [n + 1 for n in lens]
        for b in range(2):
            want = m(ids[b: b + 1, :lens[b]], attention="sparse")[0, -1]
            torch.testing.assert_close(got[b], want, rtol=1e-4, atol=1e-4, msg=f"step {step} row {b}")


@torch.no_grad()
def test_sparse_actually_differs_from_dense_late_in_the_sequence():
    m = tiny(SMALL)
    ids = torch.randint(0, 300, (1, 150), generator=torch.Generator().manual_seed(1))
    s = m(ids, attention="sparse")
    d = m(ids, attention="dense")
    # v2: a token at position p < budget*block = (3 + 2) * 16 = 80 selects every past block: sparse == dense
    torch.testing.assert_close(s[0, :80], d[0, :80], rtol=1e-4, atol=1e-4)
    assert (s[0, 100:] - d[0, 100:]).abs().max() > 1e-3


@torch.no_grad()
def test_switch_happens_exactly_at_dense_len():
    m = tiny(replace(SMALL, dense_len=130))
    ids = torch.randint(0, 300, (1, 130), generator=torch.Generator().manual_seed(2))
    below = m(ids[:, :129])
    assert torch.equal(below, m(ids[:, :129], attention="dense"))
    at = m(ids)
    torch.testing.assert_close(at, m(ids, attention="sparse"))
    assert (at[0, -1] - m(ids, attention="dense")[0, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["v1", "v2"])
@torch.no_grad()
def test_budget_covering_every_block_equals_dense(variant):
    m = tiny(replace(SMALL, topk=40, variant=variant))
    ids = torch.randint(0, 300, (2, 140), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(m(ids, attention="sparse"), m(ids, attention="dense"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attention", ["dense", "sparse", "auto"])
@torch.no_grad()
def test_packed_documents_equal_separate_runs(attention):
    m = tiny(replace(SMALL, dense_len=100))
    lens = [40, 130, 7]
    ids = torch.randint(0, 300, (1, sum(lens)), generator=torch.Generator().manual_seed(4))
    cu = torch.tensor([0, 40, 170, 177], dtype=torch.int32)
    packed = m(ids, cu_seqlens=cu, attention=attention)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        torch.testing.assert_close(packed[:, s:e], m(ids[:, s:e], attention=attention), rtol=1e-4, atol=1e-4)


def test_packed_documents_backward_reaches_every_weight():
    m = tiny(replace(SMALL, dense_len=-1)).train()
    for p in m.parameters():
        p.requires_grad_(True)
    ids = torch.randint(0, 300, (1, 150), generator=torch.Generator().manual_seed(5))
    cu = torch.tensor([0, 120, 150], dtype=torch.int32)
    loss = torch.nn.functional.cross_entropy(m(ids, cu_seqlens=cu)[0, :-1], ids[0, 1:])
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_cuda_triton_model_matches_reference_and_decode_matches_prefill(monkeypatch):
    """fp32 on the GPU: the Triton path (selection + stage 2 + graph-safe decode with the incremental c1/c2 cache)
    against the PyTorch reference, at model level, with the published block sizes scaled down to a short test."""
    sc = SparseConfig(kernel_size=32, kernel_stride=16, block_size=64, window_size=128, topk=4, init_blocks=1,
                      dense_len=-1)
    m = tiny(sc).cuda()
    ids = torch.randint(0, 300, (1, 900), generator=torch.Generator().manual_seed(6)).cuda()
    fast = m(ids, attention="sparse")
    monkeypatch.setenv("LONGCPM_BACKEND", "naive")
    ref = m(ids, attention="sparse")
    monkeypatch.delenv("LONGCPM_BACKEND")
    rows_ok = ((fast - ref).abs().amax(-1) <= 1e-3 * ref.abs().amax(-1)).float().mean()
    assert rows_ok >= 0.99, f"only {rows_ok:.3f} of rows match the reference"
    cache = m.new_cache(1, 900)
    m(ids[:, :800], cache=cache, attention="sparse")
    for t in range(800, 900):
        got = m(ids[:, t: t + 1], cache=cache, attention="sparse")[0, -1]
        torch.testing.assert_close(got, fast[0, t], rtol=2e-3, atol=2e-3)
