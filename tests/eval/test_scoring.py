"""Exact-match scoring by hand-made replies: what counts as right for each task, and what must not."""

import pytest

from longcpm.eval.scoring import RULES, answer_span, items, score
from longcpm.train.synthetic import TASKS


def test_every_task_has_a_rule():
    assert set(RULES) == set(TASKS)
    with pytest.raises(ValueError):
        score("nope", "1", ("1",))


def test_answer_span_cuts_at_the_first_period_or_newline():
    assert answer_span(" 12345. And then more.") == "12345"
    assert answer_span("a, b\nc.") == "a, b"
    assert items(' "Golden", mux and NARMUBAX.') == ["golden", "mux", "narmubax"]


@pytest.mark.parametrize("reply, exact", [
    (" 21474.", True), ("21474", True), (" 21474.\nThe pass key is 99999.", True),
    (" 21475.", False), (" 214745.", False), (" the pass key is 21474.", False), ("", False),
    (" 21474 21474.", False),
])
def test_single_answer_tasks(reply, exact):
    for task in ("passkey", "niah_multikey"):
        assert score(task, reply, ("21474",))[0] is exact


def test_multikey_distractor_is_wrong():
    assert score("niah_multikey", " 7654321.", ("1234567",)) == (False, 0.0)


def test_multivalue_needs_all_values_any_order_nothing_else():
    vals = ("3400186", "1710668", "3125841", "6848156")
    assert score("niah_multivalue", " 3400186, 1710668, 3125841, 6848156.", vals) == (True, 1.0)
    assert score("niah_multivalue", " 6848156, 3125841, 1710668 and 3400186.", vals)[0]
    assert score("niah_multivalue", " 3400186, 1710668, 3125841.", vals) == (False, 0.75)
    assert not score("niah_multivalue", " 3400186, 1710668, 3125841, 6848156, 1111111.", vals)[0]


def test_variable_tracking_set_of_names_case_insensitive():
    chain = ("BELVA", "KYSEF", "GUCMC", "MJXWJ", "FQONJ")
    assert score("variable_tracking", " BELVA KYSEF GUCMC MJXWJ FQONJ.", chain)[0]
    assert score("variable_tracking", " fqonj, belva, kysef, gucmc, mjxwj", chain)[0]
    assert score("variable_tracking", " BELVA KYSEF GUCMC MJXWJ.", chain) == (False, 0.8)
    assert not score("variable_tracking", " BELVA KYSEF GUCMC MJXWJ FQONJ ZZZZZ.", chain)[0]


def test_common_words_set_equality():
    words = ("golden", "mux", "narmubax")
    assert score("common_words", " mux, golden, narmubax.", words)[0]
    assert score("common_words", " golden, golden, mux, narmubax.", words)[0]  # a repeat adds nothing wrong
    assert not score("common_words", " golden, mux.", words)[0]
    assert not score("common_words", " golden, mux, narmubax, river.", words)[0]
