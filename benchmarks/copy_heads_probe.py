"""Which attention heads find earlier copies of a token? Dense, fp32, on held-out synthetic prompts: for each
position whose token appeared before (list words in common-word lists, capital-letter name pieces in tracking
prompts), each head's attention mass on the positions right after the earlier copies (an induction head: what it
reads there is what followed last time) and on the earlier copies themselves (a duplicate-token head: a running
count needs one). Reports the best heads of each kind per model and prompt.

Stages 12-16 copy names but give list words a quarter to a fifth of the induction mass that names get, and no
head attends to a list word's own earlier copies (docs/quality.md, x29).

    python benchmarks/copy_heads_probe.py [LABEL=]MODEL ... [--length 2048] [--seeds 2] [--out F.json]

Works only where dense attention goes through scaled_dot_product_attention (the CPU path), which it wraps to read
each layer's queries and keys.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from longcpm import load_model  # noqa: E402
from longcpm.models.builtin import resolve_model_path  # noqa: E402
from longcpm.text import load_tokenizer  # noqa: E402
from longcpm.train.synthetic import EVAL_SEED_START, generate, word_list  # noqa: E402

MAX_POSITIONS = 300  # the last repeated positions of each prompt: enough for a mean, small enough for CPU


def _queries_keys(model, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (q [H, T, D], k [Hkv, T, D]) from one dense forward."""
    seen, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        seen.append((q[0].detach(), k[0].detach()))
        return real(q, k, v, *a, **kw)

    F.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        F.scaled_dot_product_attention = real
    return seen


def head_masses(qk, ids: list[int], positions: list[int]) -> list[dict]:
    """Per (layer, head): mean attention mass on the tokens after earlier copies and on the earlier copies."""
    t, pos = torch.tensor(ids), torch.tensor(positions)
    future = torch.arange(len(ids))[None, :] > pos[:, None]
    same = (t[None, :] == t[pos][:, None]) & ~future
    same[torch.arange(len(pos)), pos] = False  # not the position itself
    after = torch.zeros_like(same)
    after[:, 1:] = same[:, :-1]
    out = []
    for layer, (q, k) in enumerate(qk):
        group = q.shape[0] // k.shape[0]
        for h in range(q.shape[0]):
            s = (q[h, pos] @ k[h // group].T) / q.shape[-1] ** 0.5
            p = s.masked_fill(future, float("-inf")).softmax(-1)
            out.append({"layer": layer, "head": h, "after_copies": float((p * after).sum(-1).mean()),
                        "on_copies": float((p * same).sum(-1).mean())})
    return out


def probe(folder: str, length: int, seeds: int, label: str | None = None) -> dict:
    model = load_model(folder, device="cpu", dtype=torch.float32, sparse_config=None)
    tok = load_tokenizer(resolve_model_path(folder))
    words = {tok.encode(" " + w, add_special_tokens=False)[0] for w in word_list()}
    pieces = {i for i in range(tok.vocab_size) if (tok.convert_ids_to_tokens([i])[0] or "").lstrip("\u2581").isupper()}
    cases = {"common_words": words.__contains__, "variable_tracking": pieces.__contains__}
    result = {}
    for task, wanted in cases.items():
        rows = []
        for seed in range(EVAL_SEED_START, EVAL_SEED_START + seeds):
            ids = tok.encode(generate(task, length, seed, tok).prompt)
            positions = [i for i in range(1, len(ids)) if wanted(ids[i]) and ids[i] in ids[:i]][-MAX_POSITIONS:]
            rows.append(head_masses(_queries_keys(model, ids), ids, positions))
        heads = [{**r[0], "after_copies": sum(x["after_copies"] for x in r) / len(r),
                  "on_copies": sum(x["on_copies"] for x in r) / len(r)} for r in zip(*rows)]
        result[task] = {
            "induction": sorted(heads, key=lambda x: -x["after_copies"])[:4],
            "duplicate": sorted(heads, key=lambda x: -x["on_copies"])[:4],
        }
        best_i, best_d = result[task]["induction"][0], result[task]["duplicate"][0]
        print(f"{label or folder} {task} {length}: best induction head L{best_i['layer']}H{best_i['head']} "
              f"{best_i['after_copies']:.2f}, best duplicate head L{best_d['layer']}H{best_d['head']} "
              f"{best_d['on_copies']:.2f}")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="model folders or built-in names, each optionally LABEL=MODEL")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--out", help="write the results here (JSON)")
    a = p.parse_args()
    res = {"length": a.length, "seeds": a.seeds, "torch": torch.__version__,
           "models": {}}
    for m in a.models:
        label, _, folder = m.rpartition("=")
        res["models"][label or folder] = probe(folder, a.length, a.seeds, label or None)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
