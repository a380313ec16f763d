"""Packed causal attention for training rows (B = 1, many documents): one flash varlen call against one SDPA call
per document (the path before `longcpm.ops.packed`), forward + backward, bf16 on CUDA.

Rows are the needle-27m stage-1 layout: 16 rows of 4,096 tokens, whole documents of 64-2,048 tokens (uniform)
padded per row; 8 query heads, 1 kv head, D = 64. Also a 2 x 32K row layout with 2K-32K documents (stages 2, 4).
Writes benchmarks/results/packed-attention-h200.json: environment, then per layout the documents, the median ms of
each path and the speedup.

    python benchmarks/packed_attention.py [--out DIR]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import bench_ms, environment, write_json  # noqa: E402

from longcpm.ops.packed import packed_causal_attention  # noqa: E402

HQ, H, D = 8, 1, 64
LAYOUTS = {"16 x 4K rows, docs 64-2K": (16, 4096, 64, 2048), "2 x 32K rows, docs 2K-32K": (2, 32768, 2048, 32768)}


def row_lengths(rows: int, seq: int, lo: int, hi: int, rng: random.Random) -> list[int]:
    """Segment lengths of `rows` pad-packed rows: whole documents, then the row's padding as its own segment."""
    out = []
    for _ in range(rows):
        used = 0
        while True:
            n = rng.randint(lo, hi)
            if used + n > seq:
                break
            out.append(n)
            used += n
        if used < seq:
            out.append(seq - used)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out")
    a = p.parse_args()
    rng = random.Random(0)
    records = []
    for name, (rows, seq, lo, hi) in LAYOUTS.items():
        lens = row_lengths(rows, seq, lo, hi, rng)
        T = sum(lens)
        cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
        q = torch.randn(1, T, HQ, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        do = torch.randn(1, T, HQ, D, device="cuda", dtype=torch.bfloat16)
        rec = {"layout": name, "tokens": T, "segments": len(lens)}
        for path, flag in (("varlen", True), ("per_document", False)):
            def step(flag=flag, q=q, k=k, v=v, cu=cu, do=do):
                packed_causal_attention(q, k, v, cu, use_varlen=flag).backward(do)
            rec[f"{path}_ms"] = round(bench_ms(step, warmup=5, rep=50), 3)
        rec["speedup"] = round(rec["per_document_ms"] / rec["varlen_ms"], 2)
        print(rec, flush=True)
        records.append(rec)
    out = write_json({"environment": environment(), "shape": {"HQ": HQ, "H": H, "D": D, "dtype": "bfloat16",
                                                             "what": "forward + backward"},
                      "records": records}, "packed-attention-h200.json", a.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
