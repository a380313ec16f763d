"""Synthetic long-context tasks in the style of RULER: passkey, multi-key and multi-value needles, variable
tracking and common-word extraction, at any target token length.

`generate(task, length, seed, tokenizer)` is a pure function of its arguments: the haystack comes from a built-in
word list and sentence generator (no downloads) and every random choice from random.Random(seed), so an eval run
can regenerate the exact example. The prompt is sized with the real tokenizer so that prompt + answer + EOS fit in
`length` tokens (the last filler unit that would overflow is dropped). Seeds >= EVAL_SEED_START are reserved for
evaluation: training sources (`train.data.SyntheticSource`) refuse them.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TASKS = ("passkey", "niah_multikey", "niah_multivalue", "variable_tracking", "common_words")
# Training may also use kv_recall: every needle is a target, so retrieval gets many gradient signals per document
# (the eval tasks give one short answer each). It is not part of the eval suite.
# copy: a random list to repeat verbatim, every copied token an induction target; a warm-up that forms the
# copying heads the retrieval tasks need long before their sparse answer tokens alone would.
# kv_query: the multi-key needle with every key asked in turn (the eval's question wording), so each document
# trains the key-matching step several times instead of once. vt_hops: variable tracking with 1-4 hops, a
# curriculum for the multi-hop eval task.
# cw_top: the common-word list with 1-10 common words and a wide frequency gap, for short documents: the eval
# task asks for 3 words below ~2.5K tokens and 10 above, with a gap that shrinks as lists get short.
# cw_ten: the eval's common-word list with 10 words at every length (the eval asks for 3 below ~2.5K), because
# 10 words fail on 1K lists too (benchmarks/cw_probe.py): the number of words, not only the length, is learned.
# cw_any, cw_ten_any, cw_top_any: common_words, cw_ten and cw_top with the same prompt but the answer words in a
# random order. The eval scores the set in any order; first-appearance order (the others' targets) makes the model
# also rank the common words by where each first shows up, which a small model cannot do over a long list.
# var_query: tracking's hop step alone, asked once per statement: "VAR B = A." statements (A a number or another
# variable) and for each A, which variable holds it. Tracking misses are mostly a multi-token name copied wrong
# after its first token, on the same examples at every length (docs/quality.md); this gives that copy many targets.
# cw_plain: cw_any's list without the item numbers, so every list token is a word (each word in words.txt is one
# token): with prompt_labels, a share of the list is a dense target for the in-context word counts.
# cw_last, cw_ten_last, cw_top_last: the same lists with the answer words by last appearance, latest first. A word's
# last copy has seen all its earlier copies, so "the most recent word seen many times, not yet named" picks each
# answer word in turn with one sharp attention; first appearance needs a word's later copies to know it is common,
# and a random order spreads the target over all ten words (a small model's one kv head carries no ten-word mix).
# var_query_pieces, vt_pieces: var_query and vt_hops with each name built around a piece drawn uniformly from the
# tokenizer's capital-letter pieces (name_pieces.txt). Uniform letters make a 3-5 letter piece once in thousands of
# names, so those pieces' embeddings never train, and every tracking miss of stage 12 holds one (docs/quality.md).
TRAIN_TASKS = TASKS + ("kv_recall", "copy", "kv_query", "vt_hops", "cw_top", "cw_ten", "cw_any", "cw_ten_any",
                       "cw_top_any", "var_query", "cw_plain", "var_query_pieces", "vt_pieces", "cw_last",
                       "cw_ten_last", "cw_top_last")
EVAL_SEED_START = 10**6
# Bumped whenever the same (task, length, seed) would give a different example; results files record it. Suite 2:
# keys and common words come from words.txt (suite 1 drew keys from the filler's own words, common words from
# multi-token syllable words).
SUITE_VERSION = 2

_NOUNS = ("river", "mountain", "garden", "teacher", "window", "engine", "forest", "village", "market", "letter",
          "bridge", "harbor", "library", "painter", "kitchen", "orchard", "lantern", "meadow", "captain", "castle",
          "island", "farmer", "doctor", "valley", "station", "student", "bakery", "violin", "compass", "desert",
          "festival", "museum", "pilot", "canyon", "blanket", "mirror", "ladder", "tunnel", "glacier", "workshop")
_ADJS = ("quiet", "bright", "ancient", "narrow", "golden", "gentle", "busy", "distant", "humble", "silver",
         "crowded", "patient", "curious", "wooden", "hidden", "sudden", "careful", "frozen", "rusty", "cheerful",
         "steady", "hollow", "vivid", "modest", "restless", "shallow", "fragrant", "sturdy", "polite", "weary")
_VERBS = ("visited", "painted", "repaired", "described", "followed", "admired", "carried", "measured", "guarded",
          "studied", "crossed", "cleaned", "watched", "built", "discovered", "remembered", "opened", "decorated")
_PREPS = ("near", "behind", "beside", "across", "above", "below", "beyond", "inside", "around", "toward")
_TIMES = ("Every morning", "Last winter", "On most evenings", "Long ago", "During the festival", "After the rain",
          "Before sunrise", "In the spring", "Once a year", "Later that day")
_SYLLABLES = ("ba", "ko", "ri", "mu", "sen", "ta", "lo", "vi", "nar", "pe", "du", "mi", "zo", "fa", "gel", "tu")


@dataclass(frozen=True)
class SyntheticExample:
    """One task instance. `answers`: the strings a correct reply must contain (eval scoring)."""

    task: str
    length: int
    seed: int
    prompt: str
    answer: str
    answers: tuple[str, ...]

    def token_ids(self, tokenizer, eos_id: int | None = None) -> list[int]:
        """The training document: BOS + prompt + answer + EOS."""
        eos = tokenizer.eos_token_id if eos_id is None else eos_id
        return tokenizer.encode(self.prompt + self.answer) + [eos]


def filler_sentence(rng: random.Random) -> str:
    """A grammatical, meaningless sentence from the built-in word lists."""
    c = rng.choice
    if rng.random() < 0.5:
        return f"The {c(_ADJS)} {c(_NOUNS)} {c(_VERBS)} the {c(_ADJS)} {c(_NOUNS)} {c(_PREPS)} the {c(_NOUNS)}."
    return f"{c(_TIMES)}, one {c(_ADJS)} {c(_NOUNS)} {c(_VERBS)} the {c(_NOUNS)} {c(_PREPS)} the {c(_ADJS)} {c(_NOUNS)}."


@functools.cache
def word_list() -> tuple[str, ...]:
    """The packaged list of single-token English words (examples/train/make_words.py wrote it from MiniCPM4's
    tokenizer). None of them is a filler or prompt word."""
    return tuple(Path(__file__).with_name("words.txt").read_text().split())


def word(i: int) -> str:
    """The i-th distinct word: the packaged list first, then pronounceable syllable words (only lengths far past
    64K need those)."""
    words = word_list()
    if i < len(words):
        return words[i]
    i -= len(words)
    out = ""
    while True:
        out += _SYLLABLES[i % len(_SYLLABLES)]
        i //= len(_SYLLABLES)
        if i == 0:
            return out + "x"  # the suffix keeps syllable words distinct from each other's prefixes
        i -= 1


def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _key(rng: random.Random, used: set[str]) -> str:
    # two list words: no key word occurs in the filler, as in RULER's noise haystack (keys made of filler words
    # turned matching into finding a bigram among thousands of copies of its words)
    words = word_list()
    while True:
        k = f"{rng.choice(words)}-{rng.choice(words)}"
        if k not in used:
            used.add(k)
            return k


_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _var(rng: random.Random, used: set[str]) -> str:
    while True:
        v = "".join(rng.choice(_LETTERS) for _ in range(5))
        if v not in used:
            used.add(v)
            return v


@functools.cache
def name_pieces() -> tuple[str, ...]:
    """The tokenizer's capital-letter pieces (examples/train/make_name_pieces.py wrote them from MiniCPM4's
    tokenizer); a leading "_" marks a word-initial piece."""
    return tuple(Path(__file__).with_name("name_pieces.txt").read_text().split())


def _piece_var(rng: random.Random, used: set[str]) -> str:
    # a 5-letter name around one piece drawn uniformly from name_pieces(): uniform letters almost never make the 3-5
    # letter pieces, whose embeddings then stay untrained. Word-initial pieces go first; the others after at least
    # one letter (first, after the space, the tokenizer would cut them another way), so 5-letter ones never fit.
    # (x28 and x30 ran with the others placed anywhere, the first letter included, which left RECT untrained.)
    while True:
        piece = rng.choice(name_pieces())
        core = piece.lstrip("_")
        if piece.startswith("_"):
            at = 0
        elif len(core) < 5:
            at = rng.randint(1, 5 - len(core))
        else:
            continue
        letters = [rng.choice(_LETTERS) for _ in range(5)]
        letters[at: at + len(core)] = core
        v = "".join(letters)
        if v not in used:
            used.add(v)
            return v


def _haystack(rng: random.Random, n: int, needles: list[tuple[float, str]]) -> str:
    """n filler sentences with needles inserted at their depth fractions (stable order for equal depths)."""
    units = [filler_sentence(rng) for _ in range(n)]
    for depth, text in sorted(needles, key=lambda x: x[0], reverse=True):
        units.insert(round(depth * n), text)
    return " ".join(units)


# Each builder maps (rng, n filler units) to (prompt, answer, answers); the same rng state gives the same needles.
def _passkey(rng: random.Random, n: int):
    key = _number(rng, 5)
    depth = rng.random()
    hay = _haystack(rng, n, [(depth, f"The pass key is {key}. Remember it. {key} is the pass key.")])
    prompt = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
              f"I will quiz you about the pass key.\n\n{hay}\n\nWhat is the pass key? The pass key is")
    return prompt, f" {key}.", (key,)


def _multikey(rng: random.Random, n: int, num_keys: int = 4):
    used: set[str] = set()
    pairs = [(_key(rng, used), _number(rng)) for _ in range(num_keys)]
    needles = [(rng.random(), f"One of the special magic numbers for {k} is: {v}.") for k, v in pairs]
    key, value = pairs[0]
    hay = _haystack(rng, n, needles)
    q = f"What is the special magic number for {key} mentioned in the provided text?"
    prompt = (f"Some special magic numbers are hidden within the following text. Make sure to memorize them. "
              f"I will quiz you about the numbers afterwards.\n\n{hay}\n\n{q} "
              f"The special magic number for {key} mentioned in the provided text is")
    return prompt, f" {value}.", (value,)


def _multivalue(rng: random.Random, n: int, num_values: int = 4):
    key = _key(rng, set())
    values = [_number(rng) for _ in range(num_values)]
    depths = sorted(rng.random() for _ in values)  # values appear in list order, which is the answer's order
    hay = _haystack(rng, n, [(d, f"One of the special magic numbers for {key} is: {v}.") for d, v in zip(depths, values)])
    q = f"What are all the special magic numbers for {key} mentioned in the provided text?"
    prompt = (f"Some special magic numbers are hidden within the following text. Make sure to memorize them. "
              f"I will quiz you about the numbers afterwards.\n\n{hay}\n\n{q} "
              f"The special magic numbers for {key} mentioned in the provided text are")
    return prompt, " " + ", ".join(values) + ".", tuple(values)


def _variable_tracking(rng: random.Random, n: int, hops: int = 4, name: Callable = _var):
    used: set[str] = set()
    value, other = _number(rng, 5), _number(rng, 5)
    chain = [name(rng, used) for _ in range(hops + 1)]
    decoy = [name(rng, used) for _ in range(hops + 1)]
    needles = []
    for names, val in ((chain, value), (decoy, other)):
        depths = sorted(rng.random() for _ in names)
        stmts = [f"VAR {names[0]} = {val}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        needles += list(zip(depths, stmts))
    hay = _haystack(rng, n, needles)
    prompt = (f"Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{hay}\n\n"
              f"Question: Find all variables that are assigned the value {value} in the text above. Answer: "
              f"According to the chain(s) of variable assignment in the text above, {len(chain)} variables are "
              f"assigned the value {value}, they are:")
    return prompt, " " + " ".join(chain) + ".", tuple(chain)


ORDERS = ("first", "random", "last")  # answer orders of the common-word builders


def _common_words(rng: random.Random, n: int, k: int | None = None, freq: int | None = None,
                  order: str = "first", numbered: bool = True):
    # n = distinct rare words (2 copies each); the common ones appear more often than any rare word at any n
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    k = k if k is not None else 10 if n >= 200 else 3
    ids = rng.sample(range(max(len(word_list()), n + k)), n + k)
    common, rare = [word(i) for i in ids[:k]], [word(i) for i in ids[k:]]
    freq = freq if freq is not None else 4 + n // 40
    words = common * freq + rare * 2
    rng.shuffle(words)
    first = {w: words.index(w) for w in common}
    common.sort(key=first.__getitem__)  # answer order: first appearance in the list
    if order == "random":  # drawn after the list: the prompt is the first-appearance example's
        rng.shuffle(common)
    elif order == "last":  # most recent last appearance first
        last = {w: len(words) - 1 - words[::-1].index(w) for w in common}
        common.sort(key=last.__getitem__, reverse=True)
    listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words)) if numbered else " ".join(words)
    prompt = (f"Below is a {'numbered ' if numbered else ''}list of words. In these words, some appear more often than others. Memorize the "
              f"ones that appear most often.\n{listing}\nQuestion: What are the {k} most common words in the above "
              f"list? Answer: The top {k} words that appear most often in the list are:")
    return prompt, " " + ", ".join(common) + ".", tuple(common)


def _cw_top(rng: random.Random, n: int, order: str = "first"):
    # the counting step alone: 1-10 common words, each 4-12 times as frequent as a rare word
    k = rng.randint(1, 10)
    return _common_words(rng, n, k=k, freq=rng.randint(8, 24), order=order)


def _kv_recall(rng: random.Random, n: int):
    used: set[str] = set()
    pairs = [(_key(rng, used), _number(rng)) for _ in range(rng.randint(2, 8))]
    depths = sorted(rng.random() for _ in pairs)  # the answer lists the pairs in order of appearance
    hay = _haystack(rng, n, [(d, f"One of the special magic numbers for {k} is: {v}.") for d, (k, v) in zip(depths, pairs)])
    prompt = (f"Some special magic numbers are hidden within the following text. Make sure to memorize them. "
              f"I will quiz you about the numbers afterwards.\n\n{hay}\n\nList every key with its special magic "
              f"number, in order of appearance:")
    return prompt, " " + ", ".join(f"{k}: {v}" for k, v in pairs) + ".", tuple(v for _, v in pairs)


def _copy(rng: random.Random, n: int):
    # words from the whole list: copying must work for any list word, the ones common-word answers name included
    # (needle-27m, trained with the first 400 only, puts no more probability on a list word in its context than
    # on one that is not: docs/quality.md)
    items = [_number(rng, rng.randint(3, 7)) if rng.random() < 0.4 else word(rng.randrange(len(word_list())))
             for _ in range(4 + 2 * n)]
    listing = " ".join(items)
    return f"Repeat the following list exactly.\n{listing}\nThe list again:", f" {listing}.", (listing,)


def _kv_query(rng: random.Random, n: int):
    used: set[str] = set()
    pairs = [(_key(rng, used), _number(rng)) for _ in range(rng.randint(2, 8))]
    needles = [(rng.random(), f"One of the special magic numbers for {k} is: {v}.") for k, v in pairs]
    hay = _haystack(rng, n, needles)
    order = rng.sample(pairs, len(pairs))
    ask = "The special magic number for {} mentioned in the provided text is"
    prompt = (f"Some special magic numbers are hidden within the following text. Make sure to memorize them. "
              f"I will quiz you about the numbers afterwards.\n\n{hay}\n\nQuestions and answers:\n"
              + ask.format(order[0][0]))
    rest = "".join(f" {ask.format(k)} {v}." for k, v in order[1:])
    return prompt, f" {order[0][1]}.{rest}", tuple(v for _, v in order)


def _var_query(rng: random.Random, n: int, name: Callable = _var):
    used: set[str] = set()
    names = [name(rng, used) for _ in range(rng.randint(2, 8))]
    values = [f"VAR {name(rng, used)}" if rng.random() < 0.5 else _number(rng, 5) for _ in names]
    hay = _haystack(rng, n, [(rng.random(), f"VAR {a} = {b}.") for a, b in zip(names, values)])
    order = rng.sample(range(len(names)), len(names))
    ask = "The variable assigned {} is"
    prompt = (f"Memorize the variable assignments hidden in the following text. I will quiz you about them "
              f"afterwards.\n\n{hay}\n\nQuestions and answers:\n" + ask.format(values[order[0]]))
    rest = "".join(f" {ask.format(values[i])} {names[i]}." for i in order[1:])
    return prompt, f" {names[order[0]]}.{rest}", tuple(names[i] for i in order)


def _vt_hops(rng: random.Random, n: int, name: Callable = _var):
    return _variable_tracking(rng, n, hops=rng.randint(1, 4), name=name)


def common_words_builder(k: int | None, order: str = "first") -> Callable:
    """The eval's common-word builder with the number of words fixed at k (None: the eval's own rule), for
    generate's `build`: probes that separate the number of words from the list length, which the eval's own task
    ties together. order "random" lists the answer words in a random order, "last" by last appearance, latest
    first (same prompt)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    return lambda rng, n: _common_words(rng, n, k=k, order=order)


