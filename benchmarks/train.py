"""Training-side benchmark (issue 5 §6) on one GPU, peers side by side in one process.

Part 1, attention forward + backward (gradients for q, k, v) at 32K/64K/128K, MiniCPM4-8B shapes (HQ=32, H=2,
D=128, bf16), batch 1:
  longcpm          ours: Triton selection + block-sparse forward + backward (longcpm.ops.infllmv2_attention)
  longcpm_stage2   ours given fixed block indices: sparse forward + backward only
  sdpa_cudnn       dense causal SDPA on cuDNN
  flex             FlexAttention with our exact selection as a BlockMask (built as in benchmarks/attention.py)
  fla_nsa          flash-linear-attention's NSA selected attention (ParallelNSAFunction) given our indices
Queries are "random" (independent per token: the worst case for tiles that share block lists) and, for ours,
also "smooth" (consecutive queries correlated, as in a real model); see benchmarks/attention.py.
Part 2, full training steps (AdamW, bf16 autocast over fp32 weights) of a random MiniCPM4-0.5B-shaped model
(24 layers, hidden 1024, 16/2 heads, D=64) through longcpm.train.trainer.measure_throughput: dense at 4K, sparse
and dense at 32K; tokens/s and MFU.
Writes train-h200.json (records {impl, phase, N, B, ms | tokens_per_s, mfu}) and train-h200.png under --out.

    python benchmarks/train.py [--out DIR] [--ns 32768,65536,131072] [--budget-s SECONDS] [--skip flex,fla_nsa]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention import flex_block_mask, make_queries, selection_bool  # noqa: E402
from common import BS, CFG, HQ, D, G, H, environment, write_json  # noqa: E402

from longcpm.config import SparseConfig  # noqa: E402
from longcpm.ops import infllmv2_attention, infllmv2_select  # noqa: E402
from longcpm.ops.infllmv2.autograd import sparse_attention_with_grad  # noqa: E402

T0 = time.time()


def time_ms(fn, leaves, budget_ms: float = 1500.0, max_iter: int = 20) -> float:
    """Median ms of fn() by CUDA events after one warm-up call; as many calls as fit in budget_ms (3 to max_iter).
    Gradients of `leaves` are cleared before each call, outside the timed region."""
    def call():
        for x in leaves:
            x.grad = None
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        return s, e

    call()
    torch.cuda.synchronize()
    s, e = call()
    torch.cuda.synchronize()
    n = max(3, min(max_iter, int(budget_ms / max(s.elapsed_time(e), 1e-3))))
    evs = [call() for _ in range(n)]
    torch.cuda.synchronize()
    return round(sorted(a.elapsed_time(b) for a, b in evs)[n // 2], 3)


def try_time(fn, leaves, **kw) -> float | str:
    try:
        return time_ms(fn, leaves, **kw)
    except Exception as e:  # a peer that fails on a shape is recorded, not fatal
        torch.cuda.synchronize()
        return f"err: {type(e).__name__}: {' | '.join(str(e).strip().splitlines()[:4])[:300]}"


def leaves_like(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def kernel_breakdown(fn, leaves) -> dict:
    """CUDA time per kernel (ms) of one fn() call, from the profiler; the biggest ones."""
    from torch.profiler import ProfilerActivity, profile

    for x in leaves:
        x.grad = None
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t:
            rows.append((ev.key[:60], round(t / 1e3, 3)))
    return dict(sorted(rows, key=lambda r: -r[1])[:12])


def attention_rows(N: int, queries: str, what: set, peers: dict) -> list[dict]:
    """Records of the implementations in `what` (ours, dense, fla_nsa, flex, kernels) at length N."""
    torch.manual_seed(N)
    dev = "cuda"
    q0 = make_queries(N, queries, dev)
    k0 = torch.randn(1, N, H, D, device=dev, dtype=torch.bfloat16)
    v0 = torch.randn(1, N, H, D, device=dev, dtype=torch.bfloat16)
    do = torch.randn_like(q0)
    idx = infllmv2_select(q0, k0, CFG)
    rows = []

    def rec(impl, ms, **extra):
        r = {"impl": impl, "phase": "fwd_bwd", "N": N, "B": 1, "ms": ms, "queries": queries, **extra}
        rows.append(r)
        print(r, flush=True)

    q, k, v = leaves_like(q0, k0, v0)
    ours = lambda: infllmv2_attention(q, k, v, CFG).backward(do)  # noqa: E731
    if "ours" in what:
        rec("longcpm", try_time(ours, [q, k, v]))
        st2 = lambda: sparse_attention_with_grad(q, k, v, idx, BS).backward(do)  # noqa: E731
        rec("longcpm_stage2", try_time(st2, [q, k, v]))
    if "kernels" in what:
        try:
            rec("longcpm_kernels", None, kernels_ms=kernel_breakdown(ours, [q, k, v]))
        except Exception as e:
            rec("longcpm_kernels", f"err: {type(e).__name__}: {str(e)[:200]}")
    qh, kh, vh = leaves_like(*(t.transpose(1, 2) for t in (q0, k0, v0)))
    doh = do.transpose(1, 2)
    if "dense" in what:
        def cudnn():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True).backward(doh)

        ms = try_time(cudnn, [qh, kh, vh])
        if isinstance(ms, str):  # no GQA in this cuDNN backward: expand the kv heads (their gradients sum back)
            def cudnn_expanded():
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    F.scaled_dot_product_attention(qh, kh.repeat_interleave(G, 1), vh.repeat_interleave(G, 1),
                                                   is_causal=True).backward(doh)
            rec("sdpa_cudnn", try_time(cudnn_expanded, [qh, kh, vh]), gqa="expanded", gqa_err=ms)
        else:
            rec("sdpa_cudnn", ms)
    if "fla_nsa" in what and peers.get("nsa"):
        cnt = (idx >= 0).sum(-1).int()
        nsa = lambda: peers["nsa"](q, k, v, idx, cnt).backward(do)  # noqa: E731
        rec("fla_nsa", try_time(nsa, [q, k, v]))
    if "flex" in what and peers.get("flex"):
        try:
            bm = flex_block_mask(selection_bool(idx, -(-N // BS)), N)
            fx = lambda: peers["flex"](qh, kh, vh, block_mask=bm, enable_gqa=True).backward(doh)  # noqa: E731
            rec("flex", try_time(fx, [qh, kh, vh], budget_ms=500.0))
            del bm
        except Exception as e:
            rec("flex", f"err: {type(e).__name__}: {str(e)[:200]}")
    return rows


SWEEP = (  # backward launch variants: dq tile (BT tokens, warps, stages) and dk/dv (BTC tokens, warps, stages)
    {},
    {"num_stages": 3},
    {"BT": 2},
    {"num_warps_kv": 4},
    {"BTC": 8},
    {"num_stages_kv": 3},
)


def sweep_rows(N: int, until: float) -> list[dict]:
    """The backward alone (parallel_block_sparse_attention_bwd) under launch variants, random queries."""
    from longcpm.ops.infllmv2.backward import parallel_block_sparse_attention_bwd
    from longcpm.ops.infllmv2.parallel import parallel_block_sparse_attention

    torch.manual_seed(N)
    q = make_queries(N, "random", "cuda")
    k = torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    do = torch.randn_like(q)
    idx = infllmv2_select(q, k, CFG)
    o, lse = parallel_block_sparse_attention(q, k, v, idx, BS, return_lse=True)
    rows = []
    for cfg in SWEEP:
        if time.time() - T0 > until:
            break
        ms = try_time(lambda cfg=cfg: parallel_block_sparse_attention_bwd(q, k, v, o, lse, do, idx, BS, config=cfg),
                      [], budget_ms=600.0)
        r = {"impl": "longcpm_bwd_only", "phase": "bwd", "N": N, "B": 1, "ms": ms, "config": cfg,
             "queries": "random"}
        rows.append(r)
        print(r, flush=True)
    return rows


def load_peers(skip: set) -> tuple[dict, dict]:
    peers, notes = {}, {}
    if "flex" not in skip:
        try:
            from torch.nn.attention.flex_attention import flex_attention
            peers["flex"] = torch.compile(flex_attention, dynamic=False)
        except Exception as e:
            notes["flex"] = str(e)[:200]
    if "fla_nsa" not in skip:
        try:
            import fla
            from fla.ops.nsa.parallel import ParallelNSAFunction

            def nsa(q, k, v, idx, cnt):
                return ParallelNSAFunction.apply(q, k, v, idx, cnt, BS, 1.0 / math.sqrt(D), None)
            peers["nsa"] = nsa
            notes["fla_version"] = getattr(fla, "__version__", "?")
        except Exception as e:
            notes["fla"] = f"{type(e).__name__}: {str(e)[:200]}"
    return peers, notes


TRAIN_RUNS = (  # impl, seq_len, rows per step, attention, sparse_config
    ("train_dense_4k", 4096, 8, "dense", False),
    ("train_sparse_32k", 32768, 1, "sparse", SparseConfig().to_dict()),
    ("train_dense_32k", 32768, 1, "dense", False),
)


def train_rows(model: str) -> list[dict]:
    from longcpm.train.config import parse_run_config
    from longcpm.train.trainer import measure_throughput

    rows = []
    for impl, L, mb, attention, sparse in TRAIN_RUNS:
        raw = {"model": {"init": model, "attention": attention, "sparse_config": sparse},
               "data": {"seq_len": L, "micro_batch": mb, "sources": [{"type": "synthetic"}]},
               "run": {"steps": 100, "out_dir": tempfile.mkdtemp(prefix="longcpm-bench-"), "progress": False}}
        r = {"impl": impl, "phase": "train", "N": L, "B": mb}
        try:
            m = measure_throughput(parse_run_config(raw, "benchmarks/train.py"), steps=5, warmup=2)
            r.update(tokens_per_s=round(m["tokens_per_s"], 1), mfu=round(m["mfu"], 4) if "mfu" in m else None,
                     step_s=round(m["step_s"], 4), params=m["params"], peak_mem_gib=round(m.get("peak_mem_gib", 0), 2),
                     model=model)
        except Exception as e:
            traceback.print_exc()
            r["tokens_per_s"] = f"err: {type(e).__name__}: {str(e)[:200]}"
        rows.append(r)
        print(r, flush=True)
        torch.cuda.empty_cache()
    return rows


def plot(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    fb = [r for r in records if r["phase"] == "fwd_bwd" and isinstance(r["ms"], float)]
    for label in sorted({(r["impl"], r["queries"]) for r in fb}):
        rs = sorted((r for r in fb if (r["impl"], r["queries"]) == label), key=lambda r: r["N"])
        axes[0].plot([r["N"] for r in rs], [r["ms"] for r in rs], marker="o", label=f"{label[0]} [{label[1]}]",
                     linestyle="--" if label[1] == "smooth" else "-")
    axes[0].set(xscale="log", yscale="log", xlabel="sequence length", ylabel="ms (median)",
                title="attention fwd+bwd, HQ=32 H=2 D=128 bf16")
    axes[0].legend(fontsize=8)
    tr = [r for r in records if r["phase"] == "train" and isinstance(r.get("tokens_per_s"), float)]
    axes[1].bar([r["impl"] for r in tr], [r["tokens_per_s"] for r in tr])
    for i, r in enumerate(tr):
        axes[1].text(i, r["tokens_per_s"], f"MFU {r['mfu']:.2f}" if r.get("mfu") else "", ha="center", va="bottom")
    axes[1].set(ylabel="tokens/s", title="training steps, MiniCPM4-0.5B shape")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def summary(records: list[dict]) -> list[str]:
    def get(impl, N, queries="random", phase="fwd_bwd", key="ms"):
        r = next((r for r in records if (r["impl"], r["N"], r["phase"]) == (impl, N, phase)
                  and r.get("queries", queries) == queries), None)
        return r[key] if r and isinstance(r.get(key), float) else None

    lines = []
    for N in sorted({r["N"] for r in records if r["phase"] == "fwd_bwd"}):
        cud = get("sdpa_cudnn", N)
        target = {65536: 0.5, 131072: 0.25}.get(N)
        for qm in ("random", "smooth"):
            ours = get("longcpm", N, qm)
            if ours and cud:
                lines.append(f"fwd_bwd N={N} [{qm}]: longcpm {ours} ms / sdpa_cudnn {cud} ms = {ours / cud:.3f}"
                             + (f" (target <= {target})" if target else ""))
        for peer in ("flex", "fla_nsa"):
            p, ours = get(peer, N), get("longcpm", N)
            if p and ours:
                lines.append(f"fwd_bwd N={N} [random]: {peer} {p} ms (longcpm / {peer} = {ours / p:.3f})")
    sp, de = get("train_sparse_32k", 32768, phase="train", key="tokens_per_s"), get(
        "train_dense_32k", 32768, phase="train", key="tokens_per_s")
    if sp and de:
        lines.append(f"train 32K: sparse {sp} tok/s vs dense {de} tok/s = {sp / de:.2f}x (target >= 2x)")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT") or None)
    ap.add_argument("--ns", default="32768,65536,131072")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: flex, fla_nsa, train, sweep")
    ap.add_argument("--budget-s", type=float, default=0.0, help="stop starting new parts after this many seconds")
    ap.add_argument("--train-model", default="minicpm4-0.5b")
    args = ap.parse_args()
    skip = {s for s in args.skip.split(",") if s}
    budget = args.budget_s or float("inf")
    peers, notes = load_peers(skip)
    res = {**environment(), "shapes": {"HQ": HQ, "H": H, "D": D, "dtype": "bfloat16"},
           "sparse_config": CFG.to_dict(), "notes": notes, "records": []}

    def save():
        res["summary"] = summary(res["records"])
        return write_json(res, "train-h200.json", args.out)

    def part(queries: str, what: set, until: float) -> None:
        for N in ns:
            if time.time() - T0 > until * budget:
                res["records"].append({"impl": "/".join(sorted(what)), "phase": "fwd_bwd", "N": N, "B": 1,
                                       "queries": queries, "ms": "skipped: time budget"})
                continue
            try:
                res["records"] += attention_rows(N, queries, what, peers)
            except Exception:
                traceback.print_exc()
            torch.cuda.empty_cache()
            save()

    ns = [int(x) for x in args.ns.split(",") if x]
    # most important first: ours and the dense baseline, training throughput, then the rest
    part("random", {"ours", "dense"}, 0.4)
    if "train" not in skip and time.time() - T0 < 0.6 * budget:
        res["records"] += train_rows(args.train_model)
        save()
    part("smooth", {"ours", "kernels"}, 0.7)
    if "fla_nsa" not in skip:
        part("random", {"fla_nsa"}, 0.75)
    if "flex" not in skip:
        part("random", {"flex", "kernels"}, 0.8)
    if "sweep" not in skip and time.time() - T0 < 0.85 * budget:
        res["records"] += sweep_rows(ns[len(ns) // 2], 0.95 * budget)
    p = save()
    try:
        plot(res["records"], p.with_suffix(".png"))
    except Exception:
        traceback.print_exc()
    print("\n".join(res["summary"]))
    print(f"wrote {p} after {time.time() - T0:.0f} s")


if __name__ == "__main__":
    main()
