"""Exact-match scoring of a reply against a synthetic example's answers.

The generators end every answer with "." and train models to emit EOS after it, so the reply is cut at its first
"." or newline before comparing: what a model says after its answer is not graded, but everything before it is.
Items are compared case-insensitively, split on commas, whitespace and "and".
"""

from __future__ import annotations

import re

# tasks whose answer is one string vs. a set of strings (the generators' `answers` tuples)
SINGLE = ("passkey", "niah_multikey")
MULTI = ("niah_multivalue", "variable_tracking", "common_words")
RULES = {
    "passkey": "the reply's answer span is exactly the pass key",
    "niah_multikey": "the reply's answer span is exactly the queried key's number (not a distractor's)",
    "niah_multivalue": "the span lists all values of the key, in any order, and nothing else",
    "variable_tracking": "the span lists every variable of the chain, in any order, and nothing else (no decoys)",
    "common_words": "the span lists exactly the set of most common words, in any order",
}

_SPLIT = re.compile(r"[,;\s]+|\band\b")
_STRIP = "\"'`()[]{}:*"


def answer_span(reply: str) -> str:
    """The part of a reply that holds the answer: up to its first '.' or newline (leading whitespace skipped)."""
    text = reply.lstrip()
    for stop in (".", "\n"):
        cut = text.find(stop)
        if cut >= 0:
            text = text[:cut]
    return text


def items(reply: str) -> list[str]:
    """The normalised items of a reply's answer span: lowercase, separators and surrounding quotes dropped."""
    out = (s.strip(_STRIP) for s in _SPLIT.split(answer_span(reply).lower()))
    return [s for s in out if s]


def score(task: str, reply: str, answers) -> tuple[bool, float]:
    """(exact, partial): exact match by the task's rule (RULES); partial = fraction of answers among the items,
    a finer signal for models that are still far from exact."""
    want = [a.lower() for a in answers]
    got = items(reply)
    partial = sum(a in got for a in want) / len(want) if want else 0.0
    if task in SINGLE:
        return got == want[:1] and len(want) == 1, partial
    if task in MULTI:
        return bool(got) and set(got) == set(want), partial
    raise ValueError(f"no scoring rule for task {task!r}")
