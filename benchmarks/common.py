"""Shared benchmark plumbing: environment record, timing, JSON output. Scripts, not tests."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch

from longcpm.config import SparseConfig  # the scripts put src/ on sys.path before importing this module

RESULTS = Path(__file__).resolve().parent / "results"

# attention benchmarks: MiniCPM4-8B shapes and the published sparse config
HQ, H, D = 32, 2, 128
G = HQ // H
CFG = SparseConfig()  # the published MiniCPM4.1 dict: 32/16, 64, init 1, window 2048, topk 64, dense_len 8192
BS = CFG.block_size


def environment() -> dict:
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "commit": commit or os.environ.get("GIT_COMMIT", ""),
    }


def bench_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of fn() by CUDA events (triton.testing.do_bench)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def try_bench(fn, **kw) -> float | str:
    try:
        return round(bench_ms(fn, **kw), 4)
    except Exception as e:  # a peer that fails on a shape is recorded, not fatal
        torch.cuda.synchronize()
        return f"err: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def write_json(obj: dict, name: str, out_dir: str | None = None) -> Path:
    d = Path(out_dir) if out_dir else RESULTS
    d.mkdir(parents=True, exist_ok=True)
    p = d / name
    p.write_text(json.dumps(obj, indent=1) + "\n")
    return p


def capture_attention_inputs(model, ids: list[int], layers: set[int] | None = None) -> dict[int, tuple]:
    """q, k, v (post-RoPE, cloned) of each sparse attention call of one prefill, by layer (layers None: all):
    benchmark kernels on the tensors a trained model really produces, whose block choices are far more alike
    between neighbouring tokens than random inputs' (sparse-tile-sweep-h200.json: union width)."""
    import longcpm.layers.attention as attn_mod

    seen, calls = {}, [0]
    orig = attn_mod.infllmv2_attention

    def spy(q, k, v, cfg, **kw):
        i = calls[0]
        calls[0] += 1
        if layers is None or i in layers:
            seen[i] = (q.clone(), k.clone(), v.clone())
        return orig(q, k, v, cfg, **kw)

    attn_mod.infllmv2_attention = spy
    try:
        with torch.no_grad():
            model(torch.tensor([ids], device=next(model.parameters()).device))
    finally:
        attn_mod.infllmv2_attention = orig
    return seen



def needle_model(sparse_config="config", device: str = "cuda"):
    """(model, tokenizer) of the packaged needle-27m, bf16 on CUDA (fp32 elsewhere); sparse_config as load_model's."""
    from longcpm import load_model
    from longcpm.models.builtin import builtin_path
    from longcpm.text import load_tokenizer

    folder = builtin_path("needle-27m")
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return load_model(folder, device=device, dtype=dtype, sparse_config=sparse_config), load_tokenizer(folder)


def eval_prompt_ids(tokenizer, N: int) -> list[int]:
    """Token ids of the first held-out variable-tracking eval prompt sized to N tokens: a realistic long input."""
    from longcpm.train.synthetic import EVAL_SEED_START, generate

    return tokenizer.encode(generate("variable_tracking", N, EVAL_SEED_START, tokenizer).prompt)


def random_qkv(N: int, HQ: int, H: int, D: int, device: str = "cuda") -> tuple:
    """q [1, N, HQ, D], k and v [1, N, H, D], seeded by N, bf16 on CUDA (fp32 elsewhere)."""
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    g = torch.Generator(device=device).manual_seed(N)
    return tuple(torch.randn(1, N, h, D, device=device, dtype=dtype, generator=g) for h in (HQ, H, H))
