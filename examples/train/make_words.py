"""Write the synthetic tasks' word list (src/longcpm/train/words.txt) from a tokenizer's vocabulary.

The list holds lowercase words of 4-9 letters that the tokenizer encodes as one token after a space, in vocabulary
order, minus likely word stems (a word that starts a longer list word: "indust" for "industry"; real words such as
"work" go too) and minus the filler's and the prompts' own words. Single-token words let a small model count and
match whole words (the common-word task, the multi-key needles' keys) instead of syllable pieces; keys outside the
filler's vocabulary are what RULER's noise haystack gives too. The shipped list comes from MiniCPM4's tokenizer:

    python examples/train/make_words.py ../shared/checkpoints/minicpm4-0.5b
"""

import argparse
import re
from collections import Counter
from pathlib import Path

from longcpm.text.tokenizer import load_tokenizer
from longcpm.train import synthetic


def reserved_words() -> set[str]:
    """Every word of the filler lists and of the task templates: the words common to each task's texts for three
    seeds with no filler (keys, numbers and listed words differ between seeds, the templates do not)."""
    text = " ".join(synthetic._NOUNS + synthetic._ADJS + synthetic._VERBS + synthetic._PREPS + synthetic._TIMES)
    words = set(re.findall(r"[a-z]+", text.lower()))
    for task in synthetic.TRAIN_TASKS:
        seen = []
        for seed in range(3):
            prompt, answer, _ = synthetic._BUILDERS[task](synthetic.random.Random(seed), 0)
            seen.append(set(re.findall(r"[a-z]+", (prompt + answer).lower())))
        words |= set.intersection(*seen)
    return words


def build(tok) -> list[str]:
    """The word list for a tokenizer, by the rule above."""
    piece = re.compile("\u2581([a-z]{4,9})")  # SentencePiece marks a leading space with U+2581
    found = []
    for t in tok.convert_ids_to_tokens(range(tok.vocab_size)):
        m = piece.fullmatch(t or "")
        if m and len(tok.encode(" " + m.group(1), add_special_tokens=False)) == 1:
            found.append(m.group(1))
    words = set(found)
    stems = Counter(w[:k] for w in found for k in range(4, len(w)) if w[:k] in words)
    reserved = reserved_words()
    return [w for w in found if stems[w] == 0 and w not in reserved]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tokenizer", help="a folder with the tokenizer files")
    p.add_argument("--out", default=str(Path(synthetic.__file__).with_name("words.txt")))
    args = p.parse_args()
    keep = build(load_tokenizer(args.tokenizer))
    Path(args.out).write_text("\n".join(keep) + "\n")
    print(f"{len(keep)} words -> {args.out}")


if __name__ == "__main__":
    main()
