"""Where InfLLM-V2 block selection spends its time at needle-27m's shapes, and a sweep of its launch parameters.

Selection is a quarter of the sparse attention time at 64K and half of it at 4K-8K on the packaged model's own
tensors (attention-needle-model-h200.json). Its tile sizes were tuned at MiniCPM4-8B shapes (G 16, D 128). This
times, on one layer's q/k from the packaged model's prefill of a variable-tracking eval prompt and on random q/k:
  select              the whole selection (compression included), as the prefill runs it
  compress            the c1 and c2 mean-pooling alone
  select_given_c      selection from precomputed c1/c2, per stage-1 tile config (BT tokens, BN c1 windows,
                      warps, stages) and per top-k config (rows per program, warps)
Each variant's block lists are compared with the default's (share of identical entries).

    python benchmarks/select_sweep.py [--out DIR] [--ns 4096,16384,65536] [--layer 1]
Writes select-sweep-h200.json: environment, shapes, records {input, N, impl, config, ms, same}.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    capture_attention_inputs,
    environment,
    eval_prompt_ids,
    needle_model,
    random_qkv,
    try_bench,
    write_json,
)

from longcpm.config import ModelConfig  # noqa: E402
from longcpm.models.builtin import builtin_path  # noqa: E402
from longcpm.ops.infllmv2 import select as sel  # noqa: E402
from longcpm.ops.infllmv2.compress import compress_keys  # noqa: E402


def sweep(q, k, cfg, tag: str, N: int) -> list[dict]:
    G, D = q.shape[2] // k.shape[2], q.shape[3]

    def comp():
        c1 = compress_keys(k, cfg.kernel_size, cfg.kernel_stride)[0]
        c2 = compress_keys(k, cfg.lse_kernel_size, cfg.lse_kernel_stride)[0] if cfg.uses_c2() else None
        return c1, c2

    c1, c2 = comp()
    ref = sel.parallel_infllmv2_select(q, k, cfg, c1=c1, c2=c2)
    recs = [{"impl": "select", "ms": try_bench(lambda: sel.parallel_infllmv2_select(q, k, cfg))},
            {"impl": "compress", "ms": try_bench(comp)}]
    default = sel._stage1_tiles(G, D)
    tiles = [default] + [t for t in itertools.product((8, 16, 32), (64, 128), (4, 8), (2, 3)) if t != default]
    for t in tiles:
        try:
            out = sel.parallel_infllmv2_select(q, k, cfg, c1=c1, c2=c2, tiles=t)
        except Exception as e:  # a tile the compiler refuses is recorded, not fatal
            recs.append({"impl": "select_given_c", "config": {"tiles": t}, "ms": f"err: {type(e).__name__}"})
            continue
        recs.append({"impl": "select_given_c", "config": {"tiles": t}, "default": t == default,
                     "ms": try_bench(lambda t=t: sel.parallel_infllmv2_select(q, k, cfg, c1=c1, c2=c2, tiles=t)),
                     "same": round((out == ref).float().mean().item(), 5)})
    for tk in ((1, 1), (1, 2), (1, 4), (1, 8), (2, 4)):
        out = sel.parallel_infllmv2_select(q, k, cfg, c1=c1, c2=c2, topk_cfg=tk)
        recs.append({"impl": "select_given_c", "config": {"topk": tk},
                     "ms": try_bench(lambda tk=tk: sel.parallel_infllmv2_select(q, k, cfg, c1=c1, c2=c2, topk_cfg=tk)),
                     "same": round((out == ref).float().mean().item(), 5)})
    for r in recs:
        r.update(input=tag, N=N)
    timed = [r for r in recs if r["impl"] == "select_given_c" and isinstance(r["ms"], float)]
    best = min(timed, key=lambda r: r["ms"])
    dflt = next(r for r in timed if r.get("default"))
    print(f"{tag} N={N}: select {recs[0]['ms']} compress {recs[1]['ms']} given_c default {dflt['ms']} "
          f"best {best['ms']} {best['config']} same {best['same']}", flush=True)
    return recs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or None)
    ap.add_argument("--ns", default="4096,16384,65536")
    ap.add_argument("--layer", type=int, default=1)
    a = ap.parse_args()
    base = ModelConfig.from_file(builtin_path("needle-27m") / "config.json")
    cfg = replace(base.sparse_config, dense_len=-1)  # sparse at every length, so each layer is captured
    model, tok = needle_model(cfg)
    HQ, H, D = base.num_attention_heads, base.num_key_value_heads, base.head_dim
    records = []
    for N in map(int, a.ns.split(",")):
        q, k, _ = capture_attention_inputs(model, eval_prompt_ids(tok, N), {a.layer})[a.layer]
        records += sweep(q, k, cfg, f"model-layer{a.layer}", q.shape[1])
        q, k, _ = random_qkv(N, HQ, H, D)
        records += sweep(q, k, cfg, "random", N)
        torch.cuda.empty_cache()
    path = write_json({"environment": environment(),
                       "shape": {"HQ": base.num_attention_heads, "H": base.num_key_value_heads, "D": D,
                                 "dtype": "bfloat16", "batch": 1},
                       "sparse_config": cfg.to_dict(), "records": records}, "select-sweep-h200.json", a.out)
    print(path)


if __name__ == "__main__":
    main()
