"""Built-in models: short names resolve to the shipped folder wherever a model is accepted, a local folder of the
same name wins, unknown names get an error that lists the built-ins, and the files ship as package data."""

from __future__ import annotations

import fnmatch
import sys
from pathlib import Path

import pytest

from longcpm.assets import asset_dir
from longcpm.cli import main as cli
from longcpm.errors import CheckpointError
from longcpm.models import builtin
from longcpm.models import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
NAME = "needle-27m"


def call(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_registry_points_at_shipped_files():
    assert NAME in builtin.BUILTIN_MODELS and builtin.builtin_names()[0] == NAME
    folder = builtin.builtin_path(NAME)
    assert folder == asset_dir(NAME)
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
              "tokenizer_config.json"):
        assert (folder / f).is_file(), f
    assert builtin.builtin_path("no-such-model") is None and builtin.builtin_path("openbmb/MiniCPM4-0.5B") is None
    assert all(line.split()[0] in builtin.BUILTIN_MODELS and "[files missing]" not in line
               for line in builtin.describe_builtins())


def test_resolution_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = asset_dir(NAME)
    assert builtin.resolve_model_path(NAME) == str(shipped)
    assert ckpt.resolve_model_path(NAME) == shipped
    for other in ("some/folder", "openbmb/MiniCPM4-0.5B", "./needle-27m", "tiny"):
        assert builtin.resolve_model_path(other) == other  # everything else unchanged
    assert builtin.resolve_model_path(Path("x") / "y") == str(Path("x") / "y")
    # an existing local folder with a built-in's name wins
    (tmp_path / NAME).mkdir()
    assert builtin.resolve_model_path(NAME) == NAME
    assert ckpt.resolve_model_path(NAME) == Path(NAME)


def test_unknown_name_lists_builtins():
    with pytest.raises(CheckpointError, match=r"needle-1m: no such model folder .*built-in name: needle-27m"):
        ckpt.resolve_model_path("needle-1m")


def test_missing_builtin_files_are_one_clear_error(monkeypatch):
    monkeypatch.setitem(builtin.BUILTIN_MODELS, "gone-1m", builtin.BuiltinModel("gone-1m", "not shipped"))
    with pytest.raises(CheckpointError, match="built-in model 'gone-1m': its files are missing"):
        ckpt.resolve_model_path("gone-1m")
    assert any(line.startswith("gone-1m") and "[files missing]" in line for line in builtin.describe_builtins())


def test_load_model_and_llm_by_name():
    from longcpm import LLM, SamplingParams, load_model

    m = load_model(NAME)
    assert m.config.hidden_size == 256 and m.config.sparse_config is not None and m.source_dir == asset_dir(NAME)
    llm = LLM(NAME, device="cpu", max_model_len=128)
    out = llm.generate("The pass key is", SamplingParams(temperature=0, max_tokens=3))[0]
    assert out.num_generated_tokens >= 1


def test_cli_accepts_the_name(capsys):
    code, out, err = call(capsys, "generate", "--model", NAME, "--prompt", "The pass key is", "--max-new-tokens",
                          "3", "--temperature", "0", "--device", "cpu", "--max-model-len", "128")
    assert code == 0, err
    assert "generated tokens:" in err
    code, out, err = call(capsys, "info", NAME)
    assert code == 0, err
    assert f"built-in {NAME}" in out and "sparse_config: kernel_size 32" in out and "model.safetensors" in out
    code, out, err = call(capsys, "info")
    assert code == 0 and NAME in out and "built-in models" in out
    code, out, err = call(capsys, "generate", "--model", "needle-1m", "--prompt", "hi")
    assert code == 2 and "built-in name: needle-27m" in err and err.count("\n") == 1


def test_eval_accepts_the_name(capsys):
    code, out, err = call(capsys, "eval", "--model", NAME, "--tasks", "passkey", "--lengths", "256", "--seeds", "1",
                          "--attention", "dense", "--device", "cpu", "--no-warmup", "--quiet")
    assert code == 0, err
    assert "passkey" in out and NAME in out


def test_assets_are_package_data():
    """Every file of a built-in model folder matches pyproject.toml's package-data patterns, so it ships."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["longcpm"]
    for name in builtin.BUILTIN_MODELS:
        for f in asset_dir(builtin.BUILTIN_MODELS[name].folder).iterdir():
            if f.is_file():
                assert any(fnmatch.fnmatch(f.name, p.rsplit("/", 1)[-1]) for p in patterns), f"{f.name} not shipped"
