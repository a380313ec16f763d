"""The `longcpm` command end to end on a tiny random checkpoint, and its one-line errors for user mistakes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from longcpm.cli import main as cli

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """A real process, as a user runs it."""
    full_env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    return subprocess.run([sys.executable, "-m", "longcpm.cli.main", *args], capture_output=True, text=True,
                          input=stdin, env=full_env, timeout=300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "tiny"
    p = run("new-model", str(out), "--config", "tiny", "--layers", "2", "--dtype", "float32", "--seed", "1")
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr and "random-weight checkpoint" in p.stdout
    return out


def call(capsys, *argv: str) -> tuple[int, str, str]:
    """In process, for speed."""
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_new_model_files(model_dir):
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
            "special_tokens_map.json", "added_tokens.json"} <= names
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["hidden_size"] == 128 and cfg["vocab_size"] == 73448
    assert len(cfg["rope_scaling"]["long_factor"]) == 16  # head_dim 32 / 2


def test_generate_subprocess_greedy_is_deterministic(model_dir):
    args = ("generate", "--model", str(model_dir), "--prompt", "Hello, 世界", "--max-new-tokens", "12",
            "--temperature", "0", "--device", "cpu")
    a, b = run(*args), run(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.strip()
    assert "Traceback" not in a.stderr
    stats = a.stderr.strip().splitlines()[-1]
    assert "prompt tokens: 5" in stats and "generated tokens: 12" in stats and "tokens/s" in stats


def test_generate_in_process_options(model_dir, tmp_path, capsys):
    prompt = tmp_path / "p.txt"
    prompt.write_text("Once upon a time", encoding="utf-8")
    code, out, err = call(capsys, "generate", "--model", str(model_dir), "--prompt-file", str(prompt), "--chat",
                          "--max-new-tokens", "6", "--seed", "3", "--top-k", "20", "--temperature", "1.0")
    assert code == 0 and "generated tokens: 6" in err
    seeded = out
    assert call(capsys, "generate", "--model", str(model_dir), "--prompt-file", str(prompt), "--chat",
                "--max-new-tokens", "6", "--seed", "3", "--top-k", "20", "--temperature", "1.0")[1] == seeded
    code, out, err = call(capsys, "generate", "--model", str(model_dir), "--prompt", "x" * 40, "--attention",
                          "sparse", "--window", "64", "--topk", "2", "--dense-len", "-1", "--max-new-tokens", "3",
                          "--temperature", "0")
    assert code == 0, err


def test_info(model_dir, capsys):
    code, out, err = call(capsys, "info", str(model_dir))
    assert code == 0, err
    assert "parameters: " in out and "untied lm_head" in out
    assert "fp32" in out and "bf16" in out and "KV cache per token (bf16/fp16): 512 bytes" in out
    assert "sparse_config: none" in out and "model.safetensors" in out


def test_chat_repl(model_dir, capsys, monkeypatch):
    import io
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi there\n/reset\n\nHi there\n/exit\nnever read\n"))
    code, out, err = call(capsys, "chat", "--model", str(model_dir), "--max-new-tokens", "4", "--temperature", "0")
    assert code == 0 and "history cleared" in err
    replies = [line for line in out.split("> ") if line.strip()]
    assert len(replies) == 2 and replies[0] == replies[1]  # same prompt after /reset, greedy: same reply
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))  # EOF ends the session too
    assert call(capsys, "chat", "--model", str(model_dir), "--max-new-tokens", "2")[0] == 0


def test_keyboard_interrupt_exits_130(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_info", interrupted)
    code, out, err = call(capsys, "info", "anything")
    assert code == 130 and err == ""


def _broken_copy(model_dir: Path, dest: Path) -> Path:
    shutil.copytree(model_dir, dest)
    return dest


def _corrupt(d: Path) -> None:
    (d / "model.safetensors").write_bytes(os.urandom(4096))


def _drop_tensor(d: Path) -> None:
    t = load_file(d / "model.safetensors")
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, d / "model.safetensors")


def _wrong_shape(d: Path) -> None:
    t = load_file(d / "model.safetensors")
    t["model.norm.weight"] = t["model.norm.weight"][:-1].clone()
    save_file(t, d / "model.safetensors")


def _unknown_type(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))


def _bin_only(d: Path) -> None:
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not unpickled")


@pytest.mark.parametrize("breaker, message", [
    (_corrupt, "not a readable safetensors file"),
    (_drop_tensor, "missing tensors (1): model.layers.1.mlp.up_proj.weight"),
    (_wrong_shape, "wrong shapes (1): model.norm.weight"),
    (_unknown_type, "unknown model type 'llama'"),
    (_bin_only, "pickled weights"),
])
def test_broken_checkpoints_give_one_line(model_dir, tmp_path, capsys, breaker, message):
    d = _broken_copy(model_dir, tmp_path / "broken")
    breaker(d)
    code, out, err = call(capsys, "generate", "--model", str(d), "--prompt", "hi", "--max-new-tokens", "2")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("longcpm: error: ") and message in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (("generate", "--model", "/no/such/model", "--prompt", "hi"), "no such model folder"),
    (("info", "/no/such/model"), "no such model folder"),
    (("generate", "--model", "MODEL", "--prompt", "hi", "--top-p", "0"), "top_p"),
    (("generate", "--model", "MODEL", "--prompt-file", "/no/such/file"), "No such file"),
    (("generate", "--model", "MODEL", "--prompt", "hi", "--max-new-tokens", "99999"), "maximum model length"),
    (("generate", "--model", "MODEL", "--prompt", "hi", "--dtype", "int3"), "unknown dtype"),
    (("new-model", "OUT", "--config", "no-such-config"), "unknown config name"),
    (("new-model", "OUT", "--config", "tiny", "--heads", "3"), "num_attention_heads"),
])
def test_user_errors_give_one_line(model_dir, tmp_path, capsys, argv, message):
    argv = [str(model_dir) if a == "MODEL" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    code, out, err = call(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and err.startswith("longcpm: error: ") and message in err


def test_error_in_a_real_process_has_no_traceback(tmp_path):
    p = run("generate", "--model", str(tmp_path / "missing"), "--prompt", "hi")
    assert p.returncode == 2
    assert p.stderr.startswith("longcpm: error: ") and "Traceback" not in p.stderr and p.stdout == ""
