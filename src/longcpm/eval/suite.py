"""The RULER-style eval suite: regenerate held-out synthetic examples at each length, run them greedily with the
same checkpoint in each attention mode, and score them by exact match.

Examples come from train.synthetic with seeds >= EVAL_SEED_START, which training refuses, so a score is never on
trained data. Each example runs alone (batch 1): its prefill time is then its own, and its reply cannot depend on
what it was batched with.
"""

from __future__ import annotations

import gc
import statistics
import sys
from collections.abc import Iterable, Sequence

import torch

from ..errors import LongcpmError
from ..train.synthetic import EVAL_SEED_START, TASKS, ChunkEncoder, generate
from .scoring import score

MODES = ("dense", "sparse", "auto")
ALIASES = {"multikey": "niah_multikey", "multivalue": "niah_multivalue", "vt": "variable_tracking",
           "variables": "variable_tracking", "cwe": "common_words", "commonwords": "common_words"}
ANSWER_MARGIN = 8  # default max_new_tokens: the answer's own token count plus this much room


class EvalError(LongcpmError, ValueError):
    """A bad eval argument (task, length, seed, mode) or results file."""


def resolve_tasks(tasks: Iterable[str] | str) -> list[str]:
    """Canonical task names from names or short aliases ("all" = every task), in the given order, deduplicated."""
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t.strip()]
    out: list[str] = []
    for t in tasks:
        key = t.strip().lower().replace("-", "_")
        names = list(TASKS) if key == "all" else [ALIASES.get(key.replace("_", ""), ALIASES.get(key, key))]
        for name in names:
            if name not in TASKS:
                raise EvalError(f"unknown task {t!r} (tasks: {', '.join(TASKS)}; aliases: {', '.join(ALIASES)})")
            if name not in out:
                out.append(name)
    if not out:
        raise EvalError("no tasks given")
    return out


def check_seeds(seeds: Iterable[int]) -> list[int]:
    """Seeds as a list, refusing any outside the held-out range (those may have been trained on)."""
    out = list(seeds)
    if not out:
        raise EvalError("no seeds given")
    bad = [s for s in out if isinstance(s, bool) or not isinstance(s, int) or s < EVAL_SEED_START]
    if bad:
        raise EvalError(f"eval seeds must be integers >= {EVAL_SEED_START} (the held-out range training never "
                        f"uses), got {bad[:3]}")
    return out


def _check(lengths, modes, max_new_tokens) -> tuple[list[int], list[str]]:
    lengths = list(lengths)
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in lengths):
        raise EvalError(f"lengths must be positive integers (tokens), got {lengths}")
    modes = [modes] if isinstance(modes, str) else list(modes)
    if not modes or any(m not in MODES for m in modes):
        raise EvalError(f"attention modes must be among {', '.join(MODES)}, got {modes}")
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
        raise EvalError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    return lengths, list(dict.fromkeys(modes))


