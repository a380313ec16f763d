"""The engine on CUDA: CUDA-graph decode equals eager decode, the Triton paged kernel equals the reference in
bf16, and sparse attention through the paged pool equals the contiguous cache. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from longcpm.engine import LLM, EngineConfig, LLMEngine

from .conftest import SPARSE, drain, greedy, prompt_ids, reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def gpu_llm(ckpt):
    return LLM(ckpt, device="cuda", dtype="float32", kv_cache_tokens=8192)


def _engine(llm, **kw):
    return LLMEngine(llm.model, llm.tokenizer, EngineConfig(kv_cache_tokens=8192, max_num_seqs=8, **kw))


def test_graph_decode_equals_eager_decode(gpu_llm):
    prompts = [prompt_ids(gpu_llm, n, seed=i) for i, n in enumerate([5, 70, 33, 130, 9])]
    sp = greedy(12)
    want = [reference(gpu_llm, p, sp) for p in prompts]
    outs = {}
    for graphs in (False, True):
        eng = _engine(gpu_llm, cuda_graphs=graphs, max_num_batched_tokens=64)
        got = drain(eng, {0: [(f"r{i}", p, sp) for i, p in enumerate(prompts[:3])],
                          3: [(f"r{i}", p, sp) for i, p in enumerate(prompts[3:], 3)]})
        outs[graphs] = [got[f"r{i}"] for i in range(len(prompts))]
        if graphs:
            assert eng.runner.graphs.graphs, "no decode step was captured"
    assert outs[True] == outs[False] == want


def test_triton_paged_decode_bf16():
    from longcpm.ops.paged.decode import triton_paged_decode
    from longcpm.ops.paged.naive import naive_paged_decode

    P, PS, H, G, D = 128, 64, 2, 16, 128
    kp = torch.randn(P, PS, H, D, device="cuda", dtype=torch.bfloat16)
    vp = torch.randn_like(kp)
    lens = [1, 100, 4096 - 7, 640]
    # disjoint pages (page 0 is scratch) and every row's table covers its whole length
    perm = (torch.randperm(P - 1) + 1).tolist()
    rows = []
    for L in lens:
        n = -(-L // PS)
        assert len(perm) >= n
        rows.append(perm[:n])
        perm = perm[n:]
    NP = max(len(r) for r in rows)
    bt = torch.tensor([r + [0] * (NP - len(r)) for r in rows], dtype=torch.int32, device="cuda")
    q = torch.randn(len(lens), H * G, D, device="cuda", dtype=torch.bfloat16)
    got = triton_paged_decode(q, kp, vp, bt, torch.tensor(lens, dtype=torch.int32, device="cuda"))
    ref = naive_paged_decode(q.float(), kp.float(), vp.float(), bt, lens)
    torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2)


def test_sparse_engine_on_cuda_equals_contiguous(ckpt):
    llm = LLM(ckpt, device="cuda", dtype="float32", attention="sparse", sparse_config=SPARSE, kv_cache_tokens=8192)
    prompts = [list(range(1000, 1400)), prompt_ids(llm, 300, seed=3)]
    sp = greedy(8)
    want = [reference(llm, p, sp, attention="sparse") for p in prompts]
    for graphs in (False, True):
        eng = _engine(llm, attention="sparse", cuda_graphs=graphs, max_num_batched_tokens=128)
        got = drain(eng, {0: [("a", prompts[0], sp), ("b", prompts[1], sp)]})
        assert [got["a"], got["b"]] == want
