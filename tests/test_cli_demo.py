"""`longcpm demo`: the built-in needle-27m model finds a pass key hidden in a long document, dense and sparse."""

from __future__ import annotations

import re

import pytest

from longcpm.cli import main as cli
from longcpm.config import ModelConfig
from longcpm.models.builtin import builtin_path
from longcpm.train.synthetic import EVAL_SEED_START


def call(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


LINE = re.compile(r"^(dense|sparse) +answer: (.*?) +(correct|WRONG) +(\d+\.\d) s")


def lines(out: str) -> dict[str, tuple[str, str, float, str]]:
    """mode -> (answer, verdict, seconds, rest of the line)."""
    found = {}
    for line in out.splitlines():
        m = LINE.match(line)
        if m:
            found[m[1]] = (m[2], m[3], float(m[4]), line[m.end():])
    return found


def test_demo_runs_both_modes(capsys):
    code, out, err = call(capsys, "demo", "--length", "512", "--device", "cpu")
    assert code == 0, err  # a wrong answer still exits 0 (the stand-in weights may be random)
    head, key_line = out.splitlines()[:2]
    sc = ModelConfig.from_file(builtin_path("needle-27m") / "config.json").sparse_config
    assert head.startswith(f"needle-27m (27.5M params, InfLLM-V2 topk {sc.topk} x {sc.block_size} + window "
                           f"{sc.window_size}), passkey at ")
    assert head.endswith(" tokens, cpu")
    assert re.match(r"hidden pass key: \d{5} \(at \d+% of the document\)$", key_line)
    found = lines(out)
    assert set(found) == {"dense", "sparse"}
    assert re.search(r"\(\d+\.\dx (faster|slower) than dense\)", found["sparse"][3])


def test_demo_one_mode_and_options(capsys):
    code, out, err = call(capsys, "demo", "--length", "256", "--device", "cpu", "--attention", "dense",
                          "--seed", str(EVAL_SEED_START + 7))
    assert code == 0, err
    assert set(lines(out)) == {"dense"} and "than dense" not in out


@pytest.mark.parametrize("argv, message", [
    (("--seed", "5"), f"held-out range >= {EVAL_SEED_START}"),
    (("--length", "10"), "below the task's minimum"),
    (("--length", "10000000"), "exceeds the model's max_position_embeddings"),
    (("--model", "needle-1m"), "built-in name: needle-27m"),
])
def test_demo_user_errors(capsys, argv, message):
    code, out, err = call(capsys, "demo", "--device", "cpu", *argv)
    assert code == 2 and err.startswith("longcpm: error: ") and err.count("\n") == 1 and message in err


@pytest.mark.parametrize("seed", ["1000000", "1000001", "1000002"])
def test_demo_finds_the_pass_key(capsys, seed):
    """The trained needle-27m finds held-out pass keys in both modes (2,048 tokens: sparse from 1 init block,
    top-k and the 512-token window out of 32 blocks)."""
    code, out, err = call(capsys, "demo", "--length", "2048", "--device", "cpu", "--seed", seed)
    found = lines(out)
    key = re.search(r"hidden pass key: (\d+)", out)[1]
    assert code == 0 and set(found) == {"dense", "sparse"}
    for mode, (answer, verdict, _, _) in found.items():
        assert (answer, verdict) == (key, "correct"), f"{mode}: {out}"
