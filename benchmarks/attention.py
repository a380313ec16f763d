"""InfLLM-V2 attention against its peers on one GPU, same inputs, one process (issue 4 §6).

Prefill at 8K/32K/64K/128K and decode at 32K/128K (batch 1 and 16), MiniCPM4-8B shapes (HQ=32, H=2, D=128, bf16):
  sdpa_cudnn, sdpa_flash   dense causal SDPA
  flex                     FlexAttention given our exact selection as a BlockMask (+ per-token mask_mod)
  fla_nsa                  flash-linear-attention's NSA selected-attention kernel given our block indices
  longcpm                  ours, selection included;  longcpm_stage2: ours, block-sparse attention alone
Before timing, outputs are checked against a dense masked SDPA built from the same selection.
Writes benchmarks/results/attention-h200.json (records {impl, phase, N, B, ms, ...}) and a plot.

    python benchmarks/attention.py [--out DIR] [--ns 8192,32768,...] [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BS, CFG, HQ, D, G, H, environment, try_bench, write_json  # noqa: E402

from longcpm.ops import infllmv2_attention, infllmv2_decode, infllmv2_select  # noqa: E402
from longcpm.ops.infllmv2.compress import compress_keys  # noqa: E402
from longcpm.ops.infllmv2.parallel import parallel_block_sparse_attention  # noqa: E402


def attended_pairs(idx: torch.Tensor, Tk: int) -> float:
    """Sum over (token, kv head) of visible keys in the selected blocks: the work stage 2 must do."""
    Tq = idx.shape[1]
    pos = torch.arange(Tk - Tq, Tk, device=idx.device)[None, :, None, None]
    start = idx.long() * BS
    vis = (pos - start + 1).clamp(0, BS).masked_fill(idx < 0, 0)
    vis = torch.minimum(vis, (Tk - start).clamp(min=0))
    return float(vis.sum())


def selection_bool(idx: torch.Tensor, n_blk: int) -> torch.Tensor:
    """[1, T, H, W] indices -> [H, T, n_blk] bool."""
    T = idx.shape[1]
    sel = torch.zeros(H, T, n_blk + 1, dtype=torch.bool, device=idx.device)
    sel.scatter_(-1, torch.where(idx[0] < 0, n_blk, idx[0]).long().permute(1, 0, 2), True)
    return sel[..., :n_blk]


def masked_reference(q, k, v, sel64):
    """Dense SDPA with the token-level mask of the selection (exact semantics; memory O(T^2), small N only)."""
    T = q.shape[1]
    tok = sel64.repeat_interleave(BS, -1)[..., :T] & torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    mask = tok.repeat_interleave(G, 0)[None]  # [1, HQ, T, T]
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                          enable_gqa=True).transpose(1, 2)


def flex_block_mask(sel64: torch.Tensor, T: int):
    """Our selection as a FlexAttention BlockMask at 128-token tiles: a tile is full when every query token of it
    selects both 64-blocks of the key tile strictly below the diagonal; partial tiles apply the exact per-token
    mask_mod. The same attention as ours, at Flex's granularity."""
    from torch.nn.attention.flex_attention import BlockMask

    FB = 128
    nq = T // FB
    pair_any = sel64.view(H, T, -1, 2).any(-1)
    pair_all = sel64.view(H, T, -1, 2).all(-1)
    any_cnt = pair_any.view(H, nq, FB, -1).any(2)
    all_cnt = pair_all.view(H, nq, FB, -1).all(2)
    qb = torch.arange(nq, device=sel64.device)[:, None]
    kb = torch.arange(any_cnt.shape[-1], device=sel64.device)[None, :]
    full = all_cnt & (kb < qb)
    part = any_cnt & ~full & (kb <= qb)

    def to_kv(m):
        num = m.sum(-1).int()
        ind = torch.argsort(m.int(), dim=-1, descending=True, stable=True).int()
        return num.repeat_interleave(G, 0)[None].contiguous(), ind.repeat_interleave(G, 0)[None].contiguous()

    pn, pi = to_kv(part)
    fn, fi = to_kv(full)
    sel_g = sel64

    def mask_mod(b, h, q_idx, kv_idx):
        return sel_g[h // G, q_idx, kv_idx // BS] & (kv_idx <= q_idx)

    return BlockMask.from_kv_blocks(pn, pi, fn, fi, BLOCK_SIZE=FB, mask_mod=mask_mod)


def make_queries(N: int, queries: str, dev: str) -> torch.Tensor:
    """random: independent per token (each token's top-k is its own: the worst case for tiles that share lists).
    smooth: a component shared by the 64 tokens of a block plus per-token noise (rho = 0.9), as consecutive
    queries of a real model are correlated; the selection is still computed per token by stage 1."""
    q = torch.randn(1, N, HQ, D, device=dev, dtype=torch.float32)
    if queries == "smooth":
        base = torch.randn(1, -(-N // BS), HQ, D, device=dev).repeat_interleave(BS, 1)[:, :N]
        q = 0.9 * base + (1 - 0.9 ** 2) ** 0.5 * q
    return q.to(torch.bfloat16)


def flex_union_mask(sel64: torch.Tensor, T: int):
    """Not the same attention: every query of a 128-token tile attends every key tile any of its tokens selected
    (how ../shared/anchors measured Flex). Reported as flex_union, for comparison with the anchors only."""
    from torch.nn.attention.flex_attention import BlockMask

    FB = 128
    nq = T // FB
    tiles = sel64.view(H, T, -1, 2).any(-1).view(H, nq, FB, -1).any(2)
    qb = torch.arange(nq, device=sel64.device)[:, None]
    kb = torch.arange(tiles.shape[-1], device=sel64.device)[None, :]
    full = tiles & (kb < qb)
    diag = torch.zeros_like(full) | (kb == qb)
    rep = lambda t: t.repeat_interleave(G, 0)[None].contiguous()  # noqa: E731
    order = lambda m: torch.argsort(m.int(), dim=-1, descending=True, stable=True).int()  # noqa: E731
    return BlockMask.from_kv_blocks(rep(diag.sum(-1).int()), rep(order(diag)), rep(full.sum(-1).int()),
                                    rep(order(full)), BLOCK_SIZE=FB, mask_mod=lambda b, h, q, kv: kv <= q)


def prefill_rows(N: int, check: bool, flex_fn, nsa_fn, queries: str = "random") -> list[dict]:
    torch.manual_seed(N)
    dev = "cuda"
    q = make_queries(N, queries, dev)
    k = torch.randn(1, N, H, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, N, H, D, device=dev, dtype=torch.bfloat16)
    qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    idx = infllmv2_select(q, k, CFG)
    pairs = attended_pairs(idx, N)
    flops_sparse = 4 * G * D * pairs
    flops_dense = 2 * HQ * D * N * N  # causal half of 4*N^2*D per head
    rows = []

    def rec(impl, ms, flops=None, **extra):
        r = {"impl": impl, "phase": "prefill", "N": N, "B": 1, "ms": ms, "queries": queries}
        if isinstance(ms, float) and flops:
            r["tflops_eff"] = round(flops / ms / 1e9, 1)
        r.update(extra)
        rows.append(r)
        print(r, flush=True)

    for name, be in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
        def f(be=be):
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True)
        rec(name, try_bench(f), flops_dense)

    sel64 = selection_bool(idx, -(-N // BS))
    errs = {}
    if check:
        ref = masked_reference(q, k, v, sel64).float()
        ours = parallel_block_sparse_attention(q, k, v, idx, BS).float()
        errs["longcpm_stage2"] = float((ours - ref).norm() / ref.norm())
        full = infllmv2_attention(q, k, v, CFG).float()
        errs["longcpm"] = float((full - ref).norm() / ref.norm())
    rec("longcpm", try_bench(lambda: infllmv2_attention(q, k, v, CFG)), flops_sparse,
        attended_tokens_mean=round(pairs / (N * H), 1), rel_err=errs.get("longcpm"))
    rec("longcpm_stage2", try_bench(lambda: parallel_block_sparse_attention(q, k, v, idx, BS)), flops_sparse,
        rel_err=errs.get("longcpm_stage2"))
    rec("longcpm_select", try_bench(lambda: infllmv2_select(q, k, CFG)))

    if flex_fn is not None:
        try:
            bm = flex_block_mask(sel64, N)
            f = lambda: flex_fn(qh, kh, vh, block_mask=bm, enable_gqa=True)  # noqa: E731
            err = None
            if check:
                err = float((f().transpose(1, 2).float() - ref).norm() / ref.norm())
            rec("flex", try_bench(f), flops_sparse, rel_err=err)
            del bm
        except Exception as e:
            rec("flex", f"err: {type(e).__name__}: {str(e)[:200]}")
        try:  # the anchors' looser peer: union of the selection over 128-token query tiles, causal mask only
            bmu = flex_union_mask(sel64, N)
            fu = lambda: flex_fn(qh, kh, vh, block_mask=bmu, enable_gqa=True)  # noqa: E731
            rec("flex_union", try_bench(fu), flops_sparse, exact=False)
            del bmu
        except Exception as e:
            rec("flex_union", f"err: {type(e).__name__}: {str(e)[:200]}")
    if nsa_fn is not None:
        try:
            cnt = (idx >= 0).sum(-1).int()
            f = lambda: nsa_fn(q, k, v, idx, cnt)  # noqa: E731
            err = None
            if check:
                err = float((f().float() - ref).norm() / ref.norm())
            rec("fla_nsa", try_bench(f), flops_sparse, rel_err=err)
        except Exception as e:
            rec("fla_nsa", f"err: {type(e).__name__}: {str(e)[:200]}")
    return rows


def decode_rows(B: int, N: int, nsa_fn) -> list[dict]:
    torch.manual_seed(B * N)
    dev = "cuda"
    q = torch.randn(B, 1, HQ, D, device=dev, dtype=torch.bfloat16)
    kc = torch.randn(B, N, H, D, device=dev, dtype=torch.bfloat16)
    vc = torch.randn(B, N, H, D, device=dev, dtype=torch.bfloat16)
    c1 = compress_keys(kc, CFG.kernel_size, CFG.kernel_stride)[0]
    c2 = compress_keys(kc, CFG.lse_kernel_size, CFG.lse_kernel_stride)[0]
    seqlens = torch.full((B,), N, dtype=torch.int32, device=dev)
    qh, kh, vh = q.transpose(1, 2).contiguous(), kc.transpose(1, 2).contiguous(), vc.transpose(1, 2).contiguous()
    rows = []

    def rec(impl, ms, **extra):
        r = {"impl": impl, "phase": "decode", "N": N, "B": B, "ms": ms, **extra}
        rows.append(r)
        print(r, flush=True)

    def dense(be):
        def f():
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=True)
        return f

    rec("sdpa_flash", try_bench(dense([SDPBackend.FLASH_ATTENTION])))
    rec("sdpa_cudnn", try_bench(dense([SDPBackend.CUDNN_ATTENTION])))
    rec("sdpa_any", try_bench(dense([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                     SDPBackend.CUDNN_ATTENTION])))
    ref_idx = infllmv2_select(q, kc, CFG)  # prefill-path selection of the last token: the decode path must agree
    out = infllmv2_decode(q, kc, vc, seqlens, CFG, c1=c1, c2=c2)
    sel = selection_bool(ref_idx[:1], -(-N // BS)) if B == 1 else None
    err = None
    if sel is not None:
        ref = parallel_block_sparse_attention(q, kc, vc, ref_idx, BS).float()
        err = float((out.float() - ref).norm() / ref.norm())
    rec("longcpm", try_bench(lambda: infllmv2_decode(q, kc, vc, seqlens, CFG, c1=c1, c2=c2)), rel_err=err)
    g = torch.cuda.CUDAGraph()
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                infllmv2_decode(q, kc, vc, seqlens, CFG, c1=c1, c2=c2)
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            infllmv2_decode(q, kc, vc, seqlens, CFG, c1=c1, c2=c2)
        rec("longcpm_graph", try_bench(g.replay))
    except Exception as e:
        rec("longcpm_graph", f"err: {type(e).__name__}: {str(e)[:200]}")
    from longcpm.ops.infllmv2.decode import decode_block_sparse_attention
    rec("longcpm_stage2", try_bench(lambda: decode_block_sparse_attention(q, kc, vc, seqlens, ref_idx, BS)))
    if nsa_fn is not None:
        cnt = (ref_idx >= 0).sum(-1).int()
        rec("fla_nsa_stage2", try_bench(lambda: nsa_fn(q, kc, vc, ref_idx, cnt)))
    return rows


def load_peers():
    flex_fn = nsa_fn = None
    notes = {}
    try:
        from torch.nn.attention.flex_attention import flex_attention
        flex_fn = torch.compile(flex_attention, dynamic=False)
    except Exception as e:
        notes["flex"] = str(e)[:200]
    try:
        from fla.ops.nsa.parallel import ParallelNSAFunction

        def nsa_fn(q, k, v, idx, cnt):
            return ParallelNSAFunction.apply(q, k, v, idx, cnt, BS, 1.0 / math.sqrt(D), None)
        import fla
        notes["fla_version"] = getattr(fla, "__version__", "?")
    except Exception as e:
        notes["fla"] = f"{type(e).__name__}: {str(e)[:200]}"
    return flex_fn, nsa_fn, notes


def plot(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    pre = [r for r in records if r["phase"] == "prefill" and isinstance(r["ms"], float)]
    modes = sorted({r.get("queries", "random") for r in pre})
    for r in pre:  # dense peers do not depend on the queries' structure: one line for them
        r["_label"] = r["impl"] if r["impl"].startswith("sdpa") else f"{r['impl']} [{r.get('queries', 'random')}]"
    pre = [r for r in pre if not r["impl"].startswith("sdpa") or r.get("queries", "random") == modes[0]]
    for label in sorted({r["_label"] for r in pre}):
        rs = sorted((r for r in pre if r["_label"] == label), key=lambda r: r["N"])
        axes[0].plot([r["N"] for r in rs], [r["ms"] for r in rs], marker="o", label=label,
                     linestyle="--" if "smooth" in label else "-")
    axes[0].set(xscale="log", yscale="log", xlabel="sequence length", ylabel="ms (median)",
                title="prefill, MiniCPM4-8B attention (HQ=32, H=2, D=128, bf16)")
    axes[0].legend(fontsize=8)
    dec = [r for r in records if r["phase"] == "decode" and isinstance(r["ms"], float)]
    labels = sorted({(r["B"], r["N"]) for r in dec})
    impls = sorted({r["impl"] for r in dec})
    w = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        ys = [next((r["ms"] for r in dec if r["impl"] == impl and (r["B"], r["N"]) == lab), 0) for lab in labels]
        axes[1].bar([x + i * w for x in range(len(labels))], ys, width=w, label=impl)
    axes[1].set_xticks([x + 0.4 for x in range(len(labels))], [f"B={b}\nN={n // 1024}K" for b, n in labels])
    axes[1].set(yscale="log", ylabel="ms per step (median)", title="decode, one query token")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    for r in records:
        r.pop("_label", None)


def summary(records: list[dict]) -> list[str]:
    """Ratios against the targets of issue 4, from this run only."""
    def ms(impl, phase, N, B=1):
        r = next((r for r in records if (r["impl"], r["phase"], r["N"], r["B"]) == (impl, phase, N, B)), None)
        return r["ms"] if r and isinstance(r["ms"], float) else None

    lines = []
    all_records = records
    for qm in sorted({r.get("queries", "random") for r in all_records if r["phase"] == "prefill"}):
        records = [r for r in all_records if r["phase"] != "prefill" or r.get("queries", "random") == qm]
        for N in sorted({r["N"] for r in records if r["phase"] == "prefill"}):
            ours, cud, fl, nsa = (ms(i, "prefill", N) for i in ("longcpm", "sdpa_cudnn", "flex", "fla_nsa"))
            st2 = next((r for r in records if (r["impl"], r["phase"], r["N"]) == ("longcpm_stage2", "prefill", N)),
                       {})
            rat = lambda a, b: f"{a / b:.3f}" if a and b else "n/a"  # noqa: E731
            lines.append(f"prefill[{qm}] N={N}: longcpm {ours} ms | /sdpa_cudnn {rat(ours, cud)} | /flex "
                         f"{rat(ours, fl)} | /fla_nsa {rat(ours, nsa)} | stage2 {st2.get('ms')} ms = "
                         f"{st2.get('tflops_eff')} TFLOP/s eff")
    records = all_records
    for B, N in sorted({(r["B"], r["N"]) for r in records if r["phase"] == "decode"}):
        ours, g, fa = ms("longcpm", "decode", N, B), ms("longcpm_graph", "decode", N, B), ms("sdpa_flash", "decode", N, B)
        best = min(x for x in (ours, g) if x) if (ours or g) else None
        lines.append(f"decode B={B} N={N}: longcpm {ours} ms, graph {g} ms | best/sdpa_flash "
                     f"{best / fa:.3f}" if best and fa else f"decode B={B} N={N}: n/a")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT") or None)
    ap.add_argument("--ns", default="8192,32768,65536,131072")
    ap.add_argument("--decode", default="1x32768,1x131072,16x32768,16x131072")
    ap.add_argument("--check-max", type=int, default=8192, help="check outputs against masked SDPA up to this N")
    ap.add_argument("--queries", default="random,smooth", help="query structures to run: random, smooth")
    args = ap.parse_args()
    flex_fn, nsa_fn, notes = load_peers()
    res = {**environment(), "shapes": {"HQ": HQ, "H": H, "D": D, "dtype": "bfloat16"},
           "sparse_config": CFG.to_dict(), "notes": notes, "records": []}
    for queries in [x for x in args.queries.split(",") if x]:
        for N in [int(x) for x in args.ns.split(",") if x]:
            try:
                res["records"] += prefill_rows(N, N <= args.check_max, flex_fn, nsa_fn, queries)
            except Exception:
                traceback.print_exc()
            torch.cuda.empty_cache()
    for spec in [s for s in args.decode.split(",") if s]:
        B, N = (int(x) for x in spec.split("x"))
        try:
            res["records"] += decode_rows(B, N, nsa_fn)
        except Exception:
            traceback.print_exc()
        torch.cuda.empty_cache()
    res["summary"] = summary(res["records"])
    p = write_json(res, "attention-h200.json", args.out)
    plot(res["records"], p.with_suffix(".png"))
    print("\n".join(res["summary"]))
    print(f"wrote {p}")


if __name__ == "__main__":
    main()
