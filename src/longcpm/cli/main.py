"""The `longcpm` command: argparse to library calls, nothing more.

User mistakes (LongcpmError, missing files, bad values) print one `longcpm: error: ...` line and exit 2;
Ctrl-C exits 130. Heavy imports happen inside the commands so `longcpm --help` stays instant.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path


def _model_args(p: argparse.ArgumentParser, model: bool = True) -> None:
    if model:
        p.add_argument("--model", required=True, help="checkpoint folder or Hugging Face hub id")
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

    i = sub.add_parser("info", help="parameters, memory, KV cache size and config of a checkpoint")
    i.add_argument("model", help="checkpoint folder or hub id")
    i.set_defaults(func=cmd_info)

    d = sub.add_parser("demo", help="generate from a small built-in model (for now: random weights)")
    d.add_argument("--device", default="auto")
    d.add_argument("--prompt", default="The capital of France is")
    d.add_argument("--max-new-tokens", type=int, default=48)
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
    from ..models.checkpoint import resolve_model_path
    folder = resolve_model_path(args.model)
    c = ModelConfig.from_file(folder / "config.json")
    n = c.num_parameters()
    rs = c.rope_scaling
    rope = rs.rope_type if rs.rope_type != "longrope" else (
        f"longrope (original_max_position_embeddings {rs.original_max_position_embeddings}, "
        f"{len(rs.long_factor)} factors, long {'==' if rs.long_factor == rs.short_factor else '!='} short)")
    lines = [
        f"model: {folder}",
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
    """Placeholder demo until a trained built-in model exists: a cached tiny random checkpoint, streamed."""
    from ..engine import LLM, SamplingParams
    from ..models.random import create_random_checkpoint
    folder = Path(os.environ.get("LONGCPM_CACHE") or "~/.cache/longcpm").expanduser() / "demo-random"
    if not (folder / "model.safetensors").is_file():
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        create_random_checkpoint(tmp, "tiny", seed=0, dtype="float32")
        if folder.exists():  # a leftover without weights
            shutil.rmtree(folder)
        os.replace(tmp, folder)  # atomic: a half-written checkpoint is never reused
        print(f"made a tiny random-weight MiniCPM4 checkpoint (real tokenizer) in {folder}", file=sys.stderr)
    else:
        print(f"reusing the random-weight checkpoint in {folder}", file=sys.stderr)
    t0 = time.perf_counter()
    llm = LLM(folder, device=args.device)
    print(f"loaded in {time.perf_counter() - t0:.2f} s on {llm.device}; the weights are random, so expect "
          f"gibberish\n{args.prompt}", file=sys.stderr, end="")
    out = llm.generate(args.prompt, SamplingParams(temperature=0.8, top_p=0.8, max_tokens=args.max_new_tokens,
                                                   seed=0, ignore_eos=True), on_token=_write)[0]
    sys.stdout.write("\n")
    print(_stats(out), file=sys.stderr)
    return 0


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
