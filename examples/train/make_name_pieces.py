"""Write the variable-name pieces (src/longcpm/train/name_pieces.txt) from a tokenizer's vocabulary.

Variable tracking's names are 5 random capital letters. The tokenizer cuts them into pieces of 1-5 letters, and a
uniform draw of letters almost never yields the 3-5 letter pieces (NAL, RECT, SEC): in needle-27m (stage 12) those
pieces' embeddings never moved from where all unseen tokens sit, every tracking miss at 2K-32K contains one, and the
model cannot copy them (docs/quality.md). The training tasks var_query_pieces and vt_pieces build names around a
piece drawn uniformly from this list, so every piece gets trained. A leading "_" marks a piece that only starts a
word (SentencePiece's leading-space form); the others may sit anywhere. The shipped file comes from MiniCPM4's
tokenizer:

    python examples/train/make_name_pieces.py src/longcpm/assets/minicpm4-0.5b
"""

import argparse
import re
from pathlib import Path

from longcpm.text.tokenizer import load_tokenizer
from longcpm.train import synthetic


def build(tok) -> list[str]:
    """Every vocabulary piece of 1-5 capital letters, word-initial ones (U+2581 first) written with a leading '_'."""
    piece = re.compile("(\u2581?)([A-Z]{1,5})")
    out = []
    for t in tok.convert_ids_to_tokens(range(tok.vocab_size)):
        m = piece.fullmatch(t or "")
        if m:
            out.append(("_" if m.group(1) else "") + m.group(2))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tokenizer", help="a folder with the tokenizer files")
    p.add_argument("--out", default=str(Path(synthetic.__file__).with_name("name_pieces.txt")))
    args = p.parse_args()
    keep = build(load_tokenizer(args.tokenizer))
    Path(args.out).write_text("\n".join(keep) + "\n")
    print(f"{len(keep)} pieces -> {args.out}")


if __name__ == "__main__":
    main()
