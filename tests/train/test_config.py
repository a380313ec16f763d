"""RUN.toml parsing: defaults, overrides, and one clear ConfigError per mistake, naming the key and the file."""

import pytest

from longcpm.errors import ConfigError
from longcpm.train.config import load_run_config

from .conftest import tiny_run, write_toml


def _load(tmp_path, raw, overrides=None):
    return load_run_config(write_toml(tmp_path / "RUN.toml", raw), overrides)


def test_parses_and_overrides(tmp_path):
    cfg = _load(tmp_path, tiny_run(tmp_path / "o"), {"run.steps": 9, "schedule.shape": "cosine"})
    assert cfg.run.steps == 9 and cfg.schedule.shape == "cosine" and cfg.data.seq_len == 64
    assert cfg.data.sources[0].type == "synthetic" and cfg.data.sources[0].tasks == ["passkey"]
    assert cfg.wsd().total_steps == 9 and cfg.optim.betas == [0.9, 0.95]


@pytest.mark.parametrize("mutate, match", [
    (lambda r: r["run"].update(stepz=3), r"unknown key 'run.stepz'"),
    (lambda r: r.update(trainer={"x": 1}), r"unknown section 'trainer'"),
    (lambda r: r["data"]["sources"][0].update(lenght=3), r"unknown key 'data.sources\[0\].lenght'"),
    (lambda r: r["optim"].update(lr="fast"), r"key 'optim.lr' must be float"),
    (lambda r: r["run"].update(steps=2.5), r"key 'run.steps' must be int"),
    (lambda r: r["model"].update(attention="flash"), r"key 'model.attention' must be one of"),
    (lambda r: r["model"].update(checkpoint="x"), r"exactly one of 'init'"),
    (lambda r: r["data"].update(sources=[]), r"no data"),
    (lambda r: r["data"]["sources"][0].update(type="web"), r"data.sources\[0\].type' must be one of"),
    (lambda r: r["data"]["sources"][0].update(tasks=["qa"]), r"unknown tasks \['qa'\]"),
    (lambda r: r["data"].update(seq_len=0), r"'data.seq_len' must be >= 1"),
    (lambda r: r["schedule"].update(warmup_steps=5, decay_fraction=0.9), r"\[schedule\]: WSD decay starts"),
    (lambda r: r["model"].update(sparse_config="on"), r"'model.sparse_config' must be a table or false"),
    (lambda r: r["optim"].update(betas=[0.9]), r"'optim.betas' must be two numbers"),
    (lambda r: r["data"]["sources"][0].update(prompt_labels=2.0, loss="answer"), r"prompt_labels' must be in"),
    (lambda r: r["data"]["sources"][0].update(prompt_labels=0.1, loss="all"), r"needs loss = \"answer\""),
])
def test_errors_name_key_and_file(tmp_path, mutate, match):
    raw = tiny_run(tmp_path / "o")
    mutate(raw)
    with pytest.raises(ConfigError, match=match) as e:
        _load(tmp_path, raw)
    assert "RUN.toml" in str(e.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such run file"):
        load_run_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nsteps = 1\n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_run_config(bad)


def test_bad_sparse_config_and_seed_at_build(tmp_path):
    from longcpm.train.trainer import Trainer
    raw = tiny_run(tmp_path / "o", model={"sparse_config": {"kernel_size": 8, "kernel_stride": 3}})
    with pytest.raises(ConfigError, match="block_size"):
        Trainer(_load(tmp_path, raw))
    raw = tiny_run(tmp_path / "o")
    raw["data"]["sources"][0]["seed"] = 10**6
    with pytest.raises(ConfigError, match=r"data.sources\[0\].*reserved for evaluation"):
        Trainer(_load(tmp_path, raw))


def test_overrides_index_arrays_of_tables():
    from longcpm.train.config import apply_overrides
    raw = {"data": {"sources": [{"type": "synthetic", "max_len": 64}, {"type": "shards"}]}, "run": {"steps": 3}}
    out = apply_overrides(raw, {"data.sources.0.max_len": 512, "data.sources.1.weight": 2.0, "run.steps": 9,
                                "model.attention": "sparse"})
    assert out["data"]["sources"][0]["max_len"] == 512 and out["data"]["sources"][1]["weight"] == 2.0
    assert out["run"]["steps"] == 9 and out["model"]["attention"] == "sparse"
    assert raw["data"]["sources"][0]["max_len"] == 64  # the input is not modified
    for bad in ("data.sources.2.max_len", "data.sources.x.max_len", "run.steps.x"):
        with pytest.raises(ConfigError, match="override"):
            apply_overrides(raw, {bad: 1})
