"""Synthetic long-context tasks: deterministic per (task, length, seed), sized with the real tokenizer, the answer
is in the prompt, eval seeds are refused by training sources."""

import importlib.util
from pathlib import Path

import pytest

from longcpm.train import synthetic
from longcpm.train.data import SyntheticSource
from longcpm.train.synthetic import EVAL_SEED_START, TASKS, TRAIN_TASKS, ChunkEncoder, generate, word, word_list


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_sized_and_answerable(task, tokenizer):
    for length, seed in ((400, 1), (1500, 2), (3000, EVAL_SEED_START + 7)):
        ex = generate(task, length, seed, tokenizer)
        again = generate(task, length, seed, tokenizer)
        assert ex == again
        n = len(ex.token_ids(tokenizer))
        assert length - 40 <= n <= length, (task, length, n)
        assert ex.answers and all(a in ex.prompt for a in ex.answers)
        assert all(a in ex.answer for a in ex.answers)
        assert ex.token_ids(tokenizer)[-1] == tokenizer.eos_token_id
    assert generate(task, 1500, 3, tokenizer) != generate(task, 1500, 2, tokenizer)


def test_specific_answers(tokenizer):
    ex = generate("passkey", 600, 11, tokenizer)
    key = ex.answers[0]
    assert f"The pass key is {key}." in ex.prompt and ex.prompt.endswith("The pass key is")
    mv = generate("niah_multivalue", 800, 4, tokenizer)
    positions = [mv.prompt.index(v) for v in mv.answers]
    assert positions == sorted(positions) and len(mv.answers) == 4
    vt = generate("variable_tracking", 900, 5, tokenizer)
    value = vt.prompt.split("assigned the value ")[1].split()[0]
    assert f"VAR {vt.answers[0]} = {value}." in vt.prompt
    for a, b in zip(vt.answers, vt.answers[1:]):
        assert f"VAR {b} = VAR {a}." in vt.prompt
    cw = generate("common_words", 2000, 6, tokenizer)
    listing = cw.prompt.split("\n")[1].split()
    words = listing[1::2]
    counts = {w: words.count(w) for w in set(words)}
    top = min(counts[w] for w in cw.answers)
    assert all(c < top for w, c in counts.items() if w not in cw.answers)


def test_too_short_and_word_list(tokenizer):
    with pytest.raises(ValueError, match="minimum"):
        generate("niah_multikey", 50, 0, tokenizer)
    assert len(generate("niah_multikey", 50, 0, tokenizer, allow_longer=True).prompt) > 0
    with pytest.raises(ValueError, match="unknown synthetic task"):
        generate("qa", 500, 0, tokenizer)
    words = [word(i) for i in range(5000)]
    assert len(set(words)) == 5000


def test_training_source_refuses_eval_seeds(tokenizer):
    with pytest.raises(ValueError, match="reserved for evaluation"):
        SyntheticSource(tokenizer, seed=EVAL_SEED_START)
    src = SyntheticSource(tokenizer, tasks=["passkey"], min_len=100, max_len=200, seed=EVAL_SEED_START - 1)
    assert all(0 <= src.example_seed(k) < EVAL_SEED_START for k in (0, 1, 10**7))
    a = src.doc(3)
    assert (a == SyntheticSource(tokenizer, tasks=["passkey"], min_len=100, max_len=200,
                                 seed=EVAL_SEED_START - 1).doc(3)).all()
    assert 90 <= len(a) <= 200


@pytest.mark.parametrize("task", TRAIN_TASKS)
def test_chunk_encoder_gives_the_tokenizers_ids(task, tokenizer):
    enc = ChunkEncoder(tokenizer)
    assert enc.chunked  # MiniCPM's SentencePiece model never merges across a space
    for length, seed in ((300, 1), (2500, 2)):
        ex = generate(task, length, seed, tokenizer, allow_longer=True)
        for text in (ex.prompt, ex.prompt + ex.answer):
            assert enc.encode(text) == tokenizer.encode(text)
            assert enc.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)


def test_chunk_encoder_falls_back_for_tokenizers_that_merge_spaces():
    class PairTokenizer:  # one id per two characters: merges across spaces
        eos_token_id, bos_token_id, add_bos_token = 2, 1, True

        def encode(self, text, add_special_tokens=True):
            ids = [hash(text[i: i + 2]) % 1000 + 3 for i in range(0, len(text), 2)]
            return ([1] if add_special_tokens else []) + ids

    enc = ChunkEncoder(PairTokenizer())
    assert not enc.chunked
    assert enc.encode("a bc de f") == PairTokenizer().encode("a bc de f")


