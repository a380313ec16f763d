"""Where a decode step's GPU time goes: the engine's eager and graphed decode at 4K context under torch.profiler,
kernels sorted by total CUDA time. A diagnosis script (issue 7: decode is far above the weight-bandwidth floor).

    python benchmarks/profile_decode.py [--shape 0.5b] [--ctx 4096] [--steps 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e import engine_decode, random_model  # noqa: E402

from longcpm.assets import asset_dir  # noqa: E402
from longcpm.engine import EngineConfig, LLMEngine  # noqa: E402
from longcpm.text import load_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="0.5b")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    name = {"0.5b": "minicpm4-0.5b", "8b": "minicpm4-8b"}[args.shape]
    model = random_model(name, 8192, "cuda", torch.bfloat16)
    engine = LLMEngine(model, load_tokenizer(asset_dir("minicpm4-0.5b")), EngineConfig(
        max_model_len=8192, max_num_seqs=1, enable_prefix_caching=False, gpu_memory_utilization=0.5))
    from torch.profiler import ProfilerActivity, profile

    lines = []
    for label in ("graphs", "eager"):
        if label == "eager":
            engine.runner.graphs = None
        engine_decode(engine, 1, args.ctx, 2, 2)  # warm up: compile kernels, capture graphs
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            r = engine_decode(engine, 1, args.ctx, args.steps, 1)
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
        lines += [f"== {label}: {r}", table]
    text = "\n".join(lines)
    Path(args.out, f"profile-decode-{args.shape}.txt").write_text(text)
    print(text[-9000:])


if __name__ == "__main__":
    main()
