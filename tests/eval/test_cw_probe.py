"""benchmarks/cw_probe.py: its word positions point at the answer words, and it scores every (k, length) cell."""

import importlib.util
import random
from pathlib import Path

from longcpm.models.builtin import builtin_path
from longcpm.text import load_tokenizer
from longcpm.train import synthetic

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cw_probe.py"


def _module():
    spec = importlib.util.spec_from_file_location("cw_probe", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_word_starts_point_at_the_answer_words():
    mod = _module()
    tok = load_tokenizer(builtin_path("needle-27m"))
    for k in (3, 10):
        prompt, answer, answers = synthetic._common_words(random.Random(5), 60, k=k)
        ex = synthetic.SyntheticExample("cw", 0, 5, prompt, answer, answers)
        full = ex.token_ids(tok)
        starts = mod.word_starts(tok, answers, len(tok.encode(prompt)))
        assert [tok.decode([full[i]]).strip() for i in starts] == list(answers)


def test_probe_scores_each_word_count_and_length():
    rows = _module().probe(builtin_path("needle-27m"), [3, 10], [600], 1, "cpu")
    assert [(r["k"], r["length"], r["samples"]) for r in rows] == [(3, 600, 1), (10, 600, 1)]
    assert all(0 <= r["first_token_words"] <= 1 and r["exact"] in (0.0, 1.0) for r in rows)
