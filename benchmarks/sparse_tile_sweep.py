"""Tile and launch sweep of the InfLLM-V2 prefill kernel (ops/infllmv2/parallel.py) at needle-27m's shapes.

prefill_config was tuned at MiniCPM4-8B shapes (G = 16 query heads per kv head, D = 128: 4 tokens x 16 heads =
64 rows a tile). The built-in model has G = 8, D = 64, and there the sparse kernel at top-k 64 is slower than
cuDNN's whole causal pass (attention-needle-h200.json). This times the stage-2 kernel (block union included) over
tokens per tile BT, key tile BN, warps and pipeline stages, on the q/k/v the packaged model itself produces
(layers LAYERS of a variable-tracking eval prompt, captured during its sparse prefill) and on random inputs, next
to dense cuDNN SDPA and the block selection on the same tensors, and the whole model's unchunked forward on that
prompt, dense against sparse. Every config's output is checked against the
default config's. Also records the union width: the distinct key blocks a tile walks, against the W each token
selects.

    python benchmarks/sparse_tile_sweep.py [--out DIR] [--ns 16384,32768,65536] [--layers 1,6]
Writes sparse-tile-sweep-h200.json: environment, shapes, records {input, N, impl, config, ms, max_err}.
"""

from __future__ import annotations

import argparse
import itertools
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

from longcpm.ops import infllmv2_select  # noqa: E402
from longcpm.ops.infllmv2 import parallel as stage2  # noqa: E402


def sweep(q, k, v, cfg, tag: str, N: int, configs: list[dict]) -> list[dict]:
    recs = []
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def cudnn():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)

    recs.append({"impl": "sdpa_cudnn", "ms": try_bench(cudnn)})
    idx = infllmv2_select(q, k, cfg)
    recs.append({"impl": "select", "ms": try_bench(lambda: infllmv2_select(q, k, cfg))})
    G, D, H, W = q.shape[2] // k.shape[2], q.shape[3], k.shape[2], idx.shape[-1]
    default = stage2.prefill_config(G, D, cfg.block_size)
    ref = stage2.parallel_block_sparse_attention(q, k, v, idx, cfg.block_size).float()
    for BT in sorted({c["BT"] for c in configs}):
        NT = -(-N // BT)
        c_max = stage2.union_width(BT, W, 0, N, cfg.block_size)
        _, _, cnt = stage2.block_union(idx, BT=BT, NT=NT, grid_t=NT, B=1, H=H, Tq=N, Tk=N, block_size=cfg.block_size,
                                window_blocks=0, c_max=c_max, mode=0)
        ms = try_bench(lambda BT=BT, NT=NT, c_max=c_max: stage2.block_union(
            idx, BT=BT, NT=NT, grid_t=NT, B=1, H=H, Tq=N, Tk=N, block_size=cfg.block_size, window_blocks=0,
            c_max=c_max, mode=0))
        per_tok = (idx >= 0).sum(-1).float().mean().item()
        recs.append({"impl": "union", "config": {"BT": BT}, "ms": ms, "W": W,
                     "union_blocks_mean": round(cnt.float().mean().item(), 2),
                     "blocks_per_token_mean": round(per_tok, 2)})
    for c in configs:
        try:
            o = stage2.parallel_block_sparse_attention(q, k, v, idx, cfg.block_size, config=c)
            err = (o.float() - ref).abs().max().item()
        except Exception as e:  # a config the compiler or the GPU refuses is recorded, not fatal
            recs.append({"impl": "stage2", "config": c, "ms": f"err: {type(e).__name__}", "max_err": None})
            continue
        ms = try_bench(lambda c=c: stage2.parallel_block_sparse_attention(q, k, v, idx, cfg.block_size, config=c))
        recs.append({"impl": "stage2", "config": c, "default": c == default, "ms": ms, "max_err": round(err, 5)})
    for r in recs:
        r.update(input=tag, N=N)
    best = min((r for r in recs if r["impl"] == "stage2" and isinstance(r["ms"], float)), key=lambda r: r["ms"])
    dflt = next((r for r in recs if r.get("default")), None)
    print(f"{tag} N={N}: cudnn {recs[0]['ms']} select {recs[1]['ms']} default {dflt and dflt['ms']} "
          f"best {best['ms']} {best['config']}", flush=True)
    return recs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or None)
    ap.add_argument("--ns", default="16384,32768,65536")
    ap.add_argument("--layers", default="1,6")
    a = ap.parse_args()
    model, tok = needle_model()
    cfg = replace(model.config.sparse_config, dense_len=-1)
    G, D = model.config.num_attention_heads // model.config.num_key_value_heads, model.config.head_dim
    configs = [dict(BT=bt, BN=bn, num_warps=w, num_stages=s)
               for bt, bn, w, s in itertools.product((8, 16), (32, 64), (4, 8), (2, 3, 4))]
    default = stage2.prefill_config(G, D, cfg.block_size)
    if default not in configs:
        configs.insert(0, default)
    layers = {int(x) for x in a.layers.split(",")}
    dense_model, _ = needle_model(sparse_config=None)
    records = []
    for N in map(int, a.ns.split(",")):
        ids = torch.tensor([eval_prompt_ids(tok, N)], device="cuda")
        for name, m in (("model_forward_dense", dense_model), ("model_forward_sparse", model)):
            with torch.no_grad():  # one unchunked forward of the whole model, logits included
                records.append({"input": "model", "N": ids.shape[1], "impl": name,
                                "ms": try_bench(lambda m=m, ids=ids: m(ids), warmup=2, rep=20)})
        print(records[-2], records[-1], flush=True)
        for i, (q, k, v) in sorted(capture_attention_inputs(model, ids[0].tolist(), layers).items()):
            records += sweep(q, k, v, cfg, f"model-layer{i}", q.shape[1], configs)
        q, k, v = random_qkv(N, model.config.num_attention_heads, model.config.num_key_value_heads, D)
        records += sweep(q, k, v, cfg, "random", N, configs)
        torch.cuda.empty_cache()
    path = write_json({"environment": environment(),
                       "shape": {"HQ": model.config.num_attention_heads, "H": model.config.num_key_value_heads,
                                 "D": D, "dtype": "bfloat16", "batch": 1},
                       "sparse_config": cfg.to_dict(), "default_config": default, "records": records},
                      "sparse-tile-sweep-h200.json", a.out)
    print(path)


if __name__ == "__main__":
    main()
