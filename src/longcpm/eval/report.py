"""Turn suite records into the dense-vs-sparse table and the results JSON that docs/quality.md and reviews read.

The JSON keeps every record (with its per-example details) next to the metadata needed to rerun it exactly:
model, config, sparse_config, seeds, lengths and versions. The table is Markdown, so it pastes into the docs.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

from ..train.synthetic import SUITE_VERSION
from .scoring import RULES
from .suite import EvalError

SCHEMA = "longcpm.eval/1"
LONG = 16384  # the target is stated over lengths >= 16K
REQUIRED = ("model", "task", "length", "attention", "accuracy", "samples")


def length_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _ordered(records, key) -> list:
    return list(dict.fromkeys(r[key] for r in records))


def timing(records: list[dict]) -> list[dict]:
    """Per (length, attention): median prefill ms over every example of every task, and the mode that ran."""
    out = []
    for length in _ordered(records, "length"):
        for mode in _ordered(records, "attention"):
            details = [d for r in records if r["length"] == length and r["attention"] == mode
                       for d in r.get("details") or []]
            if not details:
                continue
            used = sorted({d["attention_used"] for d in details})
            decode = [d["decode_ms_per_token"] for d in details if d.get("decode_ms_per_token") is not None]
            out.append({"length": length, "attention": mode, "attention_used": used[0] if len(used) == 1 else "mixed",
                        "samples": len(details),
                        "prompt_tokens": round(statistics.mean(d["prompt_tokens"] for d in details), 1),
                        "prefill_ms": round(statistics.median(d["prefill_ms"] for d in details), 3),
                        "decode_ms_per_token": round(statistics.median(decode), 3) if decode else None})
    return out


def summary(records: list[dict], min_length: int = LONG) -> dict:
    """Mean accuracy per mode over (task, length >= min_length) cells that ran in both dense and sparse, and
    sparse / dense: the issue's target is ratio >= 0.99 with dense >= 0.80."""
    cells: dict[tuple, dict[str, float]] = {}
    for r in records:
        if r["length"] >= min_length and r["accuracy"] is not None:
            cells.setdefault((r["task"], r["length"]), {})[r["attention"]] = r["accuracy"]
    both = [c for c in cells.values() if "dense" in c and "sparse" in c]
    out = {"min_length": min_length, "cells": len(both), "dense": None, "sparse": None, "ratio": None}
    if both:
        out["dense"] = statistics.mean(c["dense"] for c in both)
        out["sparse"] = statistics.mean(c["sparse"] for c in both)
        out["ratio"] = out["sparse"] / out["dense"] if out["dense"] > 0 else None
    return out


def _pct(x) -> str:
    return "skip" if x is None else f"{100 * x:.1f}"


