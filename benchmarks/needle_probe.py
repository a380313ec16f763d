"""Probe for the needle-11m training runs (H200): SDPA backends for the model's attention shape with native GQA vs
repeated kv heads, and the synthetic data rate with worker processes. Prints one JSON line per measurement."""

import json
import sys
import time

import torch
import torch.nn.functional as F


def sdpa_rates() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for T in (4096, 16384):
        q = torch.randn(1, 8, T, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, 1, T, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn_like(k, requires_grad=True)
        def gqa(q=q, k=k, v=v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        def repeat(q=q, k=k, v=v):
            return F.scaled_dot_product_attention(q, k.repeat_interleave(8, 1), v.repeat_interleave(8, 1),
                                                  is_causal=True)
        variants = {"gqa_auto": gqa, "repeat_auto": repeat}
        for name, fn in variants.items():
            for _ in range(2):
                fn().sum().backward()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(5):
                fn().sum().backward()
            torch.cuda.synchronize()
            print(json.dumps({"probe": "sdpa", "T": T, "variant": name, "ms_fwd_bwd": (time.perf_counter() - t) / 5 * 1e3}))
        for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            try:
                with sdpa_kernel([be]):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                ok = True
            except RuntimeError:
                ok = False
            print(json.dumps({"probe": "sdpa_gqa_supported", "T": T, "backend": be.name, "ok": ok}))


def data_rate(max_len: int, workers: int) -> None:
    from longcpm.assets import asset_dir
    from longcpm.text import load_tokenizer
    from longcpm.train.data import SyntheticSource
    tok = load_tokenizer(asset_dir("minicpm4-0.5b"))
    src = SyntheticSource(tok, min_len=128, max_len=max_len, loss="answer", workers=workers, seed=3)
    src.doc(0)
    t, n = time.perf_counter(), 0
    for k in range(1, 1 + 20 * max(workers, 1)):
        n += len(src.doc(k)[0])
    dt = time.perf_counter() - t
    print(json.dumps({"probe": "data", "max_len": max_len, "workers": workers, "tokens_per_s": n / dt,
                      "docs_per_s": 20 * max(workers, 1) / dt}))


if __name__ == "__main__":
    if "sdpa" in sys.argv:
        sdpa_rates()
    if "data" in sys.argv:
        for L, w in ((4096, 0), (4096, 14), (16384, 14), (32768, 14)):
            data_rate(L, w)
