"""End-to-end engine speed (issue 7 §4): MiniCPM4-8B and -0.5B shapes, random bf16 weights built on the GPU.

  longcpm            LLMEngine (paged KV, chunked prefill, CUDA graphs), attention "auto": InfLLM-V2 sparse from
                     dense_len 8192 on (decode at 4K context is therefore dense for both longcpm impls)
  longcpm_dense      the same engine with attention forced dense
  transformers       LlamaForCausalLM of the same dimensions (bf16, SDPA, dynamic cache) through generate()
  bandwidth_ceiling  bytes of weights read per decode step / measured device copy bandwidth
Records {impl, phase, N, B, ms, model, ...}: decode ms per step at batch B with an N-token context (engine steps,
host work included; graph_ms is the replay alone), prefill ms total for one N-token prompt (first token included,
peak_gib = peak allocated memory during it, weights and the preallocated KV pool included;
activation_peak_gib = the part above them; kv_gib = the prompt's share of the pool). Errors (OOM, ...) are
recorded and the run goes on.

    python benchmarks/e2e.py [--shapes 8b,0.5b] [--quick] [--compile] [--skip-prefill] [--no-hf] [--out DIR]
    python benchmarks/e2e.py --dry-run     # tiny model on CPU, one small iteration of every path
Results merge into OUT/e2e-h200.json (a rerun replaces records of the same model/impl/phase/N/B/variant), plus
e2e-h200.png; so `--shapes 8b --compile --skip-prefill --no-hf` adds the compiled variant to a full run.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from longcpm.assets import asset_dir  # noqa: E402
from longcpm.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from longcpm.engine.cuda_graph import DecodeGraphs  # noqa: E402
from longcpm.models.checkpoint import build_model  # noqa: E402
from longcpm.models.random import default_dtype, resolve_config  # noqa: E402
from longcpm.text import load_tokenizer  # noqa: E402

SPARSE = {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64, "window_size": 2048,
          "topk": 64, "dense_len": 8192}
SHAPES = {"8b": "minicpm4-8b", "0.5b": "minicpm4-0.5b"}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def random_model(name: str, max_len: int, dev: str, dtype, tiny: bool = False):
    over = {"max_position_embeddings": max_len, "sparse_config": SPARSE}
    if tiny:
        over.update(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=256, sparse_config=dict(SPARSE, window_size=128, topk=2, dense_len=256))
    cfg = resolve_config(name, over)
    with default_dtype(dtype):
        model = build_model(cfg, dev)
    with torch.no_grad():  # init on the device: an 8B CPU init would take minutes
        for n, p in model.named_parameters():
            p.fill_(1.0) if n.endswith("norm.weight") else p.normal_(0.0, 0.02)
    model.model.rotary_emb.reset_buffers(torch.device(dev))
    return model.eval()


def rand_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(100, 70000, (n - 1,), generator=g).tolist()


def set_attention(engine: LLMEngine, mode: str) -> None:
    engine.config.attention = engine.runner.attention = mode


def engine_decode(engine: LLMEngine, B: int, ctx: int, steps: int, warmup: int) -> dict:
    sp = SamplingParams(temperature=0, max_tokens=warmup + steps + 4, ignore_eos=True)
    rids = [f"d{B}-{b}" for b in range(B)]
    for b, rid in enumerate(rids):
        engine.add_request(rid, rand_ids(ctx, seed=b), sp)
    try:
        while any(not engine.requests[r].output_ids for r in rids):
            engine.step()
        for _ in range(warmup):
            engine.step()
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync()
        out = {"ms": (time.perf_counter() - t0) / steps * 1e3}
        g = engine.runner.graphs
        if g is not None and (g.bucket(B), False) in g.graphs:
            from common import bench_ms
            out["graph_ms"] = bench_ms(g.graphs[(g.bucket(B), False)], warmup=5, rep=50)
        return out
    finally:
        for rid in rids:
            engine.abort(rid)


def engine_prefill(engine: LLMEngine, N: int, decode_steps: int) -> dict:
    sp = SamplingParams(temperature=0, max_tokens=decode_steps + 2, ignore_eos=True)
    ids = rand_ids(N, seed=N)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()  # weights + the whole preallocated KV pool
    sync()
    t0 = time.perf_counter()
    engine.add_request("p", ids, sp)
    try:
        while not engine.requests["p"].output_ids:
            engine.step()
        sync()
        out = {"ms": (time.perf_counter() - t0) * 1e3}
        if torch.cuda.is_available():
            peak = torch.cuda.max_memory_allocated()
            out["peak_gib"] = round(peak / 2**30, 2)
            out["activation_peak_gib"] = round((peak - base) / 2**30, 2)
        page = engine.pool.page_bytes(engine.model.config, engine.pool.page_size, engine.model.dtype)
        out["kv_gib"] = round(-(-N // engine.pool.page_size) * page / 2**30, 3)  # this prompt's K/V + c1/c2
        engine.step()
        sync()
        t1 = time.perf_counter()
        for _ in range(decode_steps):
            engine.step()
        sync()
        out["decode_ms"] = (time.perf_counter() - t1) / max(decode_steps, 1) * 1e3
        return out
    finally:
        engine.abort("p")


def hf_model(cfg, dev: str, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    lc = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                     num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                     num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                     max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
                     tie_word_embeddings=cfg.tie_word_embeddings, attn_implementation="sdpa")
    with default_dtype(dtype), torch.device(dev):
        m = LlamaForCausalLM(lc)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.fill_(1.0) if "norm" in n else p.normal_(0.0, 0.02)
    return m.to(dtype).eval()


@torch.inference_mode()
def hf_generate_ms(m, B: int, N: int, new: int, static: bool) -> float:
    ids = torch.tensor([rand_ids(N, seed=b) for b in range(B)], device=m.device)
    kw = {"do_sample": False, "pad_token_id": 0}
    if static:
        kw["cache_implementation"] = "static"
    sync()
    t0 = time.perf_counter()
    m.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
    sync()
    return (time.perf_counter() - t0) * 1e3


def copy_bandwidth(dev: str) -> float:
    """Bytes per second of a device-to-device copy (read + write)."""
    n = (1 << 30) if dev == "cuda" else (64 << 20)
    x = torch.empty(n, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    if dev == "cuda":
        from common import bench_ms
        ms = bench_ms(lambda: y.copy_(x), warmup=5, rep=30)
    else:
        t0 = time.perf_counter()
        for _ in range(5):
            y.copy_(x)
        ms = (time.perf_counter() - t0) / 5 * 1e3
    return 2 * n / (ms / 1e3)


class Runner:
    def __init__(self, out: Path, shape: str, meta: dict):
        self.records, self.shape, self.out, self.meta = [], shape, out, meta

    def run(self, impl: str, phase: str, N: int, B: int, fn, **extra) -> None:
        rec = {"impl": impl, "phase": phase, "N": N, "B": B, "model": self.shape, **extra}
        try:
            got = fn()
            rec.update({k: (round(v, 3) if isinstance(v, float) else v) for k, v in got.items()})
        except Exception as e:  # OOM or a failing path: record it and go on
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            traceback.print_exc()
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        print(json.dumps(rec), flush=True)
        self.records.append(rec)


def bench_engine(args, model, R: Runner) -> None:
    ns, bs, ctx = args.ns, args.bs, args.ctx
    tok = load_tokenizer(asset_dir("minicpm4-0.5b"))
    max_len = model.config.max_position_embeddings
    engine = LLMEngine(model, tok, EngineConfig(
        max_model_len=max_len, max_num_seqs=max(bs), max_num_batched_tokens=args.chunk, enable_prefix_caching=False,
        gpu_memory_utilization=args.mem, kv_cache_tokens=(max(bs) * (ctx + 64) + max_len) if args.dry_run else None))
    R.meta.setdefault("engines", {})[R.shape] = engine.stats()
    steps, warm = (2, 1) if args.dry_run else ((10, 3) if args.quick else (40, 5))
    main = "graphs" if engine.runner.graphs else "eager"
    for B in bs:
        R.run("longcpm", "decode", ctx, B, lambda B=B: engine_decode(engine, B, ctx, steps, warm), variant=main)
    if not args.dry_run and not args.quick and engine.runner.graphs:  # what CUDA graphs buy
        graphs, engine.runner.graphs = engine.runner.graphs, None
        R.run("longcpm", "decode", ctx, 1, lambda: engine_decode(engine, 1, ctx, steps, warm), variant="eager")
        engine.runner.graphs = graphs
    if args.compile and engine.runner.graphs is not None:
        r = engine.runner
        r.graphs = DecodeGraphs(r, r.config.max_num_seqs, r.max_pages, compile=True)
        for B in bs:
            R.run("longcpm", "decode", ctx, B, lambda B=B: engine_decode(engine, B, ctx, steps, warm),
                  variant="graphs+compile")
    for impl, mode in () if args.skip_prefill else (("longcpm", "auto"), ("longcpm_dense", "dense")):
        set_attention(engine, mode)
        for N in ns:
            for rep in range(1 if N > 32768 or args.quick else 2):  # the first run of a length compiles kernels
                R.run(impl, "prefill", N, 1, lambda N=N: engine_prefill(engine, N, 3 if args.dry_run else 10),
                      rep=rep)


def bench_hf(args, cfg, dev: str, dtype, R: Runner) -> None:
    ns, bs, ctx = args.ns, args.bs, args.ctx
    try:
        hf = hf_model(cfg, dev, dtype)
    except Exception as e:  # transformers missing or too old: recorded once
        err = e
        R.run("transformers", "decode", ctx, 1, lambda: (_ for _ in ()).throw(err))
        return
    new = 3 if args.dry_run else (8 if args.quick else 32)
    for B in bs:
        def hf_decode(B=B):
            one = hf_generate_ms(hf, B, ctx, 1, args.hf_static)
            return {"ms": (hf_generate_ms(hf, B, ctx, new + 1, args.hf_static) - one) / new}
        R.run("transformers", "decode", ctx, B, hf_decode, cache="static" if args.hf_static else "dynamic")
    for N in ns:
        def hf_prefill(N=N):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            out = {"ms": hf_generate_ms(hf, 1, N, 1, False)}
            if torch.cuda.is_available():
                out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            return out
        R.run("transformers", "prefill", N, 1, hf_prefill)


def bench_shape(args, shape: str, R: Runner) -> None:
    dev, dtype = ("cpu", torch.float32) if args.dry_run else ("cuda", torch.bfloat16)
    model = random_model(SHAPES[shape], max(args.ns + [args.ctx]) + 256, dev, dtype, tiny=args.dry_run)
    cfg = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if not cfg.tie_word_embeddings:  # decode reads B rows of the embedding, all of lm_head
        weight_bytes -= model.model.embed_tokens.weight.numel() * model.model.embed_tokens.weight.element_size()
    try:
        bench_engine(args, model, R)
    except Exception:  # the engine itself failed to start (e.g. out of memory): recorded, the peers still run
        R.run("longcpm", "decode", args.ctx, 1, lambda: (_ for _ in ()).throw(RuntimeError(traceback.format_exc(-1))))
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    bw = copy_bandwidth(dev)
    kv_tok = cfg.kv_bytes_per_token(torch.finfo(dtype).bits // 8)
    for B in args.bs:
        R.run("bandwidth_ceiling", "decode", args.ctx, B, lambda: {"ms": weight_bytes / bw * 1e3},
              copy_gbps=round(bw / 1e9, 1), weight_gb=round(weight_bytes / 1e9, 3),
              with_kv_ms=round((weight_bytes + B * args.ctx * kv_tok) / bw * 1e3, 3))
    if not args.no_hf:
        bench_hf(args, cfg, dev, dtype, R)


def plot(records: list[dict], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    shapes = sorted({r["model"] for r in records})
    fig, axes = plt.subplots(len(shapes), 2, figsize=(12, 4.2 * len(shapes)), squeeze=False)
    for row, shape in zip(axes, shapes):
        for ax, phase, key in ((row[0], "decode", "B"), (row[1], "prefill", "N")):
            for impl in ("longcpm", "longcpm_dense", "transformers", "bandwidth_ceiling"):
                best: dict[int, dict] = {}  # x -> record: the main variant, the last repetition
                for r in records:
                    if (r["model"], r["impl"], r["phase"]) != (shape, impl, phase) or "ms" not in r:
                        continue
                    if r.get("variant") in ("eager", "graphs+compile") and r.get("variant") != _main_variant(records):
                        continue
                    if phase == "decode" and r["N"] != 4096 and r["N"] != min(q["N"] for q in records):
                        continue
                    if r[key] not in best or r.get("rep", 0) >= best[r[key]].get("rep", 0):
                        best[r[key]] = r
                if best:
                    xs = sorted(best)
                    ax.plot(xs, [best[x]["ms"] for x in xs], marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch size (4K context)" if phase == "decode" else "prompt tokens")
            ax.set_ylabel("ms per step" if phase == "decode" else "ms (total)")
            ax.set_title(f"MiniCPM4-{shape} shape: {phase}")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _key(r: dict) -> tuple:
    """What a record measures: a rerun replaces the old record with the same key, keeps the others."""
    return tuple(r.get(k) for k in ("model", "impl", "phase", "N", "B", "variant", "rep", "cache"))


def _main_variant(records: list[dict]) -> str:
    return "graphs" if any(r.get("variant") == "graphs" for r in records) else "eager"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8b,0.5b")
    ap.add_argument("--quick", action="store_true", help="fewer steps, prompts of 4K and 32K only")
    ap.add_argument("--dry-run", action="store_true", help="tiny model on CPU, one small iteration of every path")
    ap.add_argument("--compile", action="store_true", help="also time decode with torch.compile inside the graphs")
    ap.add_argument("--hf-static", action="store_true", help="transformers with its static cache")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--skip-prefill", action="store_true", help="engine decode only (e.g. with --compile)")
    ap.add_argument("--chunk", type=int, default=16384, help="max_num_batched_tokens (prefill chunk)")
    ap.add_argument("--mem", type=float, default=0.85, help="gpu_memory_utilization")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    args.ctx, args.bs, args.ns = 4096, [1, 8, 64], [4096, 32768, 131072]
    if args.quick:
        args.ns = [4096, 32768]
    if args.dry_run:
        args.ctx, args.bs, args.ns, args.chunk = 96, [1, 3], [64, 320], 128
    from common import environment
    meta = environment() if not args.dry_run else {"gpu": "cpu", "torch": torch.__version__}
    try:
        import transformers
        meta["transformers"] = transformers.__version__
    except ImportError:
        pass
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("e2e-dry-run.json" if args.dry_run else "e2e-h200.json")
    old = json.loads(path.read_text()) if path.exists() else {"records": []}
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    R = Runner(out, "", meta)
    for shape in shapes:
        R.shape = shape
        bench_shape(args, shape, R)
    fresh = {_key(r) for r in R.records}
    records = [r for r in old.get("records", []) if _key(r) not in fresh] + R.records
    path.write_text(json.dumps({"meta": {**old.get("meta", {}), **meta}, "records": records}, indent=1) + "\n")
    plot(records, path.with_suffix(".png"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