class Loader:
    """Builds the LLM for one attention mode from a checkpoint. The suite loads one mode at a time, so two KV
    pools never coexist, and an engine never switches mode mid-life. Asking for "sparse" on a checkpoint
    without a sparse_config uses the default SparseConfig (as `longcpm generate --attention sparse` does);
    otherwise sparse would silently run dense. `info` holds what the results metadata needs."""

    def __init__(self, model, *, device=None, dtype=None, attention_modes: Sequence[str] = ("dense", "sparse"),
                 sparse_config="config", max_model_len: int | None = None,
                 max_num_batched_tokens: int | None = None):
        from ..config import ModelConfig, SparseConfig
        from ..models.checkpoint import resolve_model_path

        self.path = resolve_model_path(model)
        self.name = str(model)
        self.sparse_source = "argument" if sparse_config != "config" else "checkpoint"
        if sparse_config == "config" and "sparse" in attention_modes:
            if ModelConfig.from_file(self.path / "config.json").sparse_config is None:
                sparse_config, self.sparse_source = SparseConfig(), "default (the checkpoint has none)"
        self.kw = {"device": device, "dtype": dtype, "sparse_config": sparse_config, "max_model_len": max_model_len}
        if max_num_batched_tokens is not None:  # prefill chunk (the engine's default 8,192 splits long prompts)
            self.kw["max_num_batched_tokens"] = max_num_batched_tokens
        self.info: dict = {}

    def __call__(self, mode: str):
        from ..engine.llm import LLM

        # prefix caching off: a later example must not reuse an earlier one's pages, or its prefill time lies
        llm = LLM(self.path, attention=mode, enable_prefix_caching=False, **self.kw)
        sc = llm.config.sparse_config
        self.info = {"config": llm.config.to_dict(), "sparse_config": sc.to_dict() if sc is not None else None,
                     "sparse_config_source": self.sparse_source if sc is not None else None,
                     "device": str(llm.device), "dtype": str(next(llm.model.parameters()).dtype).removeprefix("torch."),
                     "max_model_len": llm.max_model_len,
                     "max_num_batched_tokens": llm.engine.config.max_num_batched_tokens}
        return llm


def _factory(model, modes, device, dtype, sparse_config):
    """(name, mode -> LLM) from a checkpoint, a factory, or one loaded LLM (then only the mode it was built for)."""
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        loader = Loader(model, device=device, dtype=dtype, attention_modes=modes, sparse_config=sparse_config)
        return loader.name, loader
    if hasattr(model, "generate"):
        built = getattr(getattr(getattr(model, "engine", None), "config", None), "attention", None)
        if len(modes) != 1 or (built is not None and built != modes[0]):
            raise EvalError(f"a loaded LLM runs only the attention mode it was built with ({built or 'unknown'}); "
                            f"pass a checkpoint path or a factory mode -> LLM to compare {', '.join(modes)}")
        return getattr(model, "name", None) or type(model).__name__, lambda mode: model
    if callable(model):
        return getattr(model, "name", None) or "model", model
    raise EvalError(f"model must be a checkpoint path, a loaded LLM or a factory, got {type(model).__name__}")


def mode_used(mode: str, sparse_config, prompt_tokens: int) -> str:
    """The attention the prefill actually runs: no sparse_config means dense whatever was asked."""
    if sparse_config is None or mode == "dense":
        return "dense"
    if mode == "sparse":
        return "sparse"
    return "sparse" if sparse_config.is_sparse(prompt_tokens) else "dense"


def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 3) if xs else None


def _record(model, task, length, mode, details=None, skipped=None) -> dict:
    rec = {"model": model, "task": task, "length": length, "attention": mode}
    if skipped is not None:
        return {**rec, "accuracy": None, "samples": 0, "skipped": skipped}
    n = len(details)
    used = sorted({d["attention_used"] for d in details})
    return {**rec, "accuracy": sum(d["correct"] for d in details) / n, "samples": n,
            "correct": sum(d["correct"] for d in details),
            "partial": round(sum(d["partial"] for d in details) / n, 4),
            "attention_used": used[0] if len(used) == 1 else "mixed",
            "prompt_tokens": round(sum(d["prompt_tokens"] for d in details) / n, 1),
            "prefill_ms": _median([d["prefill_ms"] for d in details]),
            "details": details}


def _run_one(llm, task, ex, mode, max_new_tokens, sparse_config) -> dict:
    """One example, greedy: what a review needs to check its score and timing."""
    from ..engine.sampling_params import SamplingParams

    tok = llm.tokenizer
    ids = tok.encode(ex.prompt)  # BOS once, as the generator sized it
    room = llm.max_model_len - len(ids)  # >= 2: the generator sized prompt + answer + EOS to the length
    want = max_new_tokens or len(tok.encode(ex.answer, add_special_tokens=False)) + ANSWER_MARGIN
    out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=min(want, room)))[0]
    reply = out.outputs[0].text
    exact, partial = score(task, reply, ex.answers)
    m = out.metrics
    return {"seed": ex.seed, "prompt_tokens": len(ids), "correct": bool(exact), "partial": round(partial, 4),
            "reply": reply, "attention_used": mode_used(mode, sparse_config, len(ids)),
            "prefill_ms": round(m.prefill_s * 1e3, 3),
            "decode_ms_per_token": round(m.decode_s * 1e3 / m.decode_steps, 3) if m.decode_steps else None}


