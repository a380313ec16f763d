"""The `longcpm` command: argparse to library calls, nothing more.

User mistakes (LongcpmError, missing files, bad values) print one `longcpm: error: ...` line and exit 2;
Ctrl-C exits 130. Heavy imports happen inside the commands so `longcpm --help` stays instant.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# `longcpm demo` document lengths: 8K keeps both modes well under a minute on a 2-core CPU; the GPU default is the
# longest length needle-27m was trained at (passkey 10/10 in both modes there, docs/quality.md)
DEMO_LENGTH_CPU = 8192
DEMO_LENGTH_GPU = 32768


def _model_args(p: argparse.ArgumentParser, model: bool = True) -> None:
    if model:
        p.add_argument("--model", required=True, help="checkpoint folder, Hugging Face hub id, or built-in model "
                                                      "name, e.g. needle-27m (`longcpm info` lists them)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto (checkpoint dtype on CUDA, float32 on CPU), float32, "
                                                   "bfloat16, float16")
    p.add_argument("--attention", choices=("auto", "dense", "sparse"), default="auto")
    p.add_argument("--topk", type=int, help="InfLLM-V2: selected blocks per query (overrides sparse_config)")
    p.add_argument("--window", type=int, help="InfLLM-V2: local window in tokens")
    p.add_argument("--dense-len", type=int, help="InfLLM-V2: dense below this many tokens (-1: always sparse)")
    p.add_argument("--max-model-len", type=int, help="cap on prompt + new tokens")


def _sampling_args(p: argparse.ArgumentParser, max_new: int = 128) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8, as MiniCPM4's "
                                                                   "generation_config)")
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=-1, help="-1 or 0: off")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longcpm", description="Long-context MiniCPM4 inference and training.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate text from a prompt, streaming to stdout")
    _model_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="file holding the prompt text ('-' for stdin)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as one user turn of the chat template")
    _sampling_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat (/reset clears history, /exit or EOF quits)")
    _model_args(c)
    _sampling_args(c, max_new=512)
    c.set_defaults(func=cmd_chat)

    n = sub.add_parser("new-model", help="write a checkpoint with random weights and the real tokenizer")
    n.add_argument("out", help="output folder")
    n.add_argument("--config", required=True, help="minicpm4-0.5b, minicpm4-8b, minicpm4.1-8b, tiny, or a path "
                                                   "to a config.json / model folder")
    for flag, key in (("--layers", "num_hidden_layers"), ("--hidden", "hidden_size"),
                      ("--heads", "num_attention_heads"), ("--kv-heads", "num_key_value_heads"),
                      ("--intermediate", "intermediate_size")):
        n.add_argument(flag, type=int, dest=key)
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--dtype", default="bfloat16", help="float32, bfloat16 or float16 (default bfloat16)")
    n.set_defaults(func=cmd_new_model)

    i = sub.add_parser("info", help="parameters, memory, KV cache size and config of a checkpoint; without one, "
                                    "the built-in models")
    i.add_argument("model", nargs="?", help="checkpoint folder, hub id or built-in model name")
    i.set_defaults(func=cmd_info)

    d = sub.add_parser("demo", help="find a pass key hidden in a long document with the built-in needle-27m "
                                    "model, with sparse and with dense attention",
                       description="Builds a long document with a hidden pass key (a held-out example of the "
                                   "synthetic passkey task), asks the model for it greedily with each attention "
                                   "mode, and prints the answers and the times (prefill + generation).")
    d.add_argument("--model", default="needle-27m", help="built-in name, checkpoint folder or hub id "
                                                         "(default needle-27m)")
    d.add_argument("--length", type=int, help=f"document length in tokens (default {DEMO_LENGTH_CPU} on CPU, "
                                               f"{DEMO_LENGTH_GPU} on CUDA)")
    d.add_argument("--attention", choices=("both", "dense", "sparse"), default="both")
    d.add_argument("--seed", type=int, help="example seed, from the held-out eval range (default: its first)")
    d.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when available)")
    d.add_argument("--dtype", default="auto", help="auto (checkpoint dtype on CUDA, float32 on CPU), float32, "
                                                   "bfloat16, float16")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train or continue a model from a RUN.toml (see docs/training.md)")
    t.add_argument("run_toml")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one key of the run file (repeatable)")
    t.set_defaults(func=cmd_train)

    from ..eval.cli import add_eval_parser
    from ..server.cli import add_serve_parser
    add_eval_parser(sub)
    add_serve_parser(sub)
    return parser


def cmd_train(args) -> int:
    from ..train.__main__ import parse_set
    from ..train.trainer import main as train_main
    train_main(args.run_toml, parse_set(args.overrides))
    return 0


def _sparse_config(args):
    """'config' unless the command line asks for sparse attention or changes a sparse parameter."""
    over = {k: v for k, v in (("topk", args.topk), ("window_size", args.window), ("dense_len", args.dense_len))
            if v is not None}
    if not over and args.attention != "sparse":
        return "config"
    from dataclasses import replace

    from ..config import ModelConfig, SparseConfig
    from ..models.checkpoint import resolve_model_path
    base = ModelConfig.from_file(resolve_model_path(args.model) / "config.json").sparse_config or SparseConfig()
    return replace(base, **over)


def _load(args):
    from ..engine import LLM
    return LLM(args.model, device=args.device, dtype=None if args.dtype == "auto" else args.dtype,
               attention=args.attention, sparse_config=_sparse_config(args), max_model_len=args.max_model_len)


def _params(args):
    from ..engine import SamplingParams
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                          max_tokens=args.max_new_tokens, seed=args.seed)


def _write(_index: int, text: str, _token_id: int) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _stats(out) -> str:
    m, n = out.metrics, out.num_generated_tokens
    # the first token comes out of the prefill step, so decode speed counts the n - 1 after it
    rate = f"{(n - 1) / m.decode_s:.2f}" if n > 1 and m.decode_s > 0 else "n/a"
    return (f"prompt tokens: {len(out.prompt_token_ids)} | generated tokens: {n} | prefill: {m.prefill_s:.3f} s | "
            f"decode: {rate} tokens/s | finish: {out.outputs[0].finish_reason}")


def cmd_generate(args) -> int:
    if args.prompt_file is not None:
        prompt = sys.stdin.read() if args.prompt_file == "-" else Path(args.prompt_file).read_text(encoding="utf-8")
    else:
        prompt = args.prompt
    params = _params(args)  # validate before the (slow) model load
    llm = _load(args)
    if args.chat:
        out = llm.chat([{"role": "user", "content": prompt}], params, on_token=_write)[0]
    else:
        out = llm.generate(prompt, params, on_token=_write)[0]
    sys.stdout.write("\n")
    print(_stats(out), file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from ..errors import RequestError
    params = _params(args)
    llm = _load(args)
    print(f"chatting with {args.model} ({llm.config.num_parameters() / 1e9:.2f}B params on {llm.device}); "
          f"/reset clears history, /exit quits", file=sys.stderr)
    history: list[dict] = []
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            history.clear()
            print("(history cleared)", file=sys.stderr)
            continue
        if not cmd:
            continue
        history.append({"role": "user", "content": line})
        try:
            out = llm.chat(history, params, on_token=_write)[0]
        except RequestError as e:  # e.g. the history outgrew max_model_len: keep the session alive
            history.pop()
            print(f"longcpm: error: {e} (try /reset)", file=sys.stderr)
            continue
        print()
        history.append({"role": "assistant", "content": out.outputs[0].text})


def cmd_new_model(args) -> int:
    from ..models.random import create_random_checkpoint, resolve_config
    keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    cfg = resolve_config(args.config, overrides)
    out = create_random_checkpoint(args.out, cfg, seed=args.seed, dtype=args.dtype)
    print(f"wrote a random-weight checkpoint ({cfg.num_parameters() / 1e6:.1f}M parameters, {args.dtype}, "
          f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}) with the MiniCPM4 tokenizer to {out}")
    return 0


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return ""


def cmd_info(args) -> int:
    from ..config import ModelConfig
    from ..models.builtin import BUILTIN_MODELS, builtin_path, describe_builtins
    from ..models.checkpoint import resolve_model_path
    if args.model is None:
        print("built-in models (use the name wherever a model folder is accepted; `longcpm info NAME` for details):")
        print("\n".join("  " + line for line in describe_builtins()))
        return 0
    folder = resolve_model_path(args.model)
    c = ModelConfig.from_file(folder / "config.json")
    n = c.num_parameters()
    rs = c.rope_scaling
    rope = rs.rope_type if rs.rope_type != "longrope" else (
        f"longrope (original_max_position_embeddings {rs.original_max_position_embeddings}, "
        f"{len(rs.long_factor)} factors, long {'==' if rs.long_factor == rs.short_factor else '!='} short)")
    builtin = args.model in BUILTIN_MODELS and builtin_path(args.model) == folder
    lines = [
        f"model: {folder}" + (f" (built-in {args.model}: {BUILTIN_MODELS[args.model].description})" if builtin else ""),
        f"architecture: {', '.join(c.extra.get('architectures') or ['?'])} (model_type {c.model_type})",
        f"parameters: {n:,} ({n / 1e9:.3f} B){'' if c.tie_word_embeddings else ', untied lm_head'}",
        f"shape: {c.num_hidden_layers} layers, hidden {c.hidden_size}, heads {c.num_attention_heads} / kv "
        f"{c.num_key_value_heads} (head_dim {c.head_dim}), intermediate {c.intermediate_size}, vocab {c.vocab_size}",
        f"positions: max_position_embeddings {c.max_position_embeddings}, rope_theta {c.rope_theta}, rope {rope}",
        f"muP: scale_emb {c.scale_emb}, scale_depth {c.scale_depth}, dim_model_base {c.dim_model_base}",
        f"tokens: bos {c.bos_token_id}, eos {list(c.eos_token_ids)}, pad {c.pad_token_id}; dtype {c.torch_dtype}",
        "weights: " + ", ".join(f"{name} {_size(n * b)}" for name, b in (("fp32", 4), ("bf16", 2), ("fp16", 2))),
    ]
    for name, b in (("bf16/fp16", 2), ("fp32", 4)):
        dense, comp = c.kv_bytes_per_token(b), c.compressed_kv_bytes_per_token(b)
        lines.append(f"KV cache per token ({name}): {dense:,} bytes K+V + {comp:,.0f} bytes compressed keys "
                     f"= {_size(dense + comp)}; at {c.max_position_embeddings} tokens {_size((dense + comp) * c.max_position_embeddings)}")
    sc = c.sparse_config
    lines.append("sparse_config: " + ("none (dense attention)" if sc is None else
                                      ", ".join(f"{k} {v}" for k, v in sc.to_dict().items())))
    files = sorted(p for p in folder.iterdir() if p.is_file())
    lines.append("files: " + ", ".join(f"{p.name} ({_size(p.stat().st_size)})" for p in files))
    print("\n".join(lines))
    return 0


def cmd_demo(args) -> int:
    """Needle in a haystack: one held-out passkey example, answered greedily once per attention mode."""
    from ..config import ModelConfig, SparseConfig
    from ..engine.llm import resolve_device
    from ..errors import ConfigError
    from ..eval.scoring import answer_span, score
    from ..models.checkpoint import resolve_model_path
    from ..text import load_tokenizer
    from ..train.synthetic import EVAL_SEED_START, generate

    seed = EVAL_SEED_START if args.seed is None else args.seed
    if seed < EVAL_SEED_START:
        raise ConfigError(f"--seed: demo seeds come from the held-out range >= {EVAL_SEED_START} (lower seeds may "
                          f"have been trained on), got {seed}")
    device = resolve_device(args.device)
    length = args.length or (DEMO_LENGTH_GPU if device.type == "cuda" else DEMO_LENGTH_CPU)
    folder = resolve_model_path(args.model)
    config = ModelConfig.from_file(folder / "config.json")
    if length > config.max_position_embeddings:
        raise ConfigError(f"--length {length} exceeds the model's max_position_embeddings "
                          f"{config.max_position_embeddings}")
    tok = load_tokenizer(folder)
    ex = generate("passkey", length, seed, tok)
    ids = tok.encode(ex.prompt)
    # the answer's tokens + a little room; the generator left room for the answer + EOS within the length
    max_tokens = min(len(tok.encode(ex.answer, add_special_tokens=False)) + 4,
                     config.max_position_embeddings - len(ids))
    modes = ("dense", "sparse") if args.attention == "both" else (args.attention,)
    sc = config.sparse_config or SparseConfig()  # sparse on a checkpoint without a sparse_config: the default
    key = ex.answers[0]
    depth = ex.prompt.find(key) / len(ex.prompt)
    print(f"{args.model} ({config.num_parameters() / 1e6:.1f}M params, InfLLM-V2 topk {sc.topk} x {sc.block_size}"
          f" + window {sc.window_size}), passkey at {len(ids):,} tokens, {device}")
    print(f"hidden pass key: {key} (at {depth:.0%} of the document)")
    times: dict[str, float] = {}
    for mode in modes:
        answer, t = _demo_run(folder, mode, sc, ids, max_tokens, device, args.dtype)
        times[mode] = t
        ok = score("passkey", answer, ex.answers)[0]
        shown = " ".join((answer_span(answer) or answer).split())
        shown = (shown[:24] + "...") if len(shown) > 27 else shown or "(nothing)"
        speed = ""
        if mode == "sparse" and "dense" in times:
            r = times["dense"] / t
            speed = f"  ({r:.1f}x faster than dense)" if r >= 1 else f"  ({1 / r:.1f}x slower than dense)"
        print(f"{mode:<7} answer: {shown:<8} {'correct' if ok else 'WRONG  '}  {t:.1f} s{speed}", flush=True)
    return 0


def _demo_run(folder, mode, sparse, ids, max_tokens, device, dtype) -> tuple[str, float]:
    """(reply, seconds for prefill + generation) of one prompt with one attention mode, after an untimed warm-up:
    on CUDA the whole prompt (Triton kernels compile per shape), on CPU a short prefix (allocator growth only).
    The engine is freed before returning."""
    import gc

    import torch

    from ..engine import LLM, SamplingParams
    n = len(ids) + max_tokens
    # sparse prefills the prompt in one step: a continued chunk runs the reference sparse path on CPU (slow, and
    # gigabytes at 16K); dense keeps the engine's chunking, which is the faster of the two for it on CPU
    chunk = {"max_num_batched_tokens": n} if mode == "sparse" else {}
    llm = LLM(folder, device=device, dtype=None if dtype == "auto" else dtype, attention=mode,
              sparse_config=sparse if mode == "sparse" else "config", max_model_len=n, kv_cache_tokens=n,
              enable_prefix_caching=False, cuda_graphs=False, **chunk)
    try:
        greedy = SamplingParams(temperature=0, max_tokens=max_tokens)
        warm = ids if llm.device.type == "cuda" else ids[:1024]
        llm.generate(warm, SamplingParams(temperature=0, max_tokens=2))
        t0 = time.perf_counter()
        out = llm.generate(ids, greedy)[0]
        return out.outputs[0].text, time.perf_counter() - t0
    finally:
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..errors import LongcpmError
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `longcpm generate ... | head`: stop quietly, and silence the exit-time flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (LongcpmError, OSError, ValueError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"longcpm: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