_BUILDERS: dict[str, Callable] = {"passkey": _passkey, "niah_multikey": _multikey, "niah_multivalue": _multivalue,
                                  "variable_tracking": _variable_tracking, "common_words": _common_words,
                                  "kv_recall": _kv_recall, "copy": _copy, "kv_query": _kv_query, "vt_hops": _vt_hops,
                                  "var_query": _var_query,
                                  "cw_top": _cw_top, "cw_ten": common_words_builder(10),
                                  "cw_any": common_words_builder(None, "random"),
                                  "cw_ten_any": common_words_builder(10, "random"),
                                  "cw_top_any": functools.partial(_cw_top, order="random"),
                                  "cw_last": common_words_builder(None, "last"),
                                  "cw_ten_last": common_words_builder(10, "last"),
                                  "cw_top_last": functools.partial(_cw_top, order="last"),
                                  "cw_plain": functools.partial(_common_words, order="random", numbered=False),
                                  "var_query_pieces": functools.partial(_var_query, name=_piece_var),
                                  "vt_pieces": functools.partial(_vt_hops, name=_piece_var)}


class ChunkEncoder:
    """Encodes the generators' texts space-chunk by space-chunk with a memo. The filler repeats a few hundred words,
    so this is several times faster than encoding whole documents, and it gives the same ids when the tokenizer
    never merges across a space (true of MiniCPM's SentencePiece model on every task: tests/train check it). A
    tokenizer that does merge across spaces is detected on a probe text and then encodes whole texts instead."""

    _PROBE = "The quiet river 1234567 visited.\n\nOne of the special-magic numbers for bright-harbor is: 42. A: B"

    def __init__(self, tokenizer, max_entries: int = 1 << 18):
        self.tokenizer, self.max_entries = tokenizer, max_entries
        self.eos_token_id = tokenizer.eos_token_id
        self.bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) else []
        self._memo: dict[str, list[int]] = {}
        self.chunked = self._chunks(self._PROBE) == tokenizer.encode(self._PROBE, add_special_tokens=False)

    def _chunks(self, text: str) -> list[int]:
        out: list[int] = []
        memo, enc = self._memo, self.tokenizer.encode
        for n, c in enumerate(text.split(" ")):
            c = " " + c if n else c
            ids = memo.get(c)
            if ids is None:
                if len(memo) >= self.max_entries:
                    memo.clear()
                ids = memo[c] = enc(c, add_special_tokens=False)
            out += ids
        return out

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not self.chunked:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return (self.bos if add_special_tokens else []) + self._chunks(text)