def _free() -> None:
    """Return the previous mode's KV pool before the next mode allocates its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_suite(llm_or_path, tasks: Iterable[str] | str = TASKS, lengths: Iterable[int] = (4096,),
              seeds: Iterable[int] | None = None, attention_modes: Sequence[str] | str = ("dense", "sparse"),
              max_new_tokens: int | None = None, device=None, *, dtype=None, sparse_config="config",
              model_name: str | None = None, warmup: bool = True, progress: bool = True) -> list[dict]:
    """One record per (length, task, attention mode), in that order: {"model", "task", "length", "attention",
    "accuracy", "samples", ...}; accuracy None and a "skipped" reason when a length cannot run.

    llm_or_path: a checkpoint folder / name (loaded once per mode, see Loader), a factory mode -> LLM, or a
    loaded LLM (only for the single mode it was built with). seeds default to the first three held-out ones;
    max_new_tokens None gives each example its answer's token count + ANSWER_MARGIN. warmup runs one example
    per mode untimed first (kernel compilation, allocator growth)."""
    tasks = resolve_tasks(tasks)
    seeds = check_seeds(range(EVAL_SEED_START, EVAL_SEED_START + 3) if seeds is None else seeds)
    lengths, modes = _check(lengths, attention_modes, max_new_tokens)
    name, factory = _factory(llm_or_path, modes, device, dtype, sparse_config)
    model_name = model_name or name
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    examples: dict[tuple[str, int], list | str] = {}  # shared by the modes: generated once
    records: list[dict] = []
    for mode in modes:
        say(f"loading {model_name} with attention={mode}")
        llm = factory(mode)
        sparse = getattr(llm.config, "sparse_config", None)
        if sparse is None and mode != "dense":
            say(f"note: the model has no sparse_config, so attention={mode} runs dense")
        warm = not warmup
        enc = ChunkEncoder(llm.tokenizer)  # the tokenizer's ids, faster: sizing an example encodes it many times
        for length in lengths:
            for task in tasks:
                if length > llm.max_model_len:
                    why = f"length {length} exceeds the model's max_model_len {llm.max_model_len}"
                    records.append(_record(model_name, task, length, mode, skipped=why))
                    continue
                if (task, length) not in examples:
                    try:
                        examples[task, length] = [generate(task, length, s, enc) for s in seeds]
                    except ValueError as e:  # below the task's minimum length
                        examples[task, length] = str(e)
                exs = examples[task, length]
                if isinstance(exs, str):
                    records.append(_record(model_name, task, length, mode, skipped=exs))
                    continue
                if not warm:
                    _run_one(llm, task, exs[0], mode, max_new_tokens, sparse)
                    warm = True
                rec = _record(model_name, task, length, mode,
                              [_run_one(llm, task, ex, mode, max_new_tokens, sparse) for ex in exs])
                records.append(rec)
                say(f"{mode:<6} {task:<18} {length:>7}: {rec['correct']}/{rec['samples']} exact, partial "
                    f"{rec['partial']:.2f}, prefill {rec['prefill_ms']:.1f} ms ({rec['attention_used']})")
        del llm
        _free()
    for why in dict.fromkeys(r["skipped"] for r in records if r.get("skipped")):
        say(f"skipped: {why}")
    order = {key: i for i, key in enumerate((n, t, m) for n in lengths for t in tasks for m in modes)}
    return sorted(records, key=lambda r: order[r["length"], r["task"], r["attention"]])
