"""LLMEngine on a tiny random checkpoint: continuous batching, chunked prefill, prefix reuse, preemption, abort,
validation and sparse attention all give the single-request outputs of the static generator, token for token."""

from __future__ import annotations

import pytest

from longcpm.engine import SamplingParams
from longcpm.engine.cuda_graph import DecodeGraphs
from longcpm.errors import RequestError

from .conftest import SPARSE, drain, greedy, make_engine, prompt_ids, reference

LENS = [3, 40, 17, 90, 8, 55]
MAX_NEW = [12, 5, 20, 9, 16, 7]


@pytest.fixture(scope="module")
def cases(llm):
    """(prompt ids, params, reference output) of mixed lengths."""
    out = []
    for i, (n, m) in enumerate(zip(LENS, MAX_NEW)):
        ids, sp = prompt_ids(llm, n, seed=i), greedy(m)
        out.append((ids, sp, reference(llm, ids, sp)))
    return out


def test_staggered_arrivals_equal_single_requests(llm, cases):
    eng = make_engine(llm, max_num_seqs=4, max_num_batched_tokens=64)
    arrivals: dict[int, list] = {}
    for i, (k, (ids, sp, _)) in enumerate(zip((0, 0, 2, 3, 7, 11), cases)):
        arrivals.setdefault(k, []).append((f"r{i}", ids, sp))
    got = drain(eng, arrivals)
    assert [got[f"r{i}"] for i in range(len(cases))] == [want for *_, want in cases]
    assert eng.blocks.num_free == eng.blocks.num_pages - 1  # everything was given back


@pytest.mark.parametrize("budget", [1, 7, 33])
def test_chunked_prefill_equals_unchunked(llm, cases, budget):
    eng = make_engine(llm, max_num_batched_tokens=budget, enable_prefix_caching=False)
    got = drain(eng, {0: [(f"r{i}", ids, sp) for i, (ids, sp, _) in enumerate(cases)]})
    assert [got[f"r{i}"] for i in range(len(cases))] == [want for *_, want in cases]


def test_prefix_reuse_shares_pages_and_keeps_outputs(llm):
    shared = prompt_ids(llm, 70, seed=100)  # 4 full pages of 16 + 6 tokens
    prompts = [shared + prompt_ids(llm, 9, seed=101)[1:], shared + prompt_ids(llm, 20, seed=102)[1:], list(shared)]
    sp = greedy(6)
    want = [reference(llm, p, sp) for p in prompts]
    eng = make_engine(llm)
    got = drain(eng, {0: [("a", prompts[0], sp)]})  # the first request publishes its pages...
    assert eng.blocks.reused_tokens == 0
    got.update(drain(eng, {0: [("b", prompts[1], sp), ("c", prompts[2], sp)]}))  # ...the next two map them
    assert eng.blocks.reused_tokens == 2 * 64
    assert [got[k] for k in "abc"] == want


def test_prefix_pages_shared_while_running(llm):
    shared = prompt_ids(llm, 64, seed=7)
    eng = make_engine(llm)
    eng.add_request("a", shared + [5, 6, 7], greedy(30))
    for _ in range(3):
        eng.step()
    seq_b = eng.add_request("b", shared + [9, 9], greedy(3))
    eng.step()
    seq_a = eng.requests["a"]
    assert seq_b.block_table[:4] == seq_a.block_table[:4]  # the same physical pages
    assert all(eng.blocks.ref[p] == 2 for p in seq_a.block_table[:4])
    drain(eng)
    assert eng.blocks.num_free == eng.blocks.num_pages - 1


def test_preemption_under_tiny_pool_completes_identically(llm, cases):
    # 10 pages of 16 tokens: the longest request alone needs 7, so several must be recomputed
    eng = make_engine(llm, kv_cache_tokens=160, max_num_seqs=6, max_num_batched_tokens=48)
    got = drain(eng, {0: [(f"r{i}", ids, sp) for i, (ids, sp, _) in enumerate(cases)]})
    assert eng.scheduler.num_preemptions > 0
    assert [got[f"r{i}"] for i in range(len(cases))] == [want for *_, want in cases]
    assert eng.blocks.num_free == eng.blocks.num_pages - 1


def test_seeded_sampling_equals_static_generator(llm, cases):
    sps = [SamplingParams(temperature=0.9, top_p=0.9, top_k=50, max_tokens=8, seed=i, ignore_eos=True)
           for i in range(3)]
    want = [reference(llm, ids, sp) for (ids, *_), sp in zip(cases, sps)]
    eng = make_engine(llm, max_num_batched_tokens=16)
    got = drain(eng, {0: [("s0", cases[0][0], sps[0])], 1: [("s1", cases[1][0], sps[1]), ("s2", cases[2][0], sps[2])]})
    assert [got[f"s{i}"] for i in range(3)] == want


def test_requests_that_cannot_fit_are_refused_at_submission(llm):
    eng = make_engine(llm, kv_cache_tokens=160, max_model_len=300)
    with pytest.raises(RequestError, match="maximum model length 300"):
        eng.add_request("a", [1] * 290, greedy(20))
    with pytest.raises(RequestError, match="can never fit the KV cache"):
        eng.add_request("b", [1] * 150, greedy(20))
    with pytest.raises(RequestError, match="empty"):
        eng.add_request("c", [], greedy(2))
    with pytest.raises(RequestError, match="token ids"):
        eng.add_request("d", [1, 10**7], greedy(2))
    eng.add_request("e", [1] * 100, greedy(61))  # 160 tokens of cache: exactly fits
    with pytest.raises(RequestError, match="already running"):
        eng.add_request("e", [1, 2], greedy(2))
    assert not eng.scheduler.running and len(eng.scheduler.waiting) == 1


