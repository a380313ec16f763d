"""Attention time per length at the built-in needle-27m's shapes: what one layer's attention costs in the quality
table's prefill (docs/quality.md), dense against InfLLM-V2 sparse, on one GPU, same inputs.

One layer, batch 1, HQ = 8 query heads, H = 1 kv head, D = 64, bf16, the model's own sparse_config (top-k 64 blocks
of 64, window 512, 1 init block; --topk replaces its top-k); lengths 4K-64K, forward only:
  sdpa_flash / sdpa_cudnn   dense causal SDPA
  longcpm                   InfLLM-V2 sparse, selection included
  longcpm_select            its block selection alone (part of "longcpm")
--inputs model times each layer on the q/k/v the packaged model produces prefilling a variable-tracking eval
prompt of N tokens (records carry "layer"; "sum" is the eight layers together); random inputs select far less
alike blocks in neighbouring tokens, so the kernel walks more blocks per tile (sparse-tile-sweep-h200.json).
Writes benchmarks/results/attention-needle[-model][-topkK]-h200.json (environment, config, records
{impl, N, ms[, layer]}).

    python benchmarks/attention_needle.py [--out DIR] [--ns 4096,8192,...] [--topk K] [--inputs random|model]
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

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

from longcpm.assets import asset_dir  # noqa: E402
from longcpm.config import ModelConfig  # noqa: E402
from longcpm.ops import infllmv2_attention, infllmv2_select  # noqa: E402


def inputs(kind: str, N: int, cfg, HQ: int, H: int, D: int, model=None) -> dict:
    """{layer: (q, k, v)}: one random set (layer None), or each layer's from `model` (the packaged model, run
    sparse at every length with cfg so that every layer is captured) prefilling a variable-tracking eval prompt."""
    if kind == "random":
        return {None: random_qkv(N, HQ, H, D)}
    model, tok = model
    return capture_attention_inputs(model, eval_prompt_ids(tok, N))


def time_one(q, k, v, cfg, N: int, layer) -> list[dict]:
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    recs = []
    for name, be in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        def dense(be=be):
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
        recs.append({"impl": name, "ms": try_bench(dense)})
    recs.append({"impl": "longcpm", "ms": try_bench(lambda: infllmv2_attention(q, k, v, cfg))})
    recs.append({"impl": "longcpm_select", "ms": try_bench(lambda: infllmv2_select(q, k, cfg))})
    return [{**r, "N": N, **({"layer": layer} if layer is not None else {})} for r in recs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or None)
    ap.add_argument("--ns", default="4096,8192,16384,32768,65536")
    ap.add_argument("--topk", type=int, help="replace the model's top-k")
    ap.add_argument("--inputs", choices=("random", "model"), default="random",
                    help="random q/k/v, or every layer's q/k/v of the packaged model prefilling an eval prompt")
    a = ap.parse_args()
    config = ModelConfig.from_file(asset_dir("needle-27m") / "config.json")
    cfg = replace(config.sparse_config, dense_len=-1)  # always sparse: the table forces it at every length
    if a.topk:
        cfg = replace(cfg, topk=a.topk)
    HQ, H, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    model = needle_model(cfg) if a.inputs == "model" else None  # loaded once for every length
    records = []
    for N in map(int, a.ns.split(",")):
        for layer, (q, k, v) in inputs(a.inputs, N, cfg, HQ, H, D, model).items():
            records += time_one(q, k, v, cfg, N, layer)
        if a.inputs == "model":  # the model's attention cost: every layer's time summed
            for impl in dict.fromkeys(r["impl"] for r in records):
                ms = [r["ms"] for r in records if r["N"] == N and r["impl"] == impl and r["layer"] != "sum"]
                if all(isinstance(x, float) for x in ms):
                    records.append({"impl": impl, "N": N, "layer": "sum", "ms": round(sum(ms), 4)})
        print(" ".join(f"{r['impl']}={r['ms']}" for r in records if r["N"] == N and r.get("layer") in (None, "sum")),
              f"N={N}", flush=True)
        torch.cuda.empty_cache()
    out = write_json({"environment": environment(), "shape": {"B": 1, "HQ": HQ, "H": H, "D": D, "dtype": "bfloat16"},
                      "sparse_config": cfg.to_dict(), "inputs": a.inputs, "records": records},
                     f"attention-needle{'-model' if a.inputs == 'model' else ''}{f'-topk{a.topk}' if a.topk else ''}"
                     "-h200.json", a.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
