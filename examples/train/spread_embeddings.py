"""Spread a set of token embeddings apart around their mean: each row keeps its norm, and its deviation from the
set's mean is scaled by `factor` before renormalising, so the learned differences are kept, only larger.

Why: in needle-27m (stage 12) the embeddings of the 6,893 single-token words that the common-word lists and the
multi-key keys are drawn from point almost the same way (mean pairwise cosine 0.95; over the whole vocabulary,
cosine 0.99 to the mean row). Tied embeddings are also the output layer, so the model can neither tell two list
words apart well enough to count them nor name one: it gives every list word about the same probability
(benchmarks/cw_list_probe.py). Their deviations from the mean are high-rank (effective rank ~208 of 256) but
small (norm 0.73 against 3.38 for the mean); factor 4-5 brings the pairwise cosine to about 0.5.

    python examples/train/spread_embeddings.py src/longcpm/assets/needle-27m runs/spread --factor 4.5

By default the set is the built-in word list (longcpm.train.synthetic.word_list), each word's " word" token.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
EMBED = "model.embed_tokens.weight"


def spread_rows(table: torch.Tensor, ids: torch.Tensor, factor: float) -> torch.Tensor:
    """A copy of `table` with rows `ids` spread `factor` times further from their mean, norms kept."""
    if factor <= 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    if ids.numel() < 2:
        raise ValueError("spreading needs at least two rows")
    if int(ids.min()) < 0 or int(ids.max()) >= table.shape[0]:
        raise ValueError(f"token ids must lie in [0, {table.shape[0]})")
    rows = table[ids].double()
    mean = rows.mean(0, keepdim=True)
    moved = mean + factor * (rows - mean)
    moved = moved * (rows.norm(dim=-1, keepdim=True) / moved.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    out = table.clone()
    out[ids] = moved.to(table.dtype)
    return out


def word_token_ids(tokenizer) -> list[int]:
    """The built-in list's words as the generators write them (after a space), each one token."""
    from longcpm.train.synthetic import word_list
    ids = []
    for w in word_list():
        toks = tokenizer.encode(" " + w, add_special_tokens=False)
        if len(toks) != 1:
            raise ValueError(f"list word {w!r} is {len(toks)} tokens, not one")
        ids.append(toks[0])
    return sorted(set(ids))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="model folder (config.json, model.safetensors, tokenizer files)")
    ap.add_argument("dst", type=Path)
    ap.add_argument("--factor", type=float, default=4.5)
    a = ap.parse_args()
    from longcpm.text import load_tokenizer
    state = load_file(str(a.src / WEIGHTS))
    if EMBED not in state:
        raise SystemExit(f"{a.src / WEIGHTS} has no {EMBED}")
    if "lm_head.weight" in state:
        raise SystemExit("the model has an untied lm_head: spreading the input rows alone would split the two")
    ids = torch.tensor(word_token_ids(load_tokenizer(a.src)))
    before = torch.nn.functional.normalize(state[EMBED][ids[:500]].float(), dim=-1)
    state[EMBED] = spread_rows(state[EMBED], ids, a.factor)
    after = torch.nn.functional.normalize(state[EMBED][ids[:500]].float(), dim=-1)
    mean_cos = lambda x: float(((x @ x.T).sum() - len(x)) / (len(x) * (len(x) - 1)))  # noqa: E731
    a.dst.mkdir(parents=True, exist_ok=True)
    for f in a.src.iterdir():
        if f.is_file() and f.name != WEIGHTS:
            shutil.copy2(f, a.dst / f.name)
    save_file(state, str(a.dst / WEIGHTS), metadata={"format": "pt"})
    print(f"{len(ids)} rows spread x{a.factor}: mean pairwise cosine {mean_cos(before):.3f} -> {mean_cos(after):.3f}")


if __name__ == "__main__":
    main()
