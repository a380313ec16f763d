"""CPU checks of the built-in needle-27m behind figures in docs/quality.md:

  multikey_probe   held-out niah_multikey examples (600 tokens): which needle's number the model's first answer
                   token points at (the queried key's, the first in the document, the last), dense, fp32
  demo             `longcpm demo` times (prefill + generation, after its warm-up) and correctness at 8K and 16K,
                   dense and sparse, as the demo runs them

Writes benchmarks/results/needle-27m-cpu-checks.json. Run on an otherwise idle machine (timings).

    python benchmarks/needle_cpu_checks.py [--seeds 40] [--lengths 8192,16384]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from longcpm import load_model  # noqa: E402
from longcpm.cli.main import _demo_run  # noqa: E402
from longcpm.config import ModelConfig  # noqa: E402
from longcpm.eval.scoring import score  # noqa: E402
from longcpm.models.builtin import builtin_path  # noqa: E402
from longcpm.text import load_tokenizer  # noqa: E402
from longcpm.train.synthetic import EVAL_SEED_START, generate  # noqa: E402

NEEDLE = re.compile(r"for ([a-z]+-[a-z]+) is: (\d+)\.")


def multikey_probe(folder: Path, seeds: int) -> dict:
    model = load_model(folder, device="cpu", dtype=torch.float32)
    tok = load_tokenizer(folder)
    counts = {"queried": 0, "first_in_document": 0, "last_in_document": 0}
    for seed in range(EVAL_SEED_START + 100, EVAL_SEED_START + 100 + seeds):
        ex = generate("niah_multikey", 600, seed, tok)
        needles = NEEDLE.findall(ex.prompt)  # (key, number) in document order
        with torch.no_grad():
            logits = model(torch.tensor([tok.encode(ex.prompt)]))[0, -1]

        def first_token(number: str) -> int:  # the first token that tells the numbers apart (after a bare space)
            ids = tok.encode(" " + number, add_special_tokens=False)
            return ids[1] if tok.convert_ids_to_tokens(ids[0]) == "▁" and len(ids) > 1 else ids[0]
        pick = max(needles, key=lambda kv: logits[first_token(kv[1])].item())
        counts["queried"] += pick[1] == ex.answers[0]
        counts["first_in_document"] += pick == needles[0]
        counts["last_in_document"] += pick == needles[-1]
    return {"length": 600, "seeds": seeds, "picked": counts,
            "note": "numbers sharing a first digit tie; max picks the first of them in document order"}


def demo(folder: Path, lengths: list[int]) -> list[dict]:
    config = ModelConfig.from_file(folder / "config.json")
    tok = load_tokenizer(folder)
    out = []
    for length in lengths:
        ex = generate("passkey", length, EVAL_SEED_START, tok)
        ids = tok.encode(ex.prompt)
        max_tokens = len(tok.encode(ex.answer, add_special_tokens=False)) + 4
        for mode in ("dense", "sparse"):
            reply, seconds = _demo_run(folder, mode, config.sparse_config, ids, max_tokens, torch.device("cpu"), "auto")
            out.append({"length": length, "prompt_tokens": len(ids), "attention": mode, "seconds": round(seconds, 2),
                        "correct": score("passkey", reply, ex.answers)[0]})
            print(out[-1], flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=40)
    p.add_argument("--lengths", default="8192,16384")
    a = p.parse_args()
    folder = builtin_path("needle-27m")
    probe = multikey_probe(folder, a.seeds)
    print(probe, flush=True)
    runs = demo(folder, [int(x) for x in a.lengths.split(",")])
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "model": "needle-27m"}
    path = Path(__file__).resolve().parent / "results" / "needle-27m-cpu-checks.json"
    path.write_text(json.dumps({"metadata": meta, "multikey_probe": probe, "demo": runs}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