@pytest.mark.parametrize("task", ["passkey", "common_words", "variable_tracking"])
def test_slack_fit_stays_inside_the_slack(task, tokenizer):
    for length in (700, 3000, 9000):
        ex = generate(task, length, 3, tokenizer, slack=length // 64)
        n = len(ex.token_ids(tokenizer))
        exact = len(generate(task, length, 3, tokenizer).token_ids(tokenizer))
        assert length - length // 64 - 40 <= n <= exact <= length, (length, n, exact)


def test_word_list_is_single_token_and_outside_the_filler(tokenizer):
    words = word_list()
    assert len(words) > 5000 and len(set(words)) == len(words)
    filler = set(synthetic._NOUNS + synthetic._ADJS + synthetic._VERBS + synthetic._PREPS)
    assert not filler & set(words)
    for w in words[:: len(words) // 300]:  # a spread sample: each is one token after a space
        assert len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1, w
    mk = generate("niah_multikey", 900, 8, tokenizer)
    key = mk.prompt.split("magic number for ")[-1].split(" mentioned")[0]
    a, b = key.split("-")
    assert a in words and b in words
    haystack = mk.prompt.split("\n\n")[1]
    assert haystack.count(key) == 1
    cw = generate("common_words", 3000, 9, tokenizer)
    assert all(w in words for w in cw.answers)


def test_word_list_is_what_make_words_builds(tokenizer):
    # the packaged list is derived data: the script that writes it must still give exactly it
    path = Path(__file__).resolve().parents[2] / "examples" / "train" / "make_words.py"
    spec = importlib.util.spec_from_file_location("make_words", path)
    make_words = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_words)
    assert tuple(make_words.build(tokenizer)) == word_list()


def test_cw_top_common_words_outnumber_every_rare_word(tokenizer):
    for seed in range(4):
        ex = generate("cw_top", 900, seed, tokenizer, allow_longer=True)
        words = ex.prompt.split("\n")[1].split()[1::2]
        counts = {w: words.count(w) for w in set(words)}
        assert 1 <= len(ex.answers) <= 10 and f"the {len(ex.answers)} most common" in ex.prompt
        assert min(counts[w] for w in ex.answers) >= 4 * max(c for w, c in counts.items() if w not in ex.answers)


def test_cw_ten_asks_for_ten_words_at_short_lengths(tokenizer):
    ex = generate("cw_ten", 1024, 4, tokenizer)
    words = ex.prompt.split("\n")[1].split()[1::2]
    assert len(ex.answers) == 10 and "the 10 most common words" in ex.prompt
    assert min(words.count(w) for w in ex.answers) > max(words.count(w) for w in set(words) - set(ex.answers))


def test_a_fixed_word_count_builder_reproduces_the_eval_task(tokenizer):
    """generate(build=common_words_builder(k)) is the eval's common-word example wherever the eval asks for k."""
    from longcpm.train.synthetic import common_words_builder
    for length, k in ((3000, 10), (800, 3)):
        want = generate("common_words", length, EVAL_SEED_START + 2, tokenizer)
        got = generate("cw", length, EVAL_SEED_START + 2, tokenizer, build=common_words_builder(k))
        assert (got.prompt, got.answers) == (want.prompt, want.answers) and len(got.answers) == k
    assert generate("cw_ten", 900, 3, tokenizer).prompt == generate("x", 900, 3, tokenizer,
                                                                   build=common_words_builder(10)).prompt


@pytest.mark.parametrize("task, base", [("cw_any", "common_words"), ("cw_ten_any", "cw_ten"),
                                        ("cw_top_any", "cw_top")])
def test_any_order_common_words_keep_the_prompt_and_the_set(task, base, tokenizer):
    """The any-order training tasks are their base example with the answer words permuted: same prompt, same
    set, and (over a few seeds) not always first-appearance order, which the eval does not require."""
    reordered = 0
    for seed in range(6):
        got, want = generate(task, 1200, seed, tokenizer), generate(base, 1200, seed, tokenizer)
        assert got.prompt == want.prompt and sorted(got.answers) == sorted(want.answers)
        assert got.answer == " " + ", ".join(got.answers) + "."
        reordered += got.answers != want.answers
    assert reordered >= 3


def test_common_words_builder_refuses_an_unknown_order():
    from longcpm.train.synthetic import _common_words, common_words_builder
    with pytest.raises(ValueError, match="order"):
        common_words_builder(10, "latest")
    with pytest.raises(ValueError, match="order"):
        generate("cw", 900, 3, None, build=lambda rng, n: _common_words(rng, n, order="latest"))


@pytest.mark.parametrize("task, base", [("cw_last", "common_words"), ("cw_ten_last", "cw_ten"),
                                        ("cw_top_last", "cw_top")])
def test_last_order_common_words_name_the_latest_last_copy_first(task, base, tokenizer):
    """The last-order tasks keep their base example's prompt and set; the answer lists the words by where each
    last appears in the list, latest first (so not first-appearance order in general)."""
    differs = 0
    for seed in range(5):
        got, want = generate(task, 1200, seed, tokenizer), generate(base, 1200, seed, tokenizer)
        assert got.prompt == want.prompt and sorted(got.answers) == sorted(want.answers)
        words = got.prompt.split("\n")[1].split()[1::2]
        last = [max(i for i, w in enumerate(words) if w == a) for a in got.answers]
        assert last == sorted(last, reverse=True)
        assert got.answer == " " + ", ".join(got.answers) + "."
        differs += got.answers != want.answers
    assert differs >= 3


def test_var_query_asks_for_every_assigned_variable(tokenizer):
    """Each question names a value (a number or another variable) whose statement is in the prompt; the answer
    after it is the variable on that statement's left."""
    ex = generate("var_query", 1500, 5, tokenizer)
    text = ex.prompt + ex.answer
    asks = text.split("Questions and answers:\n")[1].split("The variable assigned ")[1:]
    assert len(asks) == len(ex.answers) >= 2
    for ask, name in zip(asks, ex.answers):
        value, said = ask.rstrip(". ").split(" is ")
        assert said == name and f"VAR {name} = {value}." in ex.prompt


def test_name_pieces_are_the_tokenizers_capital_pieces(tokenizer):
    """name_pieces.txt is what examples/train/make_name_pieces.py writes for the packaged tokenizer, and each entry
    is one token where a name puts it (word-initial pieces after a space)."""
    script = Path(__file__).resolve().parents[2] / "examples" / "train" / "make_name_pieces.py"
    spec = importlib.util.spec_from_file_location("make_name_pieces", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert list(synthetic.name_pieces()) == mod.build(tokenizer)
    assert len(synthetic.name_pieces()) > 1000
    for p in ("_SEC", "NAL", "RECT", "COL"):  # pieces of stage 12's tracking misses
        assert p in synthetic.name_pieces()
    assert tokenizer.encode(" SEC", add_special_tokens=False) == [tokenizer.token_to_id("\u2581SEC")]


def test_piece_names_train_the_rare_pieces(tokenizer):
    """_piece_var gives distinct 5-letter capital names, each holding its drawn piece; far more of them contain a
    3-5 letter piece than uniform letters do, which is the point of the vt_pieces / var_query_pieces tasks."""
    rng_a, rng_b, used_a, used_b = synthetic.random.Random(0), synthetic.random.Random(0), set(), set()
    piece_names = [synthetic._piece_var(rng_a, used_a) for _ in range(400)]
    uniform = [synthetic._var(rng_b, used_b) for _ in range(400)]
    assert len(set(piece_names)) == 400 and all(len(v) == 5 and v.isalpha() and v.isupper() for v in piece_names)
    assert synthetic._piece_var(synthetic.random.Random(0), set()) == piece_names[0]  # a pure function of the rng

    def long_share(names):
        pieces = [tokenizer.convert_ids_to_tokens(tokenizer.encode(" " + v, add_special_tokens=False)) for v in names]
        return sum(any(len(t.lstrip("\u2581")) >= 3 for t in ts) for ts in pieces) / len(names)

    assert long_share(piece_names) > 3 * long_share(uniform), (long_share(piece_names), long_share(uniform))
    for task in ("var_query_pieces", "vt_pieces"):
        ex = generate(task, 1200, 9, tokenizer)
        assert ex.answers and all(f"VAR {a} =" in ex.prompt for a in ex.answers)
        assert all(len(a) == 5 and a.isupper() for a in ex.answers)
        assert ex == generate(task, 1200, 9, tokenizer)
