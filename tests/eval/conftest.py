"""Eval fixtures: the packaged tokenizer, an oracle fake LLM (answers from the generator itself, or wrong ones)
and one tiny random checkpoint with a small sparse_config, so that sparse attention really runs at 256 tokens."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from longcpm.assets import asset_dir
from longcpm.config import SparseConfig
from longcpm.text import load_tokenizer
from longcpm.train.synthetic import generate

SMALL_SPARSE = {"kernel_size": 8, "kernel_stride": 4, "block_size": 16, "window_size": 32, "topk": 4,
                "lse_kernel_size": 32, "lse_kernel_stride": 16, "dense_len": 300}


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(asset_dir("minicpm4-0.5b"))


class FakeLLM:
    """Enough of engine.LLM for the suite: replies with the true answer (looked up by prompt ids), or `wrong`."""

    def __init__(self, tokenizer, mode="dense", *, reply="right", max_model_len=32768, sparse=True):
        self.tokenizer, self.mode, self.reply = tokenizer, mode, reply
        self.max_model_len = max_model_len
        self.config = SimpleNamespace(sparse_config=SparseConfig(**SMALL_SPARSE) if sparse else None)
        self.engine = SimpleNamespace(config=SimpleNamespace(attention=mode))
        self.answers: dict[tuple, str] = {}
        self.calls: list[tuple[list[int], object]] = []

    def expect(self, tasks, lengths, seeds):
        for t in tasks:
            for n in lengths:
                for s in seeds:
                    try:
                        ex = generate(t, n, s, self.tokenizer)
                    except ValueError:  # below the task's minimum: the suite skips it
                        continue
                    self.answers[tuple(self.tokenizer.encode(ex.prompt))] = ex.answer
        return self

    def generate(self, ids, params):
        self.calls.append((list(ids), params))
        text = self.answers[tuple(ids)] if self.reply == "right" else self.reply
        out = SimpleNamespace(text=text, token_ids=[], finish_reason="stop")
        return [SimpleNamespace(outputs=[out], metrics=SimpleNamespace(prefill_s=0.002, decode_s=0.003,
                                                                       decode_steps=3))]


@pytest.fixture
def fake(tokenizer):
    """fake(tasks, lengths, seeds, **kw) -> factory mode -> FakeLLM (all answers precomputed); .made lists them."""

    def make(tasks, lengths, seeds, **kw):
        def factory(mode):
            llm = FakeLLM(tokenizer, mode, **kw).expect(tasks, lengths, seeds)
            factory.made.append(llm)
            return llm

        factory.made = []
        return factory

    return make


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    from longcpm.models.random import create_random_checkpoint

    return create_random_checkpoint(tmp_path_factory.mktemp("eval") / "tiny", "tiny", seed=0, dtype="float32",
                                    overrides={"sparse_config": dict(SMALL_SPARSE)})
