"""`longcpm eval`: argument parsing for the suite, wired into the main CLI by the lead:

    from ..eval.cli import add_eval_parser   # in build_parser()
    add_eval_parser(sub)

Errors are EvalError / other LongcpmError subclasses, which the main CLI prints as one line.
"""

from __future__ import annotations

import argparse
import sys

from ..train.synthetic import EVAL_SEED_START
from .suite import MODES, EvalError

DEFAULT_LENGTHS = "4096,8192,16384,32768"


def parse_lengths(text: str) -> list[int]:
    """'4096,8K,16k' -> [4096, 8192, 16384] (K = 1024 tokens)."""
    out = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        num, mult = (part[:-1], 1024) if part[-1] in "kK" else (part, 1)
        try:
            n = int(num) * mult
        except ValueError:
            raise EvalError(f"--lengths: {part!r} is not a token count (e.g. 4096 or 16K)") from None
        if n <= 0:
            raise EvalError(f"--lengths: {part!r} must be positive")
        out.append(n)
    if not out:
        raise EvalError("--lengths: no lengths given")
    return list(dict.fromkeys(out))


def parse_modes(text: str) -> list[str]:
    """'dense,sparse' or 'auto' (or any comma list of dense, sparse, auto)."""
    modes = [m.strip().lower() for m in str(text).split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise EvalError(f"--attention: expected a comma list of {', '.join(MODES)}, got {text!r}")
    return list(dict.fromkeys(modes))


def seed_range(start: int, count: int) -> list[int]:
    if count < 1:
        raise EvalError(f"--seeds: need at least 1 seed, got {count}")
    if start < EVAL_SEED_START:
        raise EvalError(f"--seed-start: eval seeds start at {EVAL_SEED_START} (lower seeds may be trained on), "
                        f"got {start}")
    return list(range(start, start + count))


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `eval` subcommand to the main CLI's subparsers; it dispatches to cmd_eval."""
    e = subparsers.add_parser("eval", help="RULER-style long-context accuracy, dense vs sparse (table + JSON)",
                              description="Exact-match accuracy on held-out synthetic tasks (passkey, multi-key and "
                                          "multi-value needles, variable tracking, common words) at each length, "
                                          "in each attention mode, with greedy decoding.")
    e.add_argument("--model", help="checkpoint folder, hub id or built-in name such as needle-27m (required "
                                   "unless --show)")
    e.add_argument("--tasks", default="all", help="comma list: passkey, niah_multikey (multikey), niah_multivalue "
                                                  "(multivalue), variable_tracking (vt), common_words (cwe), or all")
    e.add_argument("--lengths", default=DEFAULT_LENGTHS, help=f"comma list of token lengths, K = 1024 "
                                                               f"(default {DEFAULT_LENGTHS})")
    e.add_argument("--seeds", "--num-seeds", dest="num_seeds", type=int, default=3,
                   help="examples per task and length (default 3)")
    e.add_argument("--seed-start", type=int, default=EVAL_SEED_START,
                   help=f"first seed; must be >= {EVAL_SEED_START}, the held-out range (default {EVAL_SEED_START})")
    e.add_argument("--attention", default="dense,sparse", help="dense,sparse (default), auto, or any comma list")
    e.add_argument("--out", help="write the results JSON here")
    e.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto")
    e.add_argument("--dtype", default="auto", help="auto (checkpoint dtype on CUDA, float32 on CPU), float32, "
                                                   "bfloat16, float16")
    e.add_argument("--max-new-tokens", type=int, help="decode budget (default: the answer's tokens + 8)")
    e.add_argument("--max-model-len", type=int, help="cap on prompt + new tokens; longer lengths are skipped")
    e.add_argument("--max-num-batched-tokens", type=int,
                   help="prefill chunk in tokens (engine default 8192); the longest length or more prefills each "
                        "prompt in one call")
    e.add_argument("--topk", type=int, help="InfLLM-V2: selected blocks per query (overrides sparse_config)")
    e.add_argument("--window", type=int, help="InfLLM-V2: local window in tokens")
    e.add_argument("--dense-len", type=int, help="InfLLM-V2: dense below this many tokens, for --attention auto")
    e.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed warm-up run")
    e.add_argument("--quiet", action="store_true", help="no per-cell progress on stderr")
    e.add_argument("--show", metavar="RESULTS_JSON", help="print the table of an existing results file and exit")
    e.add_argument("--merge", nargs="+", metavar="RESULTS_JSON",
                   help="join results files of one model and suite into --out: one run per attention mode, length "
                        "or seed range; a cell in several files pools their examples (seeds must differ)")
    e.add_argument("--timing-from", metavar="RESULTS_JSON",
                   help="with --merge: take the prefill/decode times from this file (a run alone on the device) "
                        "instead of from the merged runs")
    e.set_defaults(func=cmd_eval)
    return e


def _sparse_config(args):
    """'config' unless a sparse parameter is overridden (then on top of the checkpoint's, or the default)."""
    over = {k: v for k, v in (("topk", args.topk), ("window_size", args.window), ("dense_len", args.dense_len))
            if v is not None}
    if not over:
        return "config"
    from dataclasses import replace

    from ..config import ModelConfig, SparseConfig
    from ..models.checkpoint import resolve_model_path
    base = ModelConfig.from_file(resolve_model_path(args.model) / "config.json").sparse_config or SparseConfig()
    return replace(base, **over)


def cmd_eval(args) -> int:
    from . import report

    if args.timing_from and not args.merge:
        raise EvalError("--timing-from goes with --merge")
    if args.show:
        doc = report.load_json(args.show)  # the file's own timing rows: a merge may have taken them from another run
        print(report.format_table(doc["records"], doc.get("metadata"), doc.get("timing")))
        return 0
    if args.merge:
        if not args.out:
            raise EvalError("--merge needs --out for the joined results file")
        records, meta = report.merge(args.merge)
        rows = None
        if args.timing_from:
            rows, meta["timing_from"] = report.timing_from(args.timing_from, meta)
        print(report.format_table(records, meta, rows))
        path = report.write_json(args.out, records, meta, rows)
        print(f"wrote {len(records)} records from {len(args.merge)} files to {path}", file=sys.stderr)
        return 0
    if not args.model:
        raise EvalError("--model is required (or --show RESULTS_JSON to print a saved table, --merge to join them)")
    from .suite import Loader, check_seeds, resolve_tasks, run_suite

    tasks = resolve_tasks(args.tasks)
    lengths = parse_lengths(args.lengths)
    modes = parse_modes(args.attention)
    seeds = check_seeds(seed_range(args.seed_start, args.num_seeds))
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise EvalError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    loader = Loader(args.model, device=args.device, dtype=None if args.dtype == "auto" else args.dtype,
                    attention_modes=modes, sparse_config=_sparse_config(args), max_model_len=args.max_model_len,
                    max_num_batched_tokens=args.max_num_batched_tokens)
    records = run_suite(loader, tasks, lengths, seeds, modes, args.max_new_tokens, model_name=args.model,
                        warmup=args.warmup, progress=not args.quiet)
    meta = report.metadata(args.model, loader.info, tasks=tasks, lengths=lengths, seeds=seeds,
                           attention_modes=modes, max_new_tokens=args.max_new_tokens)
    print(report.format_table(records, meta))
    if args.out:
        path = report.write_json(args.out, records, meta)
        print(f"wrote {len(records)} records to {path}", file=sys.stderr)
    return 0
