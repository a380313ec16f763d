"""Does a model count the words of a common-word list in context? Teacher-forced on held-out `common_words`
examples, dense: the mean log-probability the model gives each list word where it appears, split into the common
words (after their first appearance), the rare words' second appearance, and first appearances; and, at the
answer position, the share of the answer words among the model's 20 likeliest tokens.

A model that counts predicts a common word (about 12% of the list's words, ten of them) far above a rare one
(two appearances each); uniform over the list's distinct words is about -ln(distinct words).

    python benchmarks/cw_list_probe.py MODEL [MODEL ...] [--lengths 2048,16384] [--seeds 4] [--tasks common_words,cw_plain]
        [--out F.json]

--embeddings instead measures the list words' rows of the (tied) embedding table: mean pairwise cosine (first 500
words), mean cosine of every vocabulary row to the mean row, and the list words' mean and deviation norms with the
deviations' effective rank (docs/quality.md, x26-x27).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from longcpm import load_model  # noqa: E402
from longcpm.text import load_tokenizer  # noqa: E402
from longcpm.train.synthetic import EVAL_SEED_START, generate, word_list  # noqa: E402


def probe(folder: str, length: int, seeds: int, device: str, task: str = "common_words") -> dict:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = load_model(folder, device=device, dtype=dtype, sparse_config=None)
    tok = load_tokenizer(folder)
    word_ids = {tok.encode(" " + w, add_special_tokens=False)[0] for w in word_list()}
    common_lp, rare_lp, first_lp, top20, distinct = [], [], [], [], []
    for seed in range(EVAL_SEED_START + 200, EVAL_SEED_START + 200 + seeds):
        ex = generate(task, length, seed, tok)
        ids = tok.encode(ex.prompt)
        with torch.no_grad():
            logp = model(torch.tensor([ids], device=device))[0].float().log_softmax(-1).cpu()
        common = {tok.encode(" " + w, add_special_tokens=False)[0] for w in ex.answers}
        list_end = len(tok.encode(ex.prompt.rsplit("\nQuestion:", 1)[0]))
        seen: set[int] = set()
        for p in range(1, list_end):
            t = ids[p]
            if t not in word_ids:
                continue
            lp = logp[p - 1, t].item()
            (first_lp if t not in seen else common_lp if t in common else rare_lp).append(lp)
            seen.add(t)
        distinct.append(len(seen))
        top = set(logp[-1].topk(20).indices.tolist())
        top20.append(len(common & top) / len(common))
    mean = lambda xs: round(sum(xs) / len(xs), 3) if xs else None  # noqa: E731
    return {"model": folder, "task": task, "length": length, "seeds": seeds, "logp_common_repeat": mean(common_lp),
            "logp_rare_repeat": mean(rare_lp), "logp_first_appearance": mean(first_lp),
            "uniform_over_distinct": round(-math.log(sum(distinct) / len(distinct)), 3),
            "answer_words_in_top20": mean(top20), "targets": [len(common_lp), len(rare_lp), len(first_lp)]}


def embedding_stats(folder: str) -> dict:
    from safetensors.torch import load_file
    table = load_file(str(Path(folder) / "model.safetensors"))["model.embed_tokens.weight"].float()
    tok = load_tokenizer(folder)
    ids = torch.tensor(sorted({tok.encode(" " + w, add_special_tokens=False)[0] for w in word_list()}))
    rows = table[ids]
    unit = torch.nn.functional.normalize(rows[:500], dim=-1)
    n = len(unit)
    dev = rows - rows.mean(0)
    sv = torch.linalg.svdvals(dev)
    return {"model": folder, "list_words": len(ids),
            "list_mean_pairwise_cosine": round(float(((unit @ unit.T).sum() - n) / (n * (n - 1))), 4),
            "vocab_mean_cosine_to_mean_row": round(float(torch.nn.functional.cosine_similarity(
                table, table.mean(0, keepdim=True)).mean()), 4),
            "list_mean_row_norm": round(float(rows.mean(0).norm()), 3),
            "list_deviation_norm": round(float(dev.norm(dim=-1).mean()), 3),
            "list_deviation_effective_rank": round(float(sv.sum() ** 2 / (sv ** 2).sum()), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--lengths", default="2048,16384")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tasks", default="common_words", help="common_words (the eval's numbered list), cw_plain")
    ap.add_argument("--embeddings", action="store_true", help="embedding-table statistics only (CPU, no forward)")
    ap.add_argument("--out")
    a = ap.parse_args()
    rows = [embedding_stats(m) for m in a.models] if a.embeddings else [probe(m, int(n), a.seeds, a.device, t) for m in a.models for t in a.tasks.split(",")
            for n in a.lengths.split(",")]
    for r in rows:
        print(json.dumps(r))
    if a.out:
        Path(a.out).write_text(json.dumps({"rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
