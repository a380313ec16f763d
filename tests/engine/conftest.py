"""Engine tests: a tiny random checkpoint (real tokenizer, fp32, CPU) and reference outputs from LLM.generate.
Triton kernels run through the interpreter when there is no GPU; that must be set before triton is imported."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from longcpm.engine import LLM, BatchGenerator, LLMEngine, Request, SamplingParams  # noqa: E402
from longcpm.models.random import create_random_checkpoint  # noqa: E402

SPARSE = {"kernel_size": 32, "kernel_stride": 16, "block_size": 64, "init_blocks": 1, "window_size": 64, "topk": 2,
          "dense_len": -1}


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    return create_random_checkpoint(tmp_path_factory.mktemp("engine-tiny"), "tiny", seed=3, dtype="float32")


@pytest.fixture(scope="session")
def llm(ckpt):
    return LLM(ckpt, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def sparse_llm(ckpt):
    return LLM(ckpt, device="cpu", dtype="float32", attention="sparse", sparse_config=SPARSE)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def reference(llm: LLM, prompt_ids: list[int], params: SamplingParams, attention: str = "auto") -> list[int]:
    """The single-request output of the static-batch generator (the ground truth for the engine)."""
    gen = BatchGenerator(llm.model, llm.tokenizer, attention=attention)
    return gen.run([Request(None, list(prompt_ids), params)])[0].outputs[0].token_ids


def make_engine(llm: LLM, **kw) -> LLMEngine:
    kw.setdefault("page_size", 16)
    kw.setdefault("kv_cache_tokens", 4096)
    return LLMEngine(llm.model, llm.tokenizer, attention=kw.pop("attention", "auto"), **kw)


def drain(engine: LLMEngine, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]] | None = None,
          max_steps: int = 10_000) -> dict[str, list[int]]:
    """Step until idle; arrivals[k] are added before step k. Returns the generated ids per request."""
    arrivals = dict(arrivals or {})
    out: dict[str, list[int]] = {}
    step = 0
    while engine.has_unfinished() or arrivals:
        for rid, ids, sp in arrivals.pop(step, []):
            engine.add_request(rid, ids, sp)
            out[rid] = []
        for d in engine.step():
            out.setdefault(d.request_id, []).extend(d.token_ids)
        step += 1
        assert step < max_steps, "engine did not finish"
    return out


def prompt_ids(llm: LLM, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(100, 70000, (n - 1,), generator=g).tolist()
