"""Synthetic training-document generation speed on one CPU core: the exact path (every trial length encoded whole
by the tokenizer, as `longcpm eval` sized examples before) against the training path (`SyntheticSource.make`:
ChunkEncoder + a fit within 1/64 of the drawn length). Same task mix and length ranges as the needle-27m stages.

Writes benchmarks/results/synthetic-data-cpu.json with --json: machine, versions, one record per (lengths, path)
with documents, tokens, seconds and tokens/s, and the speedup of the training path.

    python benchmarks/synthetic_data.py [--docs 200] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from longcpm.assets import asset_dir  # noqa: E402
from longcpm.text import load_tokenizer  # noqa: E402
from longcpm.train.data import SyntheticSource  # noqa: E402
from longcpm.train.synthetic import TRAIN_TASKS, generate  # noqa: E402

RANGES = {"64-2K (stage 1)": (64, 2048), "2K-32K (stages 2, 4)": (2048, 32768)}


def exact_doc(tok, src: SyntheticSource, k: int) -> int:
    """The pre-ChunkEncoder path: exact fit with whole-text encodes, then the prompt encoded again."""
    rng = random.Random(src.seed * 7_919_000_003 + k)
    task = rng.choices(src.tasks, src.weights)[0]
    length = rng.randint(src.min_len, src.max_len)
    ex = generate(task, length, src.example_seed(k), tok, allow_longer=True)
    ids = ex.token_ids(tok)
    tok.encode(ex.prompt)
    return len(ids)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=200, help="documents per (range, path); long ranges use a quarter")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = p.parse_args()
    torch.set_num_threads(1)
    tok = load_tokenizer(asset_dir("needle-27m"))
    records = []
    for name, (lo, hi) in RANGES.items():
        n = a.docs if hi <= 4096 else max(a.docs // 4, 8)
        src = SyntheticSource(tok, tasks=TRAIN_TASKS, min_len=lo, max_len=hi, loss="answer", seed=1)
        rates = {}
        for path, fn in (("exact", lambda k, s=src: exact_doc(tok, s, k)), ("training", lambda k, s=src: len(s.make(k)[0]))):
            t0, tokens = time.perf_counter(), 0
            for k in range(n):
                tokens += fn(k)
            dt = time.perf_counter() - t0
            rates[path] = tokens / dt
            records.append({"lengths": name, "path": path, "docs": n, "tokens": tokens, "seconds": round(dt, 3),
                            "tokens_per_s": round(tokens / dt)})
            print(f"{name:<22} {path:<9} {n:>4} docs {tokens:>9} tokens {dt:7.2f} s {tokens / dt:>10.0f} tok/s")
        records.append({"lengths": name, "speedup": round(rates["training"] / rates["exact"], 2)})
        print(f"{name:<22} training / exact: {rates['training'] / rates['exact']:.2f}x")
    if a.json:
        out = Path(a.out) / "synthetic-data-cpu.json"
        meta = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
                "torch": torch.__version__, "threads": 1, "tasks": list(TRAIN_TASKS),
                "note": "one process, one core; the trainer runs data.sources.workers of these in parallel"}
        out.write_text(json.dumps({"metadata": meta, "records": records}, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
