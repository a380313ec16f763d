"""Private tuning script for the Triton stage-2 kernels (prefill and decode); the real benchmark is attention.py.

MiniCPM4-8B shapes (HQ=32, H=2, D=128, bf16), 96 selected 64-token blocks per token (init 1 + 33 local + 62
random). Selections: `block` = one list per 64-token query block (as in the peer anchors), `token` = independent
random lists per token (worst case for the tile union), `mixed` = per-block scores plus per-token noise.
Effective TFLOP/s counts 4 * HQ * D * attended (query, key) pairs. Prints a table, writes JSON to $OUT.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import triton
from triton.testing import do_bench

from longcpm.ops.infllmv2.decode import decode_block_sparse_attention
from longcpm.ops.infllmv2.parallel import block_union, parallel_block_sparse_attention, prefill_config, union_width

DEV = "cuda"
HQ, H, D, BS, W, INIT, LOCAL = 32, 2, 128, 64, 96, 1, 32
OUT = os.environ.get("OUT", "/tmp")
res: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
             "prefill": [], "decode": []}


def select(N: int, kind: str, lq: int | None = None, h: int = H) -> torch.Tensor:
    """int32 [lq, h, W] for the last lq of N tokens."""
    lq = lq or N
    pos = torch.arange(N - lq, N, device=DEV)
    nb = -(-N // BS)
    qb = pos // BS
    kk = torch.arange(nb, device=DEV)
    if kind == "block":
        qblk = torch.arange(qb[0].item(), qb[-1].item() + 1, device=DEV)
        s = torch.rand(len(qblk), h, nb, device=DEV)[qb - qblk[0]]
    elif kind == "mixed":
        qblk = torch.arange(qb[0].item(), qb[-1].item() + 1, device=DEV)
        s = torch.rand(len(qblk), h, nb, device=DEV)[qb - qblk[0]] + 0.3 * torch.rand(lq, h, nb, device=DEV)
    else:
        s = torch.rand(lq, h, nb, device=DEV)
    forced = (kk[None] < INIT) | ((kk[None] >= qb[:, None] - LOCAL) & (kk[None] <= qb[:, None]))
    s = s.masked_fill(forced[:, None], 3.0).masked_fill((kk[None] > qb[:, None])[:, None], float("-inf"))
    vals, idx = s.topk(min(W, nb), -1)
    del s
    big = torch.iinfo(torch.int32).max
    idx = torch.where(torch.isneginf(vals), big, idx).sort(-1).values
    idx = torch.where(idx == big, -1, idx).int()
    if idx.shape[-1] < W:
        idx = torch.cat([idx, idx.new_full((lq, h, W - idx.shape[-1]), -1)], -1)
    return idx


def attended_pairs(idx: torch.Tensor, N: int) -> int:
    """Sum over (token, kv head) of visible keys: full past blocks plus the causal part of the current one."""
    lq = idx.shape[0]
    pos = torch.arange(N - lq, N, device=DEV)
    nvalid = (idx >= 0).sum(-1)
    return int((((nvalid - 1) * BS) + (pos % BS + 1)[:, None]).sum())


def bench(f, rep=200):
    return do_bench(f, warmup=50, rep=rep, return_mode="median")


def log(*a):
    print(*a, flush=True)


def prefill(N: int, kinds, variants):
    torch.manual_seed(0)
    q = torch.randn(1, N, HQ, D, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(1, N, H, D, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    for kind in kinds:
        idx = select(N, kind)[None].contiguous()
        pairs = attended_pairs(idx[0], N)
        flops = 4 * (HQ // H) * D * pairs
        ref = None
        for name, cfg in variants:
            row = {"N": N, "sel": kind, "variant": name, "cfg": cfg}
            try:
                full = {**prefill_config(HQ // H, D, BS), **cfg}
                BT = full["BT"]
                NT = triton.cdiv(N, BT)
                cm = union_width(BT, W, 0, N, BS)

                def un(idx=idx, BT=BT, NT=NT, cm=cm):
                    return block_union(idx, BT=BT, NT=NT, grid_t=NT, B=1, H=H, Tq=N, Tk=N, block_size=BS,
                                       window_blocks=0, c_max=cm, mode=0)
                cnt = un()[2]
                row["union_mean"] = round(cnt.float().mean().item(), 1)
                row["list_mean"] = round((idx >= 0).sum(-1).float().mean().item(), 1)
                row["union_ms"] = round(bench(un, 100), 4)
                o = parallel_block_sparse_attention(q, k, v, idx, BS, config=cfg)
                if ref is None:
                    ref = o
                row["max_diff_vs_first"] = (o.float() - ref.float()).abs().max().item()
                ms = bench(lambda cfg=cfg, idx=idx: parallel_block_sparse_attention(q, k, v, idx, BS, config=cfg))
                row["ms"] = round(ms, 3)
                row["tflops_eff"] = round(flops / ms / 1e9, 1)
            except Exception as e:  # keep going: one variant failing must not lose the others
                row["err"] = f"{type(e).__name__}: {str(e)[:300]}"
            res["prefill"].append(row)
            log(json.dumps(row))
    torch.cuda.empty_cache()


def decode(N: int, B: int, Tq: int, splits=(None,)):
    torch.manual_seed(0)
    q = torch.randn(B, Tq, HQ, D, device=DEV, dtype=torch.bfloat16)
    kc = torch.randn(B, N, H, D, device=DEV, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    lens = torch.full((B,), N, dtype=torch.int32, device=DEV) - torch.randint(0, 64, (B,), device=DEV).int()
    idx = torch.stack([select(int(L), "token", Tq) for L in lens.tolist()]).contiguous()
    for ns in splits:
        row = {"N": N, "B": B, "Tq": Tq, "num_splits": ns}
        try:
            def f(ns=ns):
                return decode_block_sparse_attention(q, kc, vc, lens, idx, BS, num_splits=ns)
            f()
            row["ms"] = round(bench(f), 4)
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                f()
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(g):
                f()
            row["graph_ms"] = round(bench(g.replay), 4)
            kv_bytes = int((idx >= 0).sum()) * BS * D * 2 * 2
            row["kv_GBps_graph"] = round(kv_bytes / row["graph_ms"] / 1e6, 1)
        except Exception as e:
            row["err"] = f"{type(e).__name__}: {str(e)[:300]}"
        res["decode"].append(row)
        log(json.dumps(row))
    if B == 16 and Tq == 1:
        qh, kh, vh = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            row = {"N": N, "B": B, "Tq": Tq, "sdpa_flash_dense_ms": round(bench(
                lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, enable_gqa=True)), 4)}
        res["decode"].append(row)
        log(json.dumps(row))
    torch.cuda.empty_cache()


def diag_g1():
    """G = 1 at real block size: error per launch configuration (a GPU-only failure seen once)."""
    from longcpm.ops.infllmv2.naive import naive_block_sparse_attention
    sys.path.insert(0, "tests/ops")
    from test_infllmv2_stage2 import rand_block_idx
    torch.manual_seed(0)
    T, hq, h, d = 8000, 4, 4, 64
    q = torch.randn(1, T, hq, d, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(1, T, h, d, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    idx = rand_block_idx(T, T, h, W, BS, local=32)[None]
    ref = naive_block_sparse_attention(q[0], k[0], v[0], idx[0], BS)
    for cfg in [{}, {"num_stages": 1}, {"num_stages": 2}, {"num_warps": 1}, {"num_warps": 2}, {"BT": 8},
                {"BT": 4}, {"BN": 128}, {"BN": 32}]:
        try:
            o = parallel_block_sparse_attention(q, k, v, idx, BS, config=cfg)[0].float()
            err = (o - ref).abs().amax(-1)  # [T, HQ]
            bad = (err > 0.05).nonzero()
            log(json.dumps({"diag_g1": cfg, "max_err": err.max().item(), "n_bad": len(bad),
                            "bad_t_mod16": sorted(set((bad[:, 0] % 16).tolist()))[:16],
                            "bad_first": bad[:4].tolist()}))
        except Exception as e:
            log(json.dumps({"diag_g1": cfg, "err": f"{type(e).__name__}: {str(e)[:300]}"}))


if __name__ == "__main__":
    t0 = time.time()
    what = sys.argv[1:] or ["diag", "prefill", "decode"]
    base = [
        ("bt4_w4_s3", {}),
        ("bt4_w4_s2", {"num_stages": 2}),
        ("bt4_w4_s4", {"num_stages": 4}),
        ("bt8_w8_s3", {"BT": 8, "num_warps": 8}),
        ("bt8_w4_s3", {"BT": 8, "num_warps": 4}),
        ("bt4_bn32", {"BN": 32}),
        ("bt2_w4", {"BT": 2}),
        ("bt4_gather_bn128", {"BN": 128}),
    ]
    if "diag" in what:
        diag_g1()
    if "prefill" in what:
        prefill(131072, ["block"], base)
        prefill(131072, ["mixed", "token"], [base[0], base[6]])
        prefill(32768, ["block"], base[:1])
    if "decode" in what:
        for B in (1, 16):
            decode(131072, B, 1, (None, 16) if B == 1 else (None, 8))
            decode(131072, B, 4, (None,))
    res["wall_s"] = round(time.time() - t0, 1)
    with open(os.path.join(OUT, "stage2_scratch.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    log("wall", res["wall_s"])
