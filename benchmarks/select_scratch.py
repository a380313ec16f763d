"""Private tuning script for the InfLLM-V2 selection kernels (compress, stage 1 + pool, top-k; prefill and decode).

Not the project benchmark (benchmarks/attention.py). MiniCPM4-8B shapes: HQ=32, H=2, D=128, bf16.
Usage: python benchmarks/select_scratch.py [--out results.json] [--lens 32768,131072] [--variants]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
import triton
from triton.testing import do_bench

from longcpm.config import SparseConfig
from longcpm.ops.infllmv2.compress import append_compressed, compress_keys
from longcpm.ops.infllmv2.select import decode_infllmv2_select, parallel_infllmv2_select

CFG = SparseConfig(dense_len=-1)


def keys(B, T, H, D, seg=32):
    shared = torch.randn(B, -(-T // seg), H, D, device="cuda").repeat_interleave(seg, 1)[:, :T]
    return (torch.randn(B, T, H, D, device="cuda") + 1.5 * shared).bfloat16()


def kernel_times(fn, iters=3) -> dict[str, float]:
    """Mean ms per call of each kernel, by name, from the profiler."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    acc = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            acc[e.name] += e.device_time / 1000 / iters
    return {k: round(v, 4) for k, v in sorted(acc.items(), key=lambda kv: -kv[1])}


def bench_prefill(N, HQ=32, H=2, D=128, variants=(), topk_variants=()):
    q = torch.randn(1, N, HQ, D, device="cuda").bfloat16()
    k = keys(1, N, H, D)
    rec = {"phase": "prefill", "N": N, "HQ": HQ, "H": H, "D": D}
    rec["compress_ms"] = do_bench(lambda: (compress_keys(k, 32, 16), compress_keys(k, 128, 64)), return_mode="median")
    c1, c2 = compress_keys(k, 32, 16)[0], compress_keys(k, 128, 64)[0]
    rec["select_ms"] = do_bench(lambda: parallel_infllmv2_select(q, k, CFG), return_mode="median", rep=300)
    rec["kernels"] = kernel_times(lambda: parallel_infllmv2_select(q, k, CFG, c1=c1, c2=c2))
    scores = torch.randn(H, N, triton.cdiv(N, 64), device="cuda")
    rec["torch_topk96_ms"] = do_bench(lambda s=scores: s.topk(96, -1), return_mode="median", rep=200)
    del scores
    ref = parallel_infllmv2_select(q, k, CFG, c1=c1, c2=c2)
    for t in variants:
        try:
            out = parallel_infllmv2_select(q, k, CFG, c1=c1, c2=c2, tiles=t)
            same = (out == ref).float().mean().item()
            ms = do_bench(lambda t=t: parallel_infllmv2_select(q, k, CFG, c1=c1, c2=c2, tiles=t),
                          return_mode="median", rep=300)
            kt = kernel_times(lambda t=t: parallel_infllmv2_select(q, k, CFG, c1=c1, c2=c2, tiles=t), iters=2)
            rec[f"tiles{t}"] = {"ms_no_compress": round(ms, 3), "same_idx": round(same, 5),
                                "stage1": next((v for n, v in kt.items() if "stage1" in n), None),
                                "topk": next((v for n, v in kt.items() if "topk" in n), None)}
        except Exception as e:  # noqa: BLE001
            rec[f"tiles{t}"] = f"err: {type(e).__name__}: {str(e)[:200]}"
        print(f"  {N} tiles {t}: {rec[f'tiles{t}']}", flush=True)
    for tc in topk_variants:
        out = parallel_infllmv2_select(q, k, CFG, c1=c1, c2=c2, topk_cfg=tc)
        kt = kernel_times(lambda tc=tc: parallel_infllmv2_select(q, k, CFG, c1=c1, c2=c2, topk_cfg=tc), iters=2)
        rec[f"topk{tc}"] = {"same_idx": round((out == ref).float().mean().item(), 5),
                            "topk": next((v for n, v in kt.items() if "topk" in n), None)}
        print(f"  {N} topk {tc}: {rec[f'topk{tc}']}", flush=True)
    # causal FLOPs of the score matmuls actually needed: per row ~ (p/64 + p/16) windows x 2*D per query head
    rec["stage1_tflop"] = round(2 * HQ * D * (N * N / 2) * (1 / 64 + 1 / 16) / 1e12, 3)
    return rec


def bench_decode(B, N, Tq=1, HQ=32, H=2, D=128, variants=False):
    n1, n2 = (N - 32) // 16 + 1, (N - 128) // 64 + 1
    c1 = torch.randn(B, n1 + 8, H, D, device="cuda").bfloat16()
    c2 = torch.randn(B, n2 + 8, H, D, device="cuda").bfloat16()
    q = torch.randn(B, Tq, HQ, D, device="cuda").bfloat16()
    lens = torch.full((B,), N, dtype=torch.int32, device="cuda")
    k_cache = keys(B, N + 64, H, D)
    old = lens - Tq

    def sel():
        return decode_infllmv2_select(q, c1, c2, lens, CFG, CFG.budget)

    def step():
        append_compressed(k_cache, c1, old, lens, 32, 16, -(-Tq // 16) + 1)
        append_compressed(k_cache, c2, old, lens, 128, 64, -(-Tq // 64) + 1)
        return sel()

    rec = {"phase": "decode", "N": N, "B": B, "Tq": Tq}
    for name, fn in (("select", sel), ("append_select", step)):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        rec[f"{name}_graph_ms"] = round(do_bench(g.replay, return_mode="median", rep=200), 4)
    rec["kernels"] = kernel_times(sel, iters=20)
    for tc in ((1, 1), (1, 2), (1, 4), (1, 8), (1, 16)) if variants else ():
        rec[f"topk{tc}"] = next((v for n, v in kernel_times(
            lambda tc=tc: decode_infllmv2_select(q, c1, c2, lens, CFG, CFG.budget, topk_cfg=tc), iters=20).items()
            if "topk" in n), None)
    return rec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--lens", default="32768,131072")
    ap.add_argument("--variants", action="store_true")
    ap.add_argument("--no-decode", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "records": []}
    variants = [(8, 64, 4, 2), (8, 64, 4, 3), (8, 128, 4, 2), (8, 128, 8, 2), (4, 64, 4, 2), (16, 64, 8, 2),
                (8, 32, 4, 3)] if args.variants else ()
    topk_variants = [(1, 1), (2, 1), (4, 1), (8, 1), (1, 2), (2, 2), (2, 4)] if args.variants else ()
    lens = [int(x) for x in args.lens.split(",")]
    for N in lens:
        big = N == max(lens)
        r = bench_prefill(N, variants=variants if big else (), topk_variants=topk_variants if big else ())
        print(json.dumps(r), flush=True)
        res["records"].append(r)
        torch.cuda.empty_cache()
    if not args.no_decode:
        for B in (1, 16):
            for N in (32768, 131072):
                r = bench_decode(B, N, variants=args.variants)
                print(json.dumps(r), flush=True)
                res["records"].append(r)
        r = bench_decode(1, 131072, Tq=16)
        print(json.dumps(r), flush=True)
        res["records"].append(r)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    print("\nsummary")
    for r in res["records"]:
        keep = {k: v for k, v in r.items() if k.endswith("_ms") or k in ("N", "B", "Tq", "phase")}
        print(keep)


if __name__ == "__main__":
    main()