def generate(task: str, length: int, seed: int, tokenizer, *, allow_longer: bool = False,
             slack: int = 0, build: Callable | None = None) -> SyntheticExample:
    """The example of `task` with the most filler such that BOS + prompt + answer + EOS <= length tokens.
    A length below the task's minimum (no filler at all) raises, or with allow_longer gives the no-filler one.
    slack > 0 (training) accepts any fit within `slack` tokens of the length: fewer trial builds. build: a
    builder (rng, n filler units) -> (prompt, answer, answers) to use instead of the named task's; `task` then
    only labels the example."""
    if build is None:
        if task not in _BUILDERS:
            raise ValueError(f"unknown synthetic task {task!r} (tasks: {', '.join(TRAIN_TASKS)})")
        build = _BUILDERS[task]
    cache: dict[int, tuple[int, tuple]] = {}

    def count(n: int) -> int:
        if n not in cache:
            out = build(random.Random(seed), n)
            cache[n] = (len(tokenizer.encode(out[0] + out[1])) + 1, out)
        return cache[n][0]

    if count(0) > length:
        if allow_longer:
            prompt, answer, answers = cache[0][1]
            return SyntheticExample(task, length, seed, prompt, answer, answers)
        raise ValueError(f"{task}: length {length} is below the task's minimum of {count(0)} tokens")
    n = _fit(count, length, slack)
    prompt, answer, answers = cache[n][1]
    return SyntheticExample(task, length, seed, prompt, answer, answers)


def _fit(count: Callable[[int], int], budget: int, slack: int = 0) -> int:
    """Largest n with count(n) <= budget, for a count that grows about linearly in n: secant steps from a
    per-unit estimate, then a bisection between the best bounds seen. With slack, any n with
    budget - slack <= count(n) <= budget is returned as soon as it is seen."""
    base = count(0)
    per = max((count(8) - base) / 8, 1.0)
    lo, hi = 0, None  # count(lo) <= budget; count(hi) > budget
    target = budget - slack // 2
    n = int((target - base) / per)
    for _ in range(6):
        n = max(n, lo + 1) if hi is None else min(max(n, lo + 1), hi - 1)
        if hi is not None and n >= hi:
            break
        c = count(n)
        if budget - slack <= c <= budget and slack > 0:
            return n
        if c <= budget:
            lo = n
        else:
            hi = n
        if hi is not None and hi - lo <= 1:
            return lo
        n = n + int((target - c) / per) + (1 if c <= budget else -1)
    if hi is None:
        hi = lo + 1
        while count(hi) <= budget:
            lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) <= budget else (lo, mid)
    return lo
