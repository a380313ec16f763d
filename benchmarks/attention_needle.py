"""Attention time per length at the built-in needle-27m's shapes: what one layer's attention costs in the quality
table's prefill (docs/quality.md), dense against InfLLM-V2 sparse, on one GPU, same inputs.

One layer, batch 1, HQ = 8 query heads, H = 1 kv head, D = 64, bf16, the model's own sparse_config (top-k 64 blocks
of 64, window 512, 1 init block; --topk replaces its top-k); lengths 4K-64K, forward only:
  sdpa_flash / sdpa_cudnn   dense causal SDPA
  longcpm                   InfLLM-V2 sparse, selection included
  longcpm_select            its block selection alone (part of "longcpm")
Writes benchmarks/results/attention-needle-h200.json, or attention-needle-topkK-h200.json with --topk K
(environment, config, records {impl, N, ms}).

    python benchmarks/attention_needle.py [--out DIR] [--ns 4096,8192,...] [--topk K]
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

from common import environment, try_bench, write_json  # noqa: E402

from longcpm.assets import asset_dir  # noqa: E402
from longcpm.config import ModelConfig  # noqa: E402
from longcpm.ops import infllmv2_attention, infllmv2_select  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or None)
    ap.add_argument("--ns", default="4096,8192,16384,32768,65536")
    ap.add_argument("--topk", type=int, help="replace the model's top-k")
    a = ap.parse_args()
    config = ModelConfig.from_file(asset_dir("needle-27m") / "config.json")
    cfg = replace(config.sparse_config, dense_len=-1)  # always sparse: the table forces it at every length
    if a.topk:
        cfg = replace(cfg, topk=a.topk)
    HQ, H, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    records = []
    for N in map(int, a.ns.split(",")):
        g = torch.Generator(device="cuda").manual_seed(N)
        q, k, v = (torch.randn(1, N, h, D, device="cuda", dtype=torch.bfloat16, generator=g) for h in (HQ, H, H))
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        for name, be in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
            def dense(be=be, qt=qt, kt=kt, vt=vt):
                with sdpa_kernel([be]):
                    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
            records.append({"impl": name, "N": N, "ms": try_bench(dense)})
        records.append({"impl": "longcpm", "N": N, "ms": try_bench(lambda q=q, k=k, v=v: infllmv2_attention(q, k, v, cfg))})
        records.append({"impl": "longcpm_select", "N": N, "ms": try_bench(lambda q=q, k=k: infllmv2_select(q, k, cfg))})
        print(" ".join(f"{r['impl']}={r['ms']}" for r in records if r["N"] == N), f"N={N}", flush=True)
    out = write_json({"environment": environment(), "shape": {"B": 1, "HQ": HQ, "H": H, "D": D, "dtype": "bfloat16"},
                      "sparse_config": cfg.to_dict(), "records": records},
                     f"attention-needle{f'-topk{a.topk}' if a.topk else ''}-h200.json", a.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
