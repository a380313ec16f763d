"""run_suite plumbing with an oracle fake LLM: scoring end to end, record shape, skips, held-out seeds, bad
arguments, and determinism of the generated prompts."""

import pytest

from longcpm.errors import LongcpmError
from longcpm.eval import EvalError, resolve_tasks, run_suite
from longcpm.eval.suite import ANSWER_MARGIN, mode_used
from longcpm.train.synthetic import EVAL_SEED_START, TASKS

SEEDS = [EVAL_SEED_START, EVAL_SEED_START + 1]
KEYS = {"model", "task", "length", "attention", "accuracy", "samples"}


def run(factory, tasks=TASKS, lengths=(300,), **kw):
    return run_suite(factory, tasks, lengths, SEEDS, progress=False, **kw)


def test_right_answers_score_one_and_wrong_zero(fake):
    recs = run(fake(TASKS, [300], SEEDS), attention_modes=("dense", "sparse"))
    assert [(r["task"], r["attention"]) for r in recs] == [(t, m) for t in TASKS for m in ("dense", "sparse")]
    assert all(r["accuracy"] == 1.0 and r["samples"] == 2 and r["partial"] == 1.0 for r in recs)
    wrong = run(fake(TASKS, [300], SEEDS, reply=" 0."), attention_modes=("dense",))
    assert all(r["accuracy"] == 0.0 and r["correct"] == 0 for r in wrong)


def test_record_shape_and_details(fake):
    factory = fake(["passkey"], [300], SEEDS)
    (rec,) = run(factory, ["passkey"], attention_modes="sparse", model_name="m")
    assert KEYS <= set(rec) and rec["model"] == "m" and rec["attention"] == "sparse"
    assert rec["attention_used"] == "sparse" and rec["prefill_ms"] == 2.0
    assert [d["seed"] for d in rec["details"]] == SEEDS
    d = rec["details"][0]
    assert d["correct"] is True and d["reply"].strip().rstrip(".").isdigit() and d["decode_ms_per_token"] == 1.0
    assert d["prompt_tokens"] < 300


def test_prompts_are_token_ids_with_one_bos_within_length_greedy(fake, tokenizer):
    factory = fake(TASKS, [300, 600], SEEDS)
    run(factory, lengths=(300, 600), attention_modes=("dense",), warmup=False)
    (llm,) = factory.made
    assert len(llm.calls) == len(TASKS) * 2 * len(SEEDS)
    for ids, params in llm.calls:
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
        assert len(ids) + 2 <= 600 and params.temperature == 0
        answer = llm.answers[tuple(ids)]
        assert params.max_tokens == len(tokenizer.encode(answer, add_special_tokens=False)) + ANSWER_MARGIN


def test_deterministic_prompts_and_records(fake):
    a, b = fake(TASKS, [300], SEEDS), fake(TASKS, [300], SEEDS)
    ra, rb = run(a, attention_modes="dense", warmup=False), run(b, attention_modes="dense", warmup=False)
    assert [c[0] for c in a.made[0].calls] == [c[0] for c in b.made[0].calls]
    assert ra == rb
    other = fake(["passkey"], [300], [EVAL_SEED_START + 7])
    run_suite(other, ["passkey"], [300], [EVAL_SEED_START + 7], "dense", progress=False, warmup=False)
    assert other.made[0].calls[0][0] != a.made[0].calls[0][0]


def test_warmup_runs_once_per_mode_untimed(fake):
    factory = fake(["passkey"], [300], SEEDS)
    recs = run(factory, ["passkey"], attention_modes=("dense", "sparse"), max_new_tokens=3)
    assert [len(llm.calls) for llm in factory.made] == [3, 3]
    assert all(r["samples"] == 2 for r in recs) and factory.made[0].calls[0][1].max_tokens == 3


def test_too_long_and_too_short_lengths_are_skip_records(fake):
    factory = fake(["passkey", "common_words"], [120, 300], SEEDS, max_model_len=1000)  # common_words: >= 141
    recs = run(factory, ["passkey", "common_words"], lengths=(120, 300, 4096), attention_modes=("dense", "sparse"))
    assert len(recs) == 2 * 3 * 2
    by = {(r["task"], r["length"], r["attention"]): r for r in recs}
    assert by["passkey", 300, "dense"]["accuracy"] == 1.0
    long = by["passkey", 4096, "sparse"]
    assert long["accuracy"] is None and long["samples"] == 0 and "max_model_len 1000" in long["skipped"]
    assert by["passkey", 120, "sparse"]["accuracy"] == 1.0
    short = by["common_words", 120, "dense"]
    assert short["accuracy"] is None and "minimum" in short["skipped"]


def test_no_sparse_config_reports_dense_used(fake):
    (rec,) = run(fake(["passkey"], [300], SEEDS, sparse=False), ["passkey"], attention_modes="sparse")
    assert rec["attention"] == "sparse" and rec["attention_used"] == "dense"


def test_mode_used(fake):
    from longcpm.config import SparseConfig

    sc = SparseConfig(dense_len=1000)
    assert mode_used("auto", sc, 999) == "dense" and mode_used("auto", sc, 1000) == "sparse"
    assert mode_used("sparse", sc, 10) == "sparse" and mode_used("sparse", None, 10) == "dense"
    assert mode_used("dense", sc, 10**6) == "dense"


def test_held_out_seeds_enforced(fake):
    factory = fake(["passkey"], [300], SEEDS)
    for seeds in ([0], [EVAL_SEED_START - 1, EVAL_SEED_START], [], [1.5e6]):
        with pytest.raises(EvalError, match="seed"):
            run_suite(factory, ["passkey"], [300], seeds, progress=False)
    assert not factory.made  # refused before any model was built


@pytest.mark.parametrize("kw, match", [
    ({"tasks": ["passkey", "bogus"]}, "unknown task"),
    ({"tasks": []}, "no tasks"),
    ({"lengths": [0]}, "lengths"),
    ({"lengths": ["4K"]}, "lengths"),
    ({"attention_modes": ("dense", "fast")}, "attention modes"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
])
def test_bad_arguments(fake, kw, match):
    args = {"tasks": ["passkey"], "lengths": [300], **kw}
    with pytest.raises(EvalError, match=match) as e:
        run_suite(fake(["passkey"], [300], SEEDS), seeds=SEEDS, progress=False, **args)
    assert isinstance(e.value, LongcpmError)


def test_task_aliases():
    assert resolve_tasks("passkey,multikey,multivalue,vt,cwe") == list(TASKS)
    assert resolve_tasks("all") == list(TASKS) and resolve_tasks(["niah-multikey", "MultiKey"]) == ["niah_multikey"]


def test_a_loaded_llm_runs_only_its_own_mode(tokenizer):
    from .conftest import FakeLLM

    llm = FakeLLM(tokenizer, "sparse").expect(["passkey"], [300], SEEDS)
    (rec,) = run(llm, ["passkey"], attention_modes=("sparse",))
    assert rec["accuracy"] == 1.0 and rec["attention"] == "sparse"
    for modes in (("dense",), ("dense", "sparse")):
        with pytest.raises(EvalError, match="built with"):
            run(llm, ["passkey"], attention_modes=modes)
    with pytest.raises(EvalError, match="checkpoint path"):
        run(42, ["passkey"])
