"""The InfLLM-V2 recipe end to end, shortened: examples/train/short_dense.toml trains dense, long_sparse.toml
continues from its Hugging Face checkpoint with sparse_config on, and the sparse path really runs."""

import json
from pathlib import Path

import pytest
import torch

import longcpm.layers.attention as attention_mod
from longcpm.errors import ConfigError
from longcpm.models.checkpoint import load_model
from longcpm.train.config import load_run_config, parse_run_config
from longcpm.train.metrics import read_metrics
from longcpm.train.trainer import Trainer

from .conftest import TINY_SPARSE, tiny_run

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "train"


def test_examples_parse_as_shipped():
    short = load_run_config(EXAMPLES / "short_dense.toml")
    long = load_run_config(EXAMPLES / "long_sparse.toml")
    assert short.model.init and short.model.attention == "dense"
    assert long.model.checkpoint == short.run.out_dir + "/final"
    assert long.model.sparse_config == TINY_SPARSE and long.data.seq_len > short.data.seq_len


def test_short_dense_then_long_sparse(tmp_path, monkeypatch):
    short_out, long_out = tmp_path / "short", tmp_path / "long"
    short = load_run_config(EXAMPLES / "short_dense.toml", {
        "run.steps": 4, "run.out_dir": str(short_out), "run.progress": False, "run.save_every": 0,
        "run.eval_every": 0, "run.device": "cpu", "schedule.warmup_steps": 1, "data.seq_len": 128,
        "data.grad_accum": 1})
    Trainer(short).train()
    final = short_out / "final"
    assert "sparse_config" not in json.loads((final / "config.json").read_text())

    calls = []
    real = attention_mod.infllmv2_attention

    def spy(q, k, v, cfg, **kw):
        calls.append((q.shape[1], kw.get("cu_seqlens") is not None, q.requires_grad))
        return real(q, k, v, cfg, **kw)

    monkeypatch.setattr(attention_mod, "infllmv2_attention", spy)
    long = load_run_config(EXAMPLES / "long_sparse.toml", {
        "model.checkpoint": str(final), "run.steps": 2, "run.out_dir": str(long_out), "run.progress": False,
        "run.save_every": 0, "run.log_every": 1, "run.device": "cpu", "schedule.warmup_steps": 1, "data.seq_len": 256,
        "data.grad_accum": 1})
    t = Trainer(long)
    assert t.config.sparse_config is not None and t.config.sparse_config.to_dict().items() >= TINY_SPARSE.items()
    start = load_model(final)
    for (n, p), (_, q) in zip(start.named_parameters(), t.lm.named_parameters()):
        assert torch.equal(p, q.detach()), n  # continues from the dense checkpoint, no new parameters
    t.train()
    assert calls and all(packed and grad for _, packed, grad in calls)
    saved = json.loads((long_out / "final" / "config.json").read_text())
    assert saved["sparse_config"]["topk"] == TINY_SPARSE["topk"]
    losses = [r["loss"] for r in read_metrics(long_out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert load_model(long_out / "final").config.sparse_config is not None


@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_attention_mode_is_passed_through(tmp_path, monkeypatch, shards_dir, attention):
    calls = []
    real = attention_mod.infllmv2_attention
    monkeypatch.setattr(attention_mod, "infllmv2_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    raw = tiny_run(tmp_path / "o", shards_dir, model={"sparse_config": TINY_SPARSE, "attention": attention},
                   run={"steps": 1, "resume": False}, schedule={"warmup_steps": 0, "decay_steps": 0})
    t = Trainer(parse_run_config(raw))
    rec = t.step_on(t.packer.rows(t.global_rows))
    assert bool(calls) == (attention == "sparse") and rec["loss"] > 0


def test_dense_fraction_mixes_modes_per_step(tmp_path, monkeypatch, shards_dir):
    calls = []
    real = attention_mod.infllmv2_attention
    monkeypatch.setattr(attention_mod, "infllmv2_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    raw = tiny_run(tmp_path / "o", shards_dir, model={"sparse_config": TINY_SPARSE, "attention": "sparse",
                                                      "dense_fraction": 0.5},
                   run={"steps": 8, "resume": False}, schedule={"warmup_steps": 0, "decay_steps": 0})
    t = Trainer(parse_run_config(raw))
    modes = [t.step_attention(s) for s in range(40)]
    assert set(modes) == {"dense", "sparse"} and modes == [t.step_attention(s) for s in range(40)]
    for want in modes[:4]:
        calls.clear()
        rec = t.step_on(t.packer.rows(t.global_rows))
        assert rec["dense"] == (want == "dense") and bool(calls) == (want == "sparse")
    bad = tiny_run(tmp_path / "b", shards_dir, model={"dense_fraction": 1.5})
    with pytest.raises(ConfigError, match="dense_fraction"):
        parse_run_config(bad)


def test_needle_recipe_stages_parse_and_chain():
    """Every needle-27m stage file loads, and each continues from a stage of the same folder (its out_dir/final)."""
    folder = EXAMPLES / "needle-27m"
    runs = {p.stem: load_run_config(p) for p in sorted(folder.glob("*.toml"))}
    assert len(runs) >= 13
    outs = {r.run.out_dir + "/final" for r in runs.values()}
    for name, r in runs.items():
        assert r.run.out_dir.endswith("/" + name), name
        assert r.model.init or r.model.checkpoint in outs, (name, r.model.checkpoint)
