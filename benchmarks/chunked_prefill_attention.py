"""Dense attention of a chunked prefill at the built-in needle-27m's shapes: what the eval's whole-model dense
prefill runs (the engine prefills in chunks of max_num_batched_tokens = 8,192), against one causal call.

One layer, batch 1, HQ 8, H 1, D 64, bf16, forward. For a prompt of N tokens in chunks of C, chunk i has C queries
over (i+1)*C keys with a lower-right causal mask (`longcpm.ops.paged.prefill_attention`, triton backend). Timed:
  one_call            SDPA is_causal over all N (what attention_needle.py times)
  chunks_default      the C-token chunks as the engine runs them, SDPA choosing the kernel
  chunks_flash / chunks_efficient / chunks_cudnn   the same with one SDPA backend forced ("err: ..." if refused)
  sparse_chunks       InfLLM-V2 sparse over the same chunks (the model's sparse_config, sparse forced)
Writes benchmarks/results/chunked-prefill-h200.json (environment, shape, records {impl, N, chunk, ms}).

    python benchmarks/chunked_prefill_attention.py [--out DIR] [--ns 16384,32768,65536] [--chunk 8192]
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, try_bench, write_json  # noqa: E402

from longcpm.assets import asset_dir  # noqa: E402
from longcpm.config import ModelConfig  # noqa: E402
from longcpm.ops import infllmv2_attention  # noqa: E402
from longcpm.ops.paged import prefill_attention  # noqa: E402

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or None)
    ap.add_argument("--ns", default="16384,32768,65536")
    ap.add_argument("--chunk", type=int, default=8192)
    a = ap.parse_args()
    config = ModelConfig.from_file(asset_dir("needle-27m") / "config.json")
    cfg = replace(config.sparse_config, dense_len=-1)
    HQ, H, D, C = config.num_attention_heads, config.num_key_value_heads, config.head_dim, a.chunk
    records = []
    for N in map(int, a.ns.split(",")):
        g = torch.Generator(device="cuda").manual_seed(N)
        q, k, v = (torch.randn(1, N, h, D, device="cuda", dtype=torch.bfloat16, generator=g) for h in (HQ, H, H))
        starts = range(0, N, C)

        def one_call(q=q, k=k, v=v):
            return prefill_attention(q, k, v, 0, "triton")

        def chunks(q=q, k=k, v=v, N=N, starts=starts, backend=None):
            for s in starts:
                e = min(N, s + C)
                if backend is None:
                    prefill_attention(q[:, s:e], k[:, :e], v[:, :e], s, "triton")
                else:
                    with sdpa_kernel([BACKENDS[backend]]):
                        prefill_attention(q[:, s:e], k[:, :e], v[:, :e], s, "triton")

        def sparse_chunks(q=q, k=k, v=v, N=N, starts=starts):
            for s in starts:
                e = min(N, s + C)
                infllmv2_attention(q[:, s:e], k[:, :e], v[:, :e], cfg)

        runs = {"one_call": one_call, "chunks_default": chunks, "sparse_chunks": sparse_chunks}
        runs.update({f"chunks_{b}": (lambda b=b: chunks(backend=b)) for b in BACKENDS})
        for name, fn in runs.items():
            records.append({"impl": name, "N": N, "chunk": C, "ms": try_bench(fn)})
        print(" ".join(f"{r['impl']}={r['ms']}" for r in records if r["N"] == N), f"N={N}", flush=True)
    out = write_json({"environment": environment(), "shape": {"B": 1, "HQ": HQ, "H": H, "D": D, "dtype": "bfloat16"},
                      "sparse_config": cfg.to_dict(), "records": records}, "chunked-prefill-h200.json", a.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
