"""`longcpm eval` through add_eval_parser/cmd_eval (as the main CLI wires them), on a tiny random checkpoint:
its accuracy is ~0, so these check the plumbing, the held-out seeds and the one-line errors."""

import argparse
import json

import pytest

from longcpm.errors import LongcpmError
from longcpm.eval import EvalError, run_suite
from longcpm.eval.cli import add_eval_parser, parse_lengths, parse_modes, seed_range
from longcpm.train.synthetic import EVAL_SEED_START


def parse(*argv):
    p = argparse.ArgumentParser(prog="longcpm")
    add_eval_parser(p.add_subparsers(dest="command", required=True))
    return p.parse_args(["eval", *argv])


def test_argument_parsing():
    assert parse_lengths("4096, 8K,16k,4096") == [4096, 8192, 16384]
    assert parse_modes("dense,sparse") == ["dense", "sparse"] and parse_modes("auto") == ["auto"]
    assert seed_range(EVAL_SEED_START + 5, 2) == [EVAL_SEED_START + 5, EVAL_SEED_START + 6]
    a = parse("--model", "x", "--seeds", "5")
    assert (a.num_seeds, a.seed_start, a.attention, a.tasks, a.func.__name__) == (5, EVAL_SEED_START,
                                                                                   "dense,sparse", "all", "cmd_eval")
    assert parse("--model", "x", "--num-seeds", "2").num_seeds == 2


@pytest.mark.parametrize("call, match", [
    (lambda: parse_lengths("4096,abc"), "not a token count"),
    (lambda: parse_lengths("-4"), "positive"),
    (lambda: parse_lengths(","), "no lengths"),
    (lambda: parse_modes("dense,fast"), "--attention"),
    (lambda: seed_range(0, 3), "--seed-start"),
    (lambda: seed_range(EVAL_SEED_START, 0), "at least 1"),
])
def test_bad_values(call, match):
    with pytest.raises(EvalError, match=match):
        call()


@pytest.mark.parametrize("argv, match", [
    ([], "--model is required"),
    (["--model", "x", "--tasks", "passkey,nope"], "unknown task"),
    (["--model", "x", "--seed-start", "12"], "held-out|--seed-start"),
    (["--model", "x", "--lengths", "4K,x"], "token count"),
    (["--model", "x", "--max-new-tokens", "0"], "max-new-tokens"),
    (["--model", "/nonexistent/model"], "no such model folder"),
    (["--show", "/nonexistent/results.json"], "cannot read"),
])
def test_errors_are_one_line_longcpm_errors(argv, match):
    args = parse(*argv)
    with pytest.raises(LongcpmError, match=match):
        args.func(args)


def test_end_to_end_on_a_tiny_checkpoint(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "results.json"
    args = parse("--model", str(tiny_ckpt), "--tasks", "passkey", "--lengths", "300,40K", "--seeds", "1",
                 "--attention", "dense,sparse", "--device", "cpu", "--max-new-tokens", "2", "--out", str(out),
                 "--no-warmup", "--quiet")
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "| passkey" in table and "300 dense" in table and "40K sparse" in table and "skipped: length 40960" in table
    doc = json.loads(out.read_text())
    meta = doc["metadata"]
    assert meta["seeds"] == [EVAL_SEED_START] and meta["sparse_config"]["block_size"] == 16
    assert meta["sparse_config_source"] == "checkpoint" and meta["config"]["num_hidden_layers"] == 2
    assert meta["device"] == "cpu" and meta["dtype"] == "float32" and meta["versions"]["torch"]
    ran = [r for r in doc["records"] if r["accuracy"] is not None]
    assert [(r["length"], r["attention"], r["attention_used"]) for r in ran] == [(300, "dense", "dense"),
                                                                                 (300, "sparse", "sparse")]
    assert all(r["samples"] == 1 and r["accuracy"] in (0.0, 1.0) and r["prefill_ms"] > 0 for r in ran)
    assert [r["attention"] for r in doc["records"] if r["accuracy"] is None] == ["dense", "sparse"]
    # greedy and fixed seeds: the library call reproduces the CLI's replies exactly
    again = run_suite(tiny_ckpt, ["passkey"], [300], [EVAL_SEED_START], ("dense", "sparse"), max_new_tokens=2,
                      device="cpu", warmup=False, progress=False)
    assert [r["details"][0]["reply"] for r in again] == [r["details"][0]["reply"] for r in ran]
    assert [r["details"][0]["prompt_tokens"] for r in again] == [r["details"][0]["prompt_tokens"] for r in ran]
    show = parse("--show", str(out))
    assert show.func(show) == 0 and capsys.readouterr().out == table


def test_prefill_chunk_option(tiny_ckpt, tmp_path, capsys):
    """--max-num-batched-tokens reaches the engine (recorded in the metadata) and a chunked prefill gives the same
    greedy reply as one call; a bad value is a one-line error."""
    replies = []
    for chunk in ("128", "4096"):
        out = tmp_path / f"r{chunk}.json"
        args = parse("--model", str(tiny_ckpt), "--tasks", "passkey", "--lengths", "300", "--seeds", "1",
                     "--attention", "dense", "--device", "cpu", "--max-new-tokens", "3", "--out", str(out),
                     "--no-warmup", "--quiet", "--max-num-batched-tokens", chunk)
        assert args.func(args) == 0
        doc = json.loads(out.read_text())
        assert doc["metadata"]["max_num_batched_tokens"] == int(chunk)
        replies.append(doc["records"][0]["details"][0]["reply"])
    assert replies[0] == replies[1]
    capsys.readouterr()
    bad = parse("--model", str(tiny_ckpt), "--tasks", "passkey", "--lengths", "300", "--device", "cpu",
                "--max-num-batched-tokens", "0")
    with pytest.raises(LongcpmError, match="max_num_batched_tokens"):
        bad.func(bad)