def test_abort_frees_pages_immediately(llm):
    eng = make_engine(llm)
    eng.add_request("a", prompt_ids(llm, 50, seed=1), greedy(40))
    eng.add_request("b", prompt_ids(llm, 20, seed=2), greedy(40))
    for _ in range(3):
        eng.step()
    before = eng.blocks.num_free
    held = len(eng.requests["a"].block_table)
    assert eng.abort("a") and not eng.abort("a") and not eng.abort("nope")
    assert eng.blocks.num_free == before + held
    eng.add_request("w", prompt_ids(llm, 5, seed=3), greedy(2))
    assert eng.abort("w")  # a waiting request too
    out = drain(eng)
    assert set(out) == {"b"} and eng.blocks.num_free == eng.blocks.num_pages - 1


def test_stop_conditions_match_static_generator(llm):
    ids = prompt_ids(llm, 12, seed=5)
    full = reference(llm, ids, greedy(16))
    target = full[5]
    sp = SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[target])
    eng = make_engine(llm)
    eng.add_request("a", ids, sp)
    deltas = []
    while eng.has_unfinished():
        deltas += eng.step()
    assert [t for d in deltas for t in d.token_ids] == full[: full.index(target) + 1]
    assert deltas[-1].finished and deltas[-1].finish_reason == "stop"
    assert deltas[-1].completion_tokens == full.index(target) + 1 and deltas[-1].prompt_tokens == len(ids)


def test_sparse_attention_through_engine_equals_static_generator(sparse_llm):
    prompts = [list(range(1000, 1160)), list(range(2000, 2300)), prompt_ids(sparse_llm, 70, seed=9)]
    sp = greedy(6)
    want = [reference(sparse_llm, p, sp, attention="sparse") for p in prompts]
    eng = make_engine(sparse_llm, attention="sparse", page_size=64, max_num_batched_tokens=100)
    got = drain(eng, {0: [("a", prompts[0], sp)], 2: [("b", prompts[1], sp), ("c", prompts[2], sp)]})
    assert [got[k] for k in "abc"] == want


def test_auto_attention_switches_per_sequence(ckpt):
    """attention="auto": each sequence turns sparse when its own length reaches dense_len, in the same batch as
    sequences that are still dense (and one crosses the threshold while decoding)."""
    from longcpm.engine import LLM

    llm = LLM(ckpt, device="cpu", dtype="float32", sparse_config=dict(SPARSE, dense_len=200))
    prompts = [prompt_ids(llm, 60, seed=20), prompt_ids(llm, 196, seed=21), list(range(3000, 3260))]
    sp = greedy(8)
    want = [reference(llm, p, sp) for p in prompts]
    eng = make_engine(llm, page_size=64)
    got = drain(eng, {0: [("a", prompts[0], sp), ("b", prompts[1], sp)], 1: [("c", prompts[2], sp)]})
    assert [got[k] for k in "abc"] == want


def test_token_budget_smaller_than_batch_rotates(llm):
    """Up to six decoding sequences and a budget of two tokens per step: each gets a token every <= 3 steps."""
    small = [(ids, greedy(6)) for ids in (prompt_ids(llm, 2 + i % 3, seed=60 + i) for i in range(6))]
    want = [reference(llm, ids, sp) for ids, sp in small]
    eng = make_engine(llm, max_num_batched_tokens=2)
    for i, (ids, sp) in enumerate(small):
        eng.add_request(f"r{i}", ids, sp)
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(len(small))}
    last: dict[str, int] = {}
    step = 0
    while eng.has_unfinished():
        step += 1
        for d in eng.step():
            got[d.request_id] += d.token_ids
            assert step - last.get(d.request_id, step - 1) <= 3
            last[d.request_id] = step
    assert [got[f"r{i}"] for i in range(len(small))] == want


class _EagerGraphs(DecodeGraphs):
    """DecodeGraphs with an eager stand-in for CUDA graph capture: the static buffers, bucket padding and scratch
    page logic run on CPU exactly as they feed a real graph."""

    def record(self, fn):
        out = fn()
        return (lambda: out.copy_(fn())), out


@pytest.mark.parametrize("sparse", [False, True])
def test_decode_graph_buffers_on_cpu(llm, sparse_llm, sparse):
    src = sparse_llm if sparse else llm
    prompts = [prompt_ids(src, n, seed=80 + i) for i, n in enumerate([70, 5, 130])]
    sp = greedy(10)
    want = [reference(src, p, sp, attention="sparse" if sparse else "auto") for p in prompts]
    eng = make_engine(src, page_size=64, attention="sparse" if sparse else "auto", max_num_seqs=6)
    r = eng.runner
    r.graphs = _EagerGraphs(r, 6, r.max_pages)
    got = drain(eng, {0: [("a", prompts[0], sp), ("b", prompts[1], sp)], 4: [("c", prompts[2], sp)]})
    assert [got[k] for k in "abc"] == want
    assert {bs for bs, _ in r.graphs.graphs} >= {2, 4}  # 2 rows, then 3 rows padded to the bucket of 4
