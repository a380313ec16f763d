"""InfLLM-V2 sparse prefill on CPU: the "torch" backend (ops/infllmv2/blocked.py) against dense causal SDPA.

One attention layer of a small model, HQ=8 query heads, H=1 kv head, D=64, fp32 random q/k/v, always sparse:
  dense    F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)
  sparse   blocked_infllmv2_attention, selection included
  select   its block selection alone (part of "sparse")
  naive    the reference (naive.py), only up to --naive-max tokens: it builds [T, H, G, T] fp32 logits
Milliseconds are the median of --reps runs after a warm-up, modes interleaved. Prints a table; with --json writes
benchmarks/results/cpu-sparse.json (machine, torch version, threads, config, one record per T). Run it on an
otherwise idle machine: with another busy process, each of the sparse path's many mid-sized ops waits for a
descheduled OpenMP thread and it slows down far more than the one big SDPA call (use --threads 1 there).

    python benchmarks/cpu_sparse.py [--ns 4096,8192,16384] [--reps 3] [--threads N] [--json] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from longcpm.config import SparseConfig  # noqa: E402
from longcpm.ops.infllmv2.blocked import blocked_infllmv2_attention, blocked_select_one  # noqa: E402
from longcpm.ops.infllmv2.naive import naive_infllmv2_attention, selection_width  # noqa: E402

HQ, H, D = 8, 1, 64
CFG = SparseConfig(kernel_size=32, kernel_stride=16, block_size=64, init_blocks=1, window_size=512, topk=16,
                   lse_kernel_size=128, lse_kernel_stride=64, variant="v2", dense_len=-1)  # -1: always sparse


def modes(T: int, naive_max: int):
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(1, T, h, D, generator=g) for h in (HQ, H, H))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    out = {
        "dense": lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True),
        "sparse": lambda: blocked_infllmv2_attention(q, k, v, CFG),
        "select": lambda: blocked_select_one(q[0], k[0], CFG, selection_width(CFG, T)),
    }
    if T <= naive_max:
        out["naive"] = lambda: naive_infllmv2_attention(q, k, v, CFG)
    return out, (q, k, v)


def time_modes(fns: dict, reps: int) -> dict:
    for fn in fns.values():
        fn()  # warm-up
    ms = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ms[name].append((time.perf_counter() - t0) * 1e3)
    return {name: round(statistics.median(v), 1) for name, v in ms.items()}


def max_error(q, k, v) -> float:
    """Largest |blocked - naive| on the last 64 queries (the reference would not fit at long T)."""
    ref = naive_infllmv2_attention(q[:, -64:], k, v, CFG)
    return float((blocked_infllmv2_attention(q, k, v, CFG)[:, -64:] - ref).abs().max())


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", default="4096,8192,16384")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--naive-max", type=int, default=4096)
    ap.add_argument("--json", action="store_true", help="write cpu-sparse.json")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    records = []
    print(f"{'T':>6} {'dense ms':>9} {'sparse ms':>10} {'select ms':>10} {'naive ms':>9} {'dense/sparse':>13} "
          f"{'max err':>8}")
    for T in (int(x) for x in args.ns.split(",")):
        fns, (q, k, v) = modes(T, args.naive_max)
        with torch.no_grad():
            ms = time_modes(fns, args.reps)
            err = max_error(q, k, v)
        rec = {"T": T, "ms": ms, "dense_over_sparse": round(ms["dense"] / ms["sparse"], 2), "max_abs_err": err,
               "loadavg_1min": round(os.getloadavg()[0], 2)}  # lags; well above --threads: other work ran
        records.append(rec)
        print(f"{T:>6} {ms['dense']:>9} {ms['sparse']:>10} {ms['select']:>10} {ms.get('naive', '-'):>9} "
              f"{rec['dense_over_sparse']:>13} {err:>8.1e}", flush=True)
    if args.json:
        path = Path(args.out) / "cpu-sparse.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"machine": machine(), "shape": {"HQ": HQ, "H": H, "D": D, "dtype": "float32"},
               "sparse_config": CFG.to_dict(), "reps": args.reps, "records": records}
        path.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
