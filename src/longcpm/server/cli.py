"""`longcpm serve`: argparse -> AsyncLLM + create_app + uvicorn.

Kept free of FastAPI/uvicorn imports at module level so the CLI parser can include this subcommand even when
the `server` extra is not installed; the missing extra is reported only when `serve` runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from ..errors import LongcpmError

RANDOM_NAMES = ("tiny", "minicpm4-0.5b", "minicpm4-8b", "minicpm4.1-8b")


def add_serve_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (see docs/server.md)")
    s.add_argument("--model", required=True, help="checkpoint folder, Hugging Face hub id, or a built-in random-"
                                                  f"weight shape ({', '.join(RANDOM_NAMES)}) for load tests")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("LONGCPM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $LONGCPM_API_KEY; /health stays open)")
    s.add_argument("--served-model-name", help="the model id clients send and /v1/models lists (default: --model)")
    s.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when available)")
    s.add_argument("--dtype", default="auto", help="auto (checkpoint dtype on CUDA, float32 on CPU), float32, "
                                                   "bfloat16, float16")
    s.add_argument("--attention", choices=("auto", "dense", "sparse"), default="auto")
    s.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together (continuous batching)")
    s.add_argument("--max-model-len", type=int, help="cap on prompt + completion tokens")
    s.add_argument("--max-num-batched-tokens", type=int, help="tokens per engine step (longer prompts are chunked)")
    s.add_argument("--gpu-memory-utilization", type=float, help="share of GPU memory for weights + KV pool")
    s.add_argument("--kv-cache-tokens", type=int, help="KV pool size in tokens (instead of the memory share)")
    s.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false", default=None)
    s.add_argument("--enforce-eager", dest="cuda_graphs", action="store_false", default=None,
                   help="no CUDA graphs for decode")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds in-flight requests may still run before they are cancelled")
    s.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    s.set_defaults(func=cmd_serve)
    return s


def _model_folder(name: str) -> Path | str:
    """A folder or hub id as given; a built-in shape name becomes a cached random-weight checkpoint."""
    if Path(name).expanduser().is_dir() or name not in RANDOM_NAMES:
        return name
    from ..models.random import create_random_checkpoint

    folder = Path(os.environ.get("LONGCPM_CACHE") or "~/.cache/longcpm").expanduser() / f"random-{name}"
    if not (folder / "config.json").is_file():
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        create_random_checkpoint(tmp, name, seed=0, dtype="bfloat16")
        os.replace(tmp, folder)  # atomic: a half-written checkpoint is never reused
    logging.getLogger("longcpm.server").warning("%s: random weights (for load tests), outputs are gibberish", folder)
    return folder


def _generation_config(engine, model) -> dict | None:
    """The checkpoint's generation_config.json (sampling defaults), looked up beside the tokenizer for hub ids."""
    for folder in (Path(model).expanduser(), Path(str(getattr(getattr(engine, "tokenizer", None), "path", "")))):
        f = folder / "generation_config.json"
        try:
            if f.is_file():
                return json.loads(f.read_text())
        except (OSError, ValueError):
            pass
    return None


def cmd_serve(args) -> int:
    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:
        raise LongcpmError(f"the server needs the 'server' extra (pip install 'longcpm[server]'): {e}") from None
    from ..engine.async_engine import AsyncLLM

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = _model_folder(args.model)
    optional = ("max_num_batched_tokens", "gpu_memory_utilization", "kv_cache_tokens", "enable_prefix_caching",
                "cuda_graphs")
    engine_kw = {k: getattr(args, k) for k in optional if getattr(args, k) is not None}
    engine = AsyncLLM(model, device=args.device, dtype=None if args.dtype == "auto" else args.dtype,
                      attention=args.attention, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                      model_name=args.served_model_name or args.model, **engine_kw)
    app = create_app(engine, api_key=args.api_key, generation_config=_generation_config(engine, model))
    # uvicorn handles SIGINT/SIGTERM: stop accepting, wait up to --shutdown-timeout for in-flight requests
    # (then cancel them, which aborts their engine sequences), then the app lifespan shuts the engine down.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.shutdown_timeout)
    return 0
