"""The trainer: chunked loss, exact resume (bit for bit), checkpoints, decay branching, throughput helper."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from longcpm.models.checkpoint import load_model
from longcpm.train.checkpointing import latest_checkpoint, read_state
from longcpm.train.config import parse_run_config
from longcpm.train.metrics import read_metrics
from longcpm.train.trainer import Trainer, chunked_cross_entropy, measure_throughput

from .conftest import tiny_run


def _trainer(raw, **overrides):
    for dotted, v in overrides.items():
        sec, key = dotted.split(".")
        raw[sec][key] = v
    return Trainer(parse_run_config(raw, "test.toml"))


def test_chunked_cross_entropy_matches_full(tiny_model):
    lm = tiny_model(vocab=300)
    h = torch.randn(1, 37, 64, requires_grad=True)
    y = torch.randint(0, 300, (1, 37))
    y[0, ::5] = -100
    got = chunked_cross_entropy(lm, h, y, chunk=8)
    want = F.cross_entropy(lm.logits(h).reshape(-1, 300), y.reshape(-1), ignore_index=-100, reduction="sum")
    torch.testing.assert_close(got, want)
    (g1,) = torch.autograd.grad(got, h)
    (g2,) = torch.autograd.grad(want, h)
    torch.testing.assert_close(g1, g2)


def test_exact_resume_bit_for_bit(tmp_path, shards_dir):
    straight = tmp_path / "straight"
    _trainer(tiny_run(straight, shards_dir, run={"save_every": 2})).train()
    split = tmp_path / "split"
    raw = tiny_run(split, shards_dir, run={"save_every": 2})
    # interrupted after step 5: the last checkpoint is step 4, inside the decay (steps 3..6) and mid-document
    _trainer(raw).train(stop_at=5)
    assert latest_checkpoint(split).name == "step_000004"
    assert [r["step"] for r in read_metrics(split / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5]
    t = _trainer(tiny_run(split, shards_dir, run={"save_every": 2}))
    assert t.step == 4 and t.resumed_from.name == "step_000004"
    t.train()
    a = [r for r in read_metrics(straight / "metrics.jsonl") if "loss" in r]
    b = [r for r in read_metrics(split / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [(r["loss"], r["lr"], r["grad_norm"]) for r in a] == [(r["loss"], r["lr"], r["grad_norm"]) for r in b]
    wa, wb = load_file(straight / "final" / "model.safetensors"), load_file(split / "final" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a[0]["lr"] == 0.0 and a[2]["lr"] == 0.01 and a[5]["lr"] < a[4]["lr"] < 0.01


def test_checkpoint_contents(tmp_path):
    out = tmp_path / "run"
    raw = tiny_run(out, run={"steps": 3, "save_every": 1, "keep_checkpoints": 2, "eval_every": 3, "eval_rows": 2},
                   schedule={"warmup_steps": 1})
    res = _trainer(raw).train()
    ck = latest_checkpoint(out)
    assert ck.name == "step_000003"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_000002", "step_000003"]
    assert not [p for p in out.rglob(".*tmp*")]
    state = read_state(ck)
    assert state["step"] == 3 and state["data"]["seq_len"] == 64 and state["optim_format"] == "torch"
    assert set(state["rng"]) >= {"python", "numpy", "torch"}
    model = load_model(ck)  # the HF folder the inference loader reads
    assert model.config.hidden_size == 32 and (ck / "tokenizer.model").is_file()
    assert (out / "final" / "config.json").is_file() and res["final"] == str(out / "final")
    recs = read_metrics(out / "metrics.jsonl")
    assert any("eval_loss" in r for r in recs) and "tokens_per_s" in recs[0]
    assert json.loads((out / "run_config.json").read_text())["run"]["steps"] == 3


def test_branch_decay_from_stable_checkpoint(tmp_path, shards_dir):
    trunk = tmp_path / "trunk"
    _trainer(tiny_run(trunk, shards_dir, run={"steps": 6, "save_every": 4}, schedule={"decay_steps": 0})).train()
    stable = trunk / "checkpoints" / "step_000004"
    branch = tmp_path / "branch"
    raw = tiny_run(branch, shards_dir, run={"steps": 6, "branch_from": str(stable)},
                   schedule={"decay_start": 4, "shape": "linear", "final_ratio": 0.1})
    t = _trainer(raw)
    assert t.step == 4
    assert t.opt.state_dict()["state"][0]["step"] == 4  # AdamW moments restored, not fresh
    t.train()
    tr = [r for r in read_metrics(trunk / "metrics.jsonl") if "loss" in r]
    br = [r for r in read_metrics(branch / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in br] == [5, 6]
    assert br[0]["loss"] == tr[4]["loss"]  # same weights and data at step 5; only later lrs differ
    assert br[1]["lr"] == pytest.approx(0.01 * 0.55) and tr[5]["lr"] == 0.01


def test_measure_throughput(tmp_path, shards_dir):
    raw = tiny_run(tmp_path / "tp", shards_dir)
    out = measure_throughput(parse_run_config(raw, "tp.toml"), steps=2, warmup=1)
    assert out["tokens_per_s"] > 0 and out["rows"] == 2 and out["flops_per_step"] > 0
    assert not (tmp_path / "tp" / "checkpoints").exists()


def test_activation_checkpointing_same_step(tmp_path, shards_dir):
    recs = []
    for ac in (False, True):
        t = _trainer(tiny_run(tmp_path / str(ac), shards_dir, run={"activation_checkpointing": ac, "resume": False}))
        assert t.lm.model.gradient_checkpointing is ac
        rows = t.packer.rows(t.global_rows)
        recs.append([t.step_on(rows), t.step_on(rows)])
    for a, b in zip(*recs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_flops_formula():
    from longcpm.config import SparseConfig
    from longcpm.models.random import resolve_config
    from longcpm.train.metrics import attention_pairs, matmul_params, step_flops

    cfg = resolve_config("minicpm4-0.5b")
    n, L, HQ, D = 4096, 24, 16, 64
    N = 24 * (2 * 1024 * 1024 + 2 * 1024 * 128 + 3 * 1024 * 4096) + 73448 * 1024
    assert matmul_params(cfg) == N
    assert step_flops(cfg, [n]) == 6 * N * n + 12 * L * HQ * D * n * (n + 1) / 2
    assert step_flops(cfg, [n, n]) == 2 * step_flops(cfg, [n])  # packed documents do not attend each other
    sc = SparseConfig(dense_len=1024)
    pairs, comp = attention_pairs([n], sc)
    budget = (sc.topk + sc.window_size // sc.block_size) * sc.block_size
    assert pairs == sum(min(t + 1, budget) for t in range(n)) and comp > 0
    assert attention_pairs([n], sc, "dense") == (n * (n + 1) / 2, 0.0)
    assert attention_pairs([512], sc) == (512 * 513 / 2, 0.0)  # below dense_len