def format_table(records: list[dict], metadata: dict | None = None, timing_rows: list[dict] | None = None) -> str:
    """Tasks x lengths, attention modes side by side, then the task average, examples per cell, prefill time
    (from timing_rows when given) and what ran."""
    if not records:
        return "(no results)"
    lengths, modes, tasks = (_ordered(records, k) for k in ("length", "attention", "task"))
    cell = {(r["task"], r["length"], r["attention"]): r for r in records}
    cols = [(n, m) for n in lengths for m in modes]
    head = ["task"] + [f"{length_label(n)} {m}" for n, m in cols]
    rows = []
    for t in tasks:
        rows.append([t] + [_pct(cell[(t, n, m)]["accuracy"]) if (t, n, m) in cell else "-" for n, m in cols])
    avg = []
    for n, m in cols:
        accs = [cell[(t, n, m)]["accuracy"] for t in tasks if (t, n, m) in cell]
        accs = [a for a in accs if a is not None]
        avg.append(_pct(statistics.mean(accs)) if accs else "skip")
    rows.append(["average"] + avg)
    counts = []
    for n, m in cols:
        ns = sorted({cell[(t, n, m)]["samples"] for t in tasks if (t, n, m) in cell})
        counts.append("-" if not ns else str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}")
    rows.append(["examples per task"] + counts)
    tim = {(x["length"], x["attention"]): x for x in (timing(records) if timing_rows is None else timing_rows)}
    rows.append(["prefill ms (median)"] + [f"{tim[c]['prefill_ms']:.1f}" if c in tim else "-" for c in cols])
    rows.append(["attention used"] + [tim[c]["attention_used"] if c in tim else "-" for c in cols])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]

    def line(cells):
        padded = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "| " + " | ".join(padded) + " |"

    out = []
    if metadata:
        seeds = metadata.get("seeds") or []
        span = f"{seeds[0]}..{seeds[-1]}" if seeds else "?"
        out.append(f"model: {metadata.get('model')} | seeds: {len(seeds)} ({span}) | device {metadata.get('device')} "
                   f"| dtype {metadata.get('dtype')}")
    out.append("exact-match accuracy (%) per task and length; prefill ms is the whole-model prefill of one example")
    out += [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows]
    s = summary(records)
    if s["cells"]:
        ratio = "n/a (dense 0)" if s["ratio"] is None else f"{s['ratio']:.3f}"
        out.append(f"lengths >= {length_label(LONG)} ({s['cells']} task-length cells): dense {_pct(s['dense'])}%, "
                   f"sparse {_pct(s['sparse'])}%, sparse/dense {ratio} (target >= 0.99 with dense >= 80%)")
    else:
        out.append(f"lengths >= {length_label(LONG)}: no task-length cell ran in both dense and sparse")
    reasons = _ordered([r for r in records if r.get("skipped")], "skipped")
    out += [f"skipped: {why}" for why in reasons]
    return "\n".join(out)


def metadata(model, info: dict, *, tasks, lengths, seeds, attention_modes, max_new_tokens) -> dict:
    """Everything needed to rerun a results file: the model and its exact config (info: suite.Loader.info),
    the suite's arguments, the scoring rules and the versions."""
    import torch

    import longcpm

    return {"model": str(model), **info, "suite": SUITE_VERSION, "tasks": list(tasks), "lengths": list(lengths), "seeds": list(seeds),
            "attention_modes": list(attention_modes), "max_new_tokens": max_new_tokens,
            "scoring": dict(RULES), "decoding": "greedy, one example per batch, prefix caching off",
            "versions": {"longcpm": longcpm.__version__, "torch": torch.__version__,
                         "python": platform.python_version()},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_json(path, records: list[dict], meta: dict, timing_rows: list[dict] | None = None) -> Path:
    """{"schema", "metadata", "records", "timing", "summary"}; written whole, then renamed into place. timing_rows
    replace the timing computed from the records (see timing_from; the metadata should say where they came from)."""
    path = Path(path)
    rows = timing(records) if timing_rows is None else timing_rows
    doc = {"schema": SCHEMA, "metadata": meta, "records": records, "timing": rows,
           "summary": summary(records)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def load_json(path) -> dict:
    """A results file, checked to hold records in the reviewed format."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvalError(f"cannot read results file {path}: {e}") from None
    recs = doc.get("records") if isinstance(doc, dict) else None
    if not isinstance(recs, list) or not all(isinstance(r, dict) and all(k in r for k in REQUIRED) for r in recs):
        raise EvalError(f"{path}: not a longcpm eval results file (needs records with {', '.join(REQUIRED)})")
    return doc


# metadata that must agree for two results files to be one table (modes, lengths, seeds and run facts may differ)
_SAME = ("model", "config", "sparse_config", "dtype", "suite", "tasks", "max_new_tokens")


def _pool(model, task, length, mode, parts: list[dict], paths: list[str]) -> dict:
    """One record from several files' records of one cell: their examples together, when no seed repeats."""
    from .suite import _record

    if any(r.get("skipped") or not r.get("details") for r in parts):
        raise EvalError(f"{' and '.join(paths)} both hold {task} at {length} ({mode}), and one of them has no "
                        f"examples to pool")
    seen: dict[int, str] = {}
    for r, p in zip(parts, paths):
        for d in r["details"]:
            if d["seed"] in seen:
                raise EvalError(f"{p} and {seen[d['seed']]} both hold {task} at {length} ({mode}) for seed "
                                f"{d['seed']}: not one experiment")
            seen[d["seed"]] = p
    details = sorted((d for r in parts for d in r["details"]), key=lambda d: d["seed"])
    return _record(model, task, length, mode, details)


def merge(paths) -> tuple[list[dict], dict]:
    """(records, metadata) of several results files of one model and suite, run in separate processes: one per
    attention mode (so each mode's timings are its own), per length, or per seed range. A cell that several files
    hold is pooled (its examples together) when their seeds differ. Files that differ in model, config, tasks or
    decoding, or that repeat a seed in a cell, are refused: a merged table must be one experiment."""
    docs = [(str(p), load_json(p)) for p in paths]
    if len(docs) < 2:
        raise EvalError("merge needs at least two results files")
    first_path, first = docs[0]
    base = first.get("metadata") or {}
    cells: dict[tuple, list[tuple[str, dict]]] = {}
    for path, doc in docs:
        meta = doc.get("metadata") or {}
        bad = [k for k in _SAME if meta.get(k) != base.get(k)]
        if bad:
            raise EvalError(f"{path} differs from {first_path} in {', '.join(bad)}: not one experiment")
        for r in doc["records"]:
            cells.setdefault((r["task"], r["length"], r["attention"]), []).append((path, r))
    records = [parts[0][1] if len(parts) == 1 else
               _pool(parts[0][1]["model"], *key, [r for _, r in parts], [p for p, _ in parts])
               for key, parts in cells.items()]
    modes = list(dict.fromkeys(m for _, d in docs for m in d["metadata"].get("attention_modes", [])))
    lengths = sorted({n for _, d in docs for n in d["metadata"].get("lengths") or []} | {r["length"] for r in records})
    seeds = sorted({s for _, d in docs for s in d["metadata"].get("seeds") or []})
    tasks = base.get("tasks") or []
    rank = {(n, t, m): i for i, (n, t, m) in enumerate((n, t, m) for n in lengths for t in tasks for m in modes)}
    records.sort(key=lambda r: rank.get((r["length"], r["task"], r["attention"]), len(rank)))
    meta = {**base, "attention_modes": modes, "lengths": lengths, "seeds": seeds,
            "merged_from": [{"file": p, "attention_modes": d["metadata"].get("attention_modes"),
                             "lengths": d["metadata"].get("lengths"), "seeds": _span(d["metadata"].get("seeds")),
                             "device": d["metadata"].get("device"), "versions": d["metadata"].get("versions"),
                             "created": d["metadata"].get("created")} for p, d in docs]}
    return records, meta


def _span(seeds) -> list | None:
    """[first, last] of a contiguous seed list (the CLI's), else the list itself."""
    if not seeds:
        return None
    return [seeds[0], seeds[-1]] if list(seeds) == list(range(seeds[0], seeds[-1] + 1)) else list(seeds)


def timing_from(path, meta: dict) -> tuple[list[dict], dict]:
    """(timing rows, provenance) from a results file of the same model and config: for a table whose accuracy runs
    shared the GPU (benchmarks/quality_parallel_h200.sh) and whose times come from a run alone on it."""
    doc = load_json(path)
    other = doc.get("metadata") or {}
    bad = [k for k in ("model", "config", "sparse_config", "dtype", "suite") if other.get(k) != meta.get(k)]
    if bad:
        raise EvalError(f"timing file {path} differs from the merged results in {', '.join(bad)}")
    return timing(doc["records"]), {"file": str(path), "seeds": _span(other.get("seeds")),
                                    "lengths": other.get("lengths"), "device": other.get("device"),
                                    "created": other.get("created")}
